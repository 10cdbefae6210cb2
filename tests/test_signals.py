"""Preemption as schedulers do it, and Ctrl-C: SIGTERM, SIGUSR1 and SIGINT, to the main process or to the whole
process group, with DataLoader and tokenizer workers, while tokenizing, training, writing a checkpoint and evaluating.
Each run ends in one line saying what it saved, the last on stderr, with progress bars on; exits with the signal's
status; leaves no process behind and no half-written checkpoint; and, stopped in training, the same command resumes
to the numbers of the uninterrupted run. The run is held in each phase until the signal is sent
(tests/paused_run.py)."""

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import REPO, tiny_run_arguments

import run_clm
from lmtune.output_dir import is_complete_checkpoint, last_complete_checkpoint

# The seconds a stopped run's processes have to disappear; a DataLoader worker whose parent died checks every 5.
ORPHAN_PATIENCE = 20
LOADER_WORKERS = ["--dataloader_num_workers", "2"]
TOKENIZER_WORKERS = ["--preprocessing_num_workers", "2", "--overwrite_cache"]  # a cached map would start no pool


def arguments(assets, output_dir, *extra):
    # Checkpoints at steps 2, 4 and 6; progress bars on, as a user has them.
    return tiny_run_arguments(run_clm, assets, output_dir, "--do_train", "--do_eval", "--train_adapter", "--max_steps",
                              "6", "--save_strategy", "steps", "--save_steps", "2", "--disable_tqdm", "false", *extra)


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    return run_clm.main(arguments(assets, tmp_path_factory.mktemp("uninterrupted") / "out"))


def session_processes(session):
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session:
                found.append(process)
        except (ProcessLookupError, PermissionError):
            pass
    return found


def run_signalled(argv, phase, signal_number, to_group, folder):
    """Run run_clm.py with argv in a session of its own, held in phase until signal_number is sent to its main process
    or to its whole process group; returns its exit status, its stderr and the processes it left behind."""
    with open(folder / "stderr", "w") as stderr:  # a file, not a pipe, that a process left behind would hold open
        process = subprocess.Popen(
            [sys.executable, str(REPO / "tests/paused_run.py"), phase, str(folder), str(REPO / "run_clm.py"), *argv],
            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True, env=os.environ.copy())
    while not (folder / "reached").exists():
        assert process.poll() is None, (folder / "stderr").read_text()[-3000:]
        time.sleep(0.01)
    if to_group:
        os.killpg(process.pid, signal_number)
    else:
        process.send_signal(signal_number)
    (folder / "sent").touch()
    status = process.wait(timeout=300)
    deadline = time.monotonic() + ORPHAN_PATIENCE
    while (left := session_processes(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for orphan in left:
        orphan.kill()
    return status, (folder / "stderr").read_text(), [orphan.pid for orphan in left]


CASES = {
    # phase, signal, to the whole group, extra flags, what the run saved (the checkpoint of a step, or a line)
    "sigterm-group-training-loader-workers": ("training", signal.SIGTERM, True, LOADER_WORKERS, 3),
    "sigusr1-group-saving-loader-workers": ("saving", signal.SIGUSR1, True, LOADER_WORKERS, 2),
    "sigint-main-training": ("training", signal.SIGINT, False, [], 3),
    "sigterm-main-tokenizing-tokenizer-workers": (
        "tokenizing", signal.SIGTERM, False, TOKENIZER_WORKERS,
        "the run stopped, having saved nothing; run the same command again."),
    "sigint-group-tokenizing-tokenizer-workers": (
        "tokenizing", signal.SIGINT, True, TOKENIZER_WORKERS,
        "the run stopped, having saved nothing; run the same command again."),
    "sigterm-group-evaluating-loader-workers": (
        "evaluating", signal.SIGTERM, True, LOADER_WORKERS,
        "the run stopped; its last checkpoint is {output_dir}/checkpoint-6: run the same command again to resume."),
}


@pytest.mark.parametrize(("phase", "signal_number", "to_group", "extra", "saved"), CASES.values(), ids=CASES.keys())
def test_a_signalled_run_ends_in_one_line_leaves_nothing_behind_and_resumes(
        phase, signal_number, to_group, extra, saved, assets, uninterrupted, tmp_path):
    output_dir = tmp_path / "out"
    argv = arguments(assets, output_dir, *extra)
    status, stderr, left = run_signalled(argv, phase, signal_number, to_group, tmp_path)

    assert status == 128 + signal_number, stderr[-3000:]  # 143 for SIGTERM, 130 for Ctrl-C
    name = signal.Signals(signal_number).name
    if isinstance(saved, int):
        checkpoint = output_dir / f"checkpoint-{saved}"
        expected = (f"training stopped after step {saved} of 6 and saved {checkpoint}; run the same command again to "
                    "resume from it.")
    else:
        expected = saved.format(output_dir=output_dir)
    # The line alone on the last line: split on newlines only, as a terminal shows a bar's carriage returns.
    assert stderr.rstrip("\n").split("\n")[-1] == f"run_clm.py: stopped: {name} received: {expected}", stderr[-3000:]
    assert "Traceback" not in stderr and "Error" not in stderr, stderr[-3000:]
    assert not left, f"processes left behind: {left}"
    assert all(is_complete_checkpoint(folder) for folder in output_dir.glob("checkpoint-*"))  # complete, or none
    if isinstance(saved, int):
        assert not (output_dir / "all_results.json").exists()  # no metrics claim a finished run
        assert last_complete_checkpoint(output_dir) == str(checkpoint)
        resumed = run_clm.main(argv)  # the same command, run again
        for key in ("train_loss", "eval_loss"):
            assert resumed[key] == pytest.approx(uninterrupted[key], abs=1e-4), key


def test_a_checkpoint_without_its_random_state_is_resumed_with_one_warning(assets, tmp_path, caplog):
    output_dir = tmp_path / "out"
    argv = tiny_run_arguments(run_clm, assets, output_dir, "--do_train", "--train_adapter", "--max_steps", "2",
                              "--save_strategy", "steps", "--save_steps", "1")
    run_clm.main(argv)
    shutil.rmtree(output_dir / "checkpoint-2")  # resumed from checkpoint-1, whose random state is lost
    (output_dir / "checkpoint-1" / "rng_state.pth").unlink()
    caplog.clear()
    run_clm.main(argv)
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert [message for message in warnings if "random state" in message] == [
        f"Resuming from {output_dir}/checkpoint-1, which holds no random state of process 0 (rng_state.pth): its "
        "dropout and other random draws will differ from those of the uninterrupted run."]
    assert "Didn't find an RNG file" not in caplog.text


def test_an_error_in_training_is_the_last_line_with_progress_bars_on(assets, tmp_path, capsys):
    # Fully fine-tuned at a learning rate far too high: the loss leaps to billions within steps, mid-bar.
    argv = tiny_run_arguments(run_clm, assets, tmp_path / "out", "--do_train", "--max_steps", "12", "--logging_steps",
                              "1", "--learning_rate", "1e4", "--disable_tqdm", "false")
    assert run_clm.cli(argv) == 2
    stderr = capsys.readouterr().err
    assert stderr.rstrip("\n").split("\n")[-1].startswith("run_clm.py: error: "), stderr[-3000:]
