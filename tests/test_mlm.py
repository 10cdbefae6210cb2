"""run_mlm.py end to end on tiny offline models: training, fixed evaluation masks, line-by-line data, errors."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import QUIET, read_json, tiny_run_arguments
from transformers import AutoModelForMaskedLM, AutoTokenizer, EvalPrediction

import run_mlm

# The runs of this module: blocks of 64 tokens in batches of 8, evaluated on the whole validation file, at the
# Trainer's default learning rate unless a test sets one.
RUN = {"length": 64, "batch_size": 8, "eval_samples": None, "learning_rate": None}


@pytest.fixture(scope="module")
def adapter_run(assets, pretrained_roberta, tmp_path_factory):
    """Perplexity of the pretrained base with a fresh adapter on source code, then after training that adapter."""
    before_dir = tmp_path_factory.mktemp("untrained")
    after_dir = tmp_path_factory.mktemp("trained")
    common = ["--train_adapter", "--adapter_config", "seq_bn", "--do_eval"]
    before = run_mlm.main(tiny_run_arguments(run_mlm, assets, before_dir, *common, model=pretrained_roberta,
                                             train="code", validation="code", **RUN))
    after = run_mlm.main(tiny_run_arguments(run_mlm, assets, after_dir, *common, "--do_train", "--max_steps", "150",
                                            "--learning_rate", "1e-2", model=pretrained_roberta, train="code",
                                            validation="code", **RUN))
    return before, after, after_dir


def test_adapter_training_lowers_validation_perplexity(adapter_run):
    before, after, output_dir = adapter_run
    # The MLM head stays frozen with the rest of the base model (it is not saved with the adapter), so on this tiny
    # base the adapter alone gains less than in run_clm's test: about 0.7x here.
    assert after["perplexity"] < 0.75 * before["perplexity"], (before["perplexity"], after["perplexity"])
    all_results = read_json(output_dir / "all_results.json")
    assert all_results["perplexity"] == pytest.approx(np.exp(all_results["eval_loss"]))
    assert {"train_loss", "train_samples", "eval_samples", "eval_accuracy"} <= all_results.keys()


def test_saved_adapter_reloads_to_the_same_eval_loss(adapter_run, assets, pretrained_roberta, tmp_path):
    _, after, output_dir = adapter_run
    adapter_dir = output_dir / "mlm"
    assert read_json(adapter_dir / "adapter_config.json")["config"]["reduction_factor"] == 16
    # Exactly the trained weights, as safetensors: no head (the tied embeddings) and no pickle.
    assert sorted(path.name for path in adapter_dir.iterdir()) == ["adapter.safetensors", "adapter_config.json",
                                                                   "pytorch_adapter.bin"]
    assert not list(output_dir.glob("*.safetensors"))  # the frozen base model is not copied
    reloaded = run_mlm.main(tiny_run_arguments(run_mlm, assets, tmp_path, "--do_eval", "--train_adapter",
                                               "--load_adapter", str(adapter_dir), model=pretrained_roberta,
                                               train="code", validation="code", **RUN))
    assert reloaded["eval_loss"] == pytest.approx(after["eval_loss"], abs=1e-6)


def evaluate(assets, output_dir, *extra):
    return run_mlm.main(tiny_run_arguments(run_mlm, assets, output_dir, "--do_eval", *extra, **RUN))


def test_evaluation_masks_are_fixed_by_the_seed(assets, tmp_path):
    first = evaluate(assets, tmp_path / "first")
    assert evaluate(assets, tmp_path / "again")["eval_loss"] == first["eval_loss"]
    # Neither the batch size nor the cache decides the masks, only the seed; and the loss is a mean per masked token,
    # not a mean of batch means, which would move with the number of masked tokens in each batch.
    rebatched = evaluate(assets, tmp_path / "batch", "--per_device_eval_batch_size", "1", "--overwrite_cache")
    assert rebatched["eval_accuracy"] == first["eval_accuracy"]
    assert rebatched["eval_loss"] == pytest.approx(first["eval_loss"], abs=1e-6)
    assert evaluate(assets, tmp_path / "other-seed", "--seed", "8")["eval_loss"] != pytest.approx(
        first["eval_loss"], abs=1e-4)


def test_training_masks_follow_seed_epoch_and_tokens_not_the_global_random_state(assets):
    tokenizer = AutoTokenizer.from_pretrained(assets.roberta_tokenizer)
    sentence = "the quick brown fox jumps over the lazy dog " * 8
    examples = [tokenizer(sentence)]

    def masks(seed=7, epoch=0, batch=examples):
        collator = run_mlm.MaskingCollator(tokenizer=tokenizer, mlm_probability=0.15, seed=seed)
        collator.on_epoch_begin(None, SimpleNamespace(epoch=epoch + 0.5), None)
        return collator(batch)["labels"]

    first = masks()
    torch.manual_seed(123)  # what a resumed run restores only after the Trainer has collated its first batch
    assert torch.equal(masks(), first)
    assert not torch.equal(masks(epoch=1), first)  # dynamic masking: every epoch masks the text differently
    assert not torch.equal(masks(seed=8), first)
    other_text = [tokenizer(sentence.replace("fox", "cat"))]
    assert not torch.equal(masks(batch=other_text) != -100, first != -100)
    masked = first != -100
    assert 0 < masked.float().mean() < 0.4
    assert not masked[0, 0] and not masked[0, -1]  # <s> and </s> are never masked


def parsed(*argv):
    return run_mlm.parse_arguments(["--output_dir", "unused", *argv])


@pytest.mark.parametrize("pad_to_max_length", [False, True])
def test_line_by_line_makes_one_example_per_non_empty_line(assets, tmp_path, pad_to_max_length):
    lines = ["A first line of text.", "", "   ", "A second, longer line of text " * 30, "Third."]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines) + "\n")
    flags = ["--pad_to_max_length"] if pad_to_max_length else []
    model_args, data_args, training_args, *_ = parsed(
        "--validation_file", str(path), "--do_eval", "--line_by_line", "--tokenizer_name",
        str(assets.roberta_tokenizer), *flags,
    )
    raw = run_mlm.load_raw_datasets(model_args, data_args, training_args)
    tokenizer = AutoTokenizer.from_pretrained(assets.roberta_tokenizer)
    examples = run_mlm.preprocess(raw, tokenizer, 32, data_args, training_args)["validation"]
    lengths = [len(ids) for ids in examples["input_ids"]]
    assert len(lengths) == 3
    if pad_to_max_length:
        assert lengths == [32, 32, 32]
    else:
        assert lengths[1] == 32 and lengths[0] < 32 and lengths[2] < lengths[0]  # truncated, not padded


@pytest.mark.parametrize("pad_to_max_length", [False, True])
def test_line_by_line_trains_and_evaluates(assets, tmp_path, pad_to_max_length):
    flags = ["--pad_to_max_length"] if pad_to_max_length else []
    metrics = run_mlm.main(tiny_run_arguments(run_mlm, assets, tmp_path, "--line_by_line", "--do_train", "--do_eval",
                                              "--max_steps", "3", *flags, **RUN))
    assert metrics["eval_samples"] == len(assets.validation.read_text().splitlines())
    assert np.isfinite(metrics["perplexity"])


@pytest.mark.parametrize("extension", ["csv", "json"])
def test_extra_columns_in_line_by_line_mode(assets, tmp_path, extension):
    lines = [line for line in assets.validation.read_text().splitlines()][:120]
    frame = pd.DataFrame({"id": range(len(lines)), "text": lines, "label": ["prose"] * len(lines)})
    path = tmp_path / f"data.{extension}"
    frame.to_csv(path, index=False) if extension == "csv" else frame.to_json(path, orient="records", lines=True)
    metrics = run_mlm.main(tiny_run_arguments(run_mlm, assets, tmp_path / "out", "--line_by_line", "--do_train",
                                              "--do_eval", "--max_steps", "2", "--train_adapter", train=path,
                                              validation=path, **RUN))
    assert metrics["eval_samples"] == 120


def test_model_type_roberta_with_config_overrides(assets, tmp_path):
    metrics = run_mlm.main([
        "--model_type", "roberta", "--tokenizer_name", str(assets.roberta_tokenizer),
        "--config_overrides", "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64,"
        "max_position_embeddings=66,vocab_size=1000,pad_token_id=1",
        "--train_file", str(assets.train), "--validation_file", str(assets.validation), "--do_train", "--do_eval",
        "--max_steps", "30", "--learning_rate", "3e-3", "--output_dir", str(tmp_path), *QUIET,
    ])
    config = read_json(tmp_path / "config.json")
    assert (config["hidden_size"], config["num_hidden_layers"], config["model_type"]) == (32, 1, "roberta")
    # 66 positions of which RoBERTa leaves the first two unused: blocks of 64 tokens by default.
    tokens = sum(len(ids) for ids in AutoTokenizer.from_pretrained(assets.roberta_tokenizer)(
        assets.validation.read_text().splitlines())["input_ids"])
    assert metrics["eval_samples"] == tokens // 64
    assert metrics["perplexity"] < 900


def test_accuracy_and_loss_count_masked_positions_only():
    labels = np.array([[-100, 5, -100, 7], [8, -100, -100, -100]])
    predictions = np.array([[1, 5, 2, 0], [8, 3, 3, 3]])  # right on 5 and 8, wrong on 7; unmasked ones ignored
    losses = np.array([[9.0, 1.0, 9.0, 2.0], [6.0, 9.0, 9.0, 9.0]], dtype=np.float32)
    metrics = run_mlm.MaskedLanguageModeling().compute_metrics(EvalPrediction((predictions, losses), labels))
    # A mean per masked token: (1 + 2 + 6) / 3, not the mean of the rows' means (1.5 + 6) / 2.
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["loss"] == pytest.approx(3.0)


def test_tokenizer_without_mask_token_is_refused_in_one_line(assets, tmp_path, capsys):
    arguments = ["--model_type", "roberta", "--tokenizer_name", assets.gpt2_tokenizer, "--train_file", assets.train,
                 "--do_train", "--output_dir", tmp_path / "out"]
    assert run_mlm.cli([str(value) for value in arguments]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("run_mlm.py: error: --tokenizer_name") and "no mask token" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("probability", ["0", "1", "1.5", "-0.1"])
def test_mlm_probability_outside_zero_one_is_refused(assets, tmp_path, probability):
    with pytest.raises(run_mlm.UsageError, match=f"--mlm_probability {probability}"):
        run_mlm.main(tiny_run_arguments(run_mlm, assets, tmp_path, "--do_train", "--mlm_probability", probability,
                                        **RUN))


def test_padding_to_max_length_changes_no_mask_and_no_result(assets, tmp_path):
    # Evaluated only: training draws dropout over the padded shapes too, which no mask can keep the same.
    def run(name, *extra):
        return run_mlm.main(tiny_run_arguments(run_mlm, assets, tmp_path / name, "--do_eval", "--line_by_line",
                                               *extra))

    padded, unpadded = run("padded", "--pad_to_max_length"), run("unpadded")
    assert padded["eval_loss"] == pytest.approx(unpadded["eval_loss"], abs=1e-6)
    assert padded["eval_accuracy"] == unpadded["eval_accuracy"]


def test_persistent_data_loader_workers_mask_each_epoch_afresh_as_the_main_process_does(assets, tmp_path):
    # Without dropout: persistent workers spare the main process a random draw per epoch, which moves dropout.
    model = AutoModelForMaskedLM.from_pretrained(assets.tiny_roberta, hidden_dropout_prob=0.0,
                                                 attention_probs_dropout_prob=0.0)
    model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(assets.tiny_roberta).save_pretrained(tmp_path / "model")

    def losses(name, *extra):
        run_mlm.main(tiny_run_arguments(run_mlm, assets, tmp_path / name, "--do_train", "--num_train_epochs", "3",
                                        "--max_train_samples", "8", "--logging_steps", "1", *extra,
                                        model=tmp_path / "model"))
        return [entry["loss"] for entry in read_json(tmp_path / name / "trainer_state.json")["log_history"]
                if "loss" in entry]

    in_process = losses("in-process")
    assert len(in_process) == 6
    persistent = losses("workers", "--dataloader_num_workers", "1", "--dataloader_persistent_workers", "true")
    assert persistent == pytest.approx(in_process, abs=1e-6)
