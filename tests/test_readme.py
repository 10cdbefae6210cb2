"""The README's commands and snippet, run as a new user would run them."""

import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO, noise_in, read_json, tiny_run_arguments

import run_clm
import run_mlm

README = (REPO / "README.md").read_text()


def fenced_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def command_block(containing):
    return next(block for block in fenced_blocks("bash") if containing in block).strip()


def test_quick_start_adapts_a_pretrained_base_to_code_and_reports_it_quietly(tmp_path, monkeypatch, capsys):
    commands = command_block("make_tiny_assets.py")
    # The same commands from a fresh folder: only the script paths point back into the repository.
    commands = commands.replace("python tools/", f"{sys.executable} {REPO}/tools/")
    commands = commands.replace("python run_clm.py", f"{sys.executable} {REPO}/run_clm.py")
    result = subprocess.run(["bash", "-ec", commands], cwd=tmp_path, capture_output=True, text=True,
                            env=os.environ.copy(), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not noise_in(result.stdout + result.stderr)
    output_dir = tmp_path / "outputs" / "code-adapter"
    results = read_json(output_dir / "all_results.json")
    summary = result.stdout[result.stdout.rindex("***** summary *****"):]
    before = re.search(r"\(before training: perplexity ([\d.]+), accuracy ([\d.]+)\)", summary)
    # The base model knows English, not code; the adapter teaches it code.
    assert results["perplexity"] < float(before[1]) / 3 and results["eval_accuracy"] > float(before[2]) + 0.2
    assert re.search(r"trainable parameters: [\d,]+ of [\d,]+ \(0\.\d\d%\)", summary)
    assert "saved adapter: outputs/code-adapter/clm (" in summary
    assert f"perplexity {results['perplexity']:.2f}" in summary
    assert re.search(r"training: [\d.]+ s \([\d.]+ samples/s, [\d,]+ tokens/s\)", summary)
    assert (output_dir / "clm" / "adapter_config.json").is_file()
    png = output_dir / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "training curves: outputs/code-adapter/training_curves.png" in summary
    history = read_json(output_dir / "trainer_state.json")["log_history"]
    assert len([entry for entry in history if "eval_loss" in entry]) > 3  # curves, not a lonely dot

    # The README's command that evaluates the saved adapter, in this process.
    monkeypatch.chdir(tmp_path)
    evaluate = shlex.split(command_block("--load_adapter outputs/code-adapter/clm"))
    assert evaluate[:2] == ["python", "run_clm.py"] and "--train_adapter" not in evaluate
    assert run_clm.cli(evaluate[2:]) == 0
    assert "model: frozen, nothing trained" in capsys.readouterr().out
    assert read_json(tmp_path / "outputs" / "code-eval" / "eval_results.json")["eval_loss"] == pytest.approx(
        results["eval_loss"], abs=1e-5)


def test_masked_lm_quick_start_works_offline_as_written(assets, tmp_path, monkeypatch, capsys):
    # The assets fixture built what `make_tiny_assets.py tiny` builds.
    (tmp_path / "tiny").symlink_to(assets.folder)
    monkeypatch.chdir(tmp_path)
    command = shlex.split(command_block("run_mlm.py --model_type roberta"))
    assert command[:2] == ["python", "run_mlm.py"]
    assert run_mlm.cli(command[2:]) == 0
    summary = capsys.readouterr().out.split("***** summary *****")[1]
    results = read_json(tmp_path / "outputs" / "tiny-roberta" / "all_results.json")
    assert results["perplexity"] < 500  # from about 1000, the uniform guess over its 1000 tokens
    assert f"perplexity {results['perplexity']:.2f}" in summary


def test_python_snippet_loads_a_trained_adapter(assets, pretrained_gpt2, tmp_path):
    run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path, "--do_train", "--max_steps", "2", "--train_adapter",
                                    model=pretrained_gpt2, train="code", validation=None, learning_rate=None))
    snippet = next(block for block in fenced_blocks("python") if "adapters.init" in block)
    snippet = snippet.replace("outputs/tiny-gpt2", str(pretrained_gpt2))
    snippet = snippet.replace("outputs/code-adapter/clm", str(tmp_path / "clm"))
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True,
                            env=os.environ.copy(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("def read_file(path):\n    with open(")
    assert len(result.stdout) > len("def read_file(path):\n    with open(") + 5  # it generated something
