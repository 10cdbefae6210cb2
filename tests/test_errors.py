"""Bad input costs seconds: one line naming the flag and the fix, exit status 2, no traceback, nothing touched."""

import errno
import importlib.util
import json
import os
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch
import transformers.trainer
from conftest import run_script, small_file_system, tiny_run_arguments
from transformers import PreTrainedTokenizerBase, TrainingArguments

import run_clm
import run_mlm
from lmtune import modeling
from lmtune.checks import check_optimizer_settings
from lmtune.output_dir import LOCK_FILE, last_complete_checkpoint


def write(path, content):
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


# Each case: the script, a function of (assets, folder) giving the arguments, and a fragment of the one line.
CASES = {
    "missing train file": (run_clm, lambda a, d: ["--train_file", d / "missing.txt"], "--train_file"),
    "glob that matches nothing": (run_clm, lambda a, d: ["--train_file", d / "parts" / "part-*.txt"],
                                  "parts/part-*.txt matches no file; check the pattern"),
    "unsupported extension": (run_clm, lambda a, d: ["--train_file", write(d / "x.xml", "<a/>")],
                              "unsupported extension"),
    "empty file": (run_clm, lambda a, d: ["--train_file", write(d / "empty.txt", "")], "is empty"),
    "not utf-8": (run_mlm, lambda a, d: ["--train_file", write(d / "latin.txt", "caf\xe9 ol\xe9\n".encode("latin-1"))],
                  "is not UTF-8 text (byte 0xe9 at offset 3)"),
    "too short for a block": (run_clm, lambda a, d: ["--train_file", write(d / "short.txt", "Few words.\n" * 20),
                                                     "--block_size", "256"],
                              "not enough for one block of 256 tokens; pass a smaller --block_size"),
    "too little to hold out validation": (run_mlm, lambda a, d: ["--train_file", write(d / "one.txt", "One line.\n"),
                                                                 "--do_eval"], "too few to hold out 5%"),
    "unknown adapter method": (run_clm, lambda a, d: ["--train_adapter", "--adapter_config", "lorra"],
                               "--adapter_config lorra"),
    "malformed adapter string": (run_mlm, lambda a, d: ["--train_adapter", "--adapter_config", "lora[r=8"],
                                 "--adapter_config lora[r=8"),
    "lora of rank 0": (run_clm, lambda a, d: ["--train_adapter", "--adapter_config", "lora[r=0]"],
                       "--adapter_config lora[r=0]: r=0 leaves LoRAConfig no size"),
    "bottleneck of reduction factor 0": (run_mlm, lambda a, d: ["--train_adapter", "--adapter_config",
                                                                "seq_bn[reduction_factor=0]"], "reduction_factor=0"),
    "prefix of length 0": (run_clm, lambda a, d: ["--train_adapter", "--adapter_config",
                                                  "prefix_tuning[prefix_length=0]"], "prefix_length=0"),
    "prompt of length 0 in a union": (run_mlm, lambda a, d: ["--train_adapter", "--adapter_config",
                                                             "lora|prompt_tuning[prompt_length=0]"], "prompt_length=0"),
    "unknown model type": (run_clm, lambda a, d: ["--model_name_or_path", "", "--model_type", "gpt3",
                                                  "--tokenizer_name", a.gpt2_tokenizer], "--model_type gpt3"),
    "unknown config override": (run_clm, lambda a, d: ["--model_name_or_path", "", "--model_type", "gpt2",
                                                       "--tokenizer_name", a.gpt2_tokenizer,
                                                       "--config_overrides", "n_embd=32,n_wings=2"],
                                "--config_overrides"),
    "overrides with a pretrained model": (run_mlm, lambda a, d: ["--config_overrides", "hidden_size=32"],
                                          "only applies to a model built from scratch"),
    "percentage out of range": (run_clm, lambda a, d: ["--validation_split_percentage", "150"],
                                "--validation_split_percentage 150"),
    "zero samples": (run_mlm, lambda a, d: ["--max_eval_samples", "0"], "--max_eval_samples 0"),
    "zero batch size": (run_clm, lambda a, d: ["--per_device_train_batch_size", "0"],
                        "--per_device_train_batch_size 0 must be at least 1"),
    "zero block size": (run_clm, lambda a, d: ["--block_size", "0"], "--block_size 0"),
    "not a number": (run_clm, lambda a, d: ["--learning_rate", "fast"],
                     "--learning_rate/--learning-rate: invalid float value"),
    "unknown flag": (run_mlm, lambda a, d: ["--block_size", "64"],
                     "not used by the HfArgumentParser: ['--block_size', '64']"),
    "missing adapter folder": (run_clm, lambda a, d: ["--train_adapter", "--load_adapter", d / "nope" / "clm"],
                               "--load_adapter"),
    "missing checkpoint": (run_mlm, lambda a, d: ["--resume_from_checkpoint", d / "checkpoint-9"],
                           "--resume_from_checkpoint"),
    "missing model folder": (run_clm, lambda a, d: ["--model_name_or_path", d / "models" / "gpt2"],
                             "--model_name_or_path"),
    "text column of numbers": (run_mlm, lambda a, d: ["--line_by_line", "--train_file",
                                                      write(d / "n.csv", "text,label\n1,a\n2,b\n")],
                               "n.csv) has a text column 'text' of Value('int64'), not of text"),
    "json lines whose text holds lists": (run_clm, lambda a, d: ["--train_file", write(
        d / "lists.jsonl", '{"text": ["a", "b"]}\n{"text": ["c"]}\n')],
        "lists.jsonl) has a text column 'text' of List"),
    "ragged csv": (run_clm, lambda a, d: ["--train_file", write(d / "r.csv", "text\n\"unclosed,\n")],
                   "r.csv could not be loaded (Error tokenizing data"),
    "streaming without max_steps": (run_clm, lambda a, d: ["--streaming", "--max_steps", "-1"], "--streaming"),
    "probability out of range": (run_mlm, lambda a, d: ["--mlm_probability", "1.5"], "--mlm_probability 1.5"),
    "tokenizer without mask token": (run_mlm, lambda a, d: ["--tokenizer_name", a.gpt2_tokenizer],
                                     "has no mask token"),
    "no data": (run_clm, lambda a, d: [], "No data given"),
    # Data that cannot give a meaningful loss: refused, never reported as a perplexity of 1 or NaN.
    "only blank lines": (run_clm, lambda a, d: ["--train_file", write(d / "blank.txt", "\n \n\t\n" * 50)],
                         "has no text: all its 142 texts in column 'text' are empty or whitespace"),
    "only whitespace lines, line by line": (run_mlm, lambda a, d: ["--line_by_line", "--train_file",
                                                                   write(d / "spaces.txt", "  \n\t\n" * 40)],
                                            "has no text"),
    "empty text column": (run_clm, lambda a, d: ["--train_file", write(d / "e.csv", "text,id\n,1\n,2\n")],
                          "has no text"),
    "block of one token": (run_clm, lambda a, d: ["--block_size", "1"], "--block_size 1 leaves no token to predict"),
    "sequence of one token": (run_mlm, lambda a, d: ["--max_seq_length", "1"], "--max_seq_length 1 leaves no"),
    "line as short as its special tokens": (run_mlm, lambda a, d: ["--line_by_line", "--max_seq_length", "2"],
                                            "--max_seq_length 2 leaves no token to mask in a line after its 2 "
                                            "special tokens"),
    "no token to mask in validation": (run_mlm, lambda a, d: ["--do_eval", "--line_by_line", "--mlm_probability",
                                                              "0.01", "--validation_file", write(d / "v.txt", "a b\n")],
                                       "The validation data has no token to evaluate"),
    # Files that are not what their extension says, named in the line.
    "not a parquet file": (run_clm, lambda a, d: ["--train_file", write(d / "x.parquet", "plain text\n")],
                           "x.parquet could not be loaded (Parquet magic bytes not found"),
    "broken json lines": (run_mlm, lambda a, d: ["--train_file", write(d / "b.jsonl", '{"text": "a"}\n{"text": \n')],
                          "b.jsonl could not be loaded"),
    "broken validation file beside a good train file": (
        run_clm, lambda a, d: ["--do_eval", "--validation_file", write(d / "v.json", "{")],
        "--validation_file"),
    # Models, tokenizers and adapters that cannot be loaded, or do not fit: the flag that names them is blamed.
    "truncated model weights": (run_clm, lambda a, d: ["--model_name_or_path", a.truncated_gpt2],
                                "--model_name_or_path"),
    "tokenizer without vocabulary": (run_clm, lambda a, d: ["--tokenizer_name", a.tokenizer_without_vocabulary],
                                     "--tokenizer_name"),
    "adapter of another architecture": (run_clm, lambda a, d: ["--train_adapter", "--load_adapter",
                                                                a.roberta_adapter],
                                        "does not fit this gpt2 model"),
    "adapter of another width": (run_clm, lambda a, d: ["--train_adapter", "--load_adapter", a.narrow_gpt2_adapter],
                                 "does not fit this gpt2 model (size mismatch"),
    "corrupt adapter weights": (run_mlm, lambda a, d: ["--train_adapter", "--load_adapter", a.corrupt_roberta_adapter],
                                "--load_adapter"),
    "half-precision base without mixed precision": (run_clm, lambda a, d: ["--train_adapter", "--torch_dtype",
                                                                           "float16"],
                                                    "--torch_dtype float16 loads the base model in torch.float16"),
    # Settings the optimizer would reject once everything is loaded.
    "negative learning rate": (run_mlm, lambda a, d: ["--learning_rate", "-1"], "--learning_rate -1.0 must not be"),
    "impossible beta": (run_clm, lambda a, d: ["--adam_beta1", "2"],
                        "rejects these settings (Invalid beta parameter at index 0: 2.0)"),
    "zero preprocessing workers": (run_clm, lambda a, d: ["--preprocessing_num_workers", "0"],
                                   "--preprocessing_num_workers 0 must be at least 1"),
}


