"""Every adapter method of the adapters library: trained, saved and reloaded faithfully, or refused in one line."""

import json

import numpy as np
import pytest
from adapters import ADAPTER_CONFIG_MAP, AdapterConfig
from conftest import REPO, read_json
from conftest import tiny_run_arguments as arguments
from safetensors import safe_open

import run_clm
import run_mlm

# adapters 1.3.0 cannot train these on the tiny models (hidden size 64): Compacter's bottleneck of 64 / 16 = 4 is
# not a multiple of phm_dim 4 after the first division (out_features 2), GPT-2 has no prompt tuning, and GPT-2's
# fused query/key/value Conv1D breaks MTL-LoRA, VeRA and DoRA. DiReFT does not survive a save in adapters 1.3.0.
REFUSED = {
    "run_clm": {"compacter", "compacter++", "prompt_tuning", "mtl_lora", "vera", "dora", "dvora", "direft"},
    "run_mlm": {"compacter", "compacter++", "direft"},
}


# The older names of the bottleneck configurations: the same configuration under another name, so trained once.
ALIASES = {"pfeiffer": "seq_bn", "houlsby": "double_seq_bn", "parallel": "par_bn", "scaled_parallel": "scaled_par_bn",
           "pfeiffer+inv": "seq_bn_inv", "houlsby+inv": "double_seq_bn_inv"}


def test_the_older_names_are_the_same_configurations():
    for alias, name in ALIASES.items():
        assert AdapterConfig.load(alias).to_dict() == AdapterConfig.load(name).to_dict(), alias
    assert ALIASES.keys() < ADAPTER_CONFIG_MAP.keys()


@pytest.mark.parametrize("method", [name for name in ADAPTER_CONFIG_MAP if name not in ALIASES])
@pytest.mark.parametrize("script", [run_clm, run_mlm], ids=["gpt2", "roberta"])
def test_every_method_trains_and_reloads_or_is_refused_in_one_line(script, method, assets, tmp_path, capsys):
    name = "clm" if script is run_clm else "mlm"
    status = script.cli(arguments(script, assets, tmp_path / "run", "--do_train", "--do_eval", "--max_steps", "2",
                                  "--train_adapter", "--adapter_config", method))
    stderr = capsys.readouterr().err
    if method in REFUSED[script.__name__]:
        assert status == 2
        assert "Traceback" not in stderr
        line = stderr.strip().splitlines()[-1]
        assert line.startswith(f"{script.__name__}.py: error: --adapter_config {method}")
        assert "direft" in method or f"on a {'gpt2' if name == 'clm' else 'roberta'} model" in line
        assert not (tmp_path / "run" / name).exists()
        return
    assert status == 0, stderr[-2000:]
    assert sorted(path.name for path in (tmp_path / "run" / name).iterdir()) == [
        "adapter.safetensors", "adapter_config.json", "pytorch_adapter.bin"]
    trained = read_json(tmp_path / "run" / "eval_results.json")["eval_loss"]
    # A fresh base model plus the saved adapter must give the trained model's loss: so the adapter was saved whole
    # and nothing outside it changed in training.
    reloaded = script.main(arguments(script, assets, tmp_path / "reload", "--do_eval", "--train_adapter",
                                     "--load_adapter", tmp_path / "run" / name))
    assert reloaded["eval_loss"] == pytest.approx(trained, abs=1e-6)


@pytest.mark.parametrize("script", [run_clm, run_mlm], ids=["gpt2", "roberta"])
def test_load_adapter_continues_from_the_saved_weights(script, assets, tmp_path):
    name = "clm" if script is run_clm else "mlm"
    # The tiny random model is nearly uniform: a large learning rate moves its loss measurably in a few steps.
    first = script.main(arguments(script, assets, tmp_path / "first", "--do_train", "--do_eval", "--max_steps", "10",
                                  "--learning_rate", "5e-2", "--train_adapter", "--adapter_config", "lora"))
    # With a zero learning rate the continued run keeps the loaded weights exactly; a fresh adapter would not.
    continued = script.main(arguments(script, assets, tmp_path / "continued", "--do_train", "--do_eval",
                                      "--max_steps", "1", "--learning_rate", "0", "--train_adapter",
                                      "--load_adapter", tmp_path / "first" / name))
    fresh = script.main(arguments(script, assets, tmp_path / "fresh", "--do_eval", "--train_adapter",
                                  "--adapter_config", "lora"))
    assert continued["eval_loss"] == pytest.approx(first["eval_loss"], abs=1e-6)
    assert fresh["eval_loss"] != pytest.approx(first["eval_loss"], abs=1e-4)


