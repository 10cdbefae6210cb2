"""--export_peft: the LoRA adapter that a run trains, written in PEFT's layout, must load with
PeftModel.from_pretrained in a process that never imports adapters and give the adapters model's logits; an adapter
that PEFT's LoRA cannot express is refused in one line before any training.

One fresh process loads every export of this file (importing peft and transformers takes most of its time): the two
scripts' runs end to end, and tiny models built here for the mappings the runs do not reach (GPT-2's fused c_attn
with some of q, k, v, left-out layers, modules that need their full names). LoRA starts with lora_B zero, which makes
any export look exact: the runs train it away from zero, and the tiny models get a random one.
"""

import ast
import contextlib
import io
import json
import re
import subprocess
import sys

import adapters
import pytest
import torch
from conftest import REPO, TOKEN_IDS, adapter_model_logits, assert_refused_in_one_line, read_json
from conftest import tiny_run_arguments as arguments
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import run_clm
import run_mlm
from lmtune.peft_export import export_peft

TOLERANCE = 1e-5

# Run in a fresh interpreter: loads each case's base and PEFT folder with peft and prints the logits on its input,
# the modules PEFT wrapped, its class, and whether anything imported adapters; then runs the README's snippet.
LOAD_WITH_PEFT = """
import contextlib, io, json, sys, torch, transformers
from peft import PeftModel
results = {}
for name, case in json.loads(open(sys.argv[1]).read()).items():
    base = getattr(transformers, case["auto_class"]).from_pretrained(case["base"])
    model = PeftModel.from_pretrained(base, case["peft"]).eval()
    with torch.no_grad():
        logits = model(torch.tensor(case["input_ids"])).logits
    wrapped = sorted(n[len("base_model.model."):-len(".lora_A")] for n, _ in model.named_modules()
                     if n.endswith(".lora_A"))
    results[name] = {"logits": logits.tolist(), "wrapped": wrapped, "class": type(model).__name__}
results["imports adapters"] = "adapters" in sys.modules
output = io.StringIO()
with contextlib.redirect_stdout(output):
    exec(open(sys.argv[2]).read(), {})  # the README's snippet
results["snippet output"] = output.getvalue()
print(json.dumps(results))
"""

# The scripts' runs: (script, base model, --adapter_config, the modules it adapts in each of the two layers).
RUNS = {
    "clm": (run_clm, "tiny_llama", "lora", ["self_attn.q_proj", "self_attn.v_proj"]),
    "mlm": (run_mlm, "tiny_roberta", "lora[intermediate_lora=True,output_lora=True]",
            ["attention.self.query", "attention.self.value", "intermediate.dense", "output.dense"]),
}
LAYERS = {"clm": "model.layers", "mlm": "roberta.encoder.layer"}

# Tiny models built here: (model, adapters config).
MAPPINGS = {
    # q and v on the fused c_attn: one LoRA of rank 2r whose lora_B is zero in the key third; Conv1D, fan_in_fan_out.
    "gpt2 q,v": ("gpt2", adapters.LoRAConfig(r=4, alpha=8)),
    # k alone, and both MLP layers, whose short name c_proj would also pick attn.c_proj: full names.
    "gpt2 k + mlp": ("gpt2", adapters.LoRAConfig(r=2, alpha=5, attn_matrices=["k"], intermediate_lora=True,
                                                 output_lora=True)),
    # c_attn of rank 4 beside c_fc of rank 2 (rank_pattern, alpha_pattern), in layer 1 only (layers_to_transform).
    "gpt2 q,v + c_fc, leave_out 0": ("gpt2", adapters.LoRAConfig(r=2, alpha=4, intermediate_lora=True,
                                                                 leave_out=[0])),
    "llama q,k,v + mlp, leave_out 1": ("llama", adapters.LoRAConfig(r=4, alpha=8, dropout=0.1,
                                                                    attn_matrices=["q", "k", "v"],
                                                                    intermediate_lora=True, output_lora=True,
                                                                    leave_out=[1])),
}


def tiny_model(family):
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=256))
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                                        max_position_embeddings=64))


def lora_modules(model, adapter_name):
    from adapters.methods.lora import LoRALayer

    return sorted(name for name, module in model.named_modules()
                  if isinstance(module, LoRALayer) and adapter_name in module.loras)


