"""What a new user meets first: --help, what a run prints, an eval-only run, the plot, a hub name without network."""

import ast
import dataclasses
import importlib.metadata
import logging
import math
import re
import shutil
import subprocess
import sys
import warnings
from types import SimpleNamespace

import huggingface_hub
import pytest
import transformers
from conftest import REPO, noise_in, tiny_run_arguments
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from safetensors.torch import load_file
from transformers import TrainingArguments

import run_clm
import run_mlm
from lmtune.arguments import ArgumentParser, optim_given
from lmtune.hub import check_hub_is_reachable

SCRIPTS = pytest.mark.parametrize("script", [run_clm, run_mlm], ids=["clm", "mlm"])


def help_text(script, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.cli([flag])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@SCRIPTS
def test_help_shows_the_scripts_groups_first_then_the_trainers_most_used_flags(script, capsys):
    text = help_text(script, "--help", capsys)
    headings = re.findall(r"^(\S.*):$", text, flags=re.MULTILINE)
    assert headings == ["Model and tokenizer", "Data", "Adapter", "Early stopping and samples",
                        "Training (the Trainer's flags)", "Help"]
    assert {"--learning_rate", "--num_train_epochs", "--eval_steps", "--help-all"} <= set(re.findall(r"--[\w-]+", text))
    assert "--torch_empty_cache_steps" not in text and "--deepspeed" not in text  # only under --help-all
    assert len(text.splitlines()) < 300  # it was 817 lines


@SCRIPTS
def test_help_all_lists_every_flag_and_renders_every_help_text(script, capsys):
    text = help_text(script, "--help-all", capsys)
    groups = [type(group) for group in script.parse_arguments(["--output_dir", "unused"])]
    assert not [f.name for group in groups for f in dataclasses.fields(group) if f.init and f"--{f.name}" not in text]
    own = [f for group in groups if group is not TrainingArguments for f in dataclasses.fields(group) if f.init]
    assert all(f.metadata.get("help") for f in own)
    headings = re.findall(r"^(\S.*):$", text, flags=re.MULTILINE)
    assert headings == ["Model and tokenizer", "Data", "Adapter", "Early stopping and samples",
                        "Training (the Trainer's flags)", "Help"]
    flat = " ".join(text.split())
    assert "at a cost of about [10% slower performance]" in flat  # a bare % made argparse print a dict here
    assert "'option_strings'" not in flat
    assert "local folder" in flat.split("--load_adapter LOAD_ADAPTER")[1].split("--adapter_config")[0]
    # Each --no_X that HfArgumentParser adds says that it turns --X off, not what --X does.
    negations = dict(re.findall(r"^  --no_(\w+), --no-[\w-]+\n +(.*)$", text, flags=re.MULTILINE))
    assert {"use_fast_tokenizer", "dataloader_pin_memory", "remove_unused_columns"} <= negations.keys()
    assert all(first_line.startswith(f"Turn --{flag} off") for flag, first_line in negations.items())


def test_a_negated_flag_turns_its_flag_off():
    _, data_args, training_args, *_ = run_clm.parse_arguments(["--no_keep_linebreaks", "--no_remove_unused_columns"])
    assert data_args.keep_linebreaks is False and training_args.remove_unused_columns is False
    _, data_args, training_args, *_ = run_clm.parse_arguments([])
    assert data_args.keep_linebreaks is True and training_args.remove_unused_columns is True


@pytest.fixture
def run_and_read(capsys, caplog):
    """Run a script's main() in this process; returns its metrics and all it printed, logged and warned."""
    # transformers' loggers do not propagate to the root logger that caplog listens on.
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(caplog.handler)
    # A run logs at the level transformers is set to; a fresh process's is warning, an earlier test may leave info.
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_warning()

    def run(script, arguments):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics = script.main(arguments)
        printed = capsys.readouterr()
        text = "\n".join([printed.out, printed.err, caplog.text, *(str(warning.message) for warning in caught)])
        caplog.clear()
        return metrics, text

    yield run
    transformers_logger.removeHandler(caplog.handler)
    transformers.utils.logging.set_verbosity(verbosity)


@SCRIPTS
def test_a_saved_adapter_is_evaluated_without_train_adapter_quietly(script, assets, tmp_path, run_and_read):
    name = "clm" if script is run_clm else "mlm"
    trained, _ = run_and_read(script, tiny_run_arguments(
        script, assets, tmp_path / "train", "--do_train", "--do_eval", "--max_steps", "2", "--train_adapter"))
    adapter = tmp_path / "train" / name
    evaluated, text = run_and_read(script, tiny_run_arguments(
        script, assets, tmp_path / "eval", "--do_eval", "--load_adapter", adapter))
    assert evaluated["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-6)
    assert not noise_in(text)
    summary = text.split("***** summary *****")[1]
    assert "trainable parameters" not in summary and "training curves" not in summary
    adapter_size = sum(tensor.numel() for tensor in load_file(adapter / "adapter.safetensors").values())
    assert re.search(rf"model: frozen, nothing trained: [\d,]+ parameters evaluated, {adapter_size:,} \([\d.]+%\) "
                     rf"of them in adapter {name} \({re.escape(str(adapter))}, [\d.]+ MB\)", summary)
    with pytest.raises(script.UsageError, match="with --do_train trains the adapter further: add --train_adapter"):
        script.main(tiny_run_arguments(script, assets, tmp_path / "more", "--do_train", "--load_adapter", adapter))


def test_an_eval_only_run_without_adapter_says_the_model_is_frozen(assets, tmp_path, run_and_read):
    _, text = run_and_read(run_clm, tiny_run_arguments(run_clm, assets, tmp_path, "--do_eval"))
    summary = text.split("***** summary *****")[1]
    assert re.search(r"model: frozen, nothing trained: [\d,]+ parameters evaluated as loaded\n", summary)
    assert "trainable parameters" not in summary
    assert not noise_in(text)


@pytest.mark.parametrize("source", ["validation text", "prompt file"])
def test_samples_of_a_text_longer_than_the_model_takes_are_made_quietly(source, assets, tmp_path, run_and_read):
    # Far more tokens than the tiny GPT-2's 256 positions: the samples keep a text's first tokens, a prompt's last.
    long_text = " ".join(assets.validation.read_text().split()[:1500])
    path = tmp_path / "long.txt"
    path.write_text(long_text + "\n")
    flags = ["--validation_file", path] if source == "validation text" else ["--sample_prompts", path]
    _, text = run_and_read(run_clm, tiny_run_arguments(run_clm, assets, tmp_path / "run", "--do_eval",
                                                       "--num_samples", "1", *flags))
    assert "samples (greedy)" in text
    assert not noise_in(text)


# Imports each script as a user's run does, in a fresh interpreter, then makes bitsandbytes take the branch of a CPU
# with AVX512-BF16 whose optional `kernels` package is missing, wherever the test runs: its notice must not reach the
# user. (On such a CPU the plain import alone printed it.)
IMPORT_AS_ON_AN_AVX512_BF16_CPU = """
import importlib, sys
import {script}
import bitsandbytes.functional
from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
    sys.exit(3)  # no native CPU library: bitsandbytes never reaches the notice
sys.modules["kernels"] = None
bitsandbytes.functional.has_avx512bf16 = lambda: True
importlib.reload(importlib.import_module("bitsandbytes.backends.cpu.ops"))
"""


@SCRIPTS
def test_bitsandbytes_does_not_tell_a_user_about_its_optional_cpu_kernel(script, assets):
    pytest.importorskip("bitsandbytes")
    code = IMPORT_AS_ON_AN_AVX512_BF16_CPU.format(script=script.__name__)
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    if ran.returncode == 3:
        pytest.skip("bitsandbytes has no native CPU library here")
    assert ran.returncode == 0, ran.stderr
    assert not noise_in(ran.stdout + ran.stderr)


@pytest.fixture
def hub_unreachable(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    huggingface_hub.utils.reset_sessions()  # the cached session was made for offline mode
    yield
    monkeypatch.undo()
    huggingface_hub.utils.reset_sessions()


def test_a_hub_name_without_network_fails_at_once_in_one_line(assets, tmp_path, hub_unreachable):
    with pytest.raises(run_clm.UsageError, match=re.escape(
            "--model_name_or_path gpt2 is not a local folder, and the Hugging Face Hub (http://127.0.0.1:9) "
            "cannot be reached (ConnectionError); give a local folder, or run once with network")):
        run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path, "--do_train", "--model_name_or_path", "gpt2"))
    with pytest.raises(run_clm.UsageError, match=re.escape("--push_to_hub uploads to the Hugging Face Hub, and the "
                                                           "Hugging Face Hub (http://127.0.0.1:9) cannot be reached")):
        run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path, "--do_train", "--push_to_hub"))
    # Local folders alone never ask the network.
    model_args, data_args, training_args, adapter_args, _ = run_clm.parse_arguments(
        tiny_run_arguments(run_clm, assets, tmp_path))
    check_hub_is_reachable(model_args, data_args, adapter_args, training_args)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_a_hub_name_in_the_local_cache_is_used_without_network(assets, tmp_path, hub_unreachable, caplog):
    # The cache as the hub client leaves it: the files of a revision in a snapshot, and the branch naming it.
    repository = tmp_path / "cache" / "models--user--tiny-gpt2"
    shutil.copytree(assets.tiny_gpt2, repository / "snapshots" / "0123abcd")
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text("0123abcd")
    metrics = run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path / "out", "--do_eval", "--model_name_or_path",
                                              "user/tiny-gpt2", "--cache_dir", tmp_path / "cache", "--log_level",
                                              "warning"))
    local = run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path / "local", "--do_eval"))
    assert metrics["eval_loss"] == pytest.approx(local["eval_loss"], abs=1e-6)
    assert "using the local cache's copies of user/tiny-gpt2" in caplog.text


