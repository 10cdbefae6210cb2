"""Training: the Trainer subclasses (train_loss across resumes, adapter-only checkpoints and hub pushes), their
construction from what the script's objective hands in, and the train and evaluate phases."""

import json
import logging
import math
import os
import pickle
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import datasets
import torch
from adapters import AdapterTrainer
from adapters.loading import AdapterLoader
from huggingface_hub import HfApi, ModelCardData
from safetensors.torch import save_file
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lmtune.adapter_setup import load_saved_adapter
from lmtune.arguments import uses_adapter
from lmtune.errors import StoppedBySignal, UsageError, first_line
from lmtune.hardware import launcher_configures
from lmtune.lean_loss import LeanLossMixin
from lmtune.logs import log_message_dropped
from lmtune.metrics import perplexity, sliding_window_loss

logger = logging.getLogger(__name__)


# Kept in every checkpoint: the sum of the training losses up to it, for the train_loss of a resumed run.
LOSS_SUM_FILE = "train_loss_sum.json"


class LanguageModelingTrainer(LeanLossMixin, Trainer):
    """The Trainer, except that a resumed run reports the train_loss of the uninterrupted run: the Trainer divides
    the losses of this session alone by all steps, so every checkpoint here keeps the sum of the losses before it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(LogLossWhereItCounts)
        self.add_callback(StopOnDivergence(getattr(self.model.config, "vocab_size", None) or 2))
        self.stop_on_signal = StopOnSignal()
        self.add_callback(self.stop_on_signal)
        self.loss_sum_before_resume = 0.0

    def train(self, resume_from_checkpoint=None, **kwargs):
        loss_file = Path(resume_from_checkpoint or "") / LOSS_SUM_FILE
        self.loss_sum_before_resume = json.loads(loss_file.read_text())["loss_sum"] if (
            resume_from_checkpoint and loss_file.is_file()) else 0.0
        with self.stop_on_signal.handlers_installed():
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        train_loss = self.loss_sum() / max(self.state.global_step, 1)
        output.metrics["train_loss"] = train_loss
        self.state.log_history[-1]["train_loss"] = train_loss  # the summary that train() logged last
        return output._replace(training_loss=train_loss)

    def loss_sum(self):
        return self.loss_sum_before_resume + self._total_loss_scalar

    def _load_optimizer_and_scheduler(self, checkpoint):
        try:
            if checkpoint is not None and self.loads_states_to_indexed_cpu():
                self.load_states_to_cpu(Path(checkpoint))
            else:
                super()._load_optimizer_and_scheduler(checkpoint)
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
            if not damaged_states(checkpoint):
                raise  # the files are whole: something else failed, which this message would misname
            raise UsageError(
                f"Cannot resume from {checkpoint}: its optimizer or scheduler state is damaged ({first_line(error)}); "
                "delete that checkpoint to resume from the one before it, or pass --overwrite_output_dir to start "
                "afresh."
            ) from None

    def loads_states_to_indexed_cpu(self):
        # In a run of several CPU processes, transformers maps the optimizer state to args.device, cpu:<rank>, which
        # torch.load cannot restore to ("don't know how to restore data location ... cpu:0"): every resume failed.
        device = self.args.device
        return (device.type == "cpu" and device.index is not None and self.args.world_size > 1
                and not (self.is_deepspeed_enabled or self.is_fsdp_enabled))

    def load_states_to_cpu(self, checkpoint):
        """The Trainer's own loading of the optimizer and scheduler states, mapped to the CPU."""
        if (checkpoint / OPTIMIZER_NAME).is_file() and (checkpoint / SCHEDULER_NAME).is_file():
            self.optimizer.load_state_dict(
                torch.load(checkpoint / OPTIMIZER_NAME, map_location="cpu", weights_only=True))
            self.lr_scheduler.load_state_dict(torch.load(checkpoint / SCHEDULER_NAME, weights_only=True))

    def _save_checkpoint(self, model, trial):
        # Written before trainer_state.json, which marks a checkpoint complete (see is_complete_checkpoint).
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / LOSS_SUM_FILE).write_text(json.dumps({"loss_sum": self.loss_sum()}))
        super()._save_checkpoint(model, trial)


