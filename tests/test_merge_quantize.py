"""--merge_adapter, --load_in_4bit / --load_in_8bit and --gradient_checkpointing: what a user gets, checked for real.

A merged model must load with plain transformers in a process that never imports adapters and say what the adapter
model says; a 4-bit base must train an adapter that reloads onto it exactly; checkpointing must change the memory a
step needs and nothing else. Methods and settings that cannot do this are refused in one line before any training.
"""

import importlib.util
import json
import math
import subprocess
import sys

import adapters
import pytest
import torch
from conftest import TOKEN_IDS, adapter_model_logits, assert_refused_in_one_line, read_json
from conftest import tiny_run_arguments as arguments
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, TrainerCallback, trainer
from transformers.modeling_layers import GradientCheckpointingLayer

import run_clm
import run_mlm
from lmtune import hardware

# Run in a fresh interpreter: loads each merged folder with transformers alone and prints its logits on TOKEN_IDS.
LOAD_WITHOUT_ADAPTERS = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
logits = {}
for auto_class, folder in zip((AutoModelForCausalLM, AutoModelForMaskedLM), sys.argv[1:]):
    model = auto_class.from_pretrained(folder).eval()
    with torch.no_grad():
        logits[folder] = model(torch.tensor(TOKEN_IDS)).logits.tolist()
