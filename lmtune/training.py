"""Training: the Trainer subclasses (train_loss across resumes, adapter-only checkpoints and hub pushes), their
construction from what the script's objective hands in, and the train and evaluate phases."""

import logging
import math
import time
from contextlib import contextmanager

import datasets
from transformers import EarlyStoppingCallback

from lmtune.arguments import uses_adapter
from lmtune.errors import UsageError
from lmtune.metrics import perplexity, sliding_window_loss
from lmtune.output_dir import writing
from lmtune.trainer import AdapterOnlyTrainer, LanguageModelingTrainer

logger = logging.getLogger(__name__)


def build_trainer(objective, model, tokenizer, train_dataset, eval_dataset, training_args, adapter_args):
    """The Trainer of the run, with the objective's collator (made by objective.make_collator), loss, metrics and
    callbacks."""
    trainer_class, adapter_kwargs = LanguageModelingTrainer, {}
    # Also for an adapter that is only evaluated: the Trainer refuses a quantized model without one.
    if uses_adapter(adapter_args):
        trainer_class = AdapterOnlyTrainer
        adapter_kwargs = {"adapter_name": adapter_args.adapter_name, "script_name": objective.script_name}
    return trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=objective.collator,
        compute_metrics=objective.compute_metrics if training_args.do_eval else None,
        preprocess_logits_for_metrics=objective.preprocess_logits_for_metrics if training_args.do_eval else None,
        compute_loss_func=objective.compute_loss_func(training_args),
        callbacks=objective.trainer_callbacks(),
        lean_loss=objective.lean_loss,
        **adapter_kwargs,
    )


def add_early_stopping(trainer, evaluation_args):
    if evaluation_args.early_stopping_patience is not None:
        trainer.add_callback(EarlyStoppingCallback(
            evaluation_args.early_stopping_patience, evaluation_args.early_stopping_threshold
        ))


def train(trainer, train_dataset, last_checkpoint, training_args):
    checkpoint = training_args.resume_from_checkpoint or last_checkpoint
    with cache_off_while_checkpointing(trainer.model, training_args), writing("a checkpoint", training_args):
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trained = "the trained adapter" if isinstance(trainer, AdapterOnlyTrainer) else "the trained model"
    with writing(trained, training_args):
        trainer.save_model()  # with an AdapterTrainer: the adapter alone, in <output_dir>/<adapter_name>/
    metrics = train_result.metrics
    if not isinstance(train_dataset, datasets.IterableDataset):
        metrics["train_samples"] = len(train_dataset)
    trainer.log_metrics("train", metrics)
    with writing("the metrics", training_args):
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    return metrics


@contextmanager
def cache_off_while_checkpointing(model, training_args):
    """A model trained with gradient checkpointing keeps no cache of attention keys and values; asked for one, it
    warns at the first step that it will not. The model's own setting is back once training ends."""
    use_cache = getattr(model.config, "use_cache", None)
    if training_args.gradient_checkpointing and use_cache:
        model.config.use_cache = False
    try:
        yield
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache


def evaluate(trainer, eval_dataset, sliding_window=None):
    """The final evaluation's metrics, logged and saved; with a SlidingWindow, its strided loss and perplexity too."""
    metrics = trainer.evaluate()
    if not math.isfinite(metrics["eval_loss"]):
        raise UsageError(
            f"The evaluation loss is {metrics['eval_loss']}: the model computes no usable probabilities on the "
            "validation data; check --torch_dtype, --bf16/--fp16 and --learning_rate."
        )
    if not isinstance(eval_dataset, datasets.IterableDataset):
        metrics["eval_samples"] = len(eval_dataset)
    metrics["perplexity"] = perplexity(metrics["eval_loss"])
    if sliding_window is not None:
        metrics.update(sliding_window_metrics(trainer, sliding_window))
    trainer.log_metrics("eval", metrics)
    with writing("the metrics", trainer.args):
        trainer.save_metrics("eval", metrics)
    return metrics


def sliding_window_metrics(trainer, sliding_window):
    """The loss and perplexity of the trainer's model, adapters active as they are, over sliding windows of the
    validation tokens (lmtune.metrics.sliding_window_loss), in the evaluation's batch size, collator and precision.

    Under data parallelism every process holds the whole model, so the main process computes them alone, as it writes
    the samples, and the other processes go on; the windows are not split over the processes, which keeps it simple
    at the cost of speed. A model sharded by FSDP or DeepSpeed needs every process in each forward pass, so there every
    process computes the same windows (correct, if wasteful), and the main process reports them."""
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if not (sharded or trainer.is_world_process_zero()):
        return {}
    start = time.perf_counter()
    with trainer.autocast_smart_context_manager():
        loss, scored = sliding_window_loss(trainer.model, sliding_window.token_ids, sliding_window.window,
                                           sliding_window.stride, trainer.args.per_device_eval_batch_size,
                                           trainer.data_collator, trainer.lean_next_token_losses())
    return {"eval_strided_loss": loss, "strided_perplexity": perplexity(loss), "eval_stride": sliding_window.stride,
            "eval_strided_tokens": scored, "eval_strided_runtime": round(time.perf_counter() - start, 4)}
