"""Runs that must hold up: the same result twice, a SIGKILL or a SIGTERM in the middle (several processes:
test_distributed)."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import read_json, small_file_system, tiny_run_arguments

import run_clm
import run_mlm
from lmtune.callbacks import StopOnSignal
from lmtune.output_dir import last_complete_checkpoint
from lmtune.stopping import StoppedBySignal
from lmtune.trainer import LanguageModelingTrainer


def arguments(script, assets, output_dir, *extra):
    return tiny_run_arguments(script, assets, output_dir, "--do_train", "--do_eval", "--train_adapter", *extra,
                              length=64, eval_samples=24)


@pytest.mark.parametrize("script", [run_clm, run_mlm], ids=["clm", "mlm"])
def test_the_same_command_twice_gives_the_same_metrics(script, assets, tmp_path):
    first = script.main(arguments(script, assets, tmp_path / "first", "--max_steps", "6"))
    second = script.main(arguments(script, assets, tmp_path / "second", "--max_steps", "6"))
    for key in ("train_loss", "eval_loss", "eval_accuracy", "perplexity"):
        assert first[key] == second[key], key


@pytest.mark.parametrize("script", [run_clm, run_mlm], ids=["clm", "mlm"])
def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(script, assets, tmp_path, caplog):
    # 16 steps per epoch: the kill comes after checkpoint-20, so the run resumes inside its second epoch.
    extra = ["--max_train_samples", "64", "--max_steps", "40", "--save_strategy", "steps", "--save_steps", "10",
             "--log_level", "info"]
    uninterrupted = script.main(arguments(script, assets, tmp_path / "straight", *extra))

    output_dir = tmp_path / "killed"
    command = [sys.executable, script.__file__, *arguments(script, assets, output_dir, *extra)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 300
    while not (output_dir / "checkpoint-20" / "trainer_state.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert not (output_dir / "all_results.json").exists()

    caplog.clear()
    script.main(arguments(script, assets, output_dir, *extra))  # the same command, run again
    assert f"Resuming training from {output_dir}/checkpoint-" in caplog.text
    resumed_results = read_json(output_dir / "all_results.json")
    assert resumed_results["eval_loss"] == pytest.approx(uninterrupted["eval_loss"], abs=1e-4)
    # The Trainer alone would divide the second session's losses by all 40 steps.
    assert resumed_results["train_loss"] == pytest.approx(uninterrupted["train_loss"], abs=1e-4)


def run_and_signal(command, signal_number, after_losses):
    """Start command, send it the signal once it has printed after_losses training losses (one per step with
    --logging_steps 1), and wait for it; returns its exit status, its output and the seconds from signal to exit."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output, losses, signalled_at = [], 0, None
    for line in process.stdout:
        output.append(line)
        losses += "'loss'" in line
        if losses == after_losses and signalled_at is None:
            process.send_signal(signal_number)
            signalled_at = time.monotonic()
    status = process.wait(timeout=300)
    return status, "".join(output), time.monotonic() - signalled_at


@pytest.mark.parametrize(("script", "signal_number"), [(run_clm, signal.SIGTERM), (run_mlm, signal.SIGUSR1)],
                         ids=["clm-sigterm", "mlm-sigusr1"])
def test_a_run_stopped_by_a_signal_saves_its_step_and_resumes_to_the_uninterrupted_result(
        script, signal_number, assets, tmp_path, caplog):
    # Signalled during step 13 (or soon after): the checkpoint is of that step, not of --save_steps' step 10.
    extra = ["--max_steps", "30", "--save_strategy", "steps", "--save_steps", "10", "--logging_steps", "1",
             "--log_level", "info"]
    uninterrupted = script.main(arguments(script, assets, tmp_path / "straight", *extra))

    output_dir = tmp_path / "stopped"
    command = [sys.executable, script.__file__, *arguments(script, assets, output_dir, *extra)]
    status, output, seconds = run_and_signal(command, signal_number, after_losses=12)
    assert status == 128 + signal_number, output[-3000:]  # 143 for SIGTERM: terminated, as a killed run reports
    last_line = output.strip().splitlines()[-1]
    step = int(last_line.split("after step ")[1].split()[0])
    assert 12 < step < 30, last_line
    checkpoint = output_dir / f"checkpoint-{step}"
    assert last_line == (
        f"{script.__name__}.py: stopped: {signal.Signals(signal_number).name} received: training stopped after step "
        f"{step} of 30 and saved {checkpoint}; run the same command again to resume from it.")
    assert "Traceback" not in output
    assert last_complete_checkpoint(output_dir) == str(checkpoint)
    assert "TrainLossSum" in read_json(checkpoint / "trainer_state.json")["stateful_callbacks"]
    assert list(checkpoint.glob("*/adapter.safetensors"))  # the adapter only
    assert not (output_dir / "all_results.json").exists()  # no metrics claim a finished run
    print(f"signal to exit: {seconds:.2f} s")

    caplog.clear()
    handler = signal.getsignal(signal_number)
    resumed = script.main(arguments(script, assets, output_dir, *extra))  # the same command, run again
    assert signal.getsignal(signal_number) is handler  # the run's own handler is gone with its training
    assert f"Resuming training from {checkpoint};" in caplog.text
    for key in ("train_loss", "eval_loss"):
        assert resumed[key] == pytest.approx(uninterrupted[key], abs=1e-4), key


