"""Samples: what the model writes on a few prompts, the base model (adapters off) beside the adapted one."""

import json
import logging
from pathlib import Path

import torch

from lmtune.adapter_setup import adapters_off
from lmtune.arguments import uses_adapter
from lmtune.data import read_prompts
from lmtune.modeling import sharded
from lmtune.output_dir import writing

logger = logging.getLogger(__name__)


# Samples: a validation text is cut to its first tokens to make a prompt.
SAMPLE_PROMPT_TOKENS = 16


def write_samples(objective, trainer, tokenizer, raw_datasets, max_length, evaluation_args, adapter_args):
    """Show what the model now does on a few prompts, the base model (adapters off) beside the adapted one, and
    write them to <output_dir>/samples.jsonl. Greedy and without dropout: the same model gives the same samples.
    The objective makes each prompt and the model's answer to it."""
    if evaluation_args.num_samples == 0:
        return None
    if sharded(trainer.model):  # generating on the main process alone would wait for the others forever
        logger.warning("No samples: the model is sharded over the processes (FSDP or DeepSpeed ZeRO-3); evaluate the "
                       "saved adapter in one process (--load_adapter DIR --do_eval) to see them.")
        return None
    if trainer.args.device.type == "xla":
        logger.warning("No samples on XLA (TPUs): generating compiles a graph for every new token; evaluate the saved "
                       "adapter on a CPU or GPU (--load_adapter DIR --do_eval) to see them.")
        return None
    if not trainer.is_world_process_zero():
        return None
    texts = sample_texts(raw_datasets, tokenizer, evaluation_args)
    if not texts:
        return None
    model = trainer.model
    records, prompts = zip(*(objective.sample_prompt(tokenizer, text, max_length) for text in texts))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if uses_adapter(adapter_args):
            with adapters_off(model):
                outputs = {"base": [objective.complete_sample(model, tokenizer, prompt) for prompt in prompts]}
            outputs["adapted"] = [objective.complete_sample(model, tokenizer, prompt) for prompt in prompts]
        else:
            outputs = {"output": [objective.complete_sample(model, tokenizer, prompt) for prompt in prompts]}
    model.train(was_training)
    samples = [{**record, **{key: values[index] for key, values in outputs.items()}}
               for index, record in enumerate(records)]
    path = Path(trainer.args.output_dir) / "samples.jsonl"
    with writing("the samples", trainer.args):
        path.write_text("".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples))
    return path, samples


def sample_texts(raw_datasets, tokenizer, evaluation_args):
    """The prompts of --sample_prompts, or else the beginnings of the first validation texts."""
    count = evaluation_args.num_samples
    if evaluation_args.sample_prompts is not None:
        return read_prompts(evaluation_args.sample_prompts)[:count]
    validation = raw_datasets.get("validation")
    if validation is None:
        return []
    texts = []
    for example in validation:
        text = example["text"].strip()
        if text:
            # verbose=False: a text longer than the model's limit is expected, only its first tokens are kept.
            beginning = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:SAMPLE_PROMPT_TOKENS]
            texts.append(tokenizer.decode(beginning))
        if len(texts) == count:
            break
    return texts
