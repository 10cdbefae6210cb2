"""run_clm.py end to end on tiny offline models: training, saved adapters, data formats, resume, errors."""

import json
import logging
import shutil
import sys
from pathlib import Path

import adapters
import model_families_table as families
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import QUIET, read_json, tiny_run_arguments
from transformers import AutoModelForCausalLM, AutoTokenizer, EvalPrediction

import run_clm
from lmtune import hardware

# The runs of this module: blocks of 64 tokens in batches of 8, evaluated on the whole validation file, at the
# Trainer's default learning rate unless a test sets one.
RUN = {"length": 64, "batch_size": 8, "eval_samples": None, "learning_rate": None}
FROM_DATASET = {**RUN, "train": None, "validation": None}


@pytest.fixture(scope="module")
def adapter_run(assets, pretrained_gpt2, tmp_path_factory):
    """Perplexity of the pretrained base with a fresh adapter on source code, then after training that adapter."""
    before_dir = tmp_path_factory.mktemp("untrained")
    after_dir = tmp_path_factory.mktemp("trained")
    common = ["--train_adapter", "--adapter_config", "seq_bn", "--do_eval"]
    before = run_clm.main(tiny_run_arguments(run_clm, assets, before_dir, *common, model=pretrained_gpt2, train="code",
                                             validation="code", **RUN))
    after = run_clm.main(tiny_run_arguments(run_clm, assets, after_dir, *common, "--do_train", "--max_steps", "150",
                                            "--learning_rate", "1e-2", model=pretrained_gpt2, train="code",
                                            validation="code", **RUN))
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
    # Exactly the trained weights, no head (the tied embeddings): as safetensors, and as the pytorch_adapter.bin that
    # adapters' load_adapter(path) reads by default.
    assert sorted(path.name for path in adapter_dir.iterdir()) == ["adapter.safetensors", "adapter_config.json",
                                                                   "pytorch_adapter.bin"]
    assert not list(output_dir.glob("*.safetensors")) and not (output_dir / "pytorch_model.bin").exists()


def test_saved_adapter_loads_with_adapters_default_call_to_the_same_weights(adapter_run, pretrained_gpt2):
    *_, output_dir = adapter_run
    models = []
    for load_kwargs in ({}, {"use_safetensors": True}):  # adapters' default reads pytorch_adapter.bin
        model = AutoModelForCausalLM.from_pretrained(pretrained_gpt2)
        adapters.init(model)
        model.load_adapter(str(output_dir / "clm"), set_active=True, **load_kwargs)
        models.append(model.eval())
    inputs = torch.tensor([[5, 17, 99, 3, 42]])
    with torch.no_grad():
        assert torch.equal(models[0](inputs).logits, models[1](inputs).logits)
    assert models[0].adapters_config.get("clm") is not None


def test_saved_adapter_on_unchanged_base_reproduces_eval_loss(adapter_run, assets, pretrained_gpt2, tmp_path):
    # The reload reads the base model from disk, so equal losses also show that training left the base unchanged.
    _, after, output_dir = adapter_run
    reloaded = run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path, "--do_eval", "--train_adapter",
                                               "--load_adapter", str(output_dir / "clm"), model=pretrained_gpt2,
                                               train="code", validation="code", **RUN))
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
    # Block size defaults to the model's 128 positions, below 1024 and the tokenizer's limit of 1024.
    texts = [line + "\n" for line in lines_of(assets.validation)]
    assert metrics["eval_samples"] == block_count(assets.gpt2_tokenizer, texts, 128)
    assert metrics["perplexity"] < 500  # from 1000 for a uniform guess over the vocabulary


