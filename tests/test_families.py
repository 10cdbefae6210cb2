"""Every model family: adapters trained, saved and reloaded exactly, or refused in one line; full fine-tuning; and a
base model that adapters.init leaves exactly as it was loaded.

The families, their tiny models and the runs are those of tools/model_families_table.py, which writes README.md's
family table: each family's test checks the runs, then that its README row says what they measured.
"""

import gc
import json
import re
from types import SimpleNamespace

import model_families_table as families
import pytest
import torch
from conftest import REPO, tiny_run_arguments
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

import run_clm
import run_mlm
from lmtune.interfaces import BUILT_IN_INTERFACES, init_adapters
from lmtune.merge import plain_model

# What adapters 1.3.0 cannot do, refused in one line: its decoder code for BART and its kin (mBART, PLBart, Whisper)
# fails without an encoder, Falcon's fused query/key/value projection has no thirds for LoRA, and CamemBERT has
# neither model code nor an interface.
REFUSED = {"bart-clm": {"seq_bn", "lora"}, "mbart-clm": {"seq_bn", "lora"}, "plbart-clm": {"seq_bn", "lora"},
           "whisper-clm": {"seq_bn", "lora"}, "falcon-clm": {"lora"}, "camembert-mlm": {"seq_bn", "lora"}}
README = (REPO / "README.md").read_text()
IDS = [family.id for family in families.FAMILIES]
ADAPTABLE = [family for family in families.FAMILIES if REFUSED.get(family.id) != {"seq_bn", "lora"}]
# Decoders whose adapters 1.3.0 layers read the attention cache as older transformers' tuples.
TUPLE_CACHE = [family for family in families.FAMILIES if family.id in ("electra-clm", "bert-generation-clm")]


@pytest.fixture(scope="module")
def family_data(assets, tmp_path_factory):
    """The small corpus, and a builder of each family's tiny model (once per module)."""
    folder = tmp_path_factory.mktemp("families")
    tokenizers = {"run_clm": assets.gpt2_tokenizer, "run_mlm": assets.roberta_tokenizer}
    built = {}

    def model_dir(family):
        if family.id not in built:
            built[family.id] = families.build_model(family, tokenizers[family.script], folder / family.id)
        return built[family.id]

    with pytest.MonkeyPatch.context() as patch:
        # The plot costs more than a one-step run; tests/test_readme.py checks it. Every run ends in a gc.collect()
        # (accelerate's free_memory) that would scan the whole test session's objects: frozen, they are skipped.
        for script in (run_clm, run_mlm):
            patch.setattr(script, "plot_training_curves", lambda *args: None)
        gc.freeze()
        yield SimpleNamespace(corpus=families.small_corpus(assets.train, folder), model_dir=model_dir)
        gc.unfreeze()


def readme_rows():
    """README's family table as {(model type label, script): [cells]}."""
    block = README.split(families.START, 1)[1].split(families.END, 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in block.splitlines()
            if line.startswith("| ") and not line.startswith(("| model type", "| ---"))]
    return {(row[0], row[1]): row for row in rows}


@pytest.mark.parametrize("family", families.FAMILIES, ids=IDS)
def test_family_trains_saves_and_reloads_or_is_refused_in_one_line(family, family_data, tmp_path):
    model_dir = family_data.model_dir(family)
    adapter_runs, full_run = families.measure(family, model_dir, family_data.corpus, tmp_path)
    for method, (trained, reloaded) in adapter_runs.items():
        saved = trained.output_dir / families.adapter_name(family)
        if method in REFUSED.get(family.id, ()):
            assert trained.status == 2 and trained.error, method
            assert f"{family.model_type} model" in trained.error
            assert "train the whole model without --train_adapter" in trained.error
            assert not saved.exists()
            continue
        assert trained.status == 0, (method, trained.error)
        expected = {"adapter.safetensors", "adapter_config.json", "pytorch_adapter.bin"}
        if family.route.startswith("interface") or family.interface:
            expected.add("adapter_interface.json")  # the layer names, as adapters' own save_adapter writes them
        assert {path.name for path in saved.iterdir()} == expected
        assert reloaded.status == 0, (method, reloaded.error)
        # The unchanged base model plus the saved adapter gives the trained model's loss.
        assert reloaded.results()["eval_loss"] == pytest.approx(trained.results()["eval_loss"], abs=1e-6)
    assert full_run.status == 0, full_run.error
    assert (full_run.output_dir / "model.safetensors").is_file()
    assert torch.isfinite(torch.tensor(full_run.results()["train_loss"]))
    row = families.table_row(family, adapter_runs, full_run)
    assert readme_rows().get(tuple(row[:2])) == row, "README.md is out of date: run tools/model_families_table.py"