@pytest.fixture(scope="module")
def inputs(assets, tmp_path_factory):
    """The tiny assets, plus broken or mismatched ones: a model cut short, a tokenizer without its vocabulary, and
    adapters saved for other models."""
    import adapters
    from transformers import AutoModelForMaskedLM, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("broken")
    truncated = folder / "truncated-gpt2"
    shutil.copytree(assets.tiny_gpt2, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    without_vocabulary = folder / "gpt2-tokenizer-without-vocabulary"
    shutil.copytree(assets.gpt2_tokenizer, without_vocabulary)
    for name in ("vocab.json", "tokenizer.json"):
        (without_vocabulary / name).unlink()

    def saved_adapter(model, name):
        adapters.init(model)
        model.add_adapter("adapter", config="seq_bn")
        model.save_adapter(str(folder / name), "adapter")
        return folder / name

    roberta_adapter = saved_adapter(AutoModelForMaskedLM.from_pretrained(assets.tiny_roberta), "roberta-adapter")
    corrupt = folder / "corrupt-roberta-adapter"
    shutil.copytree(roberta_adapter, corrupt)
    (corrupt / "adapter.safetensors").write_bytes(b"not a safetensors file")
    narrow_gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_embd=32, n_layer=2, n_head=2, n_positions=256))
    return SimpleNamespace(
        **vars(assets), truncated_gpt2=truncated, tokenizer_without_vocabulary=without_vocabulary,
        roberta_adapter=roberta_adapter, corrupt_roberta_adapter=corrupt,
        narrow_gpt2_adapter=saved_adapter(narrow_gpt2, "narrow-gpt2-adapter"),
    )


