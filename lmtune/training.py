"""Training: the Trainer subclasses (train_loss across resumes, adapter-only checkpoints and hub pushes), their
construction from what the script's objective hands in, and the train and evaluate phases."""

import json
import logging
import math
import pickle
import signal
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import datasets
import torch
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from adapters import AdapterTrainer
from adapters.loading import AdapterLoader
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from transformers import EarlyStoppingCallback, SchedulerType, Trainer, TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lmtune.adapter_setup import load_saved_adapter
from lmtune.arguments import uses_adapter
from lmtune.errors import FIX_ADAPTER, UsageError, first_line
from lmtune.hardware import launcher_configures
from lmtune.hub import adapter_card
from lmtune.logs import log_message_dropped
from lmtune.metrics import perplexity, sliding_window_loss
from lmtune.modeling import weight_identity
from lmtune.output_dir import last_complete_checkpoint, writing
from lmtune.stopping import StoppedBySignal, stop_signals, workers_ignoring_stop_signals

logger = logging.getLogger(__name__)


# accelerate's distributed types in which an FSDP configuration applies (AcceleratorState): several processes on
# accelerators. On CPUs (MULTI_CPU) accelerate runs plain data parallel instead.
FSDP_DISTRIBUTED_TYPES = {kind for kind in DistributedType
                          if kind.name.startswith("MULTI_") and kind is not DistributedType.MULTI_CPU}


# Where checkpoints written before TrainLossSum kept the sum of the training losses; still read when resuming.
LEGACY_LOSS_SUM_FILE = "train_loss_sum.json"
# The train metrics of a throughput, which mean nothing for a session that trained no step.
THROUGHPUT_METRICS = ("train_samples_per_second", "train_steps_per_second", "train_tokens_per_second")


