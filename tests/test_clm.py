"""run_clm.py end to end on tiny offline models: training, saved adapters, data formats, resume, errors."""

import json
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import QUIET, read_json, run_script
from transformers import EvalPrediction

import run_clm


def clm_args(model, train, validation, output_dir, *extra):
    return [
        "--model_name_or_path", str(model), "--train_file", str(train), "--validation_file", str(validation),
        "--output_dir", str(output_dir), "--block_size", "64", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16", *QUIET, *extra,
    ]


@pytest.fixture(scope="module")
def adapter_run(assets, pretrained_gpt2, tmp_path_factory):
    """Perplexity of the pretrained base with a fresh adapter on source code, then after training that adapter."""
    before_dir = tmp_path_factory.mktemp("untrained")
    after_dir = tmp_path_factory.mktemp("trained")
    common = ["--train_adapter", "--adapter_config", "seq_bn", "--do_eval"]
    before = run_clm.main(clm_args(pretrained_gpt2, assets.code_train, assets.code_validation, before_dir, *common))
    after = run_clm.main(clm_args(
        pretrained_gpt2, assets.code_train, assets.code_validation, after_dir, *common,
        "--do_train", "--max_steps", "150", "--learning_rate", "1e-2",
    ))
    return before, after, after_dir


def test_adapter_training_lowers_validation_perplexity(adapter_run):
    before, after, _ = adapter_run
    assert after["perplexity"] < 0.6 * before["perplexity"], (before["perplexity"], after["perplexity"])
    assert after["eval_accuracy"] > before["eval_accuracy"]


def test_metrics_files_hold_train_and_eval_results(adapter_run):
    _, after, output_dir = adapter_run
    all_results = read_json(output_dir / "all_results.json")
    assert all_results["perplexity"] == pytest.approx(np.exp(all_results["eval_loss"]))
    assert all_results["perplexity"] == pytest.approx(after["perplexity"])
    assert {"train_loss", "train_samples", "eval_samples", "eval_accuracy"} <= all_results.keys()
    assert read_json(output_dir / "train_results.json")["train_loss"] == all_results["train_loss"]
    assert read_json(output_dir / "eval_results.json")["eval_loss"] == all_results["eval_loss"]
    assert (output_dir / "README.md").is_file()  # the model card