def damaged_states(checkpoint):
    """The optimizer, scheduler and scaler states of a checkpoint that cannot be read back."""
    damaged = []
    for name in ("optimizer.pt", "scheduler.pt", "scaler.pt"):
        path = Path(checkpoint) / name
        if path.exists():
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError):
                damaged.append(name)
    return damaged


class LogLossWhereItCounts(TrainerCallback):
    """Has the Trainer log the training loss at every checkpoint and at the last step. Only a log averages the loss
    over the processes and adds it to the sum that train_loss comes from: the steps since the last log would
    otherwise be counted from this process alone, and left out of the sum that a checkpoint keeps."""

    def on_step_end(self, args, state, control, **kwargs):
        control.should_log = control.should_log or control.should_save or state.global_step >= state.max_steps

    on_epoch_end = on_step_end


class StopOnDivergence(TrainerCallback):
    """Ends a run whose training loss has become NaN, infinite, or larger than any model that learns has: its
    numbers would mean nothing, and the checkpoints written before it stay as they were. A model that guesses
    uniformly has a loss of log(vocabulary size); a diverged one, orders of magnitude more."""

    def __init__(self, vocab_size):
        self.limit = max(50.0, 4 * math.log(max(vocab_size, 2)))

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not (math.isfinite(loss) and loss <= self.limit):
            raise UsageError(
                f"Training diverged at step {state.global_step}: the training loss is {loss:.4g}; lower "
                f"--learning_rate ({args.learning_rate:g}) or clip the gradients with --max_grad_norm, and run "
                "again (checkpoints written before this step are kept)."
            )