# adapters 1.3.0 deletes X-MOD's own language adapters from every layer (adapters/models/xmod/mixin_xmod.py, `del
# layer.output.adapter_modules`): the model that adapters then trains on is not the pretrained one.
CHANGED_BY_ADAPTERS_INIT = {"xmod-clm", "xmod-mlm"}


REMOVES_LANGUAGE_ADAPTERS = pytest.mark.xfail(strict=True, reason="adapters.init removes X-MOD's language adapters")


@pytest.mark.parametrize("family", [
    pytest.param(family, marks=REMOVES_LANGUAGE_ADAPTERS) if family.id in CHANGED_BY_ADAPTERS_INIT else family
    for family in ADAPTABLE], ids=[family.id for family in ADAPTABLE])
def test_adapters_init_leaves_the_pretrained_model_unchanged(family, family_data):
    model_dir = family_data.model_dir(family)
    auto_class = AutoModelForCausalLM if family.script == "run_clm" else AutoModelForMaskedLM
    model = auto_class.from_pretrained(model_dir).eval()
    inputs = AutoTokenizer.from_pretrained(model_dir)("The model is adapted, not changed.", return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs).logits
        interface = str(model_dir / "interface.json") if family.interface else None
        init_adapters(model, SimpleNamespace(adapter_interface=interface))
        after = model(**inputs).logits
    if family.model_type == "gptj":
        # adapters' GPT-J layer adds attention output, residual and MLP output in another order than transformers'
        # (a rounding difference in the last bit); the weights are the same.
        assert (after - before).abs().max() <= 1e-6
    else:
        assert torch.equal(after, before)


def test_readme_table_has_a_row_for_each_family_and_no_other():
    assert set(readme_rows()) == {(families.family_label(family), family.script + ".py")
                                  for family in families.FAMILIES}


def test_readme_interface_example_is_the_measured_one():
    example = re.search(r"### Other model types.*?```json\n(.*?)```", README, flags=re.DOTALL).group(1)
    assert json.loads(example) == families.CAMEMBERT_INTERFACE


def test_built_in_interfaces_are_for_types_adapters_lacks_and_each_is_measured():
    for model_type in BUILT_IN_INTERFACES:
        # Once adapters brings its own support for a type, the script's interface must go: it would take over.
        assert families.adapters_support(model_type) is None, model_type
    measured = {family.model_type for family in families.FAMILIES if family.route == "interface in the scripts"}
    assert measured == BUILT_IN_INTERFACES.keys()


def test_a_built_in_interface_that_does_not_fit_is_refused_in_one_line(family_data, monkeypatch):
    opt = next(family for family in families.FAMILIES if family.model_type == "opt")
    model = AutoModelForCausalLM.from_pretrained(family_data.model_dir(opt))
    monkeypatch.setitem(BUILT_IN_INTERFACES, "opt", {**BUILT_IN_INTERFACES["opt"],
                                                             "model_layers": "decoder.blocks"})
    with pytest.raises(run_clm.UsageError, match="built-in adapter interface for opt does not fit this opt model"):
        init_adapters(model, SimpleNamespace(adapter_interface=None))


