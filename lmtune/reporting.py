"""What a run reports and writes besides the Trainer's files: samples of the model's output, the merged model, the
model card and hub push, the plot of the training curves and the closing summary."""

import copy
import json
import logging
import math
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from adapters.loading import AdapterLoader

from lmtune.adapter_setup import adapters_off, half_precision_autocast, init_adapters, reads_tuple_cache
from lmtune.arguments import quantizes, uses_adapter
from lmtune.data import read_prompts
from lmtune.errors import shorten
from lmtune.hardware import bf16_tip
from lmtune.metrics import perplexity
from lmtune.modeling import load_config, load_model, sharded
from lmtune.output_dir import writing
from lmtune.training import save_adapter_files

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


def write_merged_model(model, tokenizer, model_args, training_args, adapter_args):
    """With --merge_adapter, write <output_dir>/merged/: the model with the adapter folded into its weights as a plain
    transformers model, and the tokenizer. It must give the adapter model's logits on a sentence to be written."""
    if not (adapter_args.merge_adapter and training_args.should_save):
        return None
    adapter_model = copy_to_merge(model, tokenizer, model_args, adapter_args)
    adapter_model.eval()
    inputs = tokenizer("A merged model must say what the adapter says.", return_tensors="pt").to(adapter_model.device)
    # Both models compute in the base model's dtype, the merged one's: in half precision the float32 adapter runs
    # under autocast, as it trained.
    with torch.no_grad(), half_precision_autocast(adapter_model):
        expected = adapter_model(**inputs).logits.float()
    adapter_model.merge_adapter(adapter_args.adapter_name)
    merged = plain_model(adapter_model)
    del adapter_model
    merged.eval()
    with torch.no_grad(), half_precision_autocast(merged):
        difference = (merged(**inputs).logits.float() - expected).abs().max().item()
    # Folded weights are rounded to the dtype and change the order of floating-point sums: a few units of its
    # precision, relative to the logits. A forgotten or misplaced weight change is far larger.
    tolerance = max(1e-4, 4 * torch.finfo(merged.dtype).eps) * max(1.0, expected.abs().max().item())
    if difference > tolerance:
        raise RuntimeError(
            f"The merged model's logits differ from the adapter model's by {difference:.3g}, more than "
            f"{tolerance:.3g}; it was not written. The adapter itself is saved; please report this with the "
            "--adapter_config used."
        )
    folder = Path(training_args.output_dir) / "merged"
    with writing("the merged model", training_args):
        merged.save_pretrained(folder, safe_serialization=training_args.save_safetensors)
        tokenizer.save_pretrained(folder)
    return folder


def copy_to_merge(model, tokenizer, model_args, adapter_args):
    """A copy of the model with its adapter, to merge while the trained model stays as it is. A quantized model's
    base is reloaded in full precision instead, with the trained adapter on top: merged into 4-bit or 8-bit weights,
    the adapter's change would be rounded away."""
    if not quantizes(model_args):
        return copy.deepcopy(model)
    full_precision = replace(model_args, load_in_4bit=False, load_in_8bit=False)
    base = load_model(full_precision, load_config(full_precision), tokenizer, plain_class(model), model.loss_type)
    init_adapters(base, adapter_args)
    with tempfile.TemporaryDirectory() as folder:
        save_adapter_files(model, Path(folder), adapter_args.adapter_name, use_safetensors=True)
        base.load_adapter(folder, load_as=adapter_args.adapter_name, with_head=False, use_safetensors=True,
                          set_active=True)
    return base


def plain_model(model):
    """The weights of a model with adapters, without the adapters' own, in a model of its plain transformers class."""
    model_class = plain_class(model)
    with torch.device("meta"):  # only the names of its weights are needed: nothing is allocated
        names = model_class(model.config).state_dict().keys()
    state_dict = model.state_dict()
    # Built where the adapter model is, in its dtype: from_pretrained would put every weight on the CPU, away from
    # the inputs that the merged model is compared on.
    plain = model_class.from_pretrained(
        None, config=model.config, state_dict={name: state_dict[name] for name in names}, dtype=model.dtype,
        device_map={"": model.device},
    )
    if reads_tuple_cache(model):  # init_adapters turned the cache off for adapters' layers; transformers' read it
        plain.config.use_cache = plain.generation_config.use_cache = True
    return plain


def plain_class(model):
    # adapters.init swaps the model's class for a subclass with adapters' mixins: the first class up the hierarchy
    # that comes from transformers is the plain one.
    return next(cls for cls in type(model).__mro__ if cls.__module__.startswith("transformers."))


