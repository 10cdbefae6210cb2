"""The best checkpoint's adapter is the one kept, early stopping stops, --push_to_hub publishes an adapter that
loads by folder, and samples show what the base model and the adapted model write."""

import concurrent.futures
import fnmatch
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import transformers.trainer
from conftest import read_json, tiny_run_arguments
from safetensors.torch import load_file
from transformers import AutoTokenizer

import run_clm
import run_mlm
from lmtune import checks, trainer
from lmtune.output_dir import LOCK_FILE


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    """The hub client, writing each repository into a local folder instead of uploading it."""
    root = tmp_path_factory.mktemp("hub")

    def create_repo(repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, delete_patterns=(), ignore_patterns=(),
                      **kwargs):
        repo = root / repo_id
        repo.mkdir(parents=True, exist_ok=True)
        for pattern in delete_patterns:
            for path in repo.glob(pattern):
                path.unlink()
        for path in Path(folder_path).rglob("*"):  # as the hub client filters: each pattern on the relative path
            relative = path.relative_to(folder_path).as_posix()
            if path.is_file() and not any(fnmatch.fnmatch(relative, pattern) for pattern in ignore_patterns):
                target = repo / (path_in_repo or "") / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        done = concurrent.futures.Future()  # what run_as_future gives the Trainer to wait on
        done.set_result(None)
        return done

    with pytest.MonkeyPatch.context() as patch:
        # The tests run offline (HF_HUB_OFFLINE), where --push_to_hub is refused; this hub is always reachable.
        patch.setattr(checks, "check_hub_is_reachable", lambda *args: True)
        patch.setattr(transformers.trainer, "create_repo", create_repo)  # the Trainer makes the repository at init
        patch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        # The Trainer's pushes of checkpoints call the client's module-level function.
        patch.setattr(transformers.trainer, "upload_folder", lambda **kwargs: upload_folder(None, **kwargs))
        yield root


# Each run adapts a pretrained base model to source code while it is evaluated on prose, where it gets worse after
# the first step, so the last checkpoint is not the best. clm chooses by accuracy (greater is better), mlm by loss.
BEST_RUNS = {
    "clm": (run_clm, "--learning_rate", "1e-2", "--metric_for_best_model", "eval_accuracy",
            "--early_stopping_patience", "3", "--save_total_limit", "2"),
    "mlm": (run_mlm, "--learning_rate", "1e-1", "--early_stopping_patience", "2", "--save_total_limit", "1"),
}


@pytest.fixture(scope="module", params=BEST_RUNS)
def best_run(request, assets, fake_hub, tmp_path_factory):
    script, *extra = BEST_RUNS[request.param]
    base = request.getfixturevalue("pretrained_gpt2" if script is run_clm else "pretrained_roberta")
    output_dir = tmp_path_factory.mktemp(f"best-{request.param}")
    metrics = script.main(tiny_run_arguments(
        script, assets, output_dir, "--do_train", "--do_eval", "--train_adapter", "--max_steps", "8",
        "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
        "--load_best_model_at_end", "--push_to_hub", "--hub_model_id", f"user/tiny-{request.param}",
        "--hub_strategy", "end", *extra, model=base, train="code",
    ))
    state = read_json(output_dir / "trainer_state.json")
    evaluations = {entry["step"]: entry for entry in state["log_history"] if "eval_loss" in entry and "step" in entry}
    return script, base, output_dir, metrics, state, evaluations, fake_hub / f"user/tiny-{request.param}"


def test_the_adapter_saved_at_the_end_is_the_best_checkpoints(best_run):
    script, _, output_dir, metrics, state, evaluations, _ = best_run
    adapter_name = script.__name__.removeprefix("run_")
    best = state["best_model_checkpoint"]
    best_step = int(best.rsplit("-", 1)[1])
    assert best_step < max(evaluations)  # the last checkpoint is not the best, so reloading it changes something
    metric = "eval_accuracy" if script is run_clm else "eval_loss"
    assert evaluations[best_step][metric] == state["best_metric"]
    # The evaluation after training is the best checkpoint's, not the last one's.
    assert metrics[metric] == pytest.approx(state["best_metric"], abs=1e-6)
    assert metrics["eval_loss"] == pytest.approx(evaluations[best_step]["eval_loss"], abs=1e-6)
    saved = load_file(output_dir / adapter_name / "adapter.safetensors")
    from_best = load_file(f"{best}/{adapter_name}/adapter.safetensors")
    assert saved.keys() == from_best.keys()
    assert all((saved[key] == from_best[key]).all() for key in saved)
    assert not (output_dir / "samples.jsonl").exists()  # --num_samples 0