def block_count(tokenizer_dir, texts, block_size):
    """Blocks that grouping cuts from fewer than 1000 texts (one `datasets.map` batch)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
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
    run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path / "out", "--do_train", "--max_steps", "1",
                                    "--train_adapter", "--report_to", "tensorboard", "--logging_steps", "1", model=base,
                                    **RUN))
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
    metrics = run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path / "out", "--do_train", "--do_eval",
                                              "--max_steps", "2", train=train, validation=validation, **RUN))
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
    metrics = run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path / "out", "--do_eval", train=path,
                                              validation=path, **RUN))
    assert metrics["eval_samples"] > 20


def test_local_folder_as_dataset_name(assets, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_data_file(folder / "train.txt", lines_of(assets.train, 300))
    write_data_file(folder / "validation.txt", lines_of(assets.validation, 100))
    metrics = run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path / "out", "--dataset_name", folder,
                                              "--do_train", "--do_eval", "--max_steps", "2", **FROM_DATASET))
    # The adapter is named by --adapter_name, never by the dataset's path.
    assert metrics["eval_samples"] > 20


def test_adapter_name_comes_from_the_flag_not_the_dataset_path(assets, tmp_path):
    folder = tmp_path / "my.corpus"
    folder.mkdir()
    write_data_file(folder / "train.txt", lines_of(assets.train, 300))
    run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path / "out", "--dataset_name", folder, "--do_train",
                                    "--max_steps", "2", "--train_adapter", "--adapter_name", "docs", **FROM_DATASET))
    assert (tmp_path / "out" / "docs" / "adapter_config.json").is_file()


def test_dataset_saved_to_disk_with_validation_carved_from_train(assets, tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"text": lines_of(assets.train, 600)}).save_to_disk(tmp_path / "saved")
    metrics = run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path / "out", "--dataset_name", tmp_path / "saved",
                                              "--do_eval", "--validation_split_percentage", "10", **FROM_DATASET))
    assert 5 < metrics["eval_samples"] < 60  # 10% of the ~200 blocks that 600 lines give


def test_streaming_with_max_train_samples_and_no_validation_split(assets, tmp_path):
    metrics = run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path, "--streaming", "--do_train", "--do_eval",
                                              "--max_steps", "4", "--max_train_samples", "16", validation=None,
                                              length=64, eval_samples=8, learning_rate=None))
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
        return run_clm.main(tiny_run_arguments(run_clm, assets, output_dir, "--do_train", "--do_eval",
                                               "--max_eval_samples", "20", "--train_adapter", "--max_steps",
                                               str(max_steps), "--lr_scheduler_type", "constant", "--learning_rate",
                                               "1e-2", "--save_strategy", "steps", "--save_steps", "4", "--log_level",
                                               "info", **RUN))

    uninterrupted = run(tmp_path / "straight", 8)
    run(tmp_path / "resumed", 4)
    caplog.clear()
    resumed = run(tmp_path / "resumed", 8)  # finds checkpoint-4 and continues from it
    assert f"Resuming training from {tmp_path / 'resumed' / 'checkpoint-4'}" in caplog.text
    assert resumed["eval_loss"] == pytest.approx(uninterrupted["eval_loss"], abs=1e-5)


def test_train_loss_is_the_loss_per_predicted_token(assets, dropout_free, tmp_path):
    # The Trainer divides the summed loss by the number of labels other than -100, so a block's first token, which
    # nothing predicts, must not count: the first step's loss on 8 blocks is then the untrained model's eval loss on
    # the same 8 blocks, not (n - 1) / n of it.
    same_blocks = ["--validation_file", assets.train, "--max_train_samples", "8", "--per_device_train_batch_size", "8"]
    untrained = run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path / "eval", "--do_eval", *same_blocks,
                                                eval_samples=8, model=dropout_free.gpt2))
    first_step = run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path / "train", "--do_train", "--max_steps", "1",
                                                 *same_blocks, model=dropout_free.gpt2))
    assert first_step["train_loss"] == pytest.approx(untrained["eval_loss"], abs=1e-5)


def test_accuracy_and_loss_compare_each_prediction_with_the_next_token():
    labels = np.array([[-100, 6, 7, 8]])  # a block's first token is predicted by no position
    predictions = np.array([[6, 7, 0, 1]])  # right for tokens 6 and 7, wrong for 8; the last has no target
    losses = np.array([[1.0, 2.0, 6.0]], dtype=np.float32)  # of the predictions of 6, 7 and 8
    metrics = run_clm.CausalLanguageModeling().compute_metrics(EvalPrediction((predictions, losses), labels))
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["loss"] == pytest.approx(3.0)


def test_refuses_a_non_empty_output_dir_without_checkpoint_and_leaves_it_alone(assets, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert run_clm.cli(tiny_run_arguments(run_clm, assets, tmp_path, "--do_train", **RUN)) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("run_clm.py: error: --output_dir") and "--overwrite_output_dir" in line
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
        run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path, "--do_train", *extra, **RUN))


def test_data_too_short_for_one_block_names_its_size(assets, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.\n")
    with pytest.raises(run_clm.UsageError, match=r"has \d+ tokens in 1 texts.*smaller --block_size"):
        run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path / "out", "--do_eval", train=short, validation=short,
                                        **RUN))


def test_block_size_larger_than_the_model_is_clamped(assets, tmp_path):
    metrics = run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path, "--do_eval", train=None, length=5000,
                                              eval_samples=None, learning_rate=None))
    texts = [line + "\n" for line in lines_of(assets.validation)]
    assert metrics["eval_samples"] == block_count(assets.tiny_gpt2, texts, 256)  # the model's 256 positions


def test_without_matplotlib_the_summary_says_what_to_install(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path, "--do_train", "--max_steps", "2", "--train_adapter",
                                    **RUN))
    summary = capsys.readouterr().out.split("***** summary *****")[1]
    assert "saved adapter:" in summary
    assert "training curves: not drawn: matplotlib is missing (pip install matplotlib)" in summary
    assert not (tmp_path / "training_curves.png").exists()


def test_each_data_file_is_read_by_its_own_extension(assets, tmp_path):
    train = write_data_file(tmp_path / "train.txt", lines_of(assets.train, 300))
    validation = write_data_file(tmp_path / "validation.jsonl", lines_of(assets.validation, 100))
    metrics = run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path / "out", "--do_eval", train=train,
                                              validation=validation, **RUN))
    # The blocks of the json objects' text, not of the json lines read as raw text (which would be many more).
    assert metrics["eval_samples"] == block_count(assets.tiny_gpt2, lines_of(assets.validation, 100), 64)


def test_empty_cells_are_skipped_and_counted(assets, tmp_path, caplog):
    lines = lines_of(assets.validation, 100)
    frame = pd.DataFrame({"text": [line if i % 4 else None for i, line in enumerate(lines)], "id": range(100)})
    frame.to_csv(tmp_path / "gaps.csv", index=False)
    metrics = run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path / "out", "--do_eval", "--log_level", "info",
                                              train=tmp_path / "gaps.csv", validation=tmp_path / "gaps.csv", **RUN))
    assert "Skipping 25 empty texts of the validation data." in caplog.text
    assert metrics["eval_samples"] == block_count(assets.tiny_gpt2, [line for i, line in enumerate(lines) if i % 4], 64)
def test_bf16_advice_follows_the_cpus_native_bf16(tmp_path, monkeypatch, caplog):
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(hardware, "CPUINFO", cpuinfo)
    # Parsing --bf16 sets ACCELERATE_MIXED_PRECISION=bf16 for the process, which later runs in it would inherit.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    bf16 = run_clm.parse_arguments(["--output_dir", "unused", "--do_train", "--use_cpu", "--bf16"])[2]
    fp32 = run_clm.parse_arguments(["--output_dir", "unused", "--do_train", "--use_cpu"])[2]

    def warned(training_args):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lmtune.hardware"):
            hardware.warn_if_bf16_is_emulated(training_args)
        return "--bf16 on a CPU without native bf16" in caplog.text

    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f\n")  # like the AMD EPYC of the tests
    assert hardware.native_bf16_flags() == ()
    assert warned(bf16) and not warned(fp32)
    assert hardware.bf16_tip(fp32) is None
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n")  # a Sapphire Rapids
    assert hardware.native_bf16_flags() == ("amx_bf16", "avx512_bf16")
    assert not warned(bf16)
    assert hardware.bf16_tip(fp32).startswith("tip: this CPU has native bf16 (amx_bf16, avx512_bf16): --use_cpu --bf16")
    assert hardware.bf16_tip(bf16) is None
    cpuinfo.unlink()  # not Linux: nothing is claimed either way
    assert hardware.native_bf16_flags() is None and not warned(bf16) and hardware.bf16_tip(fp32) is None


def test_a_glob_of_files_reads_every_file_it_matches_as_datasets_does(assets, tmp_path):
    lines = Path(assets.train).read_text(encoding="utf-8").splitlines(keepends=True)[:600]
    whole = tmp_path / "whole.txt"
    whole.write_text("".join(lines), encoding="utf-8")
    (tmp_path / "parts").mkdir()
    for index, start in enumerate(range(0, len(lines), 200)):
        (tmp_path / "parts" / f"part-{index}.txt").write_text("".join(lines[start:start + 200]), encoding="utf-8")

    def train_samples(train_file, name):
        return run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path / name, "--do_train", "--max_steps", "1",
                                               train=train_file, validation=None))["train_samples"]

    assert train_samples(f"{tmp_path}/parts/part-*.txt", "glob") == train_samples(whole, "whole") > 0


def concatenated_ids(tokenizer_dir, texts):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [token for ids in tokenizer(texts)["input_ids"] for token in ids]


def window_by_window_loss(model, ids, window, stride):
    """The loop of the Hugging Face perplexity guide, one window at a time: windows of window tokens every stride
    tokens, each scoring the tokens after the previous window's end; the mean loss and the number of tokens scored."""
    loss_sum, scored, previous_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + window, len(ids))
            input_ids = torch.tensor([ids[begin:end]])
            targets = input_ids.clone()
            targets[:, : -(end - previous_end)] = -100
            logits = model(input_ids).logits
            loss_sum += torch.nn.functional.cross_entropy(logits[0, :-1], targets[0, 1:], reduction="sum").item()
            scored += int((targets[0, 1:] != -100).sum())
            previous_end = end
            if end == len(ids):
                break
    return loss_sum / scored, scored


