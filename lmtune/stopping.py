"""Stopping when asked to: what a job scheduler sends before it kills a job (SIGTERM, or SIGUSR1 with sbatch
--signal=USR1@120) and Ctrl-C (SIGINT) end a run in one line saying what was saved, with the exit status of a process
ended by that signal, and with no process of the run left behind.

The main process handles these signals for the whole run (StopSignals.handled). While the Trainer trains, the handler
only notes the signal, and training stops at the end of the step in progress with a checkpoint
(callbacks.StopOnSignal). Anywhere else the handler raises StoppedBySignal at once, which unwinds the run through its
context managers: datasets' pool of tokenizer workers is terminated, the output folder's lock released. Schedulers and
Ctrl-C signal the whole process group; the run's worker processes leave the stop to the main process."""

import os
import signal
import threading
from contextlib import contextmanager
from functools import partial

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StoppedBySignal(BaseException):
    """A run asked to stop (STOP_SIGNALS): reported as one line on stderr saying what was saved, with the exit status
    of a process ended by that signal, 128 + its number (143 for SIGTERM, 130 for SIGINT). Job schedulers and shells
    read that as "terminated", as they did before the run stopped cleanly; 2 would say the command was wrong, and a
    wrapper that retries preempted jobs but not broken commands would then give up. A BaseException, as
    KeyboardInterrupt is, so that no library's `except Exception` stops it on its way out."""

    def __init__(self, message, signal_number):
        super().__init__(message)
        self.exit_status = 128 + signal_number


class StopSignals:
    """The stop signal this process received, and what its handler does with it."""

    def __init__(self):
        self.received = None  # the first stop signal of the run; the later ones change nothing
        self.installed = False
        self.noting = False  # while training: the handler only notes the signal
        self.last_checkpoint = None  # once training began: the function that finds its last complete checkpoint
        self.fork_hook_registered = False  # leave_stops_to_the_parent, in every process forked from this one

    def handle(self, number, frame):
        if self.received is not None:
            return  # already stopping: a second signal must not cut short the checkpoint or the clean-up under way
        self.received = number
        # While training, only a note: saving here could deadlock on a lock that the interrupted code holds, and the
        # step in progress would be half applied.
        if not self.noting:
            raise self.stop()

    def stop(self):
        """The StoppedBySignal of a signal received outside training, saying what the run has saved."""
        name = signal.Signals(self.received).name
        if self.last_checkpoint is None:
            message = "the run stopped, having saved nothing; run the same command again."
        elif checkpoint := self.last_checkpoint():
            message = f"the run stopped; its last checkpoint is {checkpoint}: run the same command again to resume."
        else:
            message = "the run stopped before it saved a checkpoint; run the same command again to start it anew."
        return StoppedBySignal(f"{name} received: {message}", self.received)

    def stop_behind(self, error):
        """The StoppedBySignal that error is, or that it comes from: a library's clean-up may raise its own error while
        a stop unwinds it (datasets' map, a TimeoutError from its pool); None for an error of another cause."""
        if isinstance(error, StoppedBySignal):
            return error
        return self.stop() if self.received is not None else None

    @contextmanager
    def handled(self):
        """Handle the stop signals while the block runs, then restore the handlers there were. Python handles signals
        in the main thread only, so from another thread (a caller's) the run keeps the handlers it has."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            yield
            return
        self.received, self.last_checkpoint = None, None
        if not self.fork_hook_registered:  # once per process: os has no call to take one back
            os.register_at_fork(after_in_child=leave_stops_to_the_parent)
            self.fork_hook_registered = True
        previous = {number: signal.signal(number, self.handle) for number in STOP_SIGNALS}
        self.installed = True
        try:
            yield
        finally:
            self.installed = False
            for number, handler in previous.items():
                signal.signal(number, signal.SIG_DFL if handler is None else handler)  # None: set outside Python

    @contextmanager
    def noted(self):
        """While training: a signal is only noted, for the training loop to stop at the end of its step. A signal
        noted after the last step stops the run once training has returned; where the run handles no signals of its
        own (main() called from Python), it is delivered again to the handler there was."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        whole_run = self.installed
        with self.handled():
            self.noting = True
            try:
                yield
            finally:
                self.noting = False
        if self.received is not None:
            if whole_run:
                raise self.stop()
            number, self.received = self.received, None
            signal.raise_signal(number)


stop_signals = StopSignals()


def leave_stops_to_the_parent():
    """In a process forked while the run handles the stop signals (a worker of datasets' tokenizer pool or of a
    DataLoader, the pool's manager): the signal that reaches the whole group is the main process's to act on. SIGINT
    is ignored; SIGTERM and SIGUSR1 end the process as by default, as the pool's terminate() needs."""
    if signal.getsignal(signal.SIGINT) == stop_signals.handle:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    for number in (signal.SIGTERM, signal.SIGUSR1):
        if signal.getsignal(number) == stop_signals.handle:
            signal.signal(number, signal.SIG_DFL)
    stop_signals.installed = stop_signals.noting = False


def worker_ignoring_stop_signals(worker_init_fn, worker_id):
    # After torch's own set-up of the worker, which ends it on a SIGTERM from anyone: the main process would then fail
    # in the middle of the step or of the stop checkpoint ("DataLoader worker ... is killed by signal"). The worker
    # still ends on its parent's SIGTERM, as when the parent's DataLoader gives up waiting for it, or the parent exits
    # (multiprocessing terminates its daemon processes); a worker whose parent died ends on its own.
    for number in (signal.SIGUSR1, signal.SIGINT):
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # inherited by the threads the worker starts later
    threading.Thread(target=end_on_sigterm_from_parent, daemon=True).start()
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


def end_on_sigterm_from_parent():
    parent = os.getppid()
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    os._exit(0)


def workers_ignoring_stop_signals(dataloader):
    """The DataLoader, its worker processes ignoring the stop signals, its worker_init_fn (the Trainer's seeding) kept.
    A signal in the milliseconds between a worker's start and its worker_init_fn still ends it."""
    loader = dataloader
    # accelerate's wrapper iterates the loader it wraps (base_dataloader); on XLA, torch_xla's device loader wraps
    # accelerate's (_loader).
    while not hasattr(loader, "worker_init_fn"):
        loader = getattr(loader, "base_dataloader", None) or getattr(loader, "_loader", None)
        if loader is None:
            return dataloader
    loader = getattr(loader, "base_dataloader", loader)
    init = loader.worker_init_fn
    if loader.num_workers and not (isinstance(init, partial) and init.func is worker_ignoring_stop_signals):
        loader.worker_init_fn = partial(worker_ignoring_stop_signals, init)
    return dataloader
