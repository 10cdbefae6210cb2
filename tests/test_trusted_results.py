"""Numbers a user can trust: a run that diverges stops whatever the logs show, a finished run stays finished when
its command runs again, a resume with another length says what it does to the schedule, the train loss survives
resumes in trainer_state.json, and a half-precision base merges."""

import json
import logging
import math
import shutil

import pytest
import torch
from conftest import read_json, tiny_run_arguments
from safetensors import safe_open
from safetensors.torch import load_file

import run_clm
import run_mlm
from lmtune.output_dir import last_complete_checkpoint


def arguments(script, assets, output_dir, *extra):
    return tiny_run_arguments(script, assets, output_dir, "--do_train", "--do_eval", "--train_adapter",
                              "--save_strategy", "steps", "--save_steps", "2", "--max_steps", "4",
                              "--max_train_samples", "32", *extra, eval_samples=8)


@pytest.mark.parametrize("extra", [[], ["--logging_nan_inf_filter", "false"], ["--max_grad_norm", "0"]],
                         ids=["logging filter on", "logging filter off", "no clipping"])
def test_a_non_finite_loss_stops_the_run_in_one_line_and_saves_no_diverged_adapter(extra, assets, tmp_path, capsys):
    output_dir = tmp_path / "out"
    # The command: no --do_eval, whose non-finite loss would have been refused on its own.
    argv = tiny_run_arguments(run_clm, assets, output_dir, "--learning_rate", "1e38", "--max_steps", "5",
                              "--logging_steps", "1", "--do_train", "--train_adapter", "--save_strategy", "steps",
                              "--save_steps", "1", *extra, validation=None)
    assert run_clm.cli(argv) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert stderr[-1].startswith("run_clm.py: error: Training diverged at step "), stderr[-1]
    assert "lower --learning_rate (1e+38)" in stderr[-1] and not any("Traceback" in line for line in stderr)
    assert not (output_dir / "clm").exists() and not (output_dir / "all_results.json").exists()
    for checkpoint in output_dir.glob("checkpoint-*"):  # what was saved before it is finite
        weights = load_file(checkpoint / "clm" / "adapter.safetensors")
        assert all(torch.isfinite(tensor).all() for tensor in weights.values()), checkpoint.name


@pytest.mark.parametrize(("script", "extra"), [
    (run_clm, []),
    (run_mlm, []),
    (run_clm, ["--max_steps", "-1", "--num_train_epochs", "1.5"]),  # 8 steps an epoch: ends in the second epoch
    (run_clm, ["--streaming"]),  # no length: the Trainer counts max_steps steps an epoch
], ids=["clm", "mlm", "fractional epochs", "streaming"])
def test_the_same_command_after_a_finished_run_trains_nothing_more(script, extra, assets, tmp_path, capsys):
    argv = arguments(script, assets, tmp_path, *extra)
    first = script.main(argv)
    checkpoints = sorted(path.name for path in tmp_path.glob("checkpoint-*"))
    final_state = read_json(tmp_path / "trainer_state.json")
    capsys.readouterr()
    again = script.main(argv)
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == checkpoints
    state = read_json(tmp_path / "trainer_state.json")
    assert state["global_step"] == final_state["global_step"] == state["max_steps"]
    assert state["num_train_epochs"] == final_state["num_train_epochs"]
    for key in ("train_loss", "epoch", "eval_loss", "eval_accuracy", "perplexity"):
        assert again[key] == first[key], key
    assert "train_samples_per_second" not in again  # this session trained nothing to measure
    assert "training: none left to do" in capsys.readouterr().out


def test_resuming_with_another_max_steps_warns_once_with_the_fix(assets, tmp_path, caplog):
    run_clm.main(arguments(run_clm, assets, tmp_path))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_clm.main(arguments(run_clm, assets, tmp_path, "--max_steps", "6"))
    warnings = [record.getMessage() for record in caplog.records if "Resuming at step" in record.getMessage()]
    assert warnings == [
        "Resuming at step 4 of a run of 4 steps with --max_steps 6: the first step resumed runs at the learning rate "
        "that the schedule for 4 steps had reached (0.0 at the end of a linear one), and the steps after it follow a "
        "schedule for 6 steps, as neither run would. Keep --max_steps 4 to finish that run, or pass "
        "--overwrite_output_dir to train 6 steps from the start."]
    assert read_json(tmp_path / "trainer_state.json")["global_step"] == 6


@pytest.mark.parametrize("checkpoint_kind", ["trainer_state.json", "legacy file", "callbacks restored"])
def test_the_train_loss_sum_resumes_from_trainer_state(checkpoint_kind, assets, tmp_path):
    output_dir = tmp_path / "out"
    uninterrupted = run_clm.main(arguments(run_clm, assets, output_dir))
    shutil.rmtree(output_dir / "checkpoint-4")  # as if the run had stopped after checkpoint-2
    state_file = output_dir / "checkpoint-2" / "trainer_state.json"
    state = read_json(state_file)
    assert not (output_dir / "checkpoint-2" / "train_loss_sum.json").exists()
    extra = []
    if checkpoint_kind == "legacy file":  # as checkpoints written before TrainLossSum kept the sum
        loss_sum = state["stateful_callbacks"].pop("TrainLossSum")["attributes"]["loss_sum"]
        state_file.write_text(json.dumps(state))
        (output_dir / "checkpoint-2" / "train_loss_sum.json").write_text(json.dumps({"loss_sum": loss_sum}))
    elif checkpoint_kind == "callbacks restored":  # the Trainer then replaces the callback with one of its own
        extra = ["--restore_callback_states_from_checkpoint", "true"]
    assert last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-2")
    resumed = run_clm.main(arguments(run_clm, assets, output_dir, *extra))
    assert resumed["train_loss"] == pytest.approx(uninterrupted["train_loss"], abs=1e-6)
    kept = read_json(output_dir / "checkpoint-4" / "trainer_state.json")["stateful_callbacks"]["TrainLossSum"]
    assert kept["attributes"]["loss_sum"] == pytest.approx(uninterrupted["train_loss"] * 4, abs=1e-5)


def test_a_half_precision_base_merges_in_its_dtype(assets, tmp_path, capsys):
    output_dir = tmp_path / "out"
    run_clm.main(tiny_run_arguments(run_clm, assets, output_dir, "--do_train", "--max_steps", "3", "--torch_dtype",
                                    "bfloat16", "--bf16", "--use_cpu", "--train_adapter", "--adapter_config", "lora",
                                    "--merge_adapter", learning_rate="5e-2", validation=None))
    assert f"merged model: {output_dir / 'merged'}" in capsys.readouterr().out
    with safe_open(output_dir / "merged" / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}
    assert math.isfinite(read_json(output_dir / "train_results.json")["train_loss"])