# What a scheduler or a spot instance sends before it kills a job (SIGTERM), and what SLURM can be asked to send
# earlier (sbatch --signal=USR1@120): both stop a run at the end of its step, with a checkpoint.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopOnSignal(TrainerCallback):
    """Stops a run that is asked to stop (STOP_SIGNALS) at the end of the optimizer step in progress, with a
    checkpoint of the same kind as at --save_steps, and ends it in one line naming that checkpoint; the same command
    run again resumes from it. The handler only notes the signal: a second one, even while the checkpoint is being
    written, changes nothing. Under several processes the signal may reach only some of them: at every step they
    agree on whether any process got one (an all-reduce of one number, on CPU), so that all stop at the same step.
    The evaluation due at that step is skipped, to stay within the scheduler's grace period."""

    def __init__(self):
        self.received = None  # the number of the first signal this process received while training
        self.stopping = None  # the signal that the run stops for, once the processes agree to
        self.group = None  # the CPU process group the processes agree in, when the default one is not one

    @contextmanager
    def handlers_installed(self):
        """Handle the signals while training, then restore the handlers there were. Python handles signals in the
        main thread only, so from another thread (a caller's) the run keeps the handlers it has. A signal that came
        after the last step, when there is nothing left to stop, is delivered again to the restored handler."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.received, self.stopping = None, None
        previous = {number: signal.signal(number, self.note) for number in STOP_SIGNALS}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        if self.received is not None:
            signal.raise_signal(self.received)

    def note(self, number, frame):
        # Only a note: logging or saving here could deadlock on a lock that the interrupted code holds.
        self.received = self.received or number

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.group is None:
            # Every process calls this together, as new_group needs. NCCL's group would need a GPU tensor, and a
            # GPU synchronisation at every step; gloo's reduces one number on the CPU in microseconds.
            if "gloo" not in str(torch.distributed.get_backend()):
                self.group = torch.distributed.new_group(backend="gloo")

    def on_step_end(self, args, state, control, **kwargs):
        self.stopping = self.signal_of_any_process()
        if self.stopping:
            control.should_training_stop = control.should_save = True
            control.should_log = True  # the losses since the last log go into the checkpoint's loss sum
            control.should_evaluate = False

    def signal_of_any_process(self):
        """The signal received by this process or, under several, by any of them (the larger number if two
        differ); None if none was."""
        number = self.received or 0
        if torch.distributed.is_available() and torch.distributed.is_initialized() and (
                torch.distributed.get_world_size() > 1):
            flag = torch.tensor([number])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
            number = int(flag.item())
        return number or None

    def on_save(self, args, state, control, **kwargs):
        if not self.stopping:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier(group=self.group)  # no process ends before all have written their part
        number = self.stopping
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        raise StoppedBySignal(
            f"{signal.Signals(number).name} received: training stopped after step {state.global_step} of "
            f"{state.max_steps} and saved {checkpoint}; run the same command again to resume from it.", number)


class AdapterOnlyTrainer(LanguageModelingTrainer, AdapterTrainer):
    """Saves and restores exactly the trained adapter, as safetensors unless --save_safetensors false: no head
    (with tied embeddings as large as the vocabulary matrix) and no frozen language adapter."""

    def __init__(self, *args, adapter_name, script_name, **kwargs):
        self.adapter_name, self.script_name = adapter_name, script_name
        super().__init__(*args, **kwargs)

    def _save(self, output_dir=None, state_dict=None):
        output_dir = Path(output_dir or self.args.output_dir)
        # A state_dict comes only under FSDP or DeepSpeed, gathered from the shards that each process holds, and on
        # XLA, copied to the CPU (_save_tpu).
        save_adapter_files(self.model, output_dir / self.adapter_name, self.adapter_name, self.args.save_safetensors,
                           gathered_state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, output_dir / "training_args.bin")

    def _save_tpu(self, output_dir=None):
        """On XLA (TPUs) save_model, and so every checkpoint, saves through _save_tpu instead of _save; the Trainer's
        own writes the whole model. Save exactly what _save saves, the adapter alone, from the master process, its
        weights copied to the CPU first. Every process calls this, and syncs the graph as often as the Trainer's
        _save_tpu does (a mark_step, then a rendezvous of all processes): each sync advances XLA's random seed, so
        dropout, and a resumed run, stay as with the Trainer's own. A checkpoint's next rendezvous, before the
        optimizer is saved, waits for the master to have written the adapter."""
        import torch_xla.core.xla_model as xm

        xm.mark_step()  # the weights' pending updates are computed before they are read
        xm.rendezvous("saving_checkpoint")
        if self.args.should_save:
            self._save(output_dir, state_dict=adapter_weights_on_cpu(self.model, self.adapter_name))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self.load_trained_adapter(Path(resume_from_checkpoint) / self.adapter_name)

    def _load_best_model(self):
        self.load_trained_adapter(Path(self.state.best_model_checkpoint) / self.adapter_name)

    def load_trained_adapter(self, folder):
        # Loading over the adapter in training is the point here, so adapters' warning that it does is noise.
        with log_message_dropped("adapters.loading", "Overwriting existing adapter"):
            load_saved_adapter(self.model, "--resume_from_checkpoint", str(folder), load_as=self.adapter_name)

    def push_to_hub(self, commit_message="End of training", blocking=True, token=None, revision=None, **card):
        """Publish the adapter where `model.load_adapter("user/repo")` looks for it: its files and a model card at
        the root of the repository. The Trainer's own push uploads output_dir, where the adapter is a subfolder."""
        self.create_model_card(**card)
        if not self.is_world_process_zero():
            return None
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token)
        folder = Path(self.args.output_dir) / self.adapter_name
        save_adapter_files(self.model, folder, self.adapter_name, self.args.save_safetensors)
        (folder / "README.md").write_text(adapter_card(self, card))
        return HfApi(token=token).upload_folder(
            repo_id=self.hub_model_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision or self.args.hub_revision,
            run_as_future=not blocking,
            # A weights file in the other format, from an earlier push, would otherwise be loaded instead.
            delete_patterns=["adapter.safetensors", "pytorch_adapter.bin"],
        )


def adapter_weights_on_cpu(model, adapter_name):
    """The adapter's weights, named as in the model's state dict, copied to the CPU for save_adapter_files. An XLA
    tensor has no data pointer (data_ptr() is 0) to save from, or to tell which names share one weight by (prefix
    tuning's pool): each weight is copied once, and all its names share that copy, as they share the weight."""
    belongs = AdapterLoader(model).filter_func(adapter_name)
    copies, weights = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():  # the weights themselves, not detached views
        if belongs(name):
            if id(tensor) not in copies:
                copies[id(tensor)] = tensor.detach().cpu()
            weights[name] = copies[id(tensor)]
    return weights


