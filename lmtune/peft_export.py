"""--export_peft: the trained LoRA adapter in PEFT's layout, <output_dir>/peft/ (adapter_config.json and
adapter_model.safetensors), which `PeftModel.from_pretrained(base, folder)` loads, and so do vLLM and TGI. Writing
it needs only torch and safetensors; peft is needed only to load it.

The mapping mirrors adapters' arithmetic (adapters 1.3 methods/lora.py) in PEFT's (peft 0.21 tuners/lora/layer.py),
module by module, so that PEFT computes what the adapters model computes:

* LoRALinear (a q/k/v projection or an MLP layer; nn.Linear, or GPT-2's Conv1D with fan_in_fan_out): adapters adds
  dropout(x) @ A.T @ B.T * alpha / r, PEFT adds lora_B(lora_A(dropout(x))) * lora_alpha / r: the same A (r x in),
  B (out x r), r, alpha and dropout.
* LoRAMergedLinear (a fused q/k/v projection, GPT-2's c_attn): with n of q, k, v enabled, adapters holds A (n*r x in)
  and B (n*d x r), d = out / 3, and adds blockdiag(B_1..B_n) @ A x * alpha / r, block i in the output third of the
  i-th enabled matrix, the other thirds zero. That is one LoRA of rank n*r whose lora_B is (3d x n*r) zeros with B_i
  at the rows of its third and columns i*r:(i+1)*r, and lora_alpha = n * alpha keeps the scale alpha / r. Exact for
  any subset of q, k, v; PEFT would train the zero blocks too if the adapter were trained further there.
"""

import json
import re
from pathlib import Path

from adapters import AdapterConfig, ConfigUnion, LoRAConfig, MTLLoRAConfig
from adapters.methods.lora import IA3, LoRA, LoRALayer, LoRALinear, LoRAMergedLinear, MTLLoRA, Vera
from safetensors.torch import save_file

from lmtune.errors import UsageError
from lmtune.output_dir import writing

# PEFT's task types (peft.utils.peft_types.TaskType) and None, which loads as a plain PeftModel: PEFT has no
# masked-LM task type, and a plain PeftModel's forward still returns the masked LM's logits.
PEFT_TASK_TYPES = {None, "CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"}

# A layer's place in the model, e.g. model.layers.3.self_attn.q_proj: the name of the list (layers) and its index.
LAYER_INDEX = re.compile(r"^(?:(?P<prefix>.*?)\.)?(?P<pattern>[^.]+)\.(?P<idx>\d+)\.")

# adapters' own modules inside the model, which PEFT's target names must not pick.
ADAPTERS_MODULES = re.compile(r"(^|\.)(loras|shared_parameters|prefix_tuning|adapters?|heads)(\.|$)")


class NoPeftForm(ValueError):
    """Why an adapter cannot be written in PEFT's LoRA layout exactly: a clause, to be put after the adapter's name."""


def check_peft_export(model, adapter_args):
    """With --export_peft, refuse now, before any data is read, an adapter that PEFT's LoRA cannot express exactly."""
    if not adapter_args.export_peft:
        return
    try:
        peft_lora_layers(model, adapter_args.adapter_name)
    except NoPeftForm as reason:
        if adapter_args.load_adapter:
            adapter, fix = f"the adapter of --load_adapter {adapter_args.load_adapter}", "export a plain LoRA adapter"
        else:
            adapter, fix = f"--adapter_config {adapter_args.adapter_config}", "train a plain LoRA (lora, or lora[...])"
        raise UsageError(
            f"--export_peft cannot write {adapter} in PEFT's LoRA layout: {reason}; {fix}, or drop --export_peft."
        ) from None


def write_peft_adapter(objective, model, model_args, training_args, adapter_args):
    """With --export_peft, write <output_dir>/peft/: the adapter in PEFT's layout, on --model_name_or_path as its base,
    of the objective's PEFT task type."""
    if not (adapter_args.export_peft and training_args.should_save):
        return None
    revision = model_args.model_revision if model_args.model_revision != "main" else None
    with writing("the PEFT adapter", training_args):
        return export_peft(model, adapter_args.adapter_name, Path(training_args.output_dir) / "peft",
                           model_args.model_name_or_path, objective.peft_task_type, revision=revision)