class LanguageModelingTrainer(Trainer):
    """The Trainer, except that a resumed run reports the train_loss of the uninterrupted run (TrainLossSum), trains
    nothing more from a checkpoint at the end of training, and stops on a step whose loss is not finite."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(LogLossWhereItCounts)
        self.divergence = StopOnDivergence(getattr(self.model.config, "vocab_size", None) or 2, self.args.fp16)
        self.add_callback(self.divergence)
        self.add_callback(StopOnSignal(self))
        self.add_callback(TrainLossSum)
        self.loss_sum_before_resume = 0.0
        self.resumed = None  # the trainer_state.json of the checkpoint that training resumes from

    def train(self, resume_from_checkpoint=None, **kwargs):
        self.resumed = read_trainer_state(resume_from_checkpoint)
        self.loss_sum_before_resume = loss_sum_kept_in(resume_from_checkpoint, self.resumed)
        with stop_signals.noted():
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        train_loss = self.loss_sum() / max(self.state.global_step, 1)
        output.metrics["train_loss"] = train_loss
        summary = self.state.log_history[-1]  # the summary that train() logged last
        summary["train_loss"] = train_loss
        if self.resumed is not None and self.state.global_step == self.resumed["global_step"]:
            self.state.num_train_epochs = self.resumed["num_train_epochs"]  # set_initial_training_values' zero epochs
            for name in THROUGHPUT_METRICS:  # the Trainer divides all the run's samples by this session's seconds
                output.metrics.pop(name, None)
                summary.pop(name, None)
        return output._replace(training_loss=train_loss)

    def loss_sum(self):
        return self.loss_sum_before_resume + self._total_loss_scalar

    def log(self, logs, start_time=None):
        # The Trainer adds the losses since the last log to its sum just before it logs them, and saves a checkpoint
        # only after a log (LogLossWhereItCounts): the sum that TrainLossSum exports is up to date for it. Looked up
        # by type: restore_callback_states_from_checkpoint replaces the callback with one of its own.
        for callback in self.callback_handler.callbacks if "loss" in logs else ():  # the training loss's logs
            if isinstance(callback, TrainLossSum):
                callback.loss_sum = self.loss_sum()
        if "loss" in logs and self.divergence.finite is not None and self.args.world_size > 1:
            # Every process stops at the same log, or the others would wait for it forever.
            non_finite = self.accelerator.reduce((~self.divergence.finite).int(), reduction="sum")
            self.divergence.finite = non_finite == 0
        super().log(logs, start_time)

    def save_model(self, output_dir=None, _internal_call=False):
        # Every checkpoint and the final save: a step can leave the weights infinite while its loss was finite. A
        # process of FSDP or DeepSpeed holds a shard of them, which could stop it alone while the others wait for it.
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            self.divergence.check_weights(self.model, self.args, self.state)
        super().save_model(output_dir, _internal_call)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.divergence.note(loss)
        return loss

    def set_initial_training_values(self, args, dataloader, total_train_batch_size):
        values = list(super().set_initial_training_values(args, dataloader, total_train_batch_size))
        num_train_epochs, steps_per_epoch, max_steps = values[0], values[1], values[-1]
        if self.resumed is None:
            return tuple(values)
        planned, done = self.resumed["max_steps"], self.resumed["global_step"]
        if planned != max_steps and args.lr_scheduler_type != SchedulerType.CONSTANT:
            logger.warning(
                f"Resuming at step {done} of a run of {planned} steps with --max_steps {max_steps}: the first step "
                f"resumed runs at the learning rate that the schedule for {planned} steps had reached (0.0 at the end "
                f"of a linear one), and the steps after it follow a schedule for {max_steps} steps, as neither run "
                f"would. Keep --max_steps {planned} to finish that run, or pass --overwrite_output_dir to train "
                f"{max_steps} steps from the start."
            )
        if done >= max_steps:
            # The Trainer skips the batches of the steps already done in the checkpoint's epoch, then trains on until
            # a step ends the training: from the last step, one step too many. With no epoch left, it trains none and
            # goes on to what follows training (the best model, the metrics).
            values[0] = min(num_train_epochs, done // steps_per_epoch)
        return tuple(values)

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

    def get_train_dataloader(self):
        return workers_ignoring_stop_signals(super().get_train_dataloader())

    def get_eval_dataloader(self, eval_dataset=None):
        return workers_ignoring_stop_signals(super().get_eval_dataloader(eval_dataset))

    def _save_rng_state(self, output_dir):
        super()._save_rng_state(output_dir)
        # The last file that each process writes into a checkpoint. The main process writes trainer_state.json next,
        # which marks the checkpoint complete (is_complete_checkpoint), and may then delete older checkpoints
        # (--save_total_limit): only once every process has written its part.
        self.accelerator.wait_for_everyone()

    def _load_rng_state(self, checkpoint):
        name = f"rng_state_{self.args.process_index}.pth" if self.args.world_size > 1 else "rng_state.pth"
        if checkpoint is not None and not (Path(checkpoint) / name).is_file():
            logger.warning(
                f"Resuming from {checkpoint}, which holds no random state of process {self.args.process_index} "
                f"({name}): its dropout and other random draws will differ from those of the uninterrupted run."
            )
        # The Trainer says the same at INFO level, shown on the main process only, as a guess about the launch.
        with log_message_dropped("transformers.trainer", "Didn't find an RNG file"):
            super()._load_rng_state(checkpoint)


def read_trainer_state(checkpoint):
    """The trainer_state.json of a checkpoint as a dict; None without a checkpoint or where it has none."""
    path = Path(checkpoint or "") / TRAINER_STATE_NAME
    return json.loads(path.read_text()) if checkpoint and path.is_file() else None


def loss_sum_kept_in(checkpoint, trainer_state):
    """The sum of the training losses up to a checkpoint: TrainLossSum's, in its trainer_state.json, or that of
    LEGACY_LOSS_SUM_FILE in a checkpoint written before it; 0.0 in one of the Trainer alone."""
    kept = (trainer_state or {}).get("stateful_callbacks", {}).get(TrainLossSum.__name__)
    if kept:
        return kept["attributes"]["loss_sum"]
    legacy = Path(checkpoint or "") / LEGACY_LOSS_SUM_FILE
    return json.loads(legacy.read_text())["loss_sum"] if checkpoint and legacy.is_file() else 0.0


class TrainLossSum(TrainerCallback, ExportableState):
    """The sum of the training losses up to each checkpoint, kept in its trainer_state.json: the Trainer divides the
    losses of the session that resumed alone by all steps, and a resumed run adds this sum to them (read by
    loss_sum_kept_in, as the Trainer restores callbacks' states only with --restore_callback_states_from_checkpoint).
    The trainer sets loss_sum at every log."""

    def __init__(self):
        self.loss_sum = 0.0

    def state(self):
        return {"args": {}, "attributes": {"loss_sum": self.loss_sum}}

    def on_train_begin(self, args, state, control, **kwargs):
        # The Trainer's save updates the entry of each ExportableState in the state it resumed, which a checkpoint
        # written before this callback existed lacks.
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())


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
    """Ends a run whose training loss has become NaN, infinite, or larger than any model that learns has, or whose
    gradient norm is not finite: its numbers would mean nothing, and the checkpoints written before it stay as they
    were. A model that guesses uniformly has a loss of log(vocabulary size); a diverged one, orders of magnitude more.

    The Trainer's logging_nan_inf_filter (on by default) logs the mean of the other steps' losses in place of a
    non-finite one, while the step's NaN gradients still reach the weights; so the trainer notes every step's loss
    here (note), and the note is read at the next log, where the Trainer synchronises anyway. Every checkpoint and
    the last step come after a log (LogLossWhereItCounts): no diverged weights are saved. Under fp16 the loss scaler
    skips the steps whose gradients are not finite, leaving the weights as they were, so only the loss is judged.
    A step can also leave the weights infinite from a finite loss and gradient: the trainer checks the weights before
    it saves them (check_weights)."""

    def __init__(self, vocab_size, loss_scaled=False):
        self.limit = max(50.0, 4 * math.log(max(vocab_size, 2)))
        self.loss_scaled = loss_scaled
        self.finite = None  # whether every step's loss since the last log was finite: a tensor where the loss is

    def note(self, loss):
        if not self.loss_scaled:
            finite = torch.isfinite(loss.detach()).all()
            self.finite = finite if self.finite is None else self.finite & finite

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:  # an evaluation's log
            return
        finite, self.finite = self.finite, None
        loss, grad_norm = logs["loss"], logs.get("grad_norm")
        if not (math.isfinite(loss) and loss <= self.limit):
            reason = f"the training loss is {loss:.4g}"
        elif finite is not None and not finite.item():
            reason = "a step's training loss was not finite (the logged loss leaves it out: --logging_nan_inf_filter)"
        elif grad_norm is not None and not self.loss_scaled and not math.isfinite(grad_norm):
            reason = f"the gradient norm is {grad_norm}"
        else:
            return
        raise diverged(args, state, reason)

    @staticmethod
    def check_weights(model, args, state):
        finite = [torch.isfinite(weight).all() for weight in model.parameters() if weight.requires_grad]
        if finite and not torch.stack(finite).all():
            raise diverged(args, state, "the trained weights are no longer finite")


def diverged(args, state, reason):
    return UsageError(
        f"Training diverged at step {state.global_step}: {reason}; lower --learning_rate ({args.learning_rate:g}) or "
        "clip the gradients with --max_grad_norm, and run again (checkpoints written before this step are kept)."
    )


class StopOnSignal(TrainerCallback):
    """Stops training asked to stop (lmtune.stopping: SIGTERM, SIGUSR1, SIGINT) at the end of the optimizer step in
    progress, with a checkpoint of the same kind as at --save_steps, or with the checkpoint being written when the
    signal came; the run ends in one line naming it, and the same command run again resumes from it. The evaluation
    due at that step is skipped, to stay within the scheduler's grace period; one in progress is finished first.

    Under several processes the signal may reach only some of them: at every step end and checkpoint they agree on
    whether any process got one, so that all stop at the same step. That is one all-reduce of one number on the
    training device, through the launcher's own process group (NCCL on GPUs, gloo on CPUs, XLA's on TPUs): no second
    group, so a multi-node GPU job needs no gloo networking. On a GPU its .item() waits for the step's kernels, as
    the Trainer already does at every step (its NaN filter of the loss, on by default, reads the loss on the host), so
    the cost is the all-reduce's latency, microseconds. It runs only where the signal handler is installed, in the
    main thread of every process as launchers start them; a process training from another thread agrees on
    nothing, and so must all of them."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.stopping = None  # the signal that the run stops for, once the processes agree to

    def on_train_begin(self, args, state, control, **kwargs):
        self.stopping = None
        stop_signals.last_checkpoint = partial(last_complete_checkpoint, args.output_dir)

    def on_step_end(self, args, state, control, **kwargs):
        self.stopping = self.signal_of_any_process()
        if self.stopping:
            control.should_training_stop = control.should_save = True
            control.should_log = True  # the losses since the last log go into the checkpoint's loss sum
            control.should_evaluate = False

    def signal_of_any_process(self):
        """The signal received by this process or, under several, by any of them (the larger number if two
        differ); None if none was, or where no handler notes signals."""
        if not stop_signals.noting:
            return None
        accelerator = self.trainer.accelerator
        if accelerator.num_processes == 1:
            return stop_signals.received
        number = torch.tensor(stop_signals.received or 0, device=accelerator.device)
        return int(accelerator.reduce(number, reduction="max").item()) or None

    def on_save(self, args, state, control, **kwargs):
        # A signal that came while this checkpoint was written stops the run with it: its losses were logged.
        self.stopping = self.stopping or self.signal_of_any_process()
        if not self.stopping:
            return
        self.trainer.accelerator.wait_for_everyone()  # no process ends before all have written their part
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        raise StoppedBySignal(
            f"{signal.Signals(self.stopping).name} received: training stopped after step {state.global_step} of "
            f"{state.max_steps} and saved {checkpoint}; run the same command again to resume from it.", self.stopping)


