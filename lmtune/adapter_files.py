"""An adapter's files: written exactly as trained (each weight once, gathered from shards or copied off XLA), read back
into a model only where every weight fits, and counted for the summary."""

import json
import logging

import torch
from adapters.loading import AdapterLoader
from safetensors.torch import save_file

from lmtune.errors import FIX_ADAPTER, UsageError, first_line, reported_as_usage_error, shorten
from lmtune.modeling import weight_identity

logger = logging.getLogger(__name__)


def adapter_weights_on_cpu(model, adapter_name):
    """The adapter's weights, named as in the model's state dict, copied to the CPU for save_adapter_files. An XLA
    tensor has no data pointer (data_ptr() is 0) to save from, or to tell which names share one weight by (prefix
    tuning's pool): each weight is copied once, and all its names share that copy, as they share the weight."""
    belongs = AdapterLoader(model).filter_func(adapter_name)
    copies, weights = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():  # the weights themselves, not detached views
        if belongs(name):
            if id(tensor) not in copies:
                copies[id(tensor)] = tensor.detach().cpu()
            weights[name] = copies[id(tensor)]
    return weights


def save_adapter_files(model, folder, adapter_name, use_safetensors, gathered_state_dict=None):
    """Write the adapter as adapters' save_adapter does (adapter_config.json and the weights, no head, in
    pytorch_adapter.bin and, unless --save_safetensors false, adapter.safetensors), but name
    each tensor once: prefix tuning keeps one pool of weights that every layer also references, so the state dict
    names a tensor several times, which safetensors refuses to write. The shortest name is kept; loading it
    restores the others, which are the same parameter.

    Under FSDP2 and DeepSpeed ZeRO-3 each process holds only a shard of every weight: the Trainer gathers the full
    state dict from all processes first, and the adapter's weights are taken from it."""
    folder.mkdir(parents=True, exist_ok=True)
    if gathered_state_dict is None and not use_safetensors:  # torch.save keeps shared tensors shared
        model.save_adapter(str(folder), adapter_name, with_head=False, use_safetensors=False)
        return
    if gathered_state_dict is None:
        model.apply_to_adapter_layers(lambda _, layer: layer.pre_save_adapters())  # e.g. ReFT's contiguous weights
    state_dict, config = AdapterLoader(model).save_to_state_dict(adapter_name)
    if gathered_state_dict is not None:
        state_dict = {key: gathered_state_dict[key] for key in state_dict}
        # FSDP2 gives the model a subclass of its class, named FSDP<class>: name the class it was built as.
        config["model_class"] = next(cls for cls in type(model).__mro__ if not cls.__name__.startswith("FSDP")).__name__
    unique, seen = {}, set()
    for key in sorted(state_dict, key=lambda key: (len(key), key)):
        tensor = state_dict[key]
        identity = weight_identity(tensor)
        if identity not in seen:
            seen.add(identity)
            unique[key] = tensor.contiguous()
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if use_safetensors:
        save_file(unique, folder / "adapter.safetensors")
    # Always: adapters' load_adapter(path) reads pytorch_adapter.bin unless told use_safetensors=True, also for a
    # name on the hub.
    torch.save(unique, folder / "pytorch_adapter.bin")
    if interface := getattr(model.base_model, "adapter_interface", None):
        # As save_adapter does: the layer names that the adapter's weights are named after, for --adapter_interface.
        interface._save(str(folder), model.config)


def load_saved_adapter(model, flag, location, **load_kwargs):
    """Load a saved adapter and insist that every one of its weights found its place in this model: adapters
    itself only warns, and keeps freshly initialised weights where a saved one did not fit."""
    loading_info = {}
    with reported_as_usage_error(flag, location, fix=FIX_ADAPTER):
        try:
            # use_safetensors reads adapter.safetensors where present and falls back to pytorch_adapter.bin.
            name = model.load_adapter(location, with_head=False, use_safetensors=True, loading_info=loading_info,
                                      **load_kwargs)
        except RuntimeError as error:  # torch's load_state_dict: weights of other shapes, e.g. another width
            mismatch = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), None)
            raise UsageError(
                f"{flag} {location} does not fit this {model.config.model_type} model "
                f"({shorten(mismatch or first_line(error))}); {FIX_ADAPTER}."
            ) from None
    # adapters names the missing weights from the model or from its base model, depending on the method.
    state = {**model.base_model.state_dict(), **model.state_dict()}
    missing = set(loading_info.get("missing_keys", []))
    # Weights shared under several names (prefix tuning's pool) are saved once: their other names load with it.
    loaded = {weight_identity(tensor) for key, tensor in state.items() if key not in missing}
    misfits = loading_info.get("unexpected_keys", []) + [
        key for key in missing if key not in state or weight_identity(state[key]) not in loaded]
    if misfits:
        raise UsageError(
            f"{flag} {location} does not fit this {model.config.model_type} model: {len(misfits)} weights have no "
            f"place in it, e.g. {misfits[0]}; {FIX_ADAPTER}."
        )
    return name


def adapter_files(folder):
    """The files of a saved adapter, its weights counted once: pytorch_adapter.bin beside adapter.safetensors holds
    the same weights, for adapters' default loader."""
    files = [path for path in folder.rglob("*") if path.is_file()]
    if (folder / "adapter.safetensors").is_file():
        files = [path for path in files if path != folder / "pytorch_adapter.bin"]
    return files