def save_adapter_files(model, folder, adapter_name, use_safetensors, gathered_state_dict=None):
    """Write the adapter as adapters' save_adapter does (adapter_config.json and the weights, no head, in
    pytorch_adapter.bin and, unless --save_safetensors false, adapter.safetensors), but name
    each tensor once: prefix tuning keeps one pool of weights that every layer also references, so the state dict
    names a tensor several times, which safetensors refuses to write. The shortest name is kept; loading it
    restores the others, which are the same parameter.

    Under FSDP2 and DeepSpeed ZeRO-3 each process holds only a shard of every weight: the Trainer gathers the full
    state dict from all processes first, and the adapter's weights are taken from it."""
    folder.mkdir(parents=True, exist_ok=True)
    if gathered_state_dict is None and not use_safetensors:  # torch.save keeps shared tensors shared
        model.save_adapter(str(folder), adapter_name, with_head=False, use_safetensors=False)
        return
    if gathered_state_dict is None:
        model.apply_to_adapter_layers(lambda _, layer: layer.pre_save_adapters())  # e.g. ReFT's contiguous weights
    state_dict, config = AdapterLoader(model).save_to_state_dict(adapter_name)
    if gathered_state_dict is not None:
        state_dict = {key: gathered_state_dict[key] for key in state_dict}
        # FSDP2 gives the model a subclass of its class, named FSDP<class>: name the class it was built as.
        config["model_class"] = next(cls for cls in type(model).__mro__ if not cls.__name__.startswith("FSDP")).__name__
    unique, seen = {}, set()
    for key in sorted(state_dict, key=lambda key: (len(key), key)):
        tensor = state_dict[key]
        identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if identity not in seen:
            seen.add(identity)
            unique[key] = tensor.contiguous()
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if use_safetensors:
        save_file(unique, folder / "adapter.safetensors")
    # Always: adapters' load_adapter(path) reads pytorch_adapter.bin unless told use_safetensors=True, also for a
    # name on the hub.
    torch.save(unique, folder / "pytorch_adapter.bin")
    if interface := getattr(model.base_model, "adapter_interface", None):
        # As save_adapter does: the layer names that the adapter's weights are named after, for --adapter_interface.
        interface._save(str(folder), model.config)


def adapter_card(trainer, card):
    """The hub repository's README.md: what the adapter adapts, how well it did, and how to load it."""
    model = trainer.model
    # The Trainer's save_model pushes too, without the card's details, which publish() fills in afterwards.
    base_model = card.get("finetuned_from") or model.name_or_path
    metadata = ModelCardData(
        base_model=base_model if base_model and not os.path.isdir(base_model) else None,  # the hub takes hub names
        library_name="adapter-transformers",
        pipeline_tag=card.get("tasks"),
        tags=[tag for tag in ("adapter-transformers", model.config.model_type, card.get("tasks")) if tag],
        datasets=card.get("dataset_tags"),
    )
    method = type(model.adapters_config.get(trainer.adapter_name)).__name__
    trained_on = f" on {card['dataset']}" if card.get("dataset") else ""
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    results = ""
    if evaluations:
        last = evaluations[-1]
        results = f"Evaluation: loss {last['eval_loss']:.4f}, perplexity {perplexity(last['eval_loss']):.2f}"
        results += f", accuracy {last['eval_accuracy']:.4f}.\n\n" if "eval_accuracy" in last else ".\n\n"
    model_class = type(model).__name__
    base_name = base_model or "path/to/the/base/model"  # a model built from scratch has no name to load it by
    return (
        f"---\n{metadata.to_yaml()}\n---\n\n# {trainer.hub_model_id}\n\n"
        f"An adapter of the [adapters](https://docs.adapterhub.ml) library ({method}, settings in "
        f"`adapter_config.json`) for `{base_name}`, trained with `{trainer.script_name}`{trained_on}. The base "
        f"model stays as it is: load it, then the adapter.\n\n{results}"
        f"```python\nimport adapters\nfrom transformers import {model_class}\n\n"
        f'model = {model_class}.from_pretrained("{base_name}")\nadapters.init(model)\n'
        f'model.load_adapter("{trainer.hub_model_id}", set_active=True)\n```\n'
    )


