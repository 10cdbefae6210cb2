"""The benchmark still runs: its smallest setting end to end on the tests' tiny models, a check and not a measurement
(benchmarks/README.md has the measurements)."""

import importlib.util
import os
import subprocess
import sys

from conftest import REPO, read_json


def load_benchmark():
    spec = importlib.util.spec_from_file_location("run_benchmark", REPO / "benchmarks" / "run_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_runs_end_to_end_at_its_smallest_setting(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_benchmark.py"), "--smoke", "--out",
                             str(tmp_path)], capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = read_json(tmp_path / "results.json")
    assert results["mode"] == "smoke"
    for script in ("run_clm", "run_mlm"):
        preprocessing = results["preprocessing"][script]
        assert sorted(preprocessing["workers"]) == ["1", "2"]
        assert all(figures["script_tokens_per_s"] > 0 and figures["bare_tokens_per_s"] > 0
                   for figures in preprocessing["workers"].values())
        assert set(preprocessing["grouping"]) == {"script", "chaining", "script_in_map", "chaining_in_map"}
    runs = results["training_runs"]
    assert [(run["script"], run["method"]) for run in runs] == [("run_clm", "seq_bn")]
    assert not [run["error"] for run in runs if "error" in run]
    assert all(run["step_s"] and run["train_peak_rss_mib"] >= run["train_start_rss_mib"] > 0 for run in runs)
    report = (tmp_path / "results.md").read_text()
    assert "| run_clm | seq_bn | 2x64 | fp32 |" in report and "| Target |" in report

    # The memory report (--memory, 18 minutes) from the same runs, which measure memory the same way.
    benchmark = load_benchmark()
    measured = [(benchmark.Run(run["script"], run["method"], benchmark.TINY, variant), dict(run))
                for run in runs for variant in ("fp32", "checkpointing")]
    rows = benchmark.summarise_memory(measured)
    assert [row["train_peak_x"] for row in rows if row["variant"] == "checkpointing"] == [1.0]
    memory_report = benchmark.memory_markdown({"machine": results["machine"], "minutes": 1.0, "rows": rows})
    assert "| run_clm | gpt2 | seq_bn | checkpointing |" in memory_report
