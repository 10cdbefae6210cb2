#!/usr/bin/env python
"""Fine-tune a causal language model (GPT-2 style) with an adapter, or fully, on a text dataset.

The command line follows the Hugging Face / AdapterHub `run_clm.py` examples flag for flag, for example:

    python run_clm.py --model_name_or_path gpt2 --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 \
        --do_train --do_eval --output_dir /tmp/test-clm --train_adapter --adapter_config seq_bn

Local files work the same way offline (`--train_file`, `--validation_file`, or a folder as `--dataset_name`).
Run `python run_clm.py --help` for every flag. Perplexity and next-token accuracy land in
`<output_dir>/all_results.json`; the trained adapter in `<output_dir>/<adapter_name>/`.
"""

import logging
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import torch
from transformers import AutoModelForCausalLM, default_data_collator, set_seed

from lmtune.adapter_setup import check_adapter_options, setup_adapter
from lmtune.arguments import AdapterGroupArguments, DataArguments, parse_command_line
from lmtune.checks import check_arguments
from lmtune.data import apply_max_samples, concatenate_and_cut, load_raw_datasets, token_stream, tokenize_and_group
from lmtune.errors import UsageError, run_from_command_line
from lmtune.hub import publish
from lmtune.lean_loss import CAUSAL
from lmtune.logs import setup_logging
from lmtune.merge import write_merged_model
from lmtune.metrics import SlidingWindow
from lmtune.modeling import example_length, load_config, load_model, load_tokenizer
from lmtune.objective import Objective
from lmtune.output_dir import (
    check_nothing_in_the_way,
    check_resume_checkpoint,
    claimed_output_dir,
    detect_last_checkpoint,
)
from lmtune.peft_export import write_peft_adapter
from lmtune.reporting import Written, plot_training_curves, print_summary
from lmtune.samples import write_samples
from lmtune.training import add_early_stopping, build_trainer, evaluate, train
from lmtune.trial_step import check_adapter_trains

logger = logging.getLogger(__name__)

# Samples: a prompt is continued by this many tokens, greedily.
SAMPLE_NEW_TOKENS = 24


@dataclass
class CausalDataArguments(DataArguments):
    """Which data to train and evaluate on, and how to cut it into blocks."""

    block_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "Length in tokens of each training example after the texts are concatenated. Default: the "
            "smallest of 1024 and the model's and tokenizer's length limits; larger values are clamped to them."
        },
    )
    keep_linebreaks: bool = field(
        default=True, metadata={"help": "Keep the line breaks at the end of each line of .txt files."}
    )
    eval_stride: Optional[int] = field(
        default=None,
        metadata={
            "help": "Also evaluate with a sliding window, as papers and the Hugging Face perplexity guide do: windows "
            "of --block_size tokens moved by this many tokens over all the validation texts concatenated, each "
            "scoring the tokens the previous one did not, so that every token is predicted with at least block size "
            "- stride tokens of context. Adds eval_strided_loss and strided_perplexity to the eval metrics; between "
            "1 (most context, one window per token) and the block size (the blocks of the plain evaluation); it costs "
            "about block size / stride times the plain evaluation."
        },
    )

    def check_own_flags(self, training_args):
        if self.block_size is not None and self.block_size < 2:
            raise UsageError(
                f"--block_size {self.block_size} leaves no token to predict: a block needs at least 2 tokens, one "
                "to read and one to predict; leave it out for the model's length."
            )
        self.check_eval_stride(self.block_size)
        if self.eval_stride is not None and not training_args.do_eval:
            raise UsageError("--eval_stride evaluates the validation data with a sliding window: add --do_eval.")

    def check_eval_stride(self, block_size):
        """Refuse a stride outside 1 to the block size; checked again once the block size is known."""
        if self.eval_stride is None:
            return
        if self.eval_stride < 1:
            raise UsageError(f"--eval_stride {self.eval_stride} must be at least 1 token; leave it out for block "
                             "evaluation alone.")
        if block_size is not None and self.eval_stride > block_size:
            raise UsageError(
                f"--eval_stride {self.eval_stride} is more than the block size of {block_size} tokens and would skip "
                f"tokens; pass at most {block_size} (and less for more context)."
            )

    def text_file_options(self):
        return {"keep_linebreaks": self.keep_linebreaks}


@dataclass
class CausalAdapterArguments(AdapterGroupArguments):
    adapter_name: str = field(default="clm", metadata={"help": AdapterGroupArguments.ADAPTER_NAME_HELP})


def parse_arguments(argv):
    return parse_command_line(argv, CausalDataArguments, CausalAdapterArguments)


def tokenize(tokenizer, examples):
    # verbose=False: texts longer than the model's limit are expected, grouping cuts them into blocks afterwards.
    # No attention mask: group_texts makes it.
    return tokenizer(examples["text"], return_attention_mask=False, verbose=False)


def preprocess(raw_datasets, tokenizer, block_size, data_args, training_args):
    """Tokenize the texts, concatenate them and cut them into blocks of block_size tokens with labels = inputs."""
    return tokenize_and_group(raw_datasets, partial(tokenize, tokenizer), group_texts, block_size, data_args,
                              training_args, fix="pass a smaller --block_size or more data")


