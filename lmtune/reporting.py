"""What a run reports and writes besides the Trainer's files: samples of the model's output, the merged model, the
model card and hub push, the plot of the training curves and the closing summary."""

import json
import logging
import math
import os
from pathlib import Path
from typing import NamedTuple, Optional

from adapters.loading import AdapterLoader

from lmtune.adapter_files import adapter_files
from lmtune.arguments import uses_adapter
from lmtune.errors import shorten
from lmtune.hardware import bf16_tip
from lmtune.metrics import perplexity
from lmtune.output_dir import writing

logger = logging.getLogger(__name__)


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


def weight_files(folder):
    return [*folder.glob("*.safetensors"), *folder.glob("*.bin")]


def megabytes(files):
    return f"{sum(path.stat().st_size for path in files) / 1e6:.2f} MB"