assert "adapters" not in sys.modules, "transformers imported adapters"
print(json.dumps(logits))
""".replace("TOKEN_IDS", repr(TOKEN_IDS))


def assert_plain_transformers_folder(folder):
    assert "adapters" not in read_json(folder / "config.json")
    assert "quantization_config" not in read_json(folder / "config.json")
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert not [name for name in weights.keys() if "lora" in name or "adapter" in name]
    assert (folder / "tokenizer.json").is_file()


def test_merged_model_loads_without_adapters_and_gives_the_adapter_models_logits(assets, tmp_path):
    # run_clm: a trained LoRA, merged at the end of training.
    run_clm.main(arguments(run_clm, assets, tmp_path / "clm", "--do_train", "--max_steps", "3", "--learning_rate",
                           "5e-2", "--train_adapter", "--adapter_config", "lora", "--merge_adapter"))
    # run_mlm: a saved (IA)^3 adapter with weights far from its initial ones, merged without training.
    model = AutoModelForMaskedLM.from_pretrained(assets.tiny_roberta)
    adapters.init(model)
    model.add_adapter("mlm", config="ia3")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "loras" in name:
                weight.uniform_(0.5, 1.5)
    model.save_adapter(str(tmp_path / "ia3"), "mlm")
    run_mlm.main(arguments(run_mlm, assets, tmp_path / "mlm", "--do_eval", "--max_eval_samples", "4",
                           "--train_adapter", "--load_adapter", tmp_path / "ia3", "--merge_adapter"))

    folders = [tmp_path / "clm" / "merged", tmp_path / "mlm" / "merged"]
    for folder in folders:
        assert_plain_transformers_folder(folder)
    loaded = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_ADAPTERS, *map(str, folders)],
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    merged = {folder: torch.tensor(logits) for folder, logits in json.loads(loaded.stdout).items()}
    expected = {
        str(folders[0]): adapter_model_logits(AutoModelForCausalLM, assets.tiny_gpt2, tmp_path / "clm" / "clm"),
        str(folders[1]): adapter_model_logits(AutoModelForMaskedLM, assets.tiny_roberta, tmp_path / "ia3"),
    }
    bases = {str(folders[0]): AutoModelForCausalLM.from_pretrained(assets.tiny_gpt2),
             str(folders[1]): AutoModelForMaskedLM.from_pretrained(assets.tiny_roberta)}
    for folder in expected:
        torch.testing.assert_close(merged[folder], expected[folder], rtol=0, atol=1e-4)
        with torch.no_grad():  # the adapter matters: the merged weights are not the base model's
            base_logits = bases[folder].eval()(torch.tensor(TOKEN_IDS)).logits
        assert (base_logits - expected[folder]).abs().max() > 1e-3  # ten times the tolerance above


def test_refusals_come_in_one_line_before_training(assets, tmp_path, capsys, monkeypatch):
    cases = [
        (run_clm, ["--train_adapter", "--adapter_config", "seq_bn", "--merge_adapter"],
         "--merge_adapter cannot fold --adapter_config seq_bn into the model's weights: adapters 1.3.0 merges only "
         "lora, ia3, vera, dora, dvora (without gating); train one of these, or drop --merge_adapter."),
        (run_mlm, ["--train_adapter", "--adapter_config", "unipelt", "--merge_adapter"],
         "--merge_adapter cannot fold --adapter_config unipelt"),
        (run_clm, ["--merge_adapter"], "--merge_adapter has no adapter to merge"),
        (run_clm, ["--train_adapter", "--gradient_checkpointing", "--gradient_checkpointing_kwargs",
                   '{"use_reentrant": true}'], "use_reentrant true does not work with --train_adapter"),
        (run_mlm, ["--load_in_4bit", "--load_in_8bit", "--train_adapter"], "exclude each other"),
        (run_mlm, ["--load_in_4bit"], "--load_in_4bit needs --train_adapter"),
        (run_mlm, ["--load_in_8bit", "--train_adapter", "--torch_dtype", "bfloat16"],
         "--torch_dtype bfloat16 cannot be combined with --load_in_8bit"),
    ]
    if importlib.util.find_spec("bitsandbytes") is not None:
        cases += [
            (run_clm, ["--load_in_4bit", "--train_adapter", "--adapter_config", "lora"],
             "--load_in_4bit does not work on a gpt2 model: adapters 1.3.0 wraps its fused query/key/value "
             "projection"),
            (run_mlm, ["--load_in_4bit", "--train_adapter", "--adapter_config", "dora"],
             "--adapter_config dora cannot be trained on a 4-bit quantized roberta model"),
        ]
    for script, extra, expected in cases:
        output_dir = tmp_path / "run"
        argv = arguments(script, assets, output_dir, "--do_train", "--max_steps", "1", *extra)
        assert_refused_in_one_line(script, argv, expected, capsys, output_dir)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    assert run_mlm.cli(arguments(run_mlm, assets, tmp_path / "none", "--load_in_4bit", "--train_adapter")) == 2
    assert capsys.readouterr().err.strip().endswith(
        "--load_in_4bit needs the bitsandbytes package: pip install -r requirements-quantization.txt")


def quantized_loss_tolerance(eval_results, block_size=32):
    """How far two evaluations of the same 4-bit model may differ. On a CPU with avx512_bf16, bitsandbytes computes
    4-bit products in bf16, where any change in the order of a sum moves each logit by up to bf16's epsilon
    (relative): independent over the evaluated tokens, the mean loss moves by about epsilon / sqrt(tokens) of
    itself. Elsewhere the products are fp32 and the same run gives the same loss to 1e-6."""
    if "avx512_bf16" not in (hardware.native_bf16_flags() or ()):
        return 1e-6
    tokens = eval_results["eval_samples"] * block_size
    return torch.finfo(torch.bfloat16).eps * eval_results["eval_loss"] / math.sqrt(tokens)


def test_4bit_lora_trains_reloads_exactly_and_merges_onto_the_full_precision_base(assets, tiny_llama, tmp_path,
                                                                                   capsys):
    pytest.importorskip("bitsandbytes")
    common = ["--model_name_or_path", tiny_llama, "--train_adapter"]
    # One batch, seen again at every step: the loss of a working adapter falls step after step.
    run_clm.main(arguments(run_clm, assets, tmp_path / "run", *common, "--adapter_config", "lora", "--load_in_4bit",
                           "--do_train", "--do_eval", "--max_train_samples", "4", "--max_steps", "6",
                           "--learning_rate", "5e-2", "--logging_steps", "1", "--merge_adapter"))
    # The summary counts the weights the model holds, as in full precision: bitsandbytes packs two 4-bit weights in
    # each byte of a parameter, which counted half of them.
    full_precision = AutoModelForCausalLM.from_pretrained(tiny_llama)
    adapters.init(full_precision)
    full_precision.add_adapter("clm", config="lora")
    in_adapter = sum(weight.numel() for name, weight in full_precision.named_parameters() if "loras" in name)
    total = full_precision.num_parameters()
    assert f"trainable parameters: {in_adapter:,} of {total:,} (" in capsys.readouterr().out
    losses = [entry["loss"] for entry in read_json(tmp_path / "run" / "trainer_state.json")["log_history"]
              if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1
    with safe_open(tmp_path / "run" / "clm" / "adapter.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.float32}

    # Evaluated alone, as README shows: no --train_adapter.
    reloaded = run_clm.main(arguments(run_clm, assets, tmp_path / "reload", "--model_name_or_path", tiny_llama,
                                      "--load_in_4bit", "--load_adapter", tmp_path / "run" / "clm", "--do_eval"))
    evaluated = f"model: frozen, nothing trained: {total:,} parameters evaluated, {in_adapter:,} ("
    assert evaluated in capsys.readouterr().out
    trained = read_json(tmp_path / "run" / "eval_results.json")
    assert reloaded["eval_loss"] == pytest.approx(trained["eval_loss"], abs=quantized_loss_tolerance(trained))

    # Merged onto the base in full precision, not into its 4-bit weights.
    merged_folder = tmp_path / "run" / "merged"
    assert_plain_transformers_folder(merged_folder)
    merged = AutoModelForCausalLM.from_pretrained(merged_folder).eval()
    assert merged.dtype == torch.float32
    with torch.no_grad():
        logits = merged(torch.tensor(TOKEN_IDS)).logits
    expected = adapter_model_logits(AutoModelForCausalLM, tiny_llama, tmp_path / "run" / "clm")
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


class LayerCalls(TrainerCallback):
    """Counts the calls of the model's checkpointable layers during training: checkpointing calls each twice."""

    def __init__(self):
        self.calls = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for module in model.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module.register_forward_pre_hook(self.count)

    def count(self, module, inputs):
        if module.training:
            self.calls += 1