@pytest.fixture(scope="module")
def exported(assets, tiny_llama, tmp_path_factory):
    """Each case's export, the adapters model's logits and modules, and what the fresh process loaded."""
    pytest.importorskip("peft")
    folder = tmp_path_factory.mktemp("peft-export")
    bases = {"tiny_llama": tiny_llama, "tiny_roberta": assets.tiny_roberta}
    cases, expected = {}, {}
    for name, (script, base, config, modules) in RUNS.items():
        auto_class = AutoModelForCausalLM if script is run_clm else AutoModelForMaskedLM
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            script.main(arguments(script, assets, folder / name, "--model_name_or_path", bases[base], "--do_train",
                                  "--max_steps", "3", "--learning_rate", "5e-2", "--train_adapter",
                                  "--adapter_config", config, "--export_peft"))
        with torch.no_grad():
            base_logits = auto_class.from_pretrained(bases[base]).eval()(torch.tensor(TOKEN_IDS)).logits
        expected[name] = {
            "logits": adapter_model_logits(auto_class, bases[base], folder / name / name),
            "base logits": base_logits,
            "modules": sorted(f"{LAYERS[name]}.{layer}.{module}" for layer in (0, 1) for module in modules),
            "summary": summary.getvalue(),
            "base": bases[base],
        }
        cases[name] = {"auto_class": auto_class.__name__, "base": str(bases[base]), "peft": str(folder / name / "peft"),
                       "input_ids": TOKEN_IDS}
    # Written where peft cannot be imported: the export needs torch and safetensors only.
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "peft", None)
        for name, (family, config) in MAPPINGS.items():
            model = tiny_model(family)
            base = folder / family
            model.save_pretrained(base)
            adapters.init(model)
            model.add_adapter("a", config=config, set_active=True)
            model.eval()  # no dropout, in the adapter's modules as well
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for parameter_name, parameter in model.named_parameters():
                    if "lora_B" in parameter_name:
                        parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
                logits = model(torch.tensor(TOKEN_IDS)).logits
            export_peft(model, "a", folder / name, base, "CAUSAL_LM")
            expected[name] = {"logits": logits, "base logits": AutoModelForCausalLM.from_pretrained(base).eval()(
                torch.tensor(TOKEN_IDS)).logits.detach(), "modules": lora_modules(model, "a"), "model": model}
            cases[name] = {"auto_class": "AutoModelForCausalLM", "base": str(base), "peft": str(folder / name),
                           "input_ids": TOKEN_IDS}
    (folder / "cases.json").write_text(json.dumps(cases))
    # The README's snippet, on the run_clm export: its tokenizer is the quick start's.
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(),
                                                 flags=re.DOTALL) if "PeftModel" in block)
    snippet = snippet.replace("outputs/tiny-gpt2", str(tiny_llama))
    (folder / "snippet.py").write_text(snippet.replace("outputs/code-lora/peft", str(folder / "clm" / "peft")))
    loaded = subprocess.run([sys.executable, "-c", LOAD_WITH_PEFT, str(folder / "cases.json"),
                             str(folder / "snippet.py")], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    return folder, expected, json.loads(loaded.stdout.strip().splitlines()[-1])


def assert_peft_computes_the_adapter(expected, loaded):
    assert (expected["logits"] - expected["base logits"]).abs().max() > 1e-3  # the adapter changes the logits
    assert loaded["wrapped"] == expected["modules"]  # PEFT wrapped exactly the modules that adapters adapts
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected["logits"], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("name", list(RUNS))
def test_a_runs_export_loads_with_peft_alone_and_gives_the_adapter_models_logits(exported, name):
    folder, expected, loaded = exported
    assert_peft_computes_the_adapter(expected[name], loaded[name])
    assert not loaded["imports adapters"]
    config = read_json(folder / name / "peft" / "adapter_config.json")
    assert config["base_model_name_or_path"] == str(expected[name]["base"])
    assert config["task_type"] == ("CAUSAL_LM" if name == "clm" else None)
    assert loaded[name]["class"] == ("PeftModelForCausalLM" if name == "clm" else "PeftModel")
    weights = folder / name / "peft" / "adapter_model.safetensors"
    summary_line = f"PEFT adapter: {folder / name / 'peft'} ({weights.stat().st_size / 1e6:.2f} MB)"
    assert summary_line in [line.strip() for line in expected[name]["summary"].splitlines()]


@pytest.mark.parametrize("name", list(MAPPINGS))
def test_fused_partial_and_left_out_adapters_export_exactly(exported, name):
    folder, expected, loaded = exported
    assert_peft_computes_the_adapter(expected[name], loaded[name])
    config = read_json(folder / name / "adapter_config.json")
    if name == "gpt2 q,v":
        # One rank-8 LoRA with alpha 16 keeps adapters' scale 8/4; its lora_B is block-diagonal in the q and v thirds.
        assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (8, 16, True)
        lora = expected[name]["model"].transformer.h[0].attn.c_attn.loras["a"]
        B = load_file(folder / name / "adapter_model.safetensors")[
            "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
        assert torch.equal(B[0:32, 0:4], lora.lora_B[0:32].detach())
        assert torch.equal(B[64:96, 4:8], lora.lora_B[32:64].detach())
        assert B[32:64].eq(0).all() and B[0:32, 4:8].eq(0).all() and B[64:96, 0:4].eq(0).all()
    if name == "gpt2 q,v + c_fc, leave_out 0":
        assert (config["layers_to_transform"], config["rank_pattern"]) == ([1], {"c_attn": 4})


def test_readme_snippet_generates_with_the_export(exported):
    _, _, loaded = exported
    prompt = "def read_file(path):\n    with open("
    assert loaded["snippet output"].startswith(prompt)
    assert len(loaded["snippet output"]) > len(prompt) + 5  # it generated something


def test_no_module_of_the_package_imports_peft():
    for module in (REPO / "lmtune").glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) else [])
            assert "peft" not in {name.split(".")[0] for name in names if name}, module.name


