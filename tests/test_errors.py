"""Bad input costs seconds: one line naming the flag and the fix, exit status 2, no traceback, nothing touched."""

import json

import pytest
from conftest import QUIET, run_script

import run_clm
import run_mlm


def write(path, content):
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


# Each case: the script, a function of (assets, folder) giving the arguments, and a fragment of the one line.
CASES = {
    "missing train file": (run_clm, lambda a, d: ["--train_file", d / "missing.txt"], "--train_file"),
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
                               "text column 'text' holds Value('int64')"),
    "ragged csv": (run_clm, lambda a, d: ["--train_file", write(d / "r.csv", "text\n\"unclosed,\n")],
                   "Could not read"),
    "streaming without max_steps": (run_clm, lambda a, d: ["--streaming", "--max_steps", "-1"], "--streaming"),
    "probability out of range": (run_mlm, lambda a, d: ["--mlm_probability", "1.5"], "--mlm_probability 1.5"),
    "tokenizer without mask token": (run_mlm, lambda a, d: ["--tokenizer_name", a.gpt2_tokenizer],
                                     "has no mask token"),
    "no data": (run_clm, lambda a, d: [], "No data given"),
}


def base_arguments(script, assets, output_dir):
    # --overwrite_output_dir lets each mistake get past the output folder check, which would refuse first.
    model = assets.tiny_gpt2 if script is run_clm else assets.tiny_roberta
    length_flag = "--block_size" if script is run_clm else "--max_seq_length"
    return ["--model_name_or_path", model, "--do_train", "--max_steps", "1", length_flag, "64",
            "--output_dir", output_dir, "--overwrite_output_dir", *QUIET]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_in_one_line_and_touches_nothing(case, assets, tmp_path, capsys):
    script, extra, expected = CASES[case]
    output_dir = tmp_path / "earlier-run"
    output_dir.mkdir()
    (output_dir / "all_results.json").write_text('{"perplexity": 12.5}')
    extra = extra(assets, tmp_path)
    data = [] if case == "no data" or "--train_file" in extra else ["--train_file", assets.train]
    argv = [str(value) for value in [*base_arguments(script, assets, output_dir), *data, *extra]]
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


def test_half_written_checkpoint_is_not_resumed_from(assets, tmp_path):
    args = [str(value) for value in base_arguments(run_clm, assets, tmp_path)] + ["--train_file", str(assets.train)]
    run_clm.main([*args, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2", "--train_adapter"])
    half_written = tmp_path / "checkpoint-4"
    half_written.mkdir()
    (half_written / "trainer_state.json").write_text('{"global_step": ')  # killed while writing
    assert run_clm.last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")


def test_the_real_command_line_exits_2_without_traceback(assets, tmp_path):
    result = run_script("run_clm.py", "--model_name_or_path", assets.tiny_gpt2, "--train_file", assets.train,
                        "--do_train", "--learning_rate", "fast", "--output_dir", tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "run_clm.py: error: argument --learning_rate/--learning-rate: invalid float value: 'fast'; see --help for "
        "the flags and their values."
    ]