class AdapterOnlyTrainer(LanguageModelingTrainer, AdapterTrainer):
    """Saves and restores exactly the trained adapter, as safetensors unless --save_safetensors false: no head
    (with tied embeddings as large as the vocabulary matrix) and no frozen language adapter."""

    def __init__(self, *args, adapter_name, script_name, **kwargs):
        self.adapter_name, self.script_name = adapter_name, script_name
        self.adapter_saved = False  # whether save_model has written <output_dir>/<adapter_name>/ in this run
        super().__init__(*args, **kwargs)

    def save_model(self, output_dir=None, _internal_call=False):
        # Noted first: the Trainer's save_model ends with a push (push_to_hub), which uploads what it has just written.
        self.adapter_saved = self.adapter_saved or output_dir is None or Path(output_dir) == Path(self.args.output_dir)
        super().save_model(output_dir, _internal_call)

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
        if self.is_fsdp_enabled:
            load_into_shards(self.model, folder)
            return
        # Loading over the adapter in training is the point here, so adapters' warning that it does is noise.
        with log_message_dropped("adapters.loading", "Overwriting existing adapter"):
            load_saved_adapter(self.model, "--resume_from_checkpoint", str(folder), load_as=self.adapter_name)

    def push_to_hub(self, commit_message="End of training", blocking=True, token=None, revision=None, **card):
        """Publish the adapter where `model.load_adapter("user/repo")` looks for it: its files and a model card at
        the root of the repository. The Trainer's own push uploads output_dir, where the adapter is a subfolder.

        It uploads the folder that save_model wrote, as it wrote it: only save_model gathers the weights that FSDP
        and DeepSpeed ZeRO-3 shard, or copies them from XLA, so a save from the live model here would write empty
        partitions or shards over the good files. A run that trained nothing saves through save_model first, with
        every process, as the gathering needs."""
        if not self.adapter_saved:
            self.save_model(_internal_call=True)
        self.create_model_card(**card)
        if not self.is_world_process_zero():
            return None
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token)
        folder = Path(self.args.output_dir) / self.adapter_name
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