def test_signals_during_the_checkpoint_change_nothing_and_the_handlers_come_back(assets, tmp_path, monkeypatch):
    """In one process: SIGTERM during step 3, then SIGTERM and SIGUSR1 while its checkpoint is written; then, in a
    second run, a signal that comes after the last step reaches the handler that was there before the run."""
    received = []
    previous = {number: signal.signal(number, lambda number, frame: received.append(number))
                for number in (signal.SIGTERM, signal.SIGUSR1)}
    ours = {number: signal.getsignal(number) for number in previous}
    save_checkpoint, on_step_end = LanguageModelingTrainer._save_checkpoint, StopOnSignal.on_step_end

    def signal_at_step_3(self, args, state, control, **kwargs):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # handled before the next line of Python runs
        on_step_end(self, args, state, control, **kwargs)

    def signals_while_saving(self, model, trial):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        save_checkpoint(self, model, trial)

    monkeypatch.setattr(StopOnSignal, "on_step_end", signal_at_step_3)
    monkeypatch.setattr(LanguageModelingTrainer, "_save_checkpoint", signals_while_saving)
    output_dir = tmp_path / "out"
    try:
        with pytest.raises(StoppedBySignal) as stop:
            run_clm.main(arguments(run_clm, assets, output_dir, "--max_steps", "6"))
        assert stop.value.exit_status == 143
        assert f"after step 3 of 6 and saved {output_dir / 'checkpoint-3'};" in str(stop.value)
        assert last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-3")
        assert received == [] and {number: signal.getsignal(number) for number in ours} == ours

        monkeypatch.undo()
        monkeypatch.setattr(StopOnSignal, "on_train_end", lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGUSR1))
        metrics = run_clm.main(arguments(run_clm, assets, tmp_path / "late", "--max_steps", "2"))
        assert received == [signal.SIGUSR1] and "eval_loss" in metrics  # delivered once, to the handler before
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def test_a_disk_that_fills_up_ends_in_one_line_and_the_rerun_resumes_exactly(assets, tmp_path, capsys):
    # Each checkpoint of this run takes about 160 kB: the third of them does not fit into 400 kB.
    extra = ["--max_steps", "8", "--save_strategy", "steps", "--save_steps", "2", "--max_train_samples", "32"]
    uninterrupted = run_clm.main(arguments(run_clm, assets, tmp_path / "straight", *extra))
    with small_file_system(tmp_path / "disk", "400k") as resize:
        output_dir = tmp_path / "disk" / "run"
        assert run_clm.cli(arguments(run_clm, assets, output_dir, *extra)) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith(f"run_clm.py: error: Could not write a checkpoint to --output_dir {output_dir} (No "
                               "space left on device")
        assert line.endswith("make room or fix the permissions, then run the same command again: it resumes from "
                             "checkpoint-4.")
        assert last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-4")
        resize("8m")
        resumed = run_clm.main(arguments(run_clm, assets, output_dir, *extra))
    assert resumed["eval_loss"] == pytest.approx(uninterrupted["eval_loss"], abs=1e-6)
    assert resumed["train_loss"] == pytest.approx(uninterrupted["train_loss"], abs=1e-6)


def test_a_read_only_output_dir_is_refused_before_the_model_loads(assets, tmp_path, capsys):
    with small_file_system(tmp_path / "disk", "1m"):
        subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "disk")], check=True)
        output_dir = tmp_path / "disk" / "run"
        # The model named does not exist: the folder is checked before anything is loaded.
        assert run_clm.cli(arguments(run_clm, assets, output_dir, "--max_steps", "1", "--model_name_or_path",
                                     tmp_path / "no-model-here")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"run_clm.py: error: --output_dir {output_dir} cannot be written (Read-only file system); give a folder you "
        "can write to.")


@pytest.mark.parametrize("script", [run_clm, run_mlm], ids=["clm", "mlm"])
def test_a_run_whose_loss_diverges_stops_in_one_line_and_keeps_its_checkpoints(script, assets, tmp_path, capsys):
    output_dir = tmp_path / "out"
    # Fully fine-tuned at a learning rate far too high: the loss leaps to billions within steps.
    argv = tiny_run_arguments(script, assets, output_dir, "--do_train", "--do_eval", "--max_steps", "12",
                              "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
                              "--save_total_limit", "1", "--learning_rate", "1e4")
    assert script.cli(argv) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert stderr[-1].startswith(f"{script.__name__}.py: error: Training diverged at step")
    assert "lower --learning_rate (10000)" in stderr[-1] and not any("Traceback" in line for line in stderr)
    assert not (output_dir / "all_results.json").exists()  # no figure was reported for it
    checkpoint = last_complete_checkpoint(output_dir)  # none where the very first step diverged
    if checkpoint is not None:
        history = read_json(Path(checkpoint) / "trainer_state.json")["log_history"]
        assert all(math.isfinite(entry["loss"]) and entry["loss"] < 50 for entry in history if "loss" in entry)