def build_trainer(model, tokenizer, data_collator, train_dataset, eval_dataset, training_args, adapter_args,
                  script_name, compute_metrics, preprocess_logits_for_metrics, **trainer_kwargs):
    """The Trainer of the run, with the objective's metrics (and its other Trainer arguments in trainer_kwargs)."""
    trainer_class = LanguageModelingTrainer
    # Also for an adapter that is only evaluated: the Trainer refuses a quantized model without one.
    if uses_adapter(adapter_args):
        trainer_class = AdapterOnlyTrainer
        trainer_kwargs.update(adapter_name=adapter_args.adapter_name, script_name=script_name)
    return trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=data_collator,
        compute_metrics=compute_metrics if training_args.do_eval else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if training_args.do_eval else None,
        **trainer_kwargs,
    )


def add_early_stopping(trainer, evaluation_args):
    if evaluation_args.early_stopping_patience is not None:
        trainer.add_callback(EarlyStoppingCallback(
            evaluation_args.early_stopping_patience, evaluation_args.early_stopping_threshold
        ))


def check_sharding(trainer, adapter_args):
    """Refuse before training a sharding mode whose adapter could not be saved whole, and say so when a launcher's
    FSDP or DeepSpeed configuration does not apply."""
    for name, enabled in (("FSDP", trainer.is_fsdp_enabled), ("DeepSpeed", trainer.is_deepspeed_enabled)):
        if launcher_configures(name) and not enabled:
            logger.warning(
                f"{name} is configured, but accelerate runs it on GPUs and other accelerators only: on CPUs this run "
                "is plain data parallel, each process holding the whole model."
            )
    if not adapter_args.train_adapter:
        return
    state = trainer.accelerator.state
    zero = state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}) if trainer.is_deepspeed_enabled else {}
    if trainer.is_fsdp_enabled or zero.get("stage") == 3:
        flag = next((flag for flag, wanted in (("--merge_adapter", adapter_args.merge_adapter),
                                               ("--export_peft", adapter_args.export_peft)) if wanted), None)
        if flag is not None:
            raise UsageError(
                f"{flag} needs the whole model in one process, which FSDP and DeepSpeed ZeRO-3 shard: drop it here, "
                f"and run it on the saved adapter afterwards in one process (--load_adapter DIR {flag})."
            )
    if trainer.is_fsdp_enabled and state.fsdp_plugin.fsdp_version != 2:
        raise UsageError(
            "--train_adapter under FSDP needs fsdp_version: 2 in the accelerate config: with FSDP1 the adapter cannot "
            "be saved from the sharded model (configs/fsdp.yaml is a configuration that works)."
        )
    if trainer.is_fsdp_enabled and "FULL_STATE_DICT" not in str(state.fsdp_plugin.state_dict_type):
        raise UsageError(
            f"--train_adapter under FSDP with {state.fsdp_plugin.state_dict_type} would save no adapter; set "
            "fsdp_state_dict_type: FULL_STATE_DICT in the accelerate config."
        )
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise UsageError(
            "--train_adapter under DeepSpeed ZeRO-3 needs \"stage3_gather_16bit_weights_on_model_save\": true in "
            "zero_optimization of the DeepSpeed config, or the adapter cannot be gathered to be saved."
        )


def train(trainer, train_dataset, last_checkpoint, training_args):
    checkpoint = training_args.resume_from_checkpoint or last_checkpoint
    with cache_off_while_checkpointing(trainer.model, training_args):
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()  # with an AdapterTrainer: the adapter alone, in <output_dir>/<adapter_name>/
    metrics = train_result.metrics
    if not isinstance(train_dataset, datasets.IterableDataset):
        metrics["train_samples"] = len(train_dataset)
    trainer.log_metrics("train", metrics)
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
