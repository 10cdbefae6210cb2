"""The adapter: adapters.init (through a plugin interface where adapters has no model code), a new or saved
adapter set up to train or to be evaluated, what adapters cannot do with it refused up front, and a trial training
step that refuses a method this model cannot train before any data is read."""

import difflib
import json
import logging
import re
from collections import Counter
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import adapters
from adapters import ADAPTER_CONFIG_MAP, AdapterConfig, ConfigUnion, LoRAConfig, MTLLoRAConfig, Stack
from adapters.configuration.adapter_config import ReftConfig
from adapters.loading import AdapterLoader
from adapters.methods.lora import LoRAMergedLinear
from adapters.utils import resolve_adapter_config

from lmtune.adapter_files import load_saved_adapter
from lmtune.arguments import quantization_flag, quantizes, uses_adapter
from lmtune.errors import UsageError, first_line, shorten
from lmtune.interfaces import init_adapters
from lmtune.logs import log_message_dropped
from lmtune.peft_export import check_peft_export

logger = logging.getLogger(__name__)

# Sizes of adapters' configurations that make no adapter, or divide by zero, unless positive.
POSITIVE_SIZES = ("r", "alpha", "reduction_factor", "prefix_length", "bottleneck_size", "prompt_length")


def setup_adapter(model, adapter_args):
    """With --train_adapter, add a fresh (or loaded) adapter to the model and freeze everything else; with
    --load_adapter alone, load the saved adapter to evaluate it, everything frozen."""
    if not uses_adapter(adapter_args):
        return
    init_adapters(model, adapter_args)
    check_language_adapter_name(adapter_args)
    # Saved adapters are loaded with the configuration saved with them: adapters' config argument served only the
    # retired AdapterHub repository, and warns even for a local folder.
    language_adapter = None
    if adapter_args.load_lang_adapter:
        language_adapter = load_saved_adapter(model, "--load_lang_adapter", adapter_args.load_lang_adapter)
    if adapter_args.load_adapter:
        load_saved_adapter(model, "--load_adapter", adapter_args.load_adapter, load_as=adapter_args.adapter_name)
    else:
        try:
            model.add_adapter(adapter_args.adapter_name, config=adapter_args.adapter_config)
        except (ValueError, TypeError, AssertionError, RuntimeError) as error:  # adapters' own checks
            raise UsageError(cannot_train_message(adapter_args, model, error)) from None
    place_adapters(model)
    with no_alarm_about_inactive_adapters():
        if adapter_args.train_adapter:
            model.train_adapter(adapter_args.adapter_name)  # freezes the rest of the model
        model.set_active_adapters(
            Stack(language_adapter, adapter_args.adapter_name) if language_adapter else adapter_args.adapter_name
        )
    # adapters' train_adapter leaves some head weights trainable (RoBERTa's lm_head.dense); they would change
    # without being saved with the adapter, so the saved adapter would not reproduce the trained model. An adapter
    # loaded only to be evaluated stays frozen with the rest.
    belongs_to_adapter = AdapterLoader(model).filter_func(adapter_args.adapter_name)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = adapter_args.train_adapter and parameter.requires_grad and belongs_to_adapter(name)
    name_layers_for_fsdp(model)


def place_adapters(model):
    """Put every adapter on the model's device. adapters creates bottleneck, prefix, prompt and ReFT weights on the
    CPU (only LoRA's follow the layer they wrap), and the Trainer does not move a quantized model, which bitsandbytes
    has put on the GPU: its adapters would stay behind. Their dtype stays float32, the precision they train in, also
    beside a base model in bf16 (--torch_dtype with --bf16 computes in it under autocast); a quantized model's compute
    dtype is float32 too (quantization_config)."""
    for name in model.adapters_config.adapters:
        model.adapter_to(name, device=model.device)


def no_alarm_about_inactive_adapters():
    # Activating or switching adapters passes through a moment without an active adapter, and adapters warns that
    # none is: a false alarm.
    return log_message_dropped("adapters.model_mixin", "There are adapters available but none are activated")


def name_layers_for_fsdp(model):
    """adapters.init turns a model's layers into subclasses (GPT2Block into GPT2BlockWithAdapters), but FSDP's
    transformer-based wrap policy finds the layers to shard one by one through the class names in _no_split_modules,
    and refuses a name that no module has: name the classes that the model has now. A class is left out if one of its
    modules shares a weight with the rest of the model (RoBERTa's embeddings, tied to the LM head): FSDP2 shards a
    weight in one group, so such a module stays in the model's own group."""
    listed = set(model._no_split_modules or [])
    references = Counter(id(parameter) for _, parameter in model.named_parameters(remove_duplicate=False))
    wrappable, sharing = set(), set()
    for module in model.modules():
        if listed & {base.__name__ for base in type(module).__mro__}:
            inside = Counter(id(parameter) for _, parameter in module.named_parameters(remove_duplicate=False))
            shares = any(references[key] > count for key, count in inside.items())
            (sharing if shares else wrappable).add(type(module).__name__)
    model._no_split_modules = sorted(wrappable - sharing)


def check_language_adapter_name(adapter_args):
    config_file = Path(adapter_args.load_lang_adapter or "") / "adapter_config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("name") == adapter_args.adapter_name:
        raise UsageError(
            f"--load_lang_adapter {adapter_args.load_lang_adapter} holds an adapter named "
            f"'{adapter_args.adapter_name}', like the adapter to train, and would replace it; "
            "pass another --adapter_name."
        )