def test_what_peft_cannot_express_is_refused_in_one_line_before_training(assets, tmp_path, capsys):
    cases = [
        (run_clm, ["--export_peft"], "--export_peft has no adapter to export: train a LoRA (--do_train "
         "--train_adapter --adapter_config lora) or load one (--load_adapter DIR)."),
        (run_clm, ["--train_adapter", "--adapter_config", "lora[use_gating=True]", "--export_peft"],
         "--export_peft cannot write --adapter_config lora[use_gating=True] in PEFT's LoRA layout: its gate "
         "(use_gating) scales the update by a factor computed from the input, which PEFT's LoRA lacks; train a plain "
         "LoRA (lora, or lora[...]), or drop --export_peft."),
        (run_mlm, ["--train_adapter", "--adapter_config", "ia3", "--export_peft"],
         "it scales the layers' outputs ((IA)^3, composition_mode=scale)"),
        (run_mlm, ["--train_adapter", "--adapter_config", "dora", "--export_peft"], "adapters' DoRA normalises"),
        (run_mlm, ["--train_adapter", "--adapter_config", "vera", "--export_peft"], "VeRA's shared frozen"),
        (run_mlm, ["--train_adapter", "--adapter_config", "mtl_lora", "--export_peft"], "MTL-LoRA's weighted"),
        (run_mlm, ["--train_adapter", "--adapter_config", "unipelt", "--export_peft"], "it combines several methods"),
        (run_mlm, ["--train_adapter", "--adapter_config", "seq_bn", "--export_peft"],
         "it is a bottleneck adapter, not a LoRA"),
        (run_clm, ["--train_adapter", "--adapter_config", "lora", "--load_lang_adapter", tmp_path, "--export_peft"],
         "without the language adapter of --load_lang_adapter"),
        (run_clm, ["--model_name_or_path", "", "--model_type", "gpt2", "--tokenizer_name", assets.gpt2_tokenizer,
                   "--train_adapter", "--adapter_config", "lora", "--export_peft"],
         "a model built from scratch (--model_type) is saved nowhere"),
    ]
    for script, extra, expected in cases:
        output_dir = tmp_path / "run"
        argv = arguments(script, assets, output_dir, "--do_train", "--max_steps", "1", *extra)
        assert_refused_in_one_line(script, argv, expected, capsys, output_dir)