def test_eval_stride_matches_a_window_by_window_computation(assets, pretrained_gpt2, tmp_path, capsys):
    lines = lines_of(assets.code_validation, 80)
    validation = write_data_file(tmp_path / "validation.txt", lines)
    output_dir = tmp_path / "out"
    metrics = run_clm.main(tiny_run_arguments(run_clm, assets, output_dir, "--do_train", "--do_eval", "--max_steps",
                                              "10", "--learning_rate", "1e-2", "--train_adapter", "--eval_stride",
                                              "16", model=pretrained_gpt2, train="code", validation=validation, **RUN))
    model = AutoModelForCausalLM.from_pretrained(pretrained_gpt2).eval()
    ids = concatenated_ids(pretrained_gpt2, [line + "\n" for line in lines])  # .txt lines keep their line break
    base_loss, _ = window_by_window_loss(model, ids, 64, 16)
    adapters.init(model)
    model.load_adapter(str(output_dir / "clm"), set_active=True, use_safetensors=True)
    loss, scored = window_by_window_loss(model, ids, 64, 16)
    # Every token but the first, with the trained adapter active (which the base model's loss shows to matter).
    assert metrics["eval_strided_tokens"] == scored == len(ids) - 1
    assert metrics["eval_strided_loss"] == pytest.approx(loss, abs=1e-5)
    assert abs(base_loss - loss) > 1e-2
    assert metrics["strided_perplexity"] == pytest.approx(np.exp(loss), rel=1e-5)
    for results in ("all_results.json", "eval_results.json"):
        saved = read_json(output_dir / results)
        assert saved["eval_strided_loss"] == metrics["eval_strided_loss"] and saved["eval_stride"] == 16
        assert saved["eval_loss"] == metrics["eval_loss"] != metrics["eval_strided_loss"]  # the blocks' own
    summary = capsys.readouterr().out.split("***** summary *****")[1]
    assert (f"perplexity {metrics['perplexity']:.2f} (sliding window of 64 by 16: "
            f"{metrics['strided_perplexity']:.2f}), accuracy") in summary


