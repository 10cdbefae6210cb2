"""The output folder: held by one run at a time, checked for other work, searched for the checkpoint to resume
from; a machine that cannot write there ends the run in one line."""

import errno
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import filelock
from adapters import AdapterConfig
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lmtune.arguments import uses_adapter
from lmtune.errors import UsageError, write_failure

logger = logging.getLogger(__name__)


# Held by the run writing into --output_dir, and removed when it ends. The Trainer's pushes of the output folder to
# the hub leave out names that begin with "_".
LOCK_FILE = "_run.lock"
# The fix for a file or folder in the way of one that the run writes.
MOVE_IT = "move it out of the way, or choose another --output_dir."
# What a checkpoint of a fully fine-tuned model holds its weights in, whole or sharded.
MODEL_WEIGHT_FILES = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json"]


def is_complete_checkpoint(folder):
    # The Trainer writes trainer_state.json last, and only once every process has written its part (see
    # LanguageModelingTrainer._save_rng_state): a checkpoint cut short by a crash has none or a broken one.
    try:
        json.loads((Path(folder) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir):
    steps = {int(path.name.split("-")[1]): path for path in Path(output_dir).glob("checkpoint-*")
             if path.name.split("-")[1].isdigit()}
    for step in sorted(steps, reverse=True):
        if is_complete_checkpoint(steps[step]):
            return str(steps[step])
        logger.warning(f"Ignoring {steps[step]}: the run stopped before it was completely written.")
    return None


@contextmanager
def claimed_output_dir(training_args):
    """Hold --output_dir for the run: create it, and lock it so that a second run into it is refused while this one
    lives (a killed run's lock goes with its process). A full disk or a folder that cannot be written, met at any
    point of the run, ends in one line naming the folder; the checkpoints already written stay usable."""
    output_dir = Path(training_args.output_dir)
    if not training_args.should_save:  # only the main process writes, so only it holds the folder
        yield
        return
    created = not output_dir.exists()
    lock = lock_output_dir(output_dir)
    try:
        with writing(None, training_args):  # whatever was being written, where no narrower writing() named it
            yield
    finally:
        Path(lock.lock_file).unlink(missing_ok=True)
        lock.release()
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()  # a run that failed before writing anything leaves no empty folder behind


@contextmanager
def writing(what, training_args):
    """Name what the run was writing in the one line of a write that the machine refuses (claimed_output_dir, around
    the whole run, can name only the folder)."""
    try:
        yield
    except UsageError:
        raise
    except Exception as error:  # the Rust libraries report a full disk as a plain Exception
        refusal = refused_write(error, training_args, what)
        if refusal is None:
            raise
        raise refusal from None


def refused_write(error, training_args, what=None):
    """The UsageError for an error that is the machine refusing a write of the run (full, read-only, not
    permitted), naming what was being written, where, and what the same command does when run again; None for any
    other error."""
    output_dir = Path(training_args.output_dir)
    reason, path = why_write_failed(error, output_dir)
    if reason is None:
        return None
    then = f"then run the same command again{what_a_rerun_does(training_args)}"
    if path is not None and not Path(path).resolve().is_relative_to(output_dir.resolve()):
        return UsageError(f"Could not write {what + ' to ' if what else ''}{path} ({reason}); make room or fix the "
                          f"permissions there, {then}.")
    at = f": {Path(path).resolve().relative_to(output_dir.resolve())}" if path is not None else ""
    return UsageError(f"Could not write {what + ' ' if what else ''}to --output_dir {output_dir} ({reason}{at}); "
                      f"make room or fix the permissions, {then}.")


def what_a_rerun_does(training_args):
    output_dir = Path(training_args.output_dir)
    if training_args.overwrite_output_dir:
        return ": it starts afresh (--overwrite_output_dir)"
    if not output_dir.is_dir():
        return ""
    checkpoint = last_complete_checkpoint(output_dir)
    if checkpoint is not None:
        return f": it resumes from {Path(checkpoint).name}" if training_args.do_train else ""
    if any(path.name != LOCK_FILE for path in output_dir.iterdir()):
        return " with --overwrite_output_dir (no checkpoint was saved to resume from)"
    return ""


def lock_output_dir(output_dir):
    """The lock of output_dir, held, with this process's id in its file for the message of a run refused."""
    lock_path = output_dir / LOCK_FILE
    lock = filelock.FileLock(lock_path, timeout=0)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        lock_path.write_text(str(os.getpid()))
    except filelock.Timeout:
        holder = lock_path.read_text().strip() or "unknown"
        raise UsageError(
            f"--output_dir {output_dir} is in use by another run (process {holder}); wait for it to end, or choose "
            "another folder."
        ) from None
    except OSError as error:
        lock.release()
        raise UsageError(
            f"--output_dir {output_dir} cannot be written ({error.strerror}); give a folder you can write to."
        ) from None
    return lock


def why_write_failed(error, folder):
    """(reason, path or None) when the machine is why writing failed (full, read-only, not permitted); else
    (None, None)."""
    failure = write_failure(error)
    if failure is not None:
        return failure
    # torch.save and safetensors report a full disk as RuntimeError / SafetensorError, without an errno.
    if not isinstance(error, OSError) and shutil.disk_usage(folder).free < 1 << 20:
        return os.strerror(errno.ENOSPC), None
    return None, None


def check_nothing_in_the_way(training_args, adapter_args, evaluation_args):
    """Refuse now, before anything is loaded, an entry of the output folder (kept by --overwrite_output_dir, or beside
    the checkpoints resumed from) of the other kind where the run will write: a file where it makes a folder, or a
    folder where it writes a file. Found at the end, it would cost the training, or be skipped without a word."""
    if not training_args.should_save:
        return
    output_dir = Path(training_args.output_dir)
    for path, is_folder, what in written_paths(training_args, adapter_args, evaluation_args):
        blocker = path if path.exists() and path.is_dir() != is_folder else next(
            (parent for parent in path.parents if parent.is_file()), None)
        if blocker == path:
            kind, wanted = ("file", "folder") if is_folder else ("folder", "file")
            raise UsageError(f"{path} is a {kind} where this run writes {what} as a {wanted}; {MOVE_IT}")
        if blocker is not None:
            raise UsageError(f"{blocker} is a file where this run writes {what} into a folder ({path}); {MOVE_IT}")
    for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        if training_args.do_train and not path.is_dir():
            raise UsageError(f"{path} is a file where this run writes its checkpoints as folders; {MOVE_IT}")


def written_paths(training_args, adapter_args, evaluation_args):
    """(path, whether it is a folder, what it holds) of what a run with these flags writes at fixed names."""
    output_dir = Path(training_args.output_dir)
    paths = [(output_dir / name, False, "the metrics") for name in ("all_results.json", "trainer_state.json")]
    paths.append((output_dir / "README.md", False, "the model card"))
    if training_args.do_train:
        paths += [(output_dir / "train_results.json", False, "the metrics"),
                  (output_dir / "training_curves.png", False, "the plot of the training curves"),
                  (output_dir / "training_args.bin", False, "the training arguments")]
    if training_args.do_eval:
        paths.append((output_dir / "eval_results.json", False, "the metrics"))
    if uses_adapter(adapter_args) and (adapter_args.train_adapter and training_args.do_train
                                       or training_args.push_to_hub):
        paths.append((output_dir / adapter_args.adapter_name, True, "the trained adapter"))
    if adapter_args.merge_adapter:
        paths.append((output_dir / "merged", True, "the merged model of --merge_adapter"))
    if adapter_args.export_peft:
        paths.append((output_dir / "peft", True, "the PEFT adapter of --export_peft"))
    if evaluation_args.num_samples:
        paths.append((output_dir / "samples.jsonl", False, "the samples"))
    if "tensorboard" in training_args.report_to and training_args.logging_dir:
        paths.append((Path(training_args.logging_dir), True, "the TensorBoard logs of --logging_dir"))
    return paths


def detect_last_checkpoint(training_args):
    """Find the checkpoint to resume from, and refuse to write into a folder that holds other work."""
    output_dir = Path(training_args.output_dir)
    if not output_dir.is_dir() or training_args.overwrite_output_dir:
        return None
    last_checkpoint = last_complete_checkpoint(output_dir)
    if last_checkpoint is None and any(path.name != LOCK_FILE for path in output_dir.iterdir()):
        raise UsageError(
            f"--output_dir {output_dir} already exists, is not empty and holds no checkpoint to resume from; "
            "choose another folder, or pass --overwrite_output_dir to write into it anyway."
        )
    if not training_args.do_train:
        return None
    if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
        logger.info(
            f"Resuming training from {last_checkpoint}; pass --overwrite_output_dir to start from scratch instead."
        )
    return last_checkpoint


def check_resume_checkpoint(last_checkpoint, training_args, adapter_args):
    """A checkpoint of another kind of run (full fine-tuning, another adapter or adapter settings) would fail deep
    inside the optimizer once everything is loaded: refuse it now, naming how it differs."""
    checkpoint = training_args.resume_from_checkpoint or last_checkpoint
    if not (training_args.do_train and checkpoint):
        return
    folder = Path(checkpoint)
    holds_model = any((folder / name).is_file() for name in MODEL_WEIGHT_FILES)
    adapter_config_file = folder / adapter_args.adapter_name / "adapter_config.json"
    if not adapter_args.train_adapter:
        found = None if holds_model else "an adapter, not a fully fine-tuned model"
    elif not adapter_config_file.is_file():
        found = "a fully fine-tuned model" if holds_model else f"no adapter named '{adapter_args.adapter_name}'"
    else:
        saved = AdapterConfig.load(json.loads(adapter_config_file.read_text())["config"])
        wanted = AdapterConfig.load(adapter_args.adapter_config)
        # With --load_adapter the trained adapter's settings are the loaded one's, not --adapter_config.
        same = adapter_args.load_adapter or saved.to_dict() == wanted.to_dict()
        found = None if same else "an adapter of another configuration"
    if found is None:
        return
    trains = f"the adapter '{adapter_args.adapter_name}' ({adapter_args.adapter_config})" if (
        adapter_args.train_adapter) else "the whole model"
    if training_args.resume_from_checkpoint:
        raise UsageError(
            f"--resume_from_checkpoint {checkpoint} holds {found}, but this run trains {trains}; give a checkpoint "
            "of the same kind of run, or start afresh without --resume_from_checkpoint."
        )
    raise UsageError(
        f"--output_dir {training_args.output_dir} holds {folder.name} with {found}, but this run trains {trains}; "
        "rerun the command that wrote it to resume, or choose another folder (or pass --overwrite_output_dir) to "
        "start afresh."
    )