INTERFACE = families.CAMEMBERT_INTERFACE
BAD_INTERFACES = {
    "missing": (None, "cannot be read"),
    "not-json": ("{'adapter_methods': ['lora']}", "is not valid JSON"),
    "a-list": (json.dumps([INTERFACE]), "holds no JSON object"),
    "unknown-method": (json.dumps({**INTERFACE, "adapter_methods": ["prefix_tuning"]}), "is not a list of method"),
    "not-a-name": (json.dumps({**INTERFACE, "model_layers": 5}), "model_layers must each be a module path"),
    "missing-field": (json.dumps({k: v for k, v in INTERFACE.items() if k != "model_layers"}),
                      "does not describe an adapter interface"),
    "unknown-field": (json.dumps({**INTERFACE, "layer_norm": "LayerNorm"}), "does not describe an adapter interface"),
    "qkv-and-q-k-v": (json.dumps({**INTERFACE, "attn_qkv_proj": "self.query"}), "does not describe an adapter"),
    "wrong-layer-name": (json.dumps({**INTERFACE, "layer_output_proj": "output.linear"}),
                         "does not fit this camembert model (AdapterInterface: 'layer_output_proj'"),
    "wrong-kind-of-module": (json.dumps({**INTERFACE, "attn_q_proj": "output.LayerNorm"}),
                             "does not fit this camembert model ('LayerNorm' object"),
}


@pytest.mark.parametrize("case", BAD_INTERFACES)
def test_a_bad_interface_file_is_refused_in_one_line_naming_the_flag(case, family_data, tmp_path):
    text, message = BAD_INTERFACES[case]
    path = tmp_path / "interface.json"
    if text is not None:
        path.write_text(text)
    camembert = next(family for family in families.FAMILIES if family.model_type == "camembert")
    failed = families.run(camembert, family_data.model_dir(camembert), family_data.corpus, tmp_path / "out",
                          "--do_train", "--train_adapter", "--adapter_interface", path)
    assert failed.status == 2
    assert failed.error.startswith(f"run_mlm.py: error: --adapter_interface {path}")
    assert message in failed.error


def test_an_interface_file_without_train_adapter_is_refused(assets, tmp_path):
    with pytest.raises(run_clm.UsageError, match="--adapter_interface names the model's layers for an adapter: add "
                                                 "--train_adapter, or --load_adapter DIR"):
        run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path, "--do_train", "--adapter_interface",
                                        "interface.json"))


def test_every_model_type_with_adapters_own_support_is_measured_for_each_objective_it_has():
    """Each causal and masked LM class of a model type that adapters supports by itself has a family."""
    for script, auto_mapping in (("run_clm", MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                                 ("run_mlm", MODEL_FOR_MASKED_LM_MAPPING_NAMES)):
        supported = {model_type for model_type in auto_mapping if families.adapters_support(model_type)}
        measured = {family.model_type for family in families.FAMILIES if family.script == script}
        assert not supported - measured, f"{script}: add these to FAMILIES in tools/model_families_table.py"


@pytest.mark.parametrize("family", TUPLE_CACHE, ids=[family.id for family in TUPLE_CACHE])
def test_a_decoder_whose_adapter_layers_cannot_read_the_cache_generates_as_before_and_merges_with_it(
        family, family_data):
    model_dir = family_data.model_dir(family)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    inputs = AutoTokenizer.from_pretrained(model_dir)("The model is adapted, not changed.", return_tensors="pt")
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(**inputs, **settings)  # transformers' own layers, with the cache
        init_adapters(model, SimpleNamespace(adapter_interface=None))
        assert torch.equal(model.generate(**inputs, **settings), expected)
    assert not model.config.use_cache
    # The merged model is a plain transformers model again, whose layers read the cache.
    plain = plain_model(model)
    assert plain.config.use_cache and plain.generation_config.use_cache