# Arguments that get each mistake as far as the check that should refuse it: --overwrite_output_dir past the output
# folder check, which would refuse first, and no data files unless the case gives them.
CHECK_ONLY = {"train": None, "validation": None, "length": 64, "eval_samples": None, "learning_rate": None}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_in_one_line_and_touches_nothing(case, inputs, tmp_path, capsys):
    script, extra, expected = CASES[case]
    output_dir = tmp_path / "earlier-run"
    output_dir.mkdir()
    (output_dir / "all_results.json").write_text('{"perplexity": 12.5}')
    extra = extra(inputs, tmp_path)
    data = [] if case == "no data" or "--train_file" in extra else ["--train_file", inputs.train]
    argv = tiny_run_arguments(script, inputs, output_dir, "--do_train", "--max_steps", "1", "--overwrite_output_dir",
                              *data, *extra, **CHECK_ONLY)
    capsys.readouterr()

    assert script.cli(argv) == 2

    stderr = capsys.readouterr().err.strip().splitlines()
    last_line = stderr[-1]
    assert last_line.startswith(f"{script.__name__}.py: error: ")
    assert expected in last_line
    assert not any("Traceback" in line for line in stderr)
    assert [path.name for path in output_dir.iterdir()] == ["all_results.json"]
    assert json.loads((output_dir / "all_results.json").read_text()) == {"perplexity": 12.5}


