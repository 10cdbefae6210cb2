"""--merge_adapter: the adapter folded into the model's weights, checked against the adapter model before the plain
transformers model is written."""

import copy
from dataclasses import replace
from pathlib import Path

import torch
from adapters.loading import AdapterLoader

from lmtune.arguments import quantizes
from lmtune.interfaces import init_adapters, reads_tuple_cache
from lmtune.modeling import load_config, load_model
from lmtune.output_dir import writing
from lmtune.trial_step import half_precision_autocast


def write_merged_model(model, tokenizer, model_args, training_args, adapter_args):
    """With --merge_adapter, write <output_dir>/merged/: the model with the adapter folded into its weights as a plain
    transformers model, and the tokenizer. It must give the adapter model's logits on a sentence to be written."""
    if not (adapter_args.merge_adapter and training_args.should_save):
        return None
    adapter_model = copy_to_merge(model, tokenizer, model_args, adapter_args)
    adapter_model.eval()
    inputs = tokenizer("A merged model must say what the adapter says.", return_tensors="pt").to(adapter_model.device)
    # Both models compute in the base model's dtype, the merged one's: in half precision the float32 adapter runs
    # under autocast, as it trained.
    with torch.no_grad(), half_precision_autocast(adapter_model):
        expected = adapter_model(**inputs).logits.float()
    adapter_model.merge_adapter(adapter_args.adapter_name)
    merged = plain_model(adapter_model)
    del adapter_model
    merged.eval()
    with torch.no_grad(), half_precision_autocast(merged):
        difference = (merged(**inputs).logits.float() - expected).abs().max().item()
    # Folded weights are rounded to the dtype and change the order of floating-point sums: a few units of its
    # precision, relative to the logits. A forgotten or misplaced weight change is far larger.
    tolerance = max(1e-4, 4 * torch.finfo(merged.dtype).eps) * max(1.0, expected.abs().max().item())
    if difference > tolerance:
        raise RuntimeError(
            f"The merged model's logits differ from the adapter model's by {difference:.3g}, more than "
            f"{tolerance:.3g}; it was not written. The adapter itself is saved; please report this with the "
            "--adapter_config used."
        )
    folder = Path(training_args.output_dir) / "merged"
    with writing("the merged model", training_args):
        merged.save_pretrained(folder, safe_serialization=training_args.save_safetensors)
        tokenizer.save_pretrained(folder)
    return folder


def copy_to_merge(model, tokenizer, model_args, adapter_args):
    """A copy of the model with its adapter, to merge while the trained model stays as it is. A quantized model's
    base is reloaded in full precision instead, with the trained adapter on top: merged into 4-bit or 8-bit weights,
    the adapter's change would be rounded away."""
    if not quantizes(model_args):
        return copy.deepcopy(model)
    full_precision = replace(model_args, load_in_4bit=False, load_in_8bit=False)
    base = load_model(full_precision, load_config(full_precision), tokenizer, plain_class(model), model.loss_type)
    init_adapters(base, adapter_args)
    name = adapter_args.adapter_name
    base.add_adapter(name, config=model.adapters_config.get(name), set_active=True)
    # The adapter's weights are not quantized: they go over as they are, under the same names.
    belongs = AdapterLoader(model).filter_func(name)
    trained = {key: tensor for key, tensor in model.state_dict().items() if belongs(key)}
    unexpected = base.load_state_dict(trained, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"The adapter's weights have no place in the full-precision base, e.g. {unexpected[0]}.")
    return base


def plain_model(model):
    """The weights of a model with adapters, without the adapters' own, in a model of its plain transformers class."""
    model_class = plain_class(model)
    with torch.device("meta"):  # only the names of its weights are needed: nothing is allocated
        names = model_class(model.config).state_dict().keys()
    state_dict = model.state_dict()
    # Built where the adapter model is, in its dtype: from_pretrained would put every weight on the CPU, away from
    # the inputs that the merged model is compared on.
    plain = model_class.from_pretrained(
        None, config=model.config, state_dict={name: state_dict[name] for name in names}, dtype=model.dtype,
        device_map={"": model.device},
    )
    if reads_tuple_cache(model):  # init_adapters turned the cache off for adapters' layers; transformers' read it
        plain.config.use_cache = plain.generation_config.use_cache = True
    return plain


def plain_class(model):
    # adapters.init swaps the model's class for a subclass with adapters' mixins: the first class up the hierarchy
    # that comes from transformers is the plain one.
    return next(cls for cls in type(model).__mro__ if cls.__module__.startswith("transformers."))
