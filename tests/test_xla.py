"""The torch_xla (TPU) path, on XLA's CPU device (PJRT_DEVICE=CPU): runs only where torch_xla is installed, such as
the environment that tools/xla_check.sh builds; skipped elsewhere (CI).

    .xla-venv/bin/python -m pytest tests/test_xla.py -n 0   (the environment tools/xla_check.sh builds)

Each run goes through tools/xla_spawn.py in a process of its own, as a TPU run would through its spawner.
"""

import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("torch_xla")

from conftest import REPO, read_json, tiny_run_arguments  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import run_clm  # noqa: E402
import run_mlm  # noqa: E402

ADAPTER_FILES = ["adapter.safetensors", "adapter_config.json", "pytorch_adapter.bin"]
FUSED_MESSAGE = "Training with --optim adamw_torch: transformers' default, adamw_torch_fused, has no XLA kernel."


def on_xla(script, arguments):
    """Run script through tools/xla_spawn.py on XLA's CPU device, with the default --num_samples (the tests' quiet
    flags set 0); the CompletedProcess, output and errors together."""
    env = {**os.environ, "PJRT_DEVICE": "CPU"}
    at = arguments.index("--num_samples")
    arguments = arguments[:at] + arguments[at + 2:]
    return subprocess.run([sys.executable, str(REPO / "tools/xla_spawn.py"), script.__file__, *arguments],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=600)


def on_cpu(script, arguments):
    """Run script in plain CPU torch: USE_TORCH_XLA=0 hides torch_xla from transformers and accelerate."""
    env = {key: value for key, value in os.environ.items() if key != "PJRT_DEVICE"}
    return subprocess.run([sys.executable, script.__file__, *arguments], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env={**env, "USE_TORCH_XLA": "0"}, timeout=600)


def succeeded(result):
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout


def adapter(folder):
    return load_file(folder / "adapter.safetensors")


def test_clm_adapter_on_xla_saves_the_adapter_alone_resumes_and_reloads_on_cpu(assets, dropout_free, tmp_path):
    # Dropout-free: the Trainer restores XLA's random seed after the device loader has already advanced it (a graph
    # sync at the first batch), so with dropout a resumed run would draw other masks than the uninterrupted one.
    def arguments(output_dir):
        return tiny_run_arguments(run_clm, assets, output_dir, "--do_train", "--do_eval", "--train_adapter",
                                  "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--log_level",
                                  "info", train="code", validation="code", model=dropout_free.gpt2)

    straight = tmp_path / "straight"
    output = succeeded(on_xla(run_clm, arguments(straight)))  # no --optim: transformers' default, adamw_torch_fused
    assert FUSED_MESSAGE in output
    # The default samples are skipped in one line: generating compiled a graph per token and ended the run (139).
    assert "No samples on XLA (TPUs)" in output and not (straight / "samples.jsonl").exists()
    summary = next(line.strip() for line in output.splitlines() if "saved adapter:" in line)
    assert summary.startswith(f"saved adapter: {straight / 'clm'} (") and "(0.00 MB)" not in summary  # was 0.00 MB
    for folder in (straight, straight / "checkpoint-2", straight / "checkpoint-4"):
        assert sorted(path.name for path in (folder / "clm").iterdir()) == ADAPTER_FILES
        assert not list(folder.glob("model*.safetensors")) and not (folder / "config.json").exists()
    final, step_2 = adapter(straight / "clm"), adapter(straight / "checkpoint-2/clm")
    assert any((final[key] - step_2[key]).abs().max() > 0 for key in final)  # each save holds its step's weights

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    assert f"Resuming training from {resumed / 'checkpoint-2'}" in succeeded(on_xla(run_clm, arguments(resumed)))
    for key in ("train_loss", "eval_loss"):
        assert read_json(resumed / "all_results.json")[key] == pytest.approx(
            read_json(straight / "all_results.json")[key], abs=1e-5)
    assert all((adapter(resumed / "clm")[key] - final[key]).abs().max() < 1e-5 for key in final)

    on_xla_loss = read_json(straight / "eval_results.json")["eval_loss"]
    succeeded(on_cpu(run_clm, tiny_run_arguments(run_clm, assets, tmp_path / "cpu", "--do_eval", "--load_adapter",
                                                 straight / "clm", train=None, validation="code",
                                                 model=dropout_free.gpt2)))
    assert read_json(tmp_path / "cpu/eval_results.json")["eval_loss"] == pytest.approx(on_xla_loss, abs=1e-4)


@pytest.mark.parametrize("lines", [[], ["--line_by_line", "--pad_to_max_length"]], ids=["grouped", "line_by_line"])
def test_mlm_adapter_on_xla_reloads_on_cpu_to_the_same_eval_loss(assets, tmp_path, lines):
    straight = tmp_path / "xla"
    succeeded(on_xla(run_mlm, tiny_run_arguments(run_mlm, assets, straight, "--do_train", "--do_eval",
                                                 "--train_adapter", "--max_steps", "4", *lines, train="code",
                                                 validation="code")))
    assert sorted(path.name for path in (straight / "mlm").iterdir()) == ADAPTER_FILES
    succeeded(on_cpu(run_mlm, tiny_run_arguments(run_mlm, assets, tmp_path / "cpu", "--do_eval", "--load_adapter",
                                                 straight / "mlm", *lines, train=None, validation="code")))
    assert read_json(tmp_path / "cpu/eval_results.json")["eval_loss"] == pytest.approx(
        read_json(straight / "eval_results.json")["eval_loss"], abs=1e-4)


def test_an_explicit_fused_optimizer_is_refused_on_xla_in_one_line(assets, tmp_path):
    result = on_xla(run_clm, tiny_run_arguments(run_clm, assets, tmp_path, "--do_train", "--max_steps", "1",
                                                "--train_adapter", "--optim", "adamw_torch_fused"))
    assert result.returncode == 2
    assert "Traceback" not in result.stdout
    assert "run_clm.py: error: --optim adamw_torch_fused has no XLA kernel" in result.stdout