def drawn_figure(history, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    trainer = SimpleNamespace(state=SimpleNamespace(log_history=history), is_world_process_zero=lambda: True)
    path = run_clm.plot_training_curves(trainer, SimpleNamespace(do_train=True, output_dir=str(tmp_path)))
    assert path == str(tmp_path / "training_curves.png") and (tmp_path / "training_curves.png").is_file()
    return figures[0]


def test_the_plot_draws_eval_perplexity_and_accuracy_curves(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    evaluations = [(0, 5.2, 0.07), (10, 3.9, 0.30), (20, 3.5, 0.42)]
    history = [{"step": step, "eval_loss": loss, "eval_accuracy": accuracy} for step, loss, accuracy in evaluations]
    history.insert(2, {"step": 10, "loss": 4.1})
    history.append(dict(history[-1]))  # the final evaluation repeats the last periodic one
    figure = drawn_figure(history, tmp_path, monkeypatch)
    loss, perplexity, accuracy = figure.axes
    assert [axes.get_title() for axes in figure.axes] == ["Loss", "Eval perplexity", "Eval accuracy"]
    assert list(perplexity.lines[0].get_xdata()) == [0, 10, 20]
    assert list(perplexity.lines[0].get_ydata()) == pytest.approx([math.exp(loss) for _, loss, _ in evaluations])
    assert list(accuracy.lines[0].get_ydata()) == [0.07, 0.30, 0.42]
    assert [line.get_label() for line in loss.lines] == ["train loss", "eval loss"]


def test_a_single_evaluation_is_written_on_the_plot_not_drawn_as_a_dot(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    history = [{"step": 10, "loss": 4.1}, {"step": 20, "loss": 3.6},
               {"step": 20, "eval_loss": 3.5, "eval_accuracy": 0.42}]
    figure = drawn_figure(history, tmp_path, monkeypatch)
    [axes] = figure.axes
    assert [line.get_label() for line in axes.lines] == ["train loss"]
    [note] = axes.texts
    assert f"perplexity {math.exp(3.5):.2f}, accuracy 0.4200" in note.get_text().replace("\n", " ")
    assert "--eval_strategy steps --eval_steps N" in note.get_text()


def distribution_closure(names):
    """The given distributions and everything they require, as installed here (extras left out)."""
    closure, pending = set(), [canonicalize_name(name) for name in names]
    while pending:
        name = pending.pop()
        if name in closure:
            continue
        closure.add(name)
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(canonicalize_name(requirement.name))
    return closure


def test_requirements_txt_alone_gives_the_scripts_every_package_they_import():
    """`pip install -r requirements.txt` must deliver what README promises, the plot included: its matplotlib is
    imported only when the plot is drawn, so no other package brings it along."""
    lines = (REPO / "requirements.txt").read_text().splitlines()
    required = [Requirement(line).name for line in lines if line.strip() and not line.startswith(("#", "-"))]
    installable = distribution_closure(required)
    modules = set()
    for source in (REPO / "run_clm.py", REPO / "run_mlm.py", *(REPO / "lmtune").glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    distributions = importlib.metadata.packages_distributions()  # installed packages only: no standard library
    third_party = modules & distributions.keys()
    assert {"torch", "adapters", "matplotlib"} <= third_party
    missing = [module for module in third_party
               if not {canonicalize_name(name) for name in distributions[module]} & installable]
    assert not missing, f"imported but not brought by requirements.txt: {missing}"


@SCRIPTS
def test_the_trainers_evaluation_flags_pass_through(script, assets, tmp_path):
    def evaluate(name, *flags):
        return script.main(tiny_run_arguments(script, assets, tmp_path / name, "--do_eval", *flags))

    whole = evaluate("whole")
    # One batch at a time, as the Trainer hands them over with --batch_eval_metrics: the same figures.
    batched = evaluate("batched", "--batch_eval_metrics")
    assert batched["eval_loss"] == pytest.approx(whole["eval_loss"], abs=1e-6)
    assert batched["eval_accuracy"] == pytest.approx(whole["eval_accuracy"], abs=1e-9)
    # The loss alone: no accuracy, in the metrics, the summary or the plot.
    loss_only = evaluate("loss-only", "--prediction_loss_only")
    assert "eval_accuracy" not in loss_only and math.isfinite(loss_only["eval_loss"])
    assert (tmp_path / "loss-only" / "all_results.json").exists()


def parser_of(script):
    """The parser of a script's command line: its argument groups, as parse_arguments reads them."""
    return ArgumentParser([type(group) for group in script.parse_arguments(["--output_dir", "unused"])])


# On XLA (TPUs) a run without --optim trains with adamw_torch, as transformers' default has no XLA kernel there: which
# needs to know whether --optim was given (tests/test_xla.py runs the XLA side where torch_xla is installed).
@pytest.mark.parametrize("script", [run_clm, run_mlm], ids=["clm", "mlm"])
@pytest.mark.parametrize("argv, given", [
    ([], False),
    (["--output_dir", "x", "--optim_args", "betas=(0.9,0.99)"], False),
    (["--optim", "adamw_torch_fused"], True),
    (["--optim=adamw_torch"], True),
    (["--output_dir", "x", "--optim", "sgd", "--optim_args", "momentum=0.9"], True),
])
def test_optim_given_tells_an_explicit_optim_from_the_default(script, argv, given):
    assert optim_given(parser_of(script), argv) is given


def test_optim_given_reads_a_json_file_of_arguments(tmp_path):
    with_optim, without = tmp_path / "with.json", tmp_path / "without.json"
    with_optim.write_text('{"output_dir": "x", "optim": "adamw_torch_fused"}')
    without.write_text('{"output_dir": "x"}')
    parser = parser_of(run_clm)
    assert optim_given(parser, [str(with_optim)]) and not optim_given(parser, [str(without)])


def test_a_yaml_arguments_file_parses_as_the_same_command_line(assets, tmp_path):
    # As users of TRL and axolotl configurations write them: one flag per key, lists and booleans as YAML has them.
    flags = ["--model_name_or_path", str(assets.tiny_gpt2), "--train_file", str(assets.train), "--do_train",
             "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--optim", "adamw_torch", "--train_adapter",
             "--adapter_config", "lora[r=4]", "--learning_rate", "0.001", "--block_size", "32", "--logging_dir", "logs"]
    (tmp_path / "args.yaml").write_text(
        f"model_name_or_path: {assets.tiny_gpt2}\ntrain_file: {assets.train}\ndo_train: true\n"
        f"output_dir: {tmp_path / 'out'}\nreport_to: [none]\noptim: adamw_torch\ntrain_adapter: yes\n"
        "adapter_config: lora[r=4]\nlearning_rate: 1e-3\nblock_size: 32\nlogging_dir: logs\n")  # 1e-3: text in YAML

    def values(groups):
        return [{field.name: getattr(group, field.name) for field in dataclasses.fields(group) if field.init}
                for group in groups]

    assert values(run_clm.parse_arguments([str(tmp_path / "args.yaml")])) == values(run_clm.parse_arguments(flags))
    assert optim_given(parser_of(run_clm), [str(tmp_path / "args.yaml")])

