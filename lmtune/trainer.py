"""The Trainer subclasses: the train_loss of a resumed run, checkpoints that resume on any setup and never past the
end of training, and, with an adapter, checkpoints, saves and hub pushes of the trained adapter alone."""

import json
import logging
import pickle
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers.trainer
from adapters import AdapterTrainer
from huggingface_hub import HfApi
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from transformers import SchedulerType, Trainer
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME

from lmtune.adapter_files import adapter_weights_on_cpu, load_saved_adapter, save_adapter_files
from lmtune.callbacks import LogLossWhereItCounts, StopOnDivergence, StopOnSignal, TrainLossSum
from lmtune.errors import FIX_ADAPTER, UsageError, first_line
from lmtune.hub import adapter_card
from lmtune.lean_loss import LeanLossMixin
from lmtune.logs import log_message_dropped
from lmtune.stopping import stop_signals, workers_ignoring_stop_signals

logger = logging.getLogger(__name__)


# Where checkpoints written before TrainLossSum kept the sum of the training losses; still read when resuming.
LEGACY_LOSS_SUM_FILE = "train_loss_sum.json"


# The train metrics of a throughput, which mean nothing for a session that trained no step.
THROUGHPUT_METRICS = ("train_samples_per_second", "train_steps_per_second", "train_tokens_per_second")


class LanguageModelingTrainer(LeanLossMixin, Trainer):
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


class AdapterOnlyTrainer(LanguageModelingTrainer, AdapterTrainer):
    """Saves and restores exactly the trained adapter, as safetensors unless --save_safetensors false: no head
    (with tied embeddings as large as the vocabulary matrix) and no frozen language adapter."""

    def __init__(self, *args, adapter_name, script_name, **kwargs):
        self.adapter_name, self.script_name = adapter_name, script_name
        self.adapter_saved = False  # whether save_model has written <output_dir>/<adapter_name>/ in this run
        super().__init__(*args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir):
        if not self.is_fsdp_enabled:
            super()._save_optimizer_and_scheduler(output_dir)
            return
        # Under FSDP the Trainer writes the whole model besides, gathered by every process onto the main one, into each
        # checkpoint (pytorch_model_fsdp.bin) for a resume of its own: the frozen base, as large as the model, every
        # --save_steps. A resume here loads the adapter alone into the shards (load_into_shards), so that file is left
        # out; the optimizer's state, the scheduler's and the random states stay.
        with fsdp_model_not_saved():
            super()._save_optimizer_and_scheduler(output_dir)

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
        if self.is_deepspeed_enabled:
            # ZeRO-3 partitions every weight over the processes, which a plain load_adapter cannot write into; the
            # engine's own checkpoint, in each checkpoint folder, restores them, as the Trainer's resume under
            # DeepSpeed does (it never calls _load_from_checkpoint there).
            Trainer._load_best_model(self)
            return
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


@contextmanager
def fsdp_model_not_saved():
    """The Trainer's checkpoint without FSDP's whole-model file: transformers calls accelerate's save_fsdp_model by
    its own module's name, for the model alone, beside save_fsdp_optimizer."""
    saves_model = transformers.trainer.save_fsdp_model
    transformers.trainer.save_fsdp_model = lambda *args, **kwargs: None
    try:
        yield
    finally:
        transformers.trainer.save_fsdp_model = saves_model


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