@pytest.mark.parametrize("adapter", [None, "prompt_tuning"], ids=["model", "prompt_tuning"])
def test_eval_stride_of_the_block_size_gives_the_block_loss(assets, pretrained_gpt2, tmp_path, adapter):
    # --max_eval_samples 8: the first 8 blocks of the validation texts (fewer than the 1000 that grouping concatenates
    # at a time), and the windows of the first 8 * 64 tokens of all of them: the same blocks, each with its first token
    # unscored. Prompt tuning's virtual tokens lengthen the model's output, which the windows' labels must follow; a
    # fresh prompt is random. Of the causal models, adapters 1.3.0 has prompt tuning for BERT as a decoder alone.
    model, extra = pretrained_gpt2, []
    if adapter:
        decoder = families.Family("bert", "run_clm", {"is_decoder": True})
        model = families.build_model(decoder, assets.gpt2_tokenizer, tmp_path / "bert-decoder")
        extra = ["--train_adapter", "--adapter_config", adapter]
    metrics = run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path / "out", "--do_eval", "--eval_stride", "64",
                                              *extra, model=model, train=None, **{**RUN, "eval_samples": 8}))
    assert metrics["eval_samples"] == 8 and metrics["eval_strided_tokens"] == 8 * 63
    assert metrics["eval_strided_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-5)


@pytest.mark.parametrize("stride, length, expected", [
    (0, 64, "--eval_stride 0 must be at least 1 token"),
    (65, 64, "--eval_stride 65 is more than the block size of 64 tokens"),
    (300, 5000, "--eval_stride 300 is more than the block size of 256 tokens"),  # the model's 256 positions
])
def test_eval_stride_outside_one_to_the_block_size_is_refused(assets, tmp_path, capsys, stride, length, expected):
    assert run_clm.cli(tiny_run_arguments(run_clm, assets, tmp_path, "--do_eval", "--eval_stride", stride,
                                          train=None, length=length)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"run_clm.py: error: {expected}")


def test_eval_stride_without_do_eval_is_refused(assets, tmp_path):
    with pytest.raises(run_clm.UsageError, match="--eval_stride .*add --do_eval"):
        run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path, "--do_train", "--eval_stride", "16", **RUN))