def test_early_stopping_stops_after_patience_evaluations_without_improvement(best_run):
    script, *_, state, evaluations, _ = best_run
    patience = 3 if script is run_clm else 2
    best_step = int(state["best_model_checkpoint"].rsplit("-", 1)[1])
    assert state["global_step"] == best_step + patience < 8
    assert max(evaluations) == state["global_step"]


def test_pushed_adapter_sits_at_the_repository_root_and_loads_back(best_run, assets, tmp_path):
    script, base, output_dir, metrics, *_, repo = best_run
    assert sorted(path.name for path in repo.iterdir()) == ["README.md", "adapter.safetensors", "adapter_config.json",
                                                            "pytorch_adapter.bin"]
    card = (repo / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: adapter-transformers" in card
    assert f'model.load_adapter("user/tiny-{script.__name__.removeprefix("run_")}", set_active=True)' in card
    assert f"Evaluation: loss {metrics['eval_loss']:.4f}" in card
    reloaded = script.main(tiny_run_arguments(
        script, assets, tmp_path, "--do_eval", "--train_adapter", "--load_adapter", repo, model=base,
    ))
    assert reloaded["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-6)
    assert reloaded["eval_accuracy"] == pytest.approx(metrics["eval_accuracy"], abs=1e-6)


@pytest.mark.parametrize("script", [run_clm, run_mlm], ids=["clm", "mlm"])
def test_samples_show_the_base_and_the_adapted_model(script, assets, tmp_path, capsys):
    # run_clm continues the prompts of a file; run_mlm fills masks that it puts in the first validation texts.
    prompts = ["def read_file(path):", "Return the number of"]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n\n")
    sample_flags = ["--sample_prompts", prompts_file] if script is run_clm else []
    common = ["--do_train", "--do_eval", "--train_adapter", "--max_steps", "10", "--learning_rate", "1e-1",
              "--num_samples", "3"]
    script.main(tiny_run_arguments(script, assets, tmp_path / "run", *common, *sample_flags))
    samples = read_samples(tmp_path / "run")
    assert len(samples) == (2 if script is run_clm else 3)
    assert all(sample["base"] and sample["adapted"] for sample in samples)
    assert any(sample["base"] != sample["adapted"] for sample in samples)  # the adapter changed what the model does
    if script is run_clm:
        assert [sample["prompt"] for sample in samples] == prompts
    else:
        assert all("<mask>" in sample["prompt"] and "<mask>" not in sample["base"] for sample in samples)
        assert all(sample["expected"] for sample in samples)  # the masked text, to compare the fills with
    summary = capsys.readouterr().out.split("***** summary *****")[-1]
    assert f"samples (greedy): {tmp_path / 'run' / 'samples.jsonl'}" in summary
    assert json.dumps(samples[0]["adapted"], ensure_ascii=False)[:60] in summary


def test_full_fine_tuning_samples_show_the_model_alone(assets, tmp_path):
    run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path, "--do_train", "--do_eval", "--max_steps", "2",
                                    "--num_samples", "2"))
    samples = read_samples(tmp_path)
    assert [sorted(sample) for sample in samples] == [["output", "prompt"]] * 2
    assert all(sample["output"] for sample in samples)


def read_samples(output_dir):
    return [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]


def test_a_prompt_with_a_mask_token_is_filled_there(assets):
    tokenizer = AutoTokenizer.from_pretrained(assets.roberta_tokenizer)
    record, (ids, masked) = run_mlm.MaskedLanguageModeling().sample_prompt(tokenizer, "Return the <mask> of items.", 64)
    assert record == {"prompt": "Return the<mask> of items."}  # no "expected": the user's mask has no answer
    assert [ids[index] for index in masked] == [tokenizer.mask_token_id]
    assert ids.count(tokenizer.mask_token_id) == 1