def export_peft(model, adapter_name, folder, base_model_name_or_path, task_type, revision=None):
    """Write the LoRA adapter adapter_name of an adapters model (unmerged) into folder in PEFT's layout and return
    the folder; NoPeftForm, before anything is written, where PEFT's LoRA cannot express it exactly."""
    if task_type not in PEFT_TASK_TYPES:
        raise ValueError(f"task_type {task_type!r} is not one of PEFT's: {sorted(map(str, PEFT_TASK_TYPES))}.")
    layers = peft_lora_layers(model, adapter_name)
    # PEFT's config holds one r and lora_alpha; the layers that differ (a fused c_attn of rank n*r beside MLP layers
    # of rank r, for one) go into rank_pattern and alpha_pattern.
    pairs = [(layer["r"], layer["alpha"]) for layer in layers]
    r, alpha = max(set(pairs), key=pairs.count)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "revision": revision,
        "inference_mode": True,
        "r": int(r),
        "lora_alpha": alpha,
        "lora_dropout": layers[0]["dropout"],
        **target_selection(model, [layer["name"] for layer in layers]),
        "rank_pattern": patterns(layers, r, "r"),
        "alpha_pattern": patterns(layers, alpha, "alpha"),
        "fan_in_fan_out": layers[0]["fan_in_fan_out"],
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    # PEFT names a weight after the module it wraps, under its own PeftModel (base_model) and LoraModel (model).
    tensors = {}
    for layer in layers:
        tensors[f"base_model.model.{layer['name']}.lora_A.weight"] = layer["A"].detach().clone().contiguous()
        tensors[f"base_model.model.{layer['name']}.lora_B.weight"] = layer["B"].detach().clone().contiguous()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def adapter_config(model, adapter_name):
    config = getattr(model, "adapters_config", None)
    config = config.get(adapter_name) if config is not None else None
    if config is None:
        raise NoPeftForm(f"the model holds no adapter named {adapter_name}")
    return AdapterConfig.load(config)


def peft_lora_layers(model, adapter_name):
    """The adapter's layers as PEFT's LoRA would hold them: name, A, B, r, alpha, dropout and fan_in_fan_out of each;
    NoPeftForm where PEFT's LoRA cannot compute what adapters computes."""
    check_plain_lora(adapter_config(model, adapter_name))
    layers = [peft_layer(name, layer, adapter_name) for name, layer in model.named_modules()
              if isinstance(layer, LoRALayer) and adapter_name in layer.loras]
    if not layers:
        raise NoPeftForm("it adds LoRA to no layer of this model")
    if len({layer["dropout"] for layer in layers}) > 1:
        raise NoPeftForm("its layers use different dropout rates, and PEFT's config holds one lora_dropout")
    if len({layer["fan_in_fan_out"] for layer in layers}) > 1:
        raise NoPeftForm("it adapts both Linear and Conv1D layers, and PEFT's config holds one fan_in_fan_out")
    return layers


def check_plain_lora(config):
    """NoPeftForm unless the adapter's configuration is a plain LoRA, the one kind PEFT's LoRA layout holds."""
    if isinstance(config, ConfigUnion):
        raise NoPeftForm(
            f"it combines several methods ({', '.join(c.architecture or 'bottleneck' for c in config.configs)}), and "
            "PEFT's LoRA layout holds one plain LoRA")
    if not isinstance(config, LoRAConfig):
        raise NoPeftForm(f"it is a {config.architecture or 'bottleneck'} adapter, not a LoRA")
    if isinstance(config, MTLLoRAConfig):
        raise NoPeftForm("MTL-LoRA's weighted up-projections and task-specific matrix have no PEFT LoRA form")
    if config.composition_mode != "add":
        raise NoPeftForm(
            f"it scales the layers' outputs ((IA)^3, composition_mode={config.composition_mode}) instead of adding a "
            "low-rank update")
    if config.vera_d is not None or config.vera_b is not None:
        raise NoPeftForm("VeRA's shared frozen random matrices with trained scaling vectors are not a LoRA")
    if config.use_gating:
        raise NoPeftForm("its gate (use_gating) scales the update by a factor computed from the input, which PEFT's "
                         "LoRA lacks")
    if config.use_dora:
        # adapters normalises W + B A without the alpha / r scale and puts the bias inside the magnitude; PEFT does
        # neither.
        raise NoPeftForm("adapters' DoRA normalises the weights otherwise than PEFT's DoRA, so PEFT would compute "
                         "something else with the same weights")