def group_texts(batch, block_size):
    """The blocks of concatenate_and_cut, with labels: the input ids (the model shifts them), except -100 for each
    block's first token. No position predicts it, and the Trainer divides the summed loss by the number of labels
    other than -100, which must be the number of predicted tokens."""
    blocks = concatenate_and_cut(batch, block_size)
    labels = pc.list_flatten(blocks.column("input_ids")).to_numpy().copy()
    labels[::block_size] = -100
    return blocks.append_column("labels", pa.FixedSizeListArray.from_arrays(labels, block_size))


def validation_windows(raw_datasets, tokenizer, block_size, data_args, training_args):
    """With --eval_stride, what the sliding windows read: the validation texts tokenized as preprocess does and all
    concatenated into one stream (where blocks are cut from each batch of 1000 texts on its own). With
    --max_eval_samples N, the stream's first N * block_size tokens: the tokens of the N blocks evaluated, exactly so
    where those come from the first 1000 texts."""
    if data_args.eval_stride is None:
        return None
    data_args.check_eval_stride(block_size)
    limit = None if data_args.max_eval_samples is None else data_args.max_eval_samples * block_size
    token_ids = token_stream(raw_datasets["validation"], partial(tokenize, tokenizer), limit)
    return SlidingWindow(token_ids, block_size, data_args.eval_stride)


class CausalLanguageModeling(Objective):
    """Predict each token from the ones before it; samples continue a prompt greedily."""

    script_name = Path(__file__).name
    auto_class = AutoModelForCausalLM
    loss_type = "ForCausalLM"
    hub_task = "text-generation"
    peft_task_type = "CAUSAL_LM"
    lean_loss_kind = CAUSAL
    label_offset = 1  # the logits at position i predict the token at position i + 1
    length_flag = "--block_size"

    def own_collator(self, tokenizer, data_args, training_args):
        return default_data_collator

    def sample_prompt(self, tokenizer, text, max_length):
        """The prompt's last tokens that leave room to continue it within max_length; the record shows what is
        kept."""
        new_tokens = min(SAMPLE_NEW_TOKENS, max_length // 2)
        # verbose=False: a prompt longer than the model's limit is expected, only its last tokens are kept.
        ids = tokenizer(text, verbose=False)["input_ids"][-(max_length - new_tokens):]
        return {"prompt": tokenizer.decode(ids, skip_special_tokens=True)}, (ids, new_tokens)

    def complete_sample(self, model, tokenizer, prompt):
        ids, new_tokens = prompt
        input_ids = torch.tensor([ids], device=model.device)
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        return tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)


def main(argv=None):
    model_args, data_args, training_args, adapter_args, evaluation_args = parse_arguments(argv)
    setup_logging(training_args, logger)
    objective = CausalLanguageModeling(model_args.lean_loss)
    check_arguments(model_args, data_args, training_args, adapter_args, evaluation_args)
    with claimed_output_dir(training_args):
        last_checkpoint = detect_last_checkpoint(training_args)
        check_resume_checkpoint(last_checkpoint, training_args, adapter_args)
        check_nothing_in_the_way(training_args, adapter_args, evaluation_args)
        set_seed(training_args.seed)

        config = load_config(model_args)
        tokenizer = load_tokenizer(model_args)
        raw_datasets = load_raw_datasets(model_args, data_args, training_args)
        model = load_model(model_args, config, tokenizer, objective.auto_class, objective.loss_type)
        setup_adapter(model, adapter_args)
        check_adapter_options(model, model_args, adapter_args)
        data_collator = objective.make_collator(tokenizer, model, data_args, training_args)
        check_adapter_trains(model, tokenizer, data_collator, model_args, training_args, adapter_args)

        block_size = example_length("--block_size", data_args.block_size, tokenizer, config)
        sliding_window = validation_windows(raw_datasets, tokenizer, block_size, data_args, training_args)
        lm_datasets = preprocess(raw_datasets, tokenizer, block_size, data_args, training_args)
        train_dataset, eval_dataset = apply_max_samples(lm_datasets, data_args)
        trainer = build_trainer(objective, model, tokenizer, train_dataset, eval_dataset, training_args, adapter_args)
        add_early_stopping(trainer, evaluation_args)

        metrics = {}
        if training_args.do_train:
            metrics.update(train(trainer, train_dataset, last_checkpoint, training_args))
        if training_args.do_eval:
            metrics.update(evaluate(trainer, eval_dataset, sliding_window))
        samples = write_samples(objective, trainer, tokenizer, raw_datasets, block_size, evaluation_args, adapter_args)
        merged = write_merged_model(trainer.model, tokenizer, model_args, training_args, adapter_args)
        peft = write_peft_adapter(objective, trainer.model, model_args, training_args, adapter_args)
        publish(objective, trainer, model_args, data_args)
        curves = plot_training_curves(trainer, training_args)
        print_summary(trainer, metrics, block_size, Written(samples, merged, peft, curves), adapter_args)
    return metrics


def _mp_fn(index):
    # Entry point for TPU spawners such as xla_spawn.py: the same one-line errors as the command line.
    status = cli()
    if status:
        sys.exit(status)


def cli(argv=None):
    return run_from_command_line(main, argv, Path(__file__).name)


if __name__ == "__main__":
    sys.exit(cli())
