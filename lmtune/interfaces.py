"""adapters.init for any model: layer names of the decoder families that adapters has no model code for, the
--adapter_interface files that name them for any other, and what init must leave as the model computed it."""

import json
from pathlib import Path

import adapters
from adapters import AdapterModelInterface
from adapters.methods import METHOD_INIT_MAPPING

from lmtune.errors import UsageError, first_line, shorten

# Layer names of decoder families that adapters has no model code for, in the fields of its plugin interface
# (adapters.AdapterModelInterface); --adapter_interface FILE.json gives the same fields for any other model.
# Bottleneck adapters hook the outputs of attn_o_proj and layer_output_proj, the layer_pre_* modules' inputs are
# the residuals, and LoRA wraps the projections (a fused attn_qkv_proj in three equal thirds taken as q, k, v).
LLAMA_LAYERS = {
    "adapter_methods": ["bottleneck", "lora", "reft", "invertible"],
    "model_embeddings": "embed_tokens",
    "model_layers": "layers",
    "layer_self_attn": "self_attn",
    "attn_q_proj": "q_proj",
    "attn_k_proj": "k_proj",
    "attn_v_proj": "v_proj",
    "attn_o_proj": "o_proj",
    "layer_intermediate_proj": "mlp.up_proj",
    "layer_output_proj": "mlp.down_proj",
    "layer_pre_self_attn": "input_layernorm",
    "layer_pre_ffn": "post_attention_layernorm",
}


BUILT_IN_INTERFACES = {
    "gemma": LLAMA_LAYERS,
    "olmo": LLAMA_LAYERS,
    "stablelm": LLAMA_LAYERS,
    "starcoder2": {**LLAMA_LAYERS, "layer_intermediate_proj": "mlp.c_fc", "layer_output_proj": "mlp.c_proj"},
    "phi3": {
        **LLAMA_LAYERS, "attn_q_proj": None, "attn_k_proj": None, "attn_v_proj": None, "attn_qkv_proj": "qkv_proj",
        "layer_intermediate_proj": "mlp.gate_up_proj",
    },
    "opt": {
        "adapter_methods": ["bottleneck", "lora", "reft", "invertible"],
        "model_embeddings": "decoder.embed_tokens",
        "model_layers": "decoder.layers",
        "layer_self_attn": "self_attn",
        "attn_q_proj": "q_proj",
        "attn_k_proj": "k_proj",
        "attn_v_proj": "v_proj",
        "attn_o_proj": "out_proj",
        "layer_intermediate_proj": "fc1",
        "layer_output_proj": "fc2",
        "layer_pre_self_attn": "self_attn_layer_norm",
        "layer_pre_ffn": "final_layer_norm",
    },
    "gpt_neo": {
        "adapter_methods": ["bottleneck", "lora", "reft", "invertible"],
        "model_embeddings": "wte",
        "model_layers": "h",
        "layer_self_attn": "attn.attention",
        "attn_q_proj": "q_proj",
        "attn_k_proj": "k_proj",
        "attn_v_proj": "v_proj",
        "attn_o_proj": "out_proj",
        "layer_intermediate_proj": "mlp.c_fc",
        "layer_output_proj": "mlp.c_proj",
        "layer_pre_self_attn": "ln_1",
        "layer_pre_ffn": "ln_2",
    },
    # Pythia's query_key_value holds q, k and v per head, interleaved: LoRA's thirds mix them.
    "gpt_neox": {
        "adapter_methods": ["bottleneck", "lora", "reft", "invertible"],
        "model_embeddings": "embed_in",
        "model_layers": "layers",
        "layer_self_attn": "attention",
        "attn_qkv_proj": "query_key_value",
        "attn_o_proj": "dense",
        "layer_intermediate_proj": "mlp.dense_h_to_4h",
        "layer_output_proj": "mlp.dense_4h_to_h",
        "layer_pre_self_attn": "input_layernorm",
        "layer_pre_ffn": "post_attention_layernorm",
    },
    # Falcon's query_key_value has fewer key and value heads than query heads, or interleaves them per head: it has
    # no thirds for LoRA.
    "falcon": {
        "adapter_methods": ["bottleneck", "reft", "invertible"],
        "model_embeddings": "word_embeddings",
        "model_layers": "h",
        "layer_self_attn": "self_attention",
        "attn_qkv_proj": "query_key_value",
        "attn_o_proj": "dense",
        "layer_intermediate_proj": "mlp.dense_h_to_4h",
        "layer_output_proj": "mlp.dense_4h_to_h",
    },
}


# adapters 1.3.0's attention layers for ELECTRA and BertGeneration still read a decoder's key/value cache as older
# transformers' tuples (past_key_values[0] the keys); transformers 4.57 hands them an EncoderDecoderCache whenever the
# decoder runs with a cache (generate, a forward pass without labels), and they fail: "expected Tensor ... got tuple".
TUPLE_CACHE_LAYERS = {"ElectraSelfAttentionWithAdapters", "BertGenerationSelfAttentionWithAdapters"}