def test_json_arguments_file_mistakes(tmp_path, capsys):
    broken = write(tmp_path / "broken.json", '{"output_dir": "x",')
    unknown = write(tmp_path / "unknown.json", json.dumps({"output_dir": "x", "learning_rat": 0.1}))
    assert run_clm.cli([str(broken)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert run_mlm.cli([str(unknown)]) == 2
    assert "learning_rat" in capsys.readouterr().err
    for name, text, expected in (("broken.yaml", "output_dir: [x", "is not valid YAML"),
                                 ("list.yml", "- output_dir\n- x\n", "holds no mapping of flags to values"),
                                 ("unknown.yaml", "output_dir: x\nlearning_rat: 0.1\n", "learning_rat"),
                                 ("missing.yaml", None, "does not exist"),
                                 ("rate.yaml", "output_dir: x\nlearning_rate: fast\n", "learning_rate: fast in the")):
        path = tmp_path / name if text is None else write(tmp_path / name, text)
        assert run_clm.cli([str(path)]) == 2
        assert expected in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("script, adapter, expected", [
    (run_clm, "roberta_adapter", "does not fit this gpt2 model"),
    (run_clm, "narrow_gpt2_adapter", "does not fit this gpt2 model (size mismatch"),
    (run_mlm, "corrupt_roberta_adapter", "--load_adapter"),
])
def test_a_saved_adapter_that_cannot_be_evaluated_is_refused_in_one_line(inputs, tmp_path, capsys, script, adapter,
                                                                         expected):
    # Evaluated alone, without --train_adapter, a saved adapter goes through the same checks as one trained further.
    argv = tiny_run_arguments(script, inputs, tmp_path / "out", "--do_eval", "--load_adapter",
                              getattr(inputs, adapter), train=None)
    assert script.cli(argv) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert expected in stderr[-1] and not any("Traceback" in line for line in stderr)
    assert not (tmp_path / "out").exists()


def test_half_written_checkpoint_is_not_resumed_from(assets, tmp_path):
    args = tiny_run_arguments(run_clm, assets, tmp_path, "--do_train", "--max_steps", "1", "--overwrite_output_dir",
                              **{**CHECK_ONLY, "train": "prose"})
    run_clm.main([*args, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2", "--train_adapter"])
    half_written = tmp_path / "checkpoint-4"
    half_written.mkdir()
    (half_written / "trainer_state.json").write_text('{"global_step": ')  # killed while writing
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")


def test_the_real_command_line_exits_2_without_traceback(assets, tmp_path):
    result = run_script("run_clm.py", "--model_name_or_path", assets.tiny_gpt2, "--train_file", assets.train,
                        "--do_train", "--learning_rate", "fast", "--output_dir", tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "run_clm.py: error: argument --learning_rate/--learning-rate: invalid float value: 'fast'; see --help for "
        "the flags and their values."
    ]


def test_an_evaluation_never_writes_over_a_folder_of_other_work(assets, tmp_path, capsys):
    (tmp_path / "README.md").write_text("my notes")
    arguments = tiny_run_arguments(run_clm, assets, tmp_path, "--do_eval", train=None, eval_samples=4)
    assert run_clm.cli(arguments) == 2
    assert "--output_dir" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md"]
    assert (tmp_path / "README.md").read_text() == "my notes"
    # Asked for explicitly, it writes there (the model card replaces the README).
    assert run_clm.cli([*arguments, "--overwrite_output_dir"]) == 0
    assert (tmp_path / "eval_results.json").is_file()


@pytest.mark.parametrize("where", ["a file", "inside a file"])
def test_an_output_dir_that_cannot_be_a_folder_is_refused_before_the_model_loads(assets, tmp_path, capsys, where):
    (tmp_path / "taken").write_text("a file, not a folder")
    output_dir = tmp_path / "taken" if where == "a file" else tmp_path / "taken" / "out"
    arguments = tiny_run_arguments(run_clm, assets, output_dir, "--do_train", model=tmp_path / "no-model-here",
                                   validation=None)
    assert run_clm.cli(arguments) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    # Refused for the folder, though the model named does not exist either: the folder is checked first.
    assert f"--output_dir {output_dir} cannot be written" in line
    assert (tmp_path / "taken").read_text() == "a file, not a folder"


def test_a_second_run_into_a_folder_in_use_is_refused_and_a_dead_runs_lock_is_not(assets, tmp_path, capsys):
    import fcntl

    output_dir = tmp_path / "out"
    output_dir.mkdir()
    arguments = tiny_run_arguments(run_clm, assets, output_dir, "--do_train", "--max_steps", "1", "--train_adapter",
                                   validation=None)
    with open(output_dir / LOCK_FILE, "w") as lock:  # as a live run holds it
        lock.write("4242")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert run_clm.cli(arguments) == 2
        assert "is in use by another run (process 4242)" in capsys.readouterr().err
    # The lock file of a killed run stays behind, but its lock died with the process.
    assert (output_dir / LOCK_FILE).exists()
    assert run_clm.cli(arguments) == 0
    assert (output_dir / "clm" / "adapter_config.json").is_file()
    assert not (output_dir / LOCK_FILE).exists()


def test_resuming_from_a_checkpoint_of_another_kind_of_run_is_refused(assets, tmp_path, capsys):
    def arguments(output_dir, *extra):
        return tiny_run_arguments(run_clm, assets, output_dir, "--do_train", "--max_steps", "4", "--save_strategy",
                                  "steps", "--save_steps", "2", *extra, validation=None, eval_samples=None)

    run_clm.main(arguments(tmp_path / "seq_bn", "--max_steps", "2", "--train_adapter"))
    assert run_clm.cli(arguments(tmp_path / "seq_bn", "--train_adapter", "--adapter_config", "lora")) == 2
    assert ("holds checkpoint-2 with an adapter of another configuration, but this run trains the adapter 'clm' "
            "(lora)") in capsys.readouterr().err
    assert run_clm.cli(arguments(tmp_path / "full", "--resume_from_checkpoint", tmp_path / "seq_bn" / "checkpoint-2",
                                 "--overwrite_output_dir")) == 2
    assert "holds an adapter, not a fully fine-tuned model, but this run trains the whole model" in (
        capsys.readouterr().err)
    assert sorted(path.name for path in (tmp_path / "seq_bn").glob("checkpoint-*")) == ["checkpoint-2"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU says")
@pytest.mark.parametrize("flags, expected", [
    (["--bf16"], "--bf16 needs a GPU with bf16 support; on a CPU add --use_cpu"),
    (["--fp16"], "--fp16 needs a GPU: on a CPU mixed precision is bf16"),
    (["--fp16", "--use_cpu", "--torch_dtype", "float16"], "--fp16 needs a GPU"),
])
def test_half_precision_flags_without_a_gpu_name_the_flag_and_the_fix(assets, tmp_path, capsys, flags, expected):
    arguments = tiny_run_arguments(run_clm, assets, tmp_path, "--do_train", "--max_steps", "1", "--train_adapter",
                                   "--overwrite_output_dir", *flags, **{**CHECK_ONLY, "train": "prose"})
    assert run_clm.cli(arguments) == 2
    assert expected in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_run_in_half_precision_leaves_no_precision_to_the_next_run_in_the_process():
    # TrainingArguments writes --bf16 into the environment, where the next TrainingArguments would find it.
    assert run_clm.parse_arguments(["--output_dir", "x", "--use_cpu", "--bf16"])[2].bf16
    run_clm.parse_arguments(["--output_dir", "x", "--use_cpu"])
    assert os.environ.get("ACCELERATE_MIXED_PRECISION", "no") == "no"


def test_a_run_with_torch_compile_leaves_no_compile_backend_to_the_next_run_in_the_process():
    # Nor torch.compile's backend, which accelerate would then apply to a run that never asked for it.
    assert run_clm.parse_arguments(["--output_dir", "x", "--torch_compile_backend", "eager"])[2].torch_compile
    assert os.environ["ACCELERATE_DYNAMO_BACKEND"] == "eager"
    assert not run_clm.parse_arguments(["--output_dir", "x"])[2].torch_compile
    assert "ACCELERATE_DYNAMO_BACKEND" not in os.environ


def test_a_tokenizer_that_needs_a_missing_package_is_refused_in_one_line(assets, tmp_path, capsys, monkeypatch):
    def from_pretrained(name, **kwargs):  # what transformers raises for a slow tokenizer's conversion
        raise ImportError("LlamaConverter requires the protobuf library but it was not found in your environment.")

    monkeypatch.setattr(modeling, "AutoTokenizer", SimpleNamespace(from_pretrained=from_pretrained))
    assert run_clm.cli(tiny_run_arguments(run_clm, assets, tmp_path / "out", "--do_train")) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"run_clm.py: error: --model_name_or_path {assets.tiny_gpt2} needs a package that is not "
                           "installed (LlamaConverter requires the protobuf library")


@pytest.mark.parametrize("error", [
    Exception("No space left on device (os error 28)"),  # the tokenizers library's own, for a full disk
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_a_full_disk_met_by_any_library_ends_in_one_line_naming_the_output_dir(assets, tmp_path, capsys, monkeypatch,
                                                                                 error):
    def save_pretrained(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", save_pretrained)
    output_dir = tmp_path / "out"
    assert run_clm.cli(tiny_run_arguments(run_clm, assets, output_dir, "--do_train", "--train_adapter",
                                          "--max_steps", "1")) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"run_clm.py: error: Could not write the trained adapter to --output_dir {output_dir} (No "
                           "space left on device)")


def test_a_cache_that_cannot_be_written_is_named_instead_of_the_data_file(assets, tmp_path, capsys):
    with small_file_system(tmp_path / "disk", "1m"):
        subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "disk")], check=True)
        argv = tiny_run_arguments(run_clm, assets, tmp_path / "out", "--do_train", "--cache_dir",
                                  tmp_path / "disk" / "cache")
        assert run_clm.cli(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("run_clm.py: error: Could not write ") and "(Read-only file system)" in line
    assert "while loading --train_file" in line and "fix the file" not in line


def test_optimizers_built_around_the_model_are_checked_as_far_as_transformers_can_without_it(monkeypatch):
    # LOMO wants the model itself: its settings pass once its package is there, as in transformers.
    monkeypatch.setattr(transformers.trainer, "is_lomo_available", lambda: True)
    check_optimizer_settings(TrainingArguments("unused", optim="lomo"))
    with pytest.raises(run_clm.UsageError, match="--optim galore_adamw needs a package that is not installed"):
        check_optimizer_settings(TrainingArguments("unused", optim="galore_adamw", optim_target_modules="all-linear"))
    with pytest.raises(run_clm.UsageError, match="--optim adamw_torch rejects these settings"):
        check_optimizer_settings(TrainingArguments("unused", optim="adamw_torch", adam_beta1=1.5))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="checks a machine without wandb")
def test_a_reporting_integration_without_its_package_is_refused_in_one_line(assets, tmp_path, capsys):
    assert run_clm.cli(tiny_run_arguments(run_clm, assets, tmp_path / "out", "--do_train", "--report_to", "wandb")) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("run_clm.py: error: --report_to wandb needs what is missing here (WandbCallback requires "
                           "wandb to be installed")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_checkpoint_with_a_damaged_optimizer_state_is_refused_in_one_line(assets, tmp_path, capsys, damage):
    output_dir = tmp_path / "out"
    argv = tiny_run_arguments(run_clm, assets, output_dir, "--do_train", "--train_adapter", "--save_strategy", "steps",
                              "--save_steps", "2", "--max_steps", "2")
    run_clm.main(argv)
    optimizer_file = output_dir / "checkpoint-2" / "optimizer.pt"
    content = optimizer_file.read_bytes()
    optimizer_file.write_bytes(content[: len(content) // 2] if damage == "truncated" else b"")
    assert run_clm.cli([*argv, "--max_steps", "4"]) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert stderr[-1].startswith(f"run_clm.py: error: Cannot resume from {output_dir / 'checkpoint-2'}: its optimizer "
                                 "or scheduler state is damaged")
    assert not any("Traceback" in line for line in stderr)
    assert optimizer_file.exists()  # nothing of the user's was deleted