@pytest.mark.parametrize("method", ["seq_bn", "lora", "prefix_tuning"])
@pytest.mark.parametrize("script", [run_clm, run_mlm], ids=["gpt2", "roberta"])
def test_gradient_checkpointing_gives_the_same_losses(script, method, assets, tmp_path, monkeypatch):
    results = {}
    for checkpointing in (False, True):
        counter = LayerCalls()
        monkeypatch.setattr(trainer, "DEFAULT_CALLBACKS", [*trainer.DEFAULT_CALLBACKS, counter])
        output_dir = tmp_path / str(checkpointing)
        flags = ["--gradient_checkpointing"] if checkpointing else []
        metrics = script.main(arguments(script, assets, output_dir, "--do_train", "--max_steps", "2",
                                        "--learning_rate", "5e-2", "--train_adapter", "--adapter_config", method,
                                        "--logging_steps", "1", *flags))
        logged = [entry["loss"] for entry in read_json(output_dir / "trainer_state.json")["log_history"]
                  if "loss" in entry]
        results[checkpointing] = metrics["train_loss"], logged, counter.calls
    (loss, logged, calls), (checkpointed_loss, checkpointed_logged, checkpointed_calls) = results.values()
    assert checkpointed_calls == 2 * calls > 0  # each layer ran again in the backward pass
    assert checkpointed_logged == logged and len(logged) == 2 and logged[1] != logged[0]
    assert checkpointed_loss == pytest.approx(loss, abs=1e-5)
