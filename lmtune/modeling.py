"""The model and what comes with it: config, tokenizer, the pretrained or new model (quantized on request), and the
length of the examples that they allow."""

import logging
import warnings

import torch
from huggingface_hub import get_torch_storage_id
from torch.distributed.tensor import DTensor
from transformers import CONFIG_MAPPING, AutoConfig, AutoTokenizer, BitsAndBytesConfig

from lmtune.arguments import quantizes
from lmtune.errors import FIX_MODEL_FOLDER, UsageError, reported_as_usage_error
from lmtune.logs import is_not_int8_cast_notice

logger = logging.getLogger(__name__)

# The longest examples made by default, as in the Hugging Face examples: longer ones take much memory.
DEFAULT_MAX_LENGTH = 1024
# Models whose position ids start after the padding index, so that pad_token_id + 1 positions are never used.
POSITIONS_AFTER_PADDING = {"roberta", "xlm-roberta", "camembert", "data2vec-text", "roberta-prelayernorm", "xmod"}


def hub_options(model_args):
    """Where and how config, tokenizer and model are fetched from the hub or its local cache."""
    return {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }


def load_config(model_args):
    if model_args.config_name or model_args.model_name_or_path:
        flag, name = ("--config_name", model_args.config_name) if model_args.config_name else (
            "--model_name_or_path", model_args.model_name_or_path)
        with reported_as_usage_error(flag, name, fix=FIX_MODEL_FOLDER):
            return AutoConfig.from_pretrained(name, **hub_options(model_args))
    config = CONFIG_MAPPING[model_args.model_type]()
    logger.warning(f"Building a new {model_args.model_type} model from scratch.")
    if model_args.config_overrides:
        logger.info(f"Overriding config: {model_args.config_overrides}")
        try:
            config.update_from_string(model_args.config_overrides)
        except ValueError as error:
            raise UsageError(
                f"--config_overrides {model_args.config_overrides} does not fit a {model_args.model_type} config "
                f"({error}); use key=value pairs separated by commas with keys of that config."
            ) from None
    return config


def tokenizer_source(model_args):
    """The flag and the value that the tokenizer is loaded from."""
    if model_args.tokenizer_name:
        return "--tokenizer_name", model_args.tokenizer_name
    return "--model_name_or_path", model_args.model_name_or_path


def load_tokenizer(model_args):
    flag, name = tokenizer_source(model_args)
    with reported_as_usage_error(flag, name, fix=FIX_MODEL_FOLDER):
        return AutoTokenizer.from_pretrained(name, use_fast=model_args.use_fast_tokenizer, **hub_options(model_args))


def load_model(model_args, config, tokenizer, auto_class, loss_type):
    """The pretrained model (--model_name_or_path) or a new one built from config, as auto_class (the objective's,
    such as AutoModelForCausalLM), computing the loss_type loss (ForCausalLM, ForMaskedLM)."""
    if model_args.model_name_or_path:
        dtype = model_args.torch_dtype
        if dtype not in ("auto", None):
            dtype = getattr(torch, dtype)
        quantization = quantization_config(model_args)
        with reported_as_usage_error("--model_name_or_path", model_args.model_name_or_path, fix=FIX_MODEL_FOLDER):
            model = auto_class.from_pretrained(
                model_args.model_name_or_path,
                config=config,
                **hub_options(model_args),
                dtype=torch.float32 if quantization else dtype,
                low_cpu_mem_usage=model_args.low_cpu_mem_usage,
                quantization_config=quantization,
            )
    else:
        take_special_tokens_from(tokenizer, config)
        model = auto_class.from_config(config, trust_remote_code=model_args.trust_remote_code)
        logger.info(f"New model: {model.num_parameters() / 1e6:.2f}M parameters")
    # Models whose class name does not say their task (GPT2LMHeadModel) leave transformers to guess the loss, with a
    # warning, and its guess is the causal LM loss.
    if getattr(model, "loss_type", None) is None:
        model.loss_type = loss_type
    # A tokenizer with more tokens than the model's embedding would index past it; fewer tokens are harmless.
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return model


def example_length(flag, requested, tokenizer, config):
    """The length in tokens of the examples: requested (the value of flag), clamped with a warning to what the model
    and the tokenizer allow, or by default the smallest of DEFAULT_MAX_LENGTH and that limit."""
    limits = [tokenizer.model_max_length]
    if getattr(config, "max_position_embeddings", None):
        positions = config.max_position_embeddings
        if config.model_type in POSITIONS_AFTER_PADDING:
            positions -= config.pad_token_id + 1
        limits.append(positions)
    limit = min(limits)
    if requested is None:
        return min(DEFAULT_MAX_LENGTH, limit)
    if requested > limit:
        logger.warning(f"{flag} {requested} is longer than the model and tokenizer allow; using {limit}.")
        return limit
    return requested


def quantization_config(model_args):
    """bitsandbytes settings for --load_in_4bit (QLoRA's NF4 with double quantization) or --load_in_8bit, else None.

    The layers left unquantized (embeddings, norms, the head) are loaded in float32, the adapter's dtype: transformers
    would load them in float16 otherwise, which the adapter's layers cannot take as input.
    """
    if not quantizes(model_args):
        return None
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(is_not_int8_cast_notice)
    return BitsAndBytesConfig(
        load_in_4bit=model_args.load_in_4bit,
        load_in_8bit=model_args.load_in_8bit,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


def take_special_tokens_from(tokenizer, config):
    # A new config has the special token ids of its model type's own vocabulary (GPT-2's 50256), which the Trainer
    # would replace by the tokenizer's, with a warning, once the model is built.
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, key) is not None:
            setattr(config, key, getattr(tokenizer, key))


def sharded(model):
    """Whether the model's weights are sharded over the processes (FSDP2's DTensors, DeepSpeed ZeRO-3's partitions),
    so that a forward pass needs every process."""
    return any(isinstance(parameter, DTensor) or hasattr(parameter, "ds_id") for parameter in model.parameters())


def weight_identity(tensor):
    """What two names of one weight in a state dict have in common (prefix tuning's pool has several): the storage,
    by huggingface_hub's id, which tells apart XLA tensors (whose data_ptr() is 0 for all) and DTensors (by their
    local shard), and the view of it."""
    with warnings.catch_warnings():
        # huggingface_hub reads a DTensor's shard through torch's TypedStorage, which torch warns is deprecated.
        warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
        storage = get_torch_storage_id(tensor)
    return storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride())