@pytest.mark.parametrize("spec", ["lora[r=4,alpha=8]", "seq_bn[reduction_factor=4]|lora[r=4]", "config.json"])
def test_parameterised_union_and_file_configs(spec, assets, tmp_path):
    if spec == "config.json":
        spec = str(tmp_path / "config.json")
        (tmp_path / "config.json").write_text(json.dumps({"architecture": "lora", "r": 2, "alpha": 4}))
    metrics = run_clm.main(arguments(run_clm, assets, tmp_path / "out", "--do_train", "--do_eval", "--max_steps",
                                     "2", "--train_adapter", "--adapter_config", spec))
    saved = read_json(tmp_path / "out" / "clm" / "adapter_config.json")["config"]
    configs = saved["configs"] if saved["architecture"] == "union" else [saved]
    assert configs[-1]["architecture"] == "lora"
    rank = 2 if spec.endswith(".json") else 4
    assert configs[-1]["r"] == rank
    if "|" in spec:
        assert len(configs) == 2 and configs[0]["reduction_factor"] == 4
    # The settings reached the model: LoRA's up projections have the rank asked for, and the union has both parts.
    with safe_open(tmp_path / "out" / "clm" / "adapter.safetensors", "pt") as weights:
        shapes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}
    assert {shape[-1] for key, shape in shapes.items() if "lora_B" in key} == {rank}
    assert any("adapter_down" in key for key in shapes) == ("|" in spec)
    assert np.isfinite(metrics["eval_loss"])


@pytest.mark.parametrize("script", [run_clm, run_mlm], ids=["gpt2", "roberta"])
def test_language_adapter_is_stacked_under_the_task_adapter_and_stays_frozen(script, assets, tmp_path):
    lang = tmp_path / "lang"
    script.main(arguments(script, assets, lang, "--do_train", "--max_steps", "3", "--train_adapter",
                          "--adapter_name", "lang"))
    stacked = ["--train_adapter", "--load_lang_adapter", lang / "lang", "--lang_adapter_config", "seq_bn",
               "--adapter_name", "task"]
    trained = script.main(arguments(script, assets, tmp_path / "task", "--do_train", "--do_eval", "--max_steps", "3",
                                    *stacked))
    # Only the task adapter is saved; the language adapter it was trained on top of is loaded, not changed.
    assert sorted(path.name for path in (tmp_path / "task" / "task").iterdir()) == [
        "adapter.safetensors", "adapter_config.json", "pytorch_adapter.bin"]
    assert not (tmp_path / "task" / "lang").exists()
    reloaded = script.main(arguments(script, assets, tmp_path / "reload", "--do_eval", *stacked, "--load_adapter",
                                     tmp_path / "task" / "task"))
    assert reloaded["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-6)


def test_language_adapter_with_the_task_adapters_name_is_refused(assets, tmp_path):
    run_clm.main(arguments(run_clm, assets, tmp_path / "lang", "--do_train", "--max_steps", "1", "--train_adapter"))
    with pytest.raises(run_clm.UsageError, match="pass another --adapter_name"):
        run_clm.main(arguments(run_clm, assets, tmp_path / "task", "--do_train", "--max_steps", "1",
                               "--train_adapter", "--load_lang_adapter", tmp_path / "lang" / "clm",
                               "--lang_adapter_config", "seq_bn"))


def test_checkpoints_hold_only_the_adapter(assets, tmp_path):
    run_clm.main(arguments(run_clm, assets, tmp_path, "--do_train", "--max_steps", "2", "--train_adapter",
                           "--save_strategy", "steps", "--save_steps", "2"))
    adapter_files = sorted(path.name for path in (tmp_path / "checkpoint-2" / "clm").iterdir())
    assert adapter_files == ["adapter.safetensors", "adapter_config.json", "pytorch_adapter.bin"]
    assert not list((tmp_path / "checkpoint-2").glob("*model*"))  # no base model weights, no head


@pytest.mark.parametrize("family", [0, 1], ids=["gpt2", "roberta"])
def test_the_tool_that_writes_readmes_methods_table_still_measures_what_it_shows(assets, tmp_path, family):
    # tools/adapter_methods_table.py runs every method on both families (a minute); one cell each keeps it working.
    import adapter_methods_table as table

    _, script, model, length_flag = table.FAMILIES[family]
    cell = table.measure(script, table.run_arguments(assets.folder, model, length_flag, "seq_bn", tmp_path))
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| `seq_bn` "))
    shown = row.split(" | ")[1 + family].removesuffix(" |")
    # The saved adapter's config names the model's folder, so its size moves by a few bytes with the path.
    (shown_counts, shown_size), (counts, size) = (text.removesuffix(" kB").rsplit(", ", 1) for text in (shown, cell))
    assert counts == shown_counts and float(size) == pytest.approx(float(shown_size), abs=0.2)