def init_adapters(model, adapter_args):
    """adapters.init, through a plugin interface for the model types that adapters has no model code for, leaving
    what the model computes exactly as it was."""
    # A model saved by an adapters-initialised full fine-tuning carries an "adapters" dict in its config;
    # adapters.init would share it with the new adapter setup, whose objects can then not be written to JSON.
    if isinstance(getattr(model.config, "adapters", None), dict):
        del model.config.adapters
    model_type = model.config.model_type
    interface = None
    if adapter_args.adapter_interface:
        interface = read_adapter_interface(adapter_args.adapter_interface)
    elif model_type in BUILT_IN_INTERFACES:
        interface = interface_from_fields(BUILT_IN_INTERFACES[model_type])
    without_bias = {name for name, module in model.named_modules() if getattr(module, "bias", False) is None}
    try:
        adapters.init(model, interface=interface)
    except ValueError as error:
        if interface is None and isinstance(error.__context__, ImportError):  # adapters found no model code
            raise UsageError(
                f"--train_adapter: adapters {adapters.__version__} has no support for {model_type} models; name "
                "their layers in --adapter_interface FILE.json, or train the whole model without --train_adapter."
            ) from None
        if interface is None or not str(error).startswith("AdapterInterface"):  # adapters' check of the names
            raise
        raise UsageError(interface_misfit_message(model_type, adapter_args, error)) from None
    except (AttributeError, TypeError) as error:
        if not adapter_args.adapter_interface:
            raise
        # The file names a module of the wrong kind, such as a layer norm for a projection.
        raise UsageError(interface_misfit_message(model_type, adapter_args, error)) from None
    remove_added_biases(model, without_bias)
    if reads_tuple_cache(model):
        # transformers hands these layers a Cache object, which they cannot read: the model computes without one.
        model.config.use_cache = model.generation_config.use_cache = False


def reads_tuple_cache(model):
    """Whether the model is a decoder whose adapter layers read the attention cache as older transformers' tuples."""
    return model.config.is_decoder and any(type(module).__name__ in TUPLE_CACHE_LAYERS for module in model.modules())


def interface_misfit_message(model_type, adapter_args, error):
    interface = (f"--adapter_interface {adapter_args.adapter_interface}" if adapter_args.adapter_interface
                 else f"The built-in adapter interface for {model_type}")
    return (
        f"{interface} does not fit this {model_type} model ({shorten(first_line(error))}); name its layers in "
        "--adapter_interface FILE.json."
    )


def remove_added_biases(model, without_bias):
    # adapters' LoRA wrapper of a fused query/key/value projection (DeBERTa, ModernBERT) gives a projection without
    # a bias a randomly initialised one, which would change the pretrained model's outputs.
    for name, module in model.named_modules():
        if name in without_bias and getattr(module, "bias", None) is not None:
            module.bias = None


def read_adapter_interface(path):
    """The AdapterModelInterface of a --adapter_interface file: its fields, or the adapter_interface.json that
    adapters saves with an adapter (the fields under "interface")."""
    flag = f"--adapter_interface {path}"
    try:
        fields = json.loads(Path(path).read_text())
    except OSError as error:
        raise UsageError(f"{flag} cannot be read ({error.strerror}); give the path of a .json file.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{flag} is not valid JSON ({error}); fix the file.") from None
    if isinstance(fields, dict) and isinstance(fields.get("interface"), dict):
        fields = fields["interface"]
    if not isinstance(fields, dict):
        raise UsageError(f"{flag} holds no JSON object; give an object of AdapterModelInterface fields.")
    methods = fields.get("adapter_methods")
    if not (isinstance(methods, list) and set(methods) <= METHOD_INIT_MAPPING.keys()):
        raise UsageError(
            f"{flag}: adapter_methods {json.dumps(methods)} is not a list of method kinds; use some of "
            f"{', '.join(METHOD_INIT_MAPPING)}."
        )
    not_names = [key for key, value in fields.items()
                 if key != "adapter_methods" and value is not None and not isinstance(value, str)]
    if not_names:
        raise UsageError(
            f"{flag}: {', '.join(not_names)} must each be a module path such as \"decoder.layers\", or null."
        )
    try:
        return interface_from_fields(fields)
    except (TypeError, ValueError) as error:  # a missing or unknown field, or q/k/v and qkv both or neither given
        raise UsageError(
            f"{flag} does not describe an adapter interface ({shorten(first_line(error))}); give the fields of "
            "adapters.AdapterModelInterface."
        ) from None


def interface_from_fields(fields):
    # A causal or masked language model has no cross-attention: the field that adapters requires may be left out.
    return AdapterModelInterface(**{"layer_cross_attn": None, **fields})