EVALUATE_EVERY_2_STEPS = ["--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps"]
# Each case: extra arguments and a fragment of the one line that refuses them before any model is loaded.
REFUSED = {
    "patience alone": (["--early_stopping_patience", "2"],
                       "add --load_best_model_at_end and --eval_strategy steps or epoch"),
    "patience without best model": (["--early_stopping_patience", "2", *EVALUATE_EVERY_2_STEPS, "--save_steps", "2"],
                                    "--early_stopping_patience stops on evaluations and keeps the best checkpoint: "
                                    "add --load_best_model_at_end."),
    "best model without evaluations": (["--load_best_model_at_end"], "needs evaluations to choose from"),
    "strategies differ": (["--load_best_model_at_end", "--eval_strategy", "steps"],
                          "save and eval strategy to match, but found - Evaluation strategy: "),  # then the values
    "save best": (["--load_best_model_at_end", *EVALUATE_EVERY_2_STEPS[:4], "--save_strategy", "best"],
                  "keeps the last model in transformers"),
    "save best without metric": (["--save_strategy", "best"], "--save_strategy best needs --metric_for_best_model"),
    "perplexity as metric": (["--metric_for_best_model", "perplexity"],
                             "--metric_for_best_model perplexity is not a metric of the evaluation"),
    "no evaluation before max_steps": (["--load_best_model_at_end", *EVALUATE_EVERY_2_STEPS, "--save_steps", "2",
                                        "--max_steps", "1"], "--eval_steps 2 is more than --max_steps 1"),
    "negative threshold": (["--early_stopping_threshold", "-0.1"], "--early_stopping_threshold -0.1"),
    "negative samples": (["--num_samples", "-1"], "--num_samples -1"),
    "missing prompts file": (["--sample_prompts", "missing.txt"], "--sample_prompts missing.txt does not exist"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_combinations_that_would_fail_late_are_refused_in_one_line(case, assets, tmp_path, capsys):
    extra, expected = REFUSED[case]
    script = run_mlm if "samples" in case else run_clm
    argv = tiny_run_arguments(script, assets, tmp_path / "out", "--do_train", "--do_eval", *extra)
    assert script.cli(argv) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert stderr[-1].startswith(f"{script.__name__}.py: error: ") and expected in stderr[-1]
    assert not any("Traceback" in line for line in stderr)
    assert not (tmp_path / "out").exists()


# transformers accepts these (saves at a multiple of the evaluations; epochs cut short by --max_steps): so do the
# scripts, which once refused the first and crashed on the second.
ACCEPTED = {
    "saves at every second evaluation": [*EVALUATE_EVERY_2_STEPS, "--save_steps", "4"],
    "epochs cut short by max_steps": ["--eval_strategy", "epoch", "--save_strategy", "epoch"],
}


@pytest.mark.parametrize("case", ACCEPTED)
def test_best_model_settings_that_transformers_accepts_run(case, assets, tmp_path, caplog):
    argv = tiny_run_arguments(run_clm, assets, tmp_path / "out", "--do_train", "--do_eval", "--train_adapter",
                              "--load_best_model_at_end", "--max_steps", "4", "--log_level", "warning",
                              *ACCEPTED[case])
    metrics = run_clm.main(argv)
    assert metrics["train_samples"] > 0 and metrics["eval_loss"] > 0
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] is not None  # a best checkpoint was recorded and reloaded
    passed_over = "a best evaluation between two saves is passed over" in caplog.text
    assert passed_over == (case == "saves at every second evaluation")


def test_the_trainers_pushes_of_checkpoints_leave_the_runs_lock_behind(assets, fake_hub, tmp_path):
    run_clm.main(tiny_run_arguments(
        run_clm, assets, tmp_path / "out", "--do_train", "--train_adapter", "--max_steps", "2", "--save_strategy",
        "steps", "--save_steps", "1", "--push_to_hub", "--hub_model_id", "user/every-save", "--hub_strategy",
        "every_save",
    ))
    pushed = {path.name for path in (fake_hub / "user/every-save").rglob("*")}
    assert "training_args.bin" in pushed  # the output folder went up while the run held it
    assert LOCK_FILE not in pushed


def test_the_push_uploads_the_folder_that_the_final_save_wrote_without_saving_again(assets, fake_hub, tmp_path,
                                                                                      monkeypatch):
    # Under FSDP, DeepSpeed ZeRO-3 and XLA only save_model gathers the weights: each push (the Trainer's at the end of
    # training, then the run's with the card) saved again from the live model, over the good files, and uploaded that.
    saves, save_adapter_files = [], trainer.save_adapter_files
    monkeypatch.setattr(trainer, "save_adapter_files", lambda model, folder, *args, **kwargs: (
        saves.append(folder), save_adapter_files(model, folder, *args, **kwargs)))
    trained = tmp_path / "trained"
    run_clm.main(tiny_run_arguments(run_clm, assets, trained, "--do_train", "--train_adapter", "--max_steps", "2",
                                    "--push_to_hub", "--hub_model_id", "user/saved-once"))
    assert saves == [trained / "clm"]
    # An evaluation alone has no final save: its push saves first, through save_model as well.
    evaluated = tmp_path / "evaluated"
    run_clm.main(tiny_run_arguments(run_clm, assets, evaluated, "--do_eval", "--load_adapter", trained / "clm",
                                    "--push_to_hub", "--hub_model_id", "user/evaluated"))
    assert saves == [trained / "clm", evaluated / "clm"]
    for folder, repo in ((trained, "user/saved-once"), (evaluated, "user/evaluated")):
        files = sorted((folder / "clm").iterdir())
        assert sorted(path.name for path in (fake_hub / repo).iterdir()) == [path.name for path in files]
        assert all((fake_hub / repo / path.name).read_bytes() == path.read_bytes() for path in files)
