"""The callbacks that guard a run: the loss sum that a resume continues, the loss logged where it counts, a run that
diverges, and a run asked to stop by a signal."""

import logging
import math
import signal
from functools import partial
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lmtune.errors import UsageError
from lmtune.output_dir import last_complete_checkpoint
from lmtune.stopping import StoppedBySignal, stop_signals

logger = logging.getLogger(__name__)


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