def publish(objective, trainer, model_args, data_args):
    """Write a model card for the objective's task (a hub pipeline tag), and push to the hub when --push_to_hub asks
    for it."""
    card = {"finetuned_from": model_args.model_name_or_path, "tasks": objective.hub_task}
    if data_args.dataset_name is not None:
        card["dataset_tags"] = data_args.dataset_name
        card["dataset"] = " ".join(filter(None, [data_args.dataset_name, data_args.dataset_config_name]))
    if trainer.args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        with writing("the model card", trainer.args):
            trainer.create_model_card(**card)


def plot_training_curves(trainer, training_args):
    """Draw the losses, and eval perplexity and accuracy, against steps into training_curves.png.

    Returns the line for the summary: the plot's path, or why there is none; None for a run that trained nothing.
    """
    if not (training_args.do_train and trainer.is_world_process_zero()):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: works without a display
        import matplotlib.pyplot as plt
    except ImportError:
        return "not drawn: matplotlib is missing (pip install matplotlib)"
    history = trainer.state.log_history
    train_points = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    # The final evaluation repeats the last periodic one when both fall on the last step.
    evaluations = list({entry["step"]: entry for entry in history if "eval_loss" in entry}.values())
    curves = len(evaluations) > 1
    figure, axes = plt.subplots(1, 3 if curves else 1, figsize=(15, 4) if curves else (7, 4), squeeze=False)
    loss_axes = axes[0][0]
    if train_points:
        loss_axes.plot(*zip(*train_points), label="train loss")
    if curves:
        draw_evaluation_curves(loss_axes, *axes[0][1:], evaluations)
    elif evaluations:
        write_final_evaluation(loss_axes, evaluations[0])
    loss_axes.set(xlabel="step", ylabel="loss", title="Loss")
    if train_points or curves:  # a run shorter than --logging_steps logs no loss
        loss_axes.legend(loc="best" if curves else "lower left")  # a falling loss leaves the corners free
    for subplot in axes[0]:
        subplot.grid(alpha=0.3)
    figure.suptitle(str(training_args.output_dir))
    figure.tight_layout()
    path = Path(training_args.output_dir) / "training_curves.png"
    try:
        with writing("the plot of the training curves", training_args):
            figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)
    return str(path)


def draw_evaluation_curves(loss_axes, perplexity_axes, accuracy_axes, evaluations):
    steps = [entry["step"] for entry in evaluations]
    loss_axes.plot(steps, [entry["eval_loss"] for entry in evaluations], "o-", label="eval loss")
    perplexity_axes.plot(steps, [perplexity(entry["eval_loss"]) for entry in evaluations], "o-", color="tab:orange")
    perplexity_axes.set(xlabel="step", ylabel="perplexity", title="Eval perplexity")
    # --prediction_loss_only evaluates the loss alone: no accuracy to draw.
    accuracy_axes.plot(steps, [entry.get("eval_accuracy", math.nan) for entry in evaluations], "o-",
                       color="tab:green")
    accuracy_axes.set(xlabel="step", ylabel="accuracy", title="Eval accuracy")


def write_final_evaluation(loss_axes, final):
    """The figures of a run's only evaluation, written on its loss plot, with how to get curves instead."""
    loss_axes.text(
        0.97, 0.95,
        f"eval at step {final['step']}: loss {final['eval_loss']:.3f},\n{evaluation_figures(final)}\n"
        "(--eval_strategy steps --eval_steps N\ndraws eval curves)",
        transform=loss_axes.transAxes, ha="right", va="top", multialignment="left",
        bbox={"facecolor": "white", "alpha": 0.8},
    )


class Written(NamedTuple):
    """What a run wrote besides the Trainer's files, for the summary: each None where it wrote none."""

    samples: Optional[tuple]  # (path, records)
    merged: Optional[Path]
    peft: Optional[Path]
    curves: Optional[str]  # the plot's path, or why there is none


def print_summary(trainer, metrics, tokens_per_example, written, adapter_args):
    """End the run with what a user looks for first: what was trained, how fast, how well, and where it went."""
    if not trainer.is_world_process_zero():
        return
    training_args = trainer.args
    samples, merged, peft, curves = written
    if training_args.do_train:
        lines = training_summary(trainer.model, metrics, tokens_per_example, training_args, adapter_args)
    else:
        lines = [evaluated_model_summary(trainer.model, adapter_args)]
    if training_args.do_eval:
        lines.append(evaluation_summary(trainer, metrics, tokens_per_example, training_args))
    # Only what is there: transformers' save_pretrained logs an error and returns where its folder is a file.
    if merged is not None and weight_files(merged):
        lines.append(f"merged model: {merged} ({megabytes(weight_files(merged))})")
    if peft is not None and weight_files(peft):
        lines.append(f"PEFT adapter: {peft} ({megabytes(weight_files(peft))})")
    if curves is not None:
        lines.append(f"training curves: {curves}")
    if samples is not None:
        path, records = samples
        lines.append(f"samples (greedy): {path}")
        for record in records:
            width = max(map(len, record)) + 1
            lines += [f"  {key + ':':{width}} {shorten(json.dumps(text, ensure_ascii=False), 100)}"
                      for key, text in record.items()]
    tip = bf16_tip(training_args)
    if tip:
        lines.append(tip)
    print("\n".join(["***** summary *****", *(f"  {line}" for line in lines)]), flush=True)