def load_into_shards(model, folder):
    """Load a checkpoint's adapter into a model that FSDP2 has sharded (resume, --load_best_model_at_end): adapters'
    load_adapter would copy whole tensors into the DTensors of which each process holds a shard, which torch
    refuses. torch's set_model_state_dict cuts each process's shard out of the whole weights (each process reads
    the file); the adapter's weights are named as in the model, the rest of the model is left as it is."""
    path = folder / "adapter.safetensors"
    weights = load_file(path) if path.is_file() else torch.load(folder / "pytorch_adapter.bin", weights_only=True)
    result = set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    if result.unexpected_keys:
        raise UsageError(
            f"--resume_from_checkpoint {folder} does not fit this {model.config.model_type} model: "
            f"{len(result.unexpected_keys)} weights have no place in it, e.g. {result.unexpected_keys[0]}; "
            f"{FIX_ADAPTER}."
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
        identity = weight_identity(tensor)
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
        **adapter_kwargs,
    )


def add_early_stopping(trainer, evaluation_args):
    if evaluation_args.early_stopping_patience is not None:
        trainer.add_callback(EarlyStoppingCallback(
            evaluation_args.early_stopping_patience, evaluation_args.early_stopping_threshold
        ))


def sharding_engines(training_args):
    """The FSDP plugin and the DeepSpeed plugin that the Trainer's accelerator will run with (None where it will not),
    known from the arguments and the launcher's environment before the Trainer is built, as accelerate decides:
    DeepSpeed from --deepspeed, or from the launcher where accelerate's process state turned to it; FSDP (from
    --fsdp or the launcher, in ACCELERATE_USE_FSDP) where the processes run on accelerators (FSDP_DISTRIBUTED_TYPES).
    A launcher's configuration that does not apply is pointed out."""
    distributed_type = getattr(training_args.distributed_state, "distributed_type", None)  # None: SageMaker MP
    fsdp = None
    if launcher_configures("FSDP") and distributed_type in FSDP_DISTRIBUTED_TYPES:
        fsdp = FullyShardedDataParallelPlugin()  # from the environment, as accelerate's Accelerator builds it
    deepspeed = training_args.deepspeed_plugin
    if deepspeed is None and distributed_type == DistributedType.DEEPSPEED:
        deepspeed = DeepSpeedPlugin()
    for name, plugin in (("FSDP", fsdp), ("DeepSpeed", deepspeed)):
        if launcher_configures(name) and plugin is None:
            logger.warning(
                f"{name} is configured, but accelerate runs it on GPUs and other accelerators only: on CPUs this run "
                "is plain data parallel, each process holding the whole model."
            )
    return fsdp, deepspeed