def cannot_train_message(adapter_args, model, reason):
    reason = re.sub(r"'\w+Config\(.*\)'", "this configuration", first_line(reason))  # drop the long repr
    method = (f"--load_adapter {adapter_args.load_adapter}" if adapter_args.load_adapter
              else f"--adapter_config {adapter_args.adapter_config}")
    interface = getattr(model.base_model, "adapter_interface", None)
    methods = "such as seq_bn or lora" if interface is None else (
        f"of a kind its adapter interface supports ({', '.join(interface.adapter_methods)})")
    return (
        f"{method} cannot be trained on a {model_kind(model)} model "
        f"({shorten(reason)}); choose another method {methods}, change its settings with name[key=value,...], "
        "or train the whole model without --train_adapter."
    )


def model_kind(model):
    for bits in (4, 8):
        if getattr(model, f"is_loaded_in_{bits}bit", False):
            return f"{bits}-bit quantized {model.config.model_type}"
    return model.config.model_type


def check_adapter_options(model, model_args, adapter_args):
    """Refuse now, before any data is read, what cannot be done with this adapter: merge it, run it quantized, or
    write it in PEFT's layout."""
    if not uses_adapter(adapter_args):
        return
    config = model.adapters_config.get(adapter_args.adapter_name)
    if adapter_args.merge_adapter and not can_merge(config):
        mergeable = ", ".join(name for name in ADAPTER_CONFIG_MAP if can_merge(AdapterConfig.load(name)))
        adapter = (f"the {config.architecture or 'bottleneck'} adapter of --load_adapter {adapter_args.load_adapter}"
                   if adapter_args.load_adapter else f"--adapter_config {adapter_args.adapter_config}")
        raise UsageError(
            f"--merge_adapter cannot fold {adapter} into the model's weights: adapters {adapters.__version__} merges "
            f"only {mergeable} (without gating); train one of these, or drop --merge_adapter."
        )
    if quantizes(model_args) and any(isinstance(module, LoRAMergedLinear) for module in model.modules()):
        flag = quantization_flag(model_args)
        raise UsageError(
            f"{flag} does not work on a {model.config.model_type} model: adapters {adapters.__version__} wraps its "
            "fused query/key/value projection in a layer that cannot compute with quantized weights; drop "
            f"{flag}, or use a model with separate projections such as Llama or RoBERTa."
        )
    check_peft_export(model, adapter_args)


def can_merge(config):
    # adapters' merge_adapter folds the weight changes of LoRA-style methods into the layers they change, and silently
    # skips every other method; it refuses gates (UniPELT), and folds MTL-LoRA into weights of the wrong shape.
    components = config.configs if isinstance(config, ConfigUnion) else [config]
    return all(isinstance(component, LoRAConfig) and not isinstance(component, MTLLoRAConfig)
               and not component.use_gating for component in components)


def check_adapter_config(spec):
    try:
        config = AdapterConfig.load(spec)
    except (ValueError, TypeError, KeyError, OSError, SyntaxError) as error:
        raise UsageError(
            f"--adapter_config {spec} is not an adapter configuration ({shorten(first_line(error))}); use a name "
            "such as seq_bn, lora or prefix_tuning, name[key=value,...], a union a|b, or a config .json file."
        ) from None
    components = config.configs if isinstance(config, ConfigUnion) else [config]
    if spec not in ADAPTER_CONFIG_MAP and Path(spec).is_file():
        check_adapter_config_keys(spec, components)
    if any(isinstance(component, ReftConfig) and not component.subtract_projection for component in components):
        raise UsageError(
            f"--adapter_config {spec}: adapters {adapters.__version__} does not save DiReFT's subtract_projection, "
            "so a saved DiReFT adapter would reload as NoReFT with other results; use loreft or noreft instead."
        )
    for component in components:
        for key in POSITIVE_SIZES:
            value = getattr(component, key, None)
            values = value.values() if isinstance(value, Mapping) else [value]  # reduction_factor per layer
            wrong = next((size for size in values if isinstance(size, (int, float)) and size <= 0), None)
            if wrong is not None:
                raise UsageError(
                    f"--adapter_config {spec}: {key}={wrong:g} leaves {type(component).__name__} no size to train "
                    f"with; give {key} a positive value (default {getattr(type(component), key, None)})."
                )


def check_adapter_config_keys(path, components):
    """adapters reads a configuration file's keys that its configuration class lacks as extra attributes, which
    nothing reads: a mistyped setting would leave its default in place without a word, where name[key=value] refuses
    it."""
    settings = resolve_adapter_config(path)  # the file's dict, or the "config" of a file saved with an adapter
    dicts = settings["configs"] if isinstance(settings.get("configs"), list) else [settings]
    for component, given in zip(components, dicts):
        known = component.__dataclass_fields__.keys() | {"architecture"}
        unknown = sorted(given.keys() - known)
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            raise UsageError(
                f"--adapter_config {path}: {type(component).__name__} has no setting '{unknown[0]}'"
                f"{f' (did you mean {close[0]}?)' if close else ''}; fix the key in the file."
            )


@contextmanager
def adapters_off(model):
    trained_setup, skip_layers = model.active_adapters, model.adapters_config.skip_layers
    with no_alarm_about_inactive_adapters():
        model.set_active_adapters(None)
        try:
            yield
        finally:
            model.set_active_adapters(trained_setup, skip_layers=skip_layers)