def peft_layer(name, layer, adapter_name):
    """The adapter's LoRA module in the layer at name in the model, as PEFT's LoRA would hold it."""
    lora = layer.loras[adapter_name]
    # The configuration was checked before; these catch a module that a plugin or a later adapters version builds
    # otherwise.
    if type(lora) is not LoRA or isinstance(lora, (MTLLoRA, Vera, IA3)):
        raise NoPeftForm(f"its {type(lora).__name__} module at {name} is not a plain LoRA")
    if lora.use_gating or lora.composition_mode != "add" or getattr(lora, "use_dora", False):
        raise NoPeftForm(f"its module at {name} uses gating, DoRA or scaling, which PEFT's LoRA lacks")
    if layer.merged:
        raise NoPeftForm("it is merged into the model's weights, which are then no longer the base model's")
    if adapter_name in getattr(layer, "shared_parameters", {}):
        raise NoPeftForm(f"its module at {name} uses shared parameters, which PEFT's LoRA lacks")
    A, B, r = lora.lora_A, lora.lora_B, lora.r
    if isinstance(layer, LoRAMergedLinear):
        A, B, r, alpha = fused_qkv_as_one_lora(name, layer, lora)
    elif isinstance(layer, LoRALinear):
        if A.shape != (r, layer.in_features) or B.shape != (layer.out_features, r):
            raise NoPeftForm(f"its weights at {name} ({tuple(A.shape)}, {tuple(B.shape)}) do not fit a "
                             f"{layer.in_features} -> {layer.out_features} projection")
        alpha = lora.lora_alpha
    else:
        raise NoPeftForm(f"it sits in a {type(layer).__name__} layer at {name}, which has no PEFT LoRA form")
    return {"name": name, "A": A, "B": B, "r": r, "alpha": alpha,
            "dropout": float(getattr(lora.lora_dropout, "p", 0.0)),
            "fan_in_fan_out": bool(getattr(layer, "fan_in_fan_out", False))}


def fused_qkv_as_one_lora(name, layer, lora):
    """A, B, r and alpha of the one LoRA of rank n*r that computes adapters' LoRA of a fused q/k/v projection."""
    enabled = list(getattr(lora, "enable_lora", []))
    n, r = sum(enabled), lora.r
    third = layer.out_features // 3
    if len(enabled) != 3 or n == 0:
        raise NoPeftForm(f"its fused q/k/v projection at {name} adapts none of q, k, v")
    if (lora.lora_A.shape != (n * r, layer.in_features) or lora.lora_B.shape != (n * third, r)
            or layer.out_features != 3 * third):
        raise NoPeftForm(f"its weights at {name} ({tuple(lora.lora_A.shape)}, {tuple(lora.lora_B.shape)}) do not "
                         f"fit a fused {layer.in_features} -> {layer.out_features} projection")
    B = lora.lora_B.new_zeros((layer.out_features, n * r))
    for block, part in enumerate(index for index, on in enumerate(enabled) if on):
        B[part * third:(part + 1) * third, block * r:(block + 1) * r] = lora.lora_B[block * third:(block + 1) * third]
    return lora.lora_A, B, n * r, n * lora.lora_alpha


def target_selection(model, names):
    """The simplest target_modules (with layers_to_transform where needed) with which PEFT wraps exactly these
    modules: short names such as q_proj; else short names in some layers (adapters' leave_out); else full names
    (RoBERTa's output.dense, whose short name dense would also pick attention.output.dense)."""
    candidates = [name for name, _ in model.named_modules() if name and not ADAPTERS_MODULES.search(name)]
    wanted = set(names)

    def picks_exactly(selection):
        return {name for name in candidates if peft_picks(selection, name)} == wanted

    short = sorted({name.rsplit(".", 1)[-1] for name in names})
    selection = {"target_modules": short, "layers_to_transform": None, "layers_pattern": None}
    if picks_exactly(selection):
        return selection
    places = [LAYER_INDEX.match(name) for name in names]
    if all(places) and len({place.group("pattern") for place in places}) == 1:
        selection = {"target_modules": short,
                     "layers_to_transform": sorted({int(place.group("idx")) for place in places}),
                     "layers_pattern": places[0].group("pattern")}
        if picks_exactly(selection):
            return selection
    return {"target_modules": sorted(names), "layers_to_transform": None, "layers_pattern": None}


def peft_picks(selection, name):
    """Whether PEFT wraps the module of this name (peft.tuners.tuners_utils.check_target_module_exists, for a list of
    target_modules), so that the selection can be checked without peft installed."""
    targets = selection["target_modules"]
    if name in targets:
        return True
    if not any(name.endswith("." + target) for target in targets):
        return False
    layers = selection["layers_to_transform"]
    if not layers:
        return True
    pattern = selection["layers_pattern"]
    place = re.match(rf"(?:^|.*?\.){re.escape(pattern)}\.(?P<idx>\d+)\." if pattern else r".*?\.[^.]*\.(?P<idx>\d+)\.",
                     name)
    return place is not None and int(place.group("idx")) in layers


def patterns(layers, common, key):
    """rank_pattern or alpha_pattern: the value of key for each module whose value differs from the common one, by
    short name where all modules of that name share it, else by the full name (PEFT matches (.*\\.)?key$)."""
    values_by_short_name = {}
    for layer in layers:
        values_by_short_name.setdefault(layer["name"].rsplit(".", 1)[-1], set()).add(layer[key])
    pattern = {}
    for layer in layers:
        if layer[key] != common:
            short = layer["name"].rsplit(".", 1)[-1]
            pattern[short if len(values_by_short_name[short]) == 1 else re.escape(layer["name"])] = layer[key]
    return pattern
