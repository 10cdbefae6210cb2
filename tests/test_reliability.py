"""Runs that must hold up: the same result twice, and a SIGKILL in the middle (several processes: test_distributed)."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import read_json, tiny_run_arguments

import run_clm
import run_mlm


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
def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(script, assets, tmp_path):
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

    resumed = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming training from {output_dir}/checkpoint-" in resumed.stdout + resumed.stderr
    assert read_json(output_dir / "all_results.json")["eval_loss"] == pytest.approx(
        uninterrupted["eval_loss"], abs=1e-4)