def test_saved_adapter_holds_config_and_weights_but_no_base_model(adapter_run):
    *_, output_dir = adapter_run
    adapter_dir = output_dir / "clm"
    assert read_json(adapter_dir / "adapter_config.json")["config"]["reduction_factor"] == 16
    # Exactly the trained weights, as safetensors: no head (the tied embeddings) and no pickle.
    assert sorted(path.name for path in adapter_dir.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert not list(output_dir.glob("*.safetensors")) and not (output_dir / "pytorch_model.bin").exists()


def test_saved_adapter_on_unchanged_base_reproduces_eval_loss(adapter_run, assets, pretrained_gpt2, tmp_path):
    # The reload reads the base model from disk, so equal losses also show that training left the base unchanged.
    _, after, output_dir = adapter_run
    reloaded = run_clm.main(clm_args(
        pretrained_gpt2, assets.code_train, assets.code_validation, tmp_path,
        "--do_eval", "--train_adapter", "--load_adapter", str(output_dir / "clm"),
    ))
    assert reloaded["eval_loss"] == pytest.approx(after["eval_loss"], abs=1e-6)


def test_full_fine_tuning_from_model_type_and_config_overrides(assets, tmp_path):
    metrics = run_clm.main([
        "--model_type", "gpt2", "--tokenizer_name", str(assets.gpt2_tokenizer),
        "--config_overrides", "n_embd=32,n_layer=1,n_head=2,n_positions=128,vocab_size=1000",
        "--train_file", str(assets.train), "--validation_file", str(assets.validation), "--do_train", "--do_eval",
        "--max_steps", "30", "--learning_rate", "3e-3", "--output_dir", str(tmp_path), *QUIET,
    ])
    config = read_json(tmp_path / "config.json")
    assert (config["n_embd"], config["n_layer"], config["n_positions"]) == (32, 1, 128)
    assert (tmp_path / "model.safetensors").is_file()
    assert "adapters" not in config  # a fully fine-tuned model loads without the adapters library
    # Block size defaults to the model's 128 positions, below 1024 and the tokenizer's limit.
    assert read_json(tmp_path / "all_results.json")["eval_samples"] == metrics["eval_samples"]
    assert metrics["perplexity"] < 500  # from 1000 for a uniform guess over the vocabulary


def block_count(tokenizer_dir, texts, block_size):
    """Blocks that grouping cuts from fewer than 1000 texts (one `datasets.map` batch)."""
    tokenizer = run_clm.AutoTokenizer.from_pretrained(tokenizer_dir)
    return sum(len(ids) for ids in tokenizer(texts)["input_ids"]) // block_size


def test_adapter_on_a_base_saved_with_an_adapters_config_logs_to_tensorboard(assets, tmp_path):
    # Models fully fine-tuned by the upstream scripts keep an empty "adapters" entry in config.json; TensorBoard
    # writes the model config at the start of training, which failed on it.
    base = tmp_path / "base"
    shutil.copytree(assets.tiny_gpt2, base)
    config = read_json(base / "config.json")
    config["adapters"] = {"adapters": {}, "config_map": {}, "fusion_config_map": {}, "fusion_name_map": {},
                          "fusions": {}}
    (base / "config.json").write_text(json.dumps(config))
    run_clm.main(clm_args(base, assets.train, assets.validation, tmp_path / "out", "--do_train", "--max_steps", "1",
                          "--train_adapter", "--report_to", "tensorboard", "--logging_steps", "1"))
    assert list((tmp_path / "out" / "runs").rglob("events.out.tfevents.*"))
    assert (tmp_path / "out" / "clm" / "adapter_config.json").is_file()


def lines_of(path, count=None):
    return [line for line in path.read_text().splitlines() if line.strip()][:count]


def write_data_file(path, lines):
    """Write lines in the format that the file's extension names, with an extra column beside the text."""
    frame = pd.DataFrame({"id": range(len(lines)), "text": lines})
    suffix = path.suffix
    if suffix == ".txt":
        path.write_text("\n".join(lines) + "\n")
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix in (".json", ".jsonl"):
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".parquet":
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("extension", ["txt", "csv", "json", "jsonl", "parquet"])
def test_each_data_file_format(assets, tmp_path, extension):
    train = write_data_file(tmp_path / f"train.{extension}", lines_of(assets.train, 400))
    validation = write_data_file(tmp_path / f"validation.{extension}", lines_of(assets.validation, 100))
    metrics = run_clm.main(clm_args(
        assets.tiny_gpt2, train, validation, tmp_path / "out", "--do_train", "--do_eval", "--max_steps", "2",
    ))
    # Blocks of 64 tokens of the text column alone (.txt keeps each line's line break).
    texts = lines_of(assets.validation, 100)
    if extension == "txt":
        texts = [text + "\n" for text in texts]
    assert metrics["eval_samples"] == block_count(assets.tiny_gpt2, texts, 64)
    assert np.isfinite(metrics["perplexity"])


def test_text_column_defaults_to_first_column(assets, tmp_path):
    lines = lines_of(assets.validation, 100)
    path = tmp_path / "validation.csv"
    pd.DataFrame({"body": lines, "id": range(len(lines))}).to_csv(path, index=False)
    metrics = run_clm.main(clm_args(assets.tiny_gpt2, path, path, tmp_path / "out", "--do_eval"))
    assert metrics["eval_samples"] > 20


def test_local_folder_as_dataset_name(assets, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_data_file(folder / "train.txt", lines_of(assets.train, 300))
    write_data_file(folder / "validation.txt", lines_of(assets.validation, 100))
    metrics = run_clm.main([
        "--model_name_or_path", str(assets.tiny_gpt2), "--dataset_name", str(folder), "--do_train", "--do_eval",
        "--max_steps", "2", "--block_size", "64", "--output_dir", str(tmp_path / "out"), *QUIET,
    ])
    # The adapter is named by --adapter_name, never by the dataset's path.
    assert metrics["eval_samples"] > 20


def test_adapter_name_comes_from_the_flag_not_the_dataset_path(assets, tmp_path):
    folder = tmp_path / "my.corpus"
    folder.mkdir()
    write_data_file(folder / "train.txt", lines_of(assets.train, 300))
    run_clm.main([
        "--model_name_or_path", str(assets.tiny_gpt2), "--dataset_name", str(folder), "--do_train",
        "--max_steps", "2", "--block_size", "64", "--train_adapter", "--adapter_name", "docs",
        "--output_dir", str(tmp_path / "out"), *QUIET,
    ])
    assert (tmp_path / "out" / "docs" / "adapter_config.json").is_file()


def test_dataset_saved_to_disk_with_validation_carved_from_train(assets, tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"text": lines_of(assets.train, 600)}).save_to_disk(tmp_path / "saved")
    metrics = run_clm.main([
        "--model_name_or_path", str(assets.tiny_gpt2), "--dataset_name", str(tmp_path / "saved"), "--do_eval",
        "--validation_split_percentage", "10", "--block_size", "64", "--output_dir", str(tmp_path / "out"), *QUIET,
    ])
    assert 5 < metrics["eval_samples"] < 60  # 10% of the ~200 blocks that 600 lines give


def test_streaming_with_max_train_samples_and_no_validation_split(assets, tmp_path):
    metrics = run_clm.main([
        "--model_name_or_path", str(assets.tiny_gpt2), "--train_file", str(assets.train), "--streaming",
        "--do_train", "--do_eval", "--max_steps", "4", "--max_train_samples", "16", "--max_eval_samples", "8",
        "--block_size", "64", "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path), *QUIET,
    ])
    assert read_json(tmp_path / "trainer_state.json")["global_step"] == 4
    assert np.isfinite(metrics["perplexity"])
    assert "train_samples" not in metrics  # a stream has no length to report


def test_json_arguments_file(assets, tmp_path):
    arguments = {
        "model_name_or_path": str(assets.tiny_gpt2), "train_file": str(assets.train),
        "validation_file": str(assets.validation), "do_eval": True, "max_eval_samples": 10, "block_size": 32,
        "output_dir": str(tmp_path / "out"), "report_to": "none", "train_adapter": True, "adapter_config": "lora",
    }
    (tmp_path / "args.json").write_text(json.dumps(arguments))
    metrics = run_clm.main([str(tmp_path / "args.json")])
    assert metrics["eval_samples"] == 10


def test_automatic_resume_matches_an_uninterrupted_run(assets, tmp_path, caplog):
    def run(output_dir, max_steps):
        return run_clm.main(clm_args(
            assets.tiny_gpt2, assets.train, assets.validation, output_dir, "--do_train", "--do_eval",
            "--max_eval_samples", "20", "--train_adapter", "--max_steps", str(max_steps),
            "--lr_scheduler_type", "constant", "--learning_rate", "1e-2", "--save_strategy", "steps",
            "--save_steps", "4", "--log_level", "info",
        ))

    uninterrupted = run(tmp_path / "straight", 8)
    run(tmp_path / "resumed", 4)
    caplog.clear()
    resumed = run(tmp_path / "resumed", 8)  # finds checkpoint-4 and continues from it
    assert f"Resuming training from {tmp_path / 'resumed' / 'checkpoint-4'}" in caplog.text
    assert resumed["eval_loss"] == pytest.approx(uninterrupted["eval_loss"], abs=1e-5)


def test_accuracy_compares_each_prediction_with_the_next_token():
    labels = np.array([[5, 6, 7, 8]])
    predictions = np.array([[6, 7, 0, 1]])  # right for tokens 6 and 7, wrong for 8; the last has no target
    assert run_clm.compute_metrics(EvalPrediction(predictions, labels))["accuracy"] == pytest.approx(2 / 3)


def test_refuses_a_non_empty_output_dir_without_checkpoint_and_leaves_it_alone(assets, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    result = run_script("run_clm.py", *clm_args(assets.tiny_gpt2, assets.train, assets.validation, tmp_path,
                                                "--do_train"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("run_clm.py: error: --output_dir")
    assert "--overwrite_output_dir" in result.stderr
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--config_overrides", "n_layer=1"], "--config_overrides"),
        (["--max_train_samples", "0"], "--max_train_samples"),
        (["--block_size", "-3"], "--block_size"),
        (["--validation_split_percentage", "0"], "--validation_split_percentage"),
        (["--adapter_config", "no_such_method", "--train_adapter"], "--adapter_config no_such_method"),
        (["--load_adapter", "somewhere"], "--train_adapter"),
    ],
)
def test_usage_errors_name_the_flag(assets, tmp_path, extra, expected):
    with pytest.raises(run_clm.UsageError, match=expected):
        run_clm.main(clm_args(assets.tiny_gpt2, assets.train, assets.validation, tmp_path, "--do_train", *extra))


def test_data_too_short_for_one_block_names_its_size(assets, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.\n")
    with pytest.raises(run_clm.UsageError, match=r"has \d+ tokens in 1 texts.*smaller --block_size"):
        run_clm.main(clm_args(assets.tiny_gpt2, short, short, tmp_path / "out", "--do_eval"))


def test_block_size_larger_than_the_model_is_clamped(assets, tmp_path):
    metrics = run_clm.main([
        "--model_name_or_path", str(assets.tiny_gpt2), "--validation_file", str(assets.validation), "--do_eval",
        "--block_size", "5000", "--output_dir", str(tmp_path), *QUIET,
    ])
    texts = [line + "\n" for line in lines_of(assets.validation)]
    assert metrics["eval_samples"] == block_count(assets.tiny_gpt2, texts, 256)  # the model's 256 positions


def test_without_matplotlib_the_summary_says_what_to_install(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    run_clm.main(clm_args(assets.tiny_gpt2, assets.train, assets.validation, tmp_path, "--do_train", "--max_steps",
                          "2", "--train_adapter"))
    summary = capsys.readouterr().out.split("***** summary *****")[1]
    assert "saved adapter:" in summary
    assert "training curves: not drawn: matplotlib is missing (pip install matplotlib)" in summary
    assert not (tmp_path / "training_curves.png").exists()
