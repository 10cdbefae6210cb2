"""The README's commands and snippet, run as a new user would run them."""

import os
import re
import subprocess
import sys

import pytest
from conftest import QUIET, REPO, read_json

import run_clm

README = (REPO / "README.md").read_text()


def fenced_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_quick_start_trains_an_adapter_and_reports_it(tmp_path):
    run_command = next(block for block in fenced_blocks("bash") if "make_tiny_assets.py" in block).strip()
    # The same command from a fresh folder: only the script paths point back into the repository.
    run_command = run_command.replace("python tools/", f"{sys.executable} {REPO}/tools/")
    run_command = run_command.replace("python run_clm.py", f"{sys.executable} {REPO}/run_clm.py")
    result = subprocess.run(["bash", "-c", run_command], cwd=tmp_path, capture_output=True, text=True,
                            env=os.environ.copy(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    output_dir = tmp_path / "outputs" / "quickstart-clm"
    results = read_json(output_dir / "all_results.json")
    assert results["perplexity"] < 950  # from ~1000, the uniform guess of a random model
    summary = result.stdout[result.stdout.index("***** summary *****"):]
    assert re.search(r"trainable parameters: [\d,]+ of [\d,]+ \(\d+\.\d\d%\)", summary)
    assert "saved adapter: outputs/quickstart-clm/clm (" in summary
    assert f"perplexity {results['perplexity']:.2f}" in summary
    assert re.search(r"training: [\d.]+ s \([\d.]+ samples/s, [\d,]+ tokens/s\)", summary)
    assert (output_dir / "clm" / "adapter_config.json").is_file()
    pytest.importorskip("matplotlib")
    png = output_dir / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "training curves: outputs/quickstart-clm/training_curves.png" in summary


def test_python_snippet_loads_a_trained_adapter(assets, pretrained_gpt2, tmp_path):
    run_clm.main([
        "--model_name_or_path", str(pretrained_gpt2), "--train_file", str(assets.code_train), "--do_train",
        "--max_steps", "2", "--block_size", "32", "--train_adapter", "--output_dir", str(tmp_path), *QUIET,
    ])
    snippet = fenced_blocks("python")[0]
    snippet = snippet.replace("outputs/tiny-gpt2", str(pretrained_gpt2))
    snippet = snippet.replace("outputs/code-adapter/clm", str(tmp_path / "clm"))
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True,
                            env=os.environ.copy(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("def read_file(path):\n    with open(")
    assert len(result.stdout) > len("def read_file(path):\n    with open(") + 5  # it generated something