def check_sharding(training_args, adapter_args):
    """Refuse, with the other checks before any model or data is loaded, a sharding mode whose adapter could not be
    saved whole, and what needs the whole model in one process under one."""
    fsdp, deepspeed = sharding_engines(training_args)
    if not adapter_args.train_adapter:
        return
    zero = deepspeed.deepspeed_config.get("zero_optimization", {}) if deepspeed is not None else {}
    if fsdp is not None or zero.get("stage") == 3:
        flag = next((flag for flag, wanted in (("--merge_adapter", adapter_args.merge_adapter),
                                               ("--export_peft", adapter_args.export_peft)) if wanted), None)
        if flag is not None:
            raise UsageError(
                f"{flag} needs the whole model in one process, which FSDP and DeepSpeed ZeRO-3 shard: drop it here, "
                f"and run it on the saved adapter afterwards in one process (--load_adapter DIR {flag})."
            )
    if fsdp is not None and fsdp.fsdp_version != 2:
        raise UsageError(
            "--train_adapter under FSDP needs fsdp_version: 2 in the accelerate config: with FSDP1 the adapter cannot "
            "be saved from the sharded model (configs/fsdp.yaml is a configuration that works)."
        )
    if fsdp is not None and "FULL_STATE_DICT" not in str(fsdp.state_dict_type):
        raise UsageError(
            f"--train_adapter under FSDP with {fsdp.state_dict_type} would save no adapter; set "
            "fsdp_state_dict_type: FULL_STATE_DICT in the accelerate config."
        )
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise UsageError(
            "--train_adapter under DeepSpeed ZeRO-3 needs \"stage3_gather_16bit_weights_on_model_save\": true in "
            "zero_optimization of the DeepSpeed config, or the adapter cannot be gathered to be saved."
        )


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
                                           trainer.data_collator)
    return {"eval_strided_loss": loss, "strided_perplexity": perplexity(loss), "eval_stride": sliding_window.stride,
            "eval_strided_tokens": scored, "eval_strided_runtime": round(time.perf_counter() - start, 4)}