def weight_count(parameter):
    """How many weights a parameter stands for: all of a DeepSpeed ZeRO-3 partition (ds_numel), and of a 4-bit one,
    which bitsandbytes packs two to a byte (its quant_state keeps the shape it was quantized from)."""
    if hasattr(parameter, "ds_numel"):
        return parameter.ds_numel
    quant_state = getattr(parameter, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else parameter.numel()


def parameter_count(model, trainable_only=False):
    return sum(weight_count(parameter) for parameter in model.parameters()
               if parameter.requires_grad or not trainable_only)


def training_summary(model, metrics, tokens_per_example, training_args, adapter_args):
    trainable = parameter_count(model, trainable_only=True)
    total = parameter_count(model)
    output_dir = Path(training_args.output_dir)
    if adapter_args.train_adapter:
        saved = output_dir / adapter_args.adapter_name
        files = adapter_files(saved)
    else:
        saved = output_dir
        files = weight_files(output_dir)
    if "train_samples_per_second" in metrics:
        throughput = f"{metrics['train_samples_per_second']:.1f} samples/s"
        if tokens_per_example:
            throughput += f", {metrics['train_samples_per_second'] * tokens_per_example:,.0f} tokens/s"
        training = f"training: {metrics['train_runtime']:.1f} s ({throughput})"
    else:  # LanguageModelingTrainer.train leaves the throughput out
        training = "training: none left to do, the checkpoint resumed from is at the last step"
    return [
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)",
        training,
        f"saved {'adapter' if adapter_args.train_adapter else 'model'}: {saved} ({megabytes(files)})",
    ]


def evaluation_summary(trainer, metrics, tokens_per_example, training_args):
    line = f"evaluation: {metrics['eval_runtime']:.1f} s, {evaluation_figures(metrics, tokens_per_example)}"
    if training_args.do_train and training_args.eval_on_start:
        start = next(entry for entry in trainer.state.log_history if "eval_loss" in entry)
        line += f" (before training: {evaluation_figures(start)})"
    return line


def evaluation_figures(metrics, tokens_per_example=None):
    """Perplexity and accuracy of an evaluation; --prediction_loss_only computes no accuracy. With run_clm.py's
    --eval_stride, the perplexity over sliding windows of tokens_per_example tokens beside the blocks' own."""
    figures = f"perplexity {perplexity(metrics['eval_loss']):.2f}"
    if "strided_perplexity" in metrics:
        figures += (f" (sliding window of {tokens_per_example} by {metrics['eval_stride']}: "
                    f"{metrics['strided_perplexity']:.2f})")
    if "eval_accuracy" in metrics:
        figures += f", accuracy {metrics['eval_accuracy']:.4f}"
    return figures


def evaluated_model_summary(model, adapter_args):
    total = parameter_count(model)
    line = f"model: frozen, nothing trained: {total:,} parameters evaluated"
    if not uses_adapter(adapter_args):
        return line + " as loaded"
    belongs_to_adapter = AdapterLoader(model).filter_func(adapter_args.adapter_name)
    in_adapter = sum(weight_count(parameter) for name, parameter in model.named_parameters()
                     if belongs_to_adapter(name))
    line += f", {in_adapter:,} ({100 * in_adapter / total:.2f}%) of them in adapter {adapter_args.adapter_name}"
    if adapter_args.load_adapter and os.path.isdir(adapter_args.load_adapter):
        files = adapter_files(Path(adapter_args.load_adapter))
        line += f" ({adapter_args.load_adapter}, {megabytes(files)})"
    return line


def adapter_files(folder):
    """The files of a saved adapter, its weights counted once: pytorch_adapter.bin beside adapter.safetensors holds
    the same weights, for adapters' default loader."""
    files = [path for path in folder.rglob("*") if path.is_file()]
    if (folder / "adapter.safetensors").is_file():
        files = [path for path in files if path != folder / "pytorch_adapter.bin"]
    return files


def weight_files(folder):
    return [*folder.glob("*.safetensors"), *folder.glob("*.bin")]


def megabytes(files):
    return f"{sum(path.stat().st_size for path in files) / 1e6:.2f} MB"
