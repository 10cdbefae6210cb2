#!/usr/bin/env python
"""Fine-tune a masked language model (BERT/RoBERTa style) with an adapter, or fully, on a text dataset.

The command line follows the Hugging Face / AdapterHub `run_mlm.py` examples flag for flag, for example:

    python run_mlm.py --model_name_or_path roberta-base --dataset_name wikitext \
        --dataset_config_name wikitext-2-raw-v1 --do_train --do_eval --output_dir /tmp/test-mlm \
        --train_adapter --adapter_config seq_bn

Local files work the same way offline (`--train_file`, `--validation_file`, or a folder as `--dataset_name`).
Run `python run_mlm.py --help` for every flag. Perplexity and accuracy on the masked tokens land in
`<output_dir>/all_results.json`; the trained adapter in `<output_dir>/<adapter_name>/`.
"""

import argparse
import codecs
import copy
import errno
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # Windows has no advisory file locks: runs into one folder are then not kept apart
    fcntl = None

import datasets
import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import transformers
from datasets import DatasetDict, IterableDatasetDict, load_dataset, load_from_disk
from datasets.exceptions import DatasetGenerationError
from huggingface_hub import HfApi, ModelCardData
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForLanguageModeling,
    EarlyStoppingCallback,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.data.data_collator import pad_without_fast_tokenizer_warning
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import adapters
from adapters import ADAPTER_CONFIG_MAP, AdapterArguments, AdapterConfig, AdapterModelInterface, AdapterTrainer
from adapters import ConfigUnion, LoRAConfig, MTLLoRAConfig, PromptTuningConfig, Stack
from adapters.configuration.adapter_config import ReftConfig
from adapters.loading import AdapterLoader
from adapters.methods import METHOD_INIT_MAPPING
from adapters.methods.lora import LoRAMergedLinear

logger = logging.getLogger(__name__)

# File extensions accepted by --train_file/--validation_file, mapped to the `datasets` builder that reads them.
FILE_BUILDERS = {"txt": "text", "csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}
HUB_PROBE_SECONDS = 5  # how long a run waits to learn whether the Hugging Face Hub can be reached
# The Trainer's flags that --help shows; --help-all shows all of its more than 100.
COMMON_TRAINER_FLAGS = {
    "output_dir", "overwrite_output_dir", "do_train", "do_eval", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "learning_rate",
    "logging_steps", "eval_strategy", "eval_steps", "eval_on_start", "save_strategy", "save_steps", "save_total_limit",
    "resume_from_checkpoint", "seed", "bf16", "fp16", "torch_compile", "report_to", "push_to_hub",
}
MAX_DEFAULT_SEQ_LENGTH = 1024
# Models whose position ids start after the padding index, so that pad_token_id + 1 positions are never used.
POSITIONS_AFTER_PADDING = {"roberta", "xlm-roberta", "camembert", "data2vec-text", "roberta-prelayernorm", "xmod"}
# What a checkpoint of a fully fine-tuned model holds its weights in, whole or sharded.
MODEL_WEIGHT_FILES = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json"]
# What adapters and the models raise for a method or dtype they cannot compute with, in the trial training step.
TRIAL_STEP_ERRORS = (RuntimeError, ValueError, TypeError, AttributeError, AssertionError, IndexError)
FIX_MODEL_FOLDER = "give a complete folder written by save_pretrained, or a hub name while online"
FIX_ADAPTER = "give an adapter saved for this model (by --train_adapter with the same --model_name_or_path)"
FIX_DATA_FILE = "fix the file, or give it the extension of its format"
# Kept in every checkpoint: the sum of the training losses up to it, for the train_loss of a resumed run.
LOSS_SUM_FILE = "train_loss_sum.json"
# Held by the run writing into --output_dir, and removed when it ends.
LOCK_FILE = ".run.lock"
# The mixed precision that `accelerate launch` asked for, if any.
LAUNCHER_PRECISION = os.environ.get("ACCELERATE_MIXED_PRECISION")

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
# Samples: a validation text is cut to its first tokens to make a prompt, in which some tokens are masked to fill.
SAMPLE_PROMPT_TOKENS = 16
SAMPLE_MASKED_SHARE = 0.15
# Where Linux lists the CPU's features, and those that compute bf16 matrix products natively (without them, CPU
# autocast emulates bf16, far slower than fp32).
CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported as one line on stderr, exit status 2."""


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to start from."""

    _argument_group_name = "Model and tokenizer"  # a heading of its own in --help

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "Hub name or local folder of the pretrained model to start from. "
            "Leave unset to build a new model from --model_type (and --config_overrides)."
        },
    )
    model_type: Optional[str] = field(
        default=None,
        metadata={
            "help": "Model architecture to build from scratch when --model_name_or_path is unset: a transformers "
            "model type such as roberta, bert or distilbert."
        },
    )
    config_overrides: Optional[str] = field(
        default=None,
        metadata={
            "help": "Config values to change when building a model from scratch, as key=value pairs separated by "
            "commas, e.g. n_embd=64,n_layer=2,n_head=2. Not combinable with --model_name_or_path or --config_name."
        },
    )
    config_name: Optional[str] = field(
        default=None, metadata={"help": "Config name or path, if different from --model_name_or_path."}
    )
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer name or path, if different from --model_name_or_path."}
    )
    cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Where to cache models and datasets downloaded from the hub."}
    )
    use_fast_tokenizer: bool = field(
        default=True, metadata={"help": "Use a fast (Rust `tokenizers`) tokenizer when the model has one."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "Model version to use: a branch name, tag name or commit id."}
    )
    token: Optional[str] = field(
        default=None,
        metadata={"help": "Hub access token for private models; defaults to the one stored by `hf auth login`."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Allow running model code from the hub repository. Only set this for repositories you trust "
            "and whose code you have read."
        },
    )
    torch_dtype: Optional[str] = field(
        default=None,
        metadata={
            "help": "Load the model weights in this dtype; 'auto' takes the dtype stored with the weights.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    low_cpu_mem_usage: bool = field(
        default=False,
        metadata={
            "help": "Load the pretrained model without first building a randomly initialised copy, which saves "
            "memory and time for large models."
        },
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "QLoRA-style: load the pretrained model's linear layers quantized to 4 bits (NF4 with double "
            "quantization, by bitsandbytes) and train an adapter on top of them in fp32. Needs --train_adapter and "
            "`pip install -r requirements-quantization.txt`."
        },
    )
    load_in_8bit: bool = field(
        default=False,
        metadata={
            "help": "Like --load_in_4bit, with the linear layers quantized to 8 bits (LLM.int8 by bitsandbytes)."
        },
    )


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on, and how to cut it into examples."""

    _argument_group_name = "Data"

    dataset_name: Optional[str] = field(
        default=None,
        metadata={"help": "Hub dataset name, or a local folder of data files or of a dataset saved with save_to_disk."},
    )
    dataset_config_name: Optional[str] = field(
        default=None, metadata={"help": "Configuration of the hub dataset, e.g. wikitext-2-raw-v1."}
    )
    train_file: Optional[str] = field(
        default=None, metadata={"help": "Training data file: .txt, .csv, .json, .jsonl or .parquet."}
    )
    validation_file: Optional[str] = field(
        default=None,
        metadata={"help": "Validation data file (same formats) to compute perplexity and accuracy on."},
    )
    max_train_samples: Optional[int] = field(
        default=None,
        metadata={"help": "Keep only the first this many training blocks, for debugging or quicker runs."},
    )
    max_eval_samples: Optional[int] = field(
        default=None,
        metadata={"help": "Keep only the first this many validation blocks, for debugging or quicker runs."},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Read the data as a stream instead of loading it whole; needs --max_steps to train."},
    )
    max_seq_length: Optional[int] = field(
        default=None,
        metadata={
            "help": "Length in tokens of each example: texts are concatenated and cut to it, or with "
            "--line_by_line truncated to it. Default: the smallest of 1024 and the model's and tokenizer's "
            "length limits; larger values are clamped to them."
        },
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Redo tokenization and grouping instead of using the `datasets` cache."}
    )
    validation_split_percentage: Optional[int] = field(
        default=5,
        metadata={
            "help": "Percentage of the training data held out for validation when the data has no validation "
            "split (when streaming, every (100/percentage)-th example)."
        },
    )
    preprocessing_num_workers: Optional[int] = field(
        default=None,
        metadata={
            "help": "Number of processes that tokenize (default: this one, where a fast tokenizer uses every core). "
            "Only worth it for large corpora: each process costs a second or more to start."
        },
    )
    mlm_probability: float = field(
        default=0.15, metadata={"help": "Fraction of tokens to mask for the masked language modeling loss."}
    )
    line_by_line: bool = field(
        default=False,
        metadata={"help": "Treat each non-empty line (row) as its own example instead of concatenating texts."},
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={
            "help": "With --line_by_line, pad every example to --max_seq_length; otherwise each batch is padded "
            "to its longest example (faster)."
        },
    )


@dataclass
class AdapterGroupArguments(AdapterArguments):
    """The adapters library's AdapterArguments, under a heading of their own in --help and with help texts that say
    what each flag takes here (the library's speak of its retired AdapterHub repository)."""

    _argument_group_name = "Adapter"

    train_adapter: bool = field(
        default=False,
        metadata={
            "help": "Train an adapter (see --adapter_config) while the model's own weights stay frozen; without it, "
            "the whole model is fine-tuned."
        },
    )
    load_adapter: Optional[str] = field(
        default="",
        metadata={
            "help": "Saved adapter to start from: a local folder (an earlier run's <output_dir>/<adapter_name>, or "
            "any folder written by save_adapter) or a Hugging Face Hub repository name. With --train_adapter it is "
            "trained further; with --do_eval alone it is evaluated as it is."
        },
    )
    adapter_config: Optional[str] = field(
        default="seq_bn",
        metadata={
            "help": "Adapter method to train: a name such as seq_bn, lora or prefix_tuning, name[key=value,...], a "
            "union a|b, or the path of a config .json file. A loaded adapter keeps the configuration saved with it."
        },
    )
    load_lang_adapter: Optional[str] = field(
        default=None,
        metadata={
            "help": "Saved language adapter (a local folder or a Hub repository name) to stack, frozen, under the "
            "adapter that is trained or loaded."
        },
    )
    lang_adapter_config: Optional[str] = field(
        default=None,
        metadata={
            "help": "Accepted for the AdapterHub examples' command lines: a loaded language adapter keeps the "
            "configuration saved with it."
        },
    )
    adapter_name: str = field(
        default="mlm",
        metadata={
            "help": "Name of the trained or loaded adapter; a trained one is saved in <output_dir>/<adapter_name>/."
        },
    )
    adapter_interface: Optional[str] = field(
        default=None,
        metadata={
            "help": "A .json file naming the model's layers for adapters' plugin interface (the fields of "
            "adapters.AdapterModelInterface), for a model type that adapters and the built-in interfaces do not "
            "cover; see README.md. The adapter_interface.json saved with such an adapter is such a file."
        },
    )
    merge_adapter: bool = field(
        default=False,
        metadata={
            "help": "After training (or with --load_adapter, without it), also write <output_dir>/merged/: the model "
            "with the adapter folded into its weights, and the tokenizer, which load with plain transformers. Only "
            "LoRA-style adapters can be merged; a quantized base is merged in full precision."
        },
    )


@dataclass
class EvaluationArguments:
    """When to stop training early, and the samples that show what the trained model does."""

    _argument_group_name = "Early stopping and samples"

    early_stopping_patience: Optional[int] = field(
        default=None,
        metadata={
            "help": "Stop training after this many evaluations in a row without improvement of "
            "--metric_for_best_model. Needs --load_best_model_at_end and an --eval_strategy (steps or epoch)."
        },
    )
    early_stopping_threshold: float = field(
        default=0.0,
        metadata={
            "help": "With --early_stopping_patience: the least change of the metric that counts as an improvement."
        },
    )
    num_samples: int = field(
        default=3,
        metadata={
            "help": "After evaluation, fill the masks of this many prompts (the first validation texts, or "
            "--sample_prompts) with the base model's and the adapted model's top predictions, show them in the "
            "summary and write them to <output_dir>/samples.jsonl; 0 turns samples off."
        },
    )
    sample_prompts: Optional[str] = field(
        default=None,
        metadata={
            "help": "Text file with one prompt per line for the samples, instead of the first validation texts. "
            "The tokenizer's mask token marks what to fill; in a prompt without one, some tokens are masked."
        },
    )


class ArgumentParser(HfArgumentParser):
    """HfArgumentParser with a --help that reads well in a terminal, and one-line errors.

    --help lists the script's own groups first, then the Trainer's most used flags; --help-all lists every flag. A bad
    command line is reported as a UsageError (one line) instead of argparse's usage block.
    """

    def __init__(self, dataclass_types, every_flag=True):
        super().__init__(dataclass_types, usage="%(prog)s --flag value ... (or: %(prog)s args.json)", add_help=False)
        # TrainingArguments has no heading of its own: its flags fill argparse's default group, which prints first.
        trainer_group = self._optionals
        trainer_group.title = "Training (the Trainer's flags)"
        if not every_flag:
            trainer_group.description = "The most used of the Trainer's flags; --help-all lists all of them."
        self._action_groups.remove(trainer_group)
        self._action_groups.append(trainer_group)
        help_group = self.add_argument_group("Help")
        help_group.add_argument("-h", "--help", action="help", help="Show the script's flags and the Trainer's most "
                                "used ones, and exit.")
        help_group.add_argument("--help-all", action="help", help="Show every flag, and exit.")
        for action in self._actions:
            make_help_readable(action)
            if not every_flag and action in trainer_group._group_actions and action.dest not in COMMON_TRAINER_FLAGS:
                action.help = argparse.SUPPRESS

    def error(self, message):
        raise UsageError(f"{message}; see --help for the flags and their values.")


def make_help_readable(action):
    if action.help:
        # argparse formats each help text with %: a bare % (TrainingArguments' "10% slower") would print a dict.
        action.help = re.sub(r"%(?!\()", "%%", action.help)
    if action.const is False and action.option_strings[0].startswith("--no_"):
        # HfArgumentParser gives --no_X the help text of --X, and a default of its own that --X's default overrides.
        action.help = f"Turn --{action.dest} off (it is on by default)."
        action.default = argparse.SUPPRESS


def parse_arguments(argv):
    """Read the five argument groups from the command line, or from a single .json file of arguments."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser(
        (ModelArguments, DataTrainingArguments, TrainingArguments, AdapterGroupArguments, EvaluationArguments),
        every_flag="--help-all" in argv,
    )
    # TrainingArguments writes the precision it chooses into the environment, where a later run in this process
    # would take it for the launcher's setting: each run starts from the launcher's.
    if LAUNCHER_PRECISION is None:
        os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
    else:
        os.environ["ACCELERATE_MIXED_PRECISION"] = LAUNCHER_PRECISION
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            arguments = parser.parse_dict(read_json_arguments(Path(argv[0])))
        else:
            arguments = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # unknown flags or JSON keys, or a combination that TrainingArguments rejects
        if "bf16" in str(error):  # TrainingArguments' own message for --bf16 without bf16 hardware names no fix
            raise UsageError(
                "--bf16 needs a GPU with bf16 support; on a CPU add --use_cpu (fast only on CPUs with native bf16, "
                "avx512_bf16 or amx_bf16 in /proc/cpuinfo), or drop --bf16."
            ) from None
        raise UsageError(f"{one_line(error)}; see --help for the flags and their values.") from None
    unpin_memory_without_accelerator(arguments[2])
    return arguments


def unpin_memory_without_accelerator(training_args):
    # Pinned memory only speeds up copies to an accelerator; without one, torch ignores it with a warning.
    if training_args.dataloader_pin_memory and not torch.accelerator.is_available():
        training_args.dataloader_pin_memory = False


def read_json_arguments(json_path):
    if not json_path.is_file():
        raise UsageError(f"The arguments file {json_path} does not exist; give the path of an existing .json file.")
    try:
        return json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"The arguments file {json_path} is not valid JSON ({error}); fix the file.") from None


def one_line(error):
    # TrainingArguments puts the values that clash on lines of their own, after the sentence that names the flags.
    return " ".join(str(error).split()) or type(error).__name__


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def setup_logging(training_args):
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    # Only the main process logs at the chosen level, so that N processes do not print everything N times.
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    distributed = training_args.parallel_mode.value == "distributed"
    # Every process of a distributed run says which one it is; a single process has nobody to be told apart from.
    (logger.warning if distributed else logger.info)(
        f"Process rank: {training_args.local_rank}, device: {training_args.device}, n_gpu: {training_args.n_gpu}, "
        f"distributed training: {distributed}, 16-bit training: {training_args.fp16 or training_args.bf16}"
    )


def check_arguments(model_args, data_args, training_args, adapter_args, evaluation_args):
    """Refuse mistakes before anything slow happens, each with one sentence naming the flag and the fix."""
    check_model_arguments(model_args)
    check_data_arguments(data_args, training_args)
    check_training_arguments(training_args)
    check_best_model_arguments(training_args)
    check_adapter_arguments(adapter_args, training_args)
    check_evaluation_arguments(evaluation_args, training_args)
    check_quantization_arguments(model_args, adapter_args)
    check_merge_arguments(training_args, adapter_args)
    check_gradient_checkpointing_arguments(training_args, adapter_args)
    check_hub_is_reachable(model_args, data_args, adapter_args)
    warn_if_bf16_is_emulated(training_args)


def native_bf16_flags():
    """The CPU's native bf16 features named in /proc/cpuinfo: empty where it has none; None where there is no such
    file to tell (not Linux)."""
    try:
        flags = set(CPUINFO.read_text().split())
    except OSError:
        return None
    return tuple(flag for flag in NATIVE_BF16_FLAGS if flag in flags)


def warn_if_bf16_is_emulated(training_args):
    if training_args.bf16 and training_args.device.type == "cpu" and native_bf16_flags() == ():
        logger.warning(
            "--bf16 on a CPU without native bf16 (neither avx512_bf16 nor amx_bf16 in /proc/cpuinfo) is emulated: "
            "training is far slower than in fp32 (0.03x measured by benchmarks/run_benchmark.py); drop --bf16."
        )


def check_model_arguments(model_args):
    if model_args.config_overrides and (model_args.model_name_or_path or model_args.config_name):
        raise UsageError(
            "--config_overrides only applies to a model built from scratch: drop it, or drop "
            "--model_name_or_path/--config_name and pass --model_type instead."
        )
    if not (model_args.model_name_or_path or model_args.config_name or model_args.model_type):
        raise UsageError("No model given: pass --model_name_or_path, or --model_type to build one from scratch.")
    if model_args.model_type is not None and model_args.model_type not in CONFIG_MAPPING:
        raise UsageError(
            f"--model_type {model_args.model_type} is not a transformers model type; use one such as roberta or bert."
        )
    if not (model_args.tokenizer_name or model_args.model_name_or_path):
        raise UsageError(
            "A model built from scratch still needs a tokenizer: pass --tokenizer_name with a hub name or a folder "
            "saved with save_pretrained."
        )


def check_data_arguments(data_args, training_args):
    if data_args.dataset_name is None and data_args.train_file is None and data_args.validation_file is None:
        raise UsageError("No data given: pass --dataset_name, or --train_file and/or --validation_file.")
    for flag, path in (("--train_file", data_args.train_file), ("--validation_file", data_args.validation_file)):
        if path is not None:
            check_data_file(flag, path)
    if training_args.do_train and data_args.dataset_name is None and data_args.train_file is None:
        raise UsageError("--do_train needs training data: pass --train_file or --dataset_name.")
    if data_args.max_seq_length is not None and data_args.max_seq_length < 2:
        raise UsageError(
            f"--max_seq_length {data_args.max_seq_length} leaves no context to predict a masked token from: give "
            "at least 2 tokens, or leave it out for the model's length."
        )
    if not 0 < data_args.mlm_probability < 1:
        raise UsageError(
            f"--mlm_probability {data_args.mlm_probability} must be between 0 and 1 (exclusive), e.g. 0.15."
        )
    if not 0 < data_args.validation_split_percentage < 100:
        raise UsageError(
            f"--validation_split_percentage {data_args.validation_split_percentage} must be between 1 and 99."
        )
    for flag, value in (("--max_train_samples", data_args.max_train_samples),
                        ("--max_eval_samples", data_args.max_eval_samples)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value} must be a positive number of examples; leave it out to keep them all.")
    if data_args.preprocessing_num_workers is not None and data_args.preprocessing_num_workers < 1:
        raise UsageError(
            f"--preprocessing_num_workers {data_args.preprocessing_num_workers} must be at least 1; leave it out "
            "to tokenize in this process."
        )
    if data_args.streaming and training_args.do_train and training_args.max_steps <= 0:
        raise UsageError("--streaming has no known length to plan epochs with: pass --max_steps as well.")


def check_training_arguments(training_args):
    for flag, value in (
        ("--per_device_train_batch_size", training_args.per_device_train_batch_size),
        ("--per_device_eval_batch_size", training_args.per_device_eval_batch_size),
        ("--gradient_accumulation_steps", training_args.gradient_accumulation_steps),
    ):
        if value < 1:
            raise UsageError(f"{flag} {value} must be at least 1.")
    if training_args.do_train and training_args.max_steps <= 0 and training_args.num_train_epochs <= 0:
        raise UsageError(f"--num_train_epochs {training_args.num_train_epochs} must be positive, or give --max_steps.")
    for flag, value, example in (("--learning_rate", training_args.learning_rate, "5e-5, or 1e-4 for an adapter"),
                                 ("--weight_decay", training_args.weight_decay, "0.01")):
        if value < 0:
            raise UsageError(f"{flag} {value} must not be negative; try e.g. {example}.")
    if training_args.fp16 and training_args.device.type == "cpu":  # accelerate then quietly computes in fp32
        raise UsageError(
            "--fp16 needs a GPU: on a CPU mixed precision is bf16; drop --fp16, or use --bf16 --use_cpu on a CPU "
            "with native bf16 (avx512_bf16 or amx_bf16 in /proc/cpuinfo)."
        )
    if training_args.do_train:
        check_optimizer_settings(training_args)
    if training_args.resume_from_checkpoint and not is_complete_checkpoint(training_args.resume_from_checkpoint):
        raise UsageError(
            f"--resume_from_checkpoint {training_args.resume_from_checkpoint} is not a complete checkpoint; give a "
            "checkpoint folder with a trainer_state.json, such as <output_dir>/checkpoint-500."
        )


def check_optimizer_settings(training_args):
    """Build the chosen optimizer on one weight, so that a setting it rejects (betas, epsilon, a missing package)
    is reported now rather than as a traceback once the model is loaded and the data preprocessed."""
    try:
        optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args)
        optimizer_class([torch.nn.Parameter(torch.zeros(1))], **optimizer_kwargs)
    except (ValueError, ImportError) as error:
        raise UsageError(
            f"--optim {training_args.optim.value} rejects these settings ({first_line(error)}); check "
            "--learning_rate, --adam_beta1, --adam_beta2, --adam_epsilon and --optim_args."
        ) from None


def check_best_model_arguments(training_args):
    """Combinations that transformers accepts, but that fail once training has begun, or that keep a model other
    than the best without a word."""
    metric = training_args.metric_for_best_model
    if metric is not None and metric.removeprefix("eval_") not in ("loss", "accuracy"):
        raise UsageError(
            f"--metric_for_best_model {metric} is not a metric of the evaluation; use eval_loss (perplexity follows "
            "it) or eval_accuracy."
        )
    if training_args.save_strategy == "best" and metric is None:
        raise UsageError("--save_strategy best needs --metric_for_best_model: eval_loss or eval_accuracy.")
    if not training_args.load_best_model_at_end:
        return
    if training_args.save_strategy == "best":
        raise UsageError(
            f"--load_best_model_at_end with --save_strategy best keeps the last model in transformers "
            f"{transformers.__version__}, which never records the best checkpoint; pass --save_strategy "
            f"{training_args.eval_strategy.value} like --eval_strategy."
        )
    if training_args.eval_strategy == "no":
        raise UsageError(
            "--load_best_model_at_end needs evaluations to choose from: pass --eval_strategy steps (with "
            "--eval_steps N) or epoch, and the same --save_strategy."
        )
    if training_args.eval_strategy == "steps" and training_args.save_steps != training_args.eval_steps:
        # The Trainer only reloads a best evaluation that was saved; one between two saves would be passed over.
        raise UsageError(
            f"--load_best_model_at_end needs a checkpoint at every evaluation: pass --save_steps "
            f"{training_args.eval_steps:g} like --eval_steps, not {training_args.save_steps:g}."
        )
    if 1 <= training_args.max_steps < training_args.eval_steps:
        raise UsageError(
            f"--eval_steps {training_args.eval_steps:g} is more than --max_steps {training_args.max_steps}, so no "
            "evaluation would choose the best model; pass a smaller --eval_steps."
        )


def check_evaluation_arguments(evaluation_args, training_args):
    patience = evaluation_args.early_stopping_patience
    if patience is not None:
        if patience < 1:
            raise UsageError(f"--early_stopping_patience {patience} must be at least 1 evaluation.")
        missing = [flag for flag, given in (
            ("--load_best_model_at_end", training_args.load_best_model_at_end),
            ("--eval_strategy steps or epoch (and the same --save_strategy)", training_args.eval_strategy != "no"),
        ) if not given]
        if missing:
            raise UsageError(
                f"--early_stopping_patience stops on evaluations and keeps the best checkpoint: add "
                f"{' and '.join(missing)}."
            )
    if evaluation_args.early_stopping_threshold < 0:
        raise UsageError(
            f"--early_stopping_threshold {evaluation_args.early_stopping_threshold} must be 0 or more."
        )
    if evaluation_args.num_samples < 0:
        raise UsageError(f"--num_samples {evaluation_args.num_samples} must be 0 (no samples) or more.")
    if evaluation_args.sample_prompts is not None and not read_prompts(evaluation_args.sample_prompts):
        raise UsageError(
            f"--sample_prompts {evaluation_args.sample_prompts} holds no prompt; give a text file with one per line."
        )


def read_prompts(path):
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(
            f"--sample_prompts {path} does not exist; give a text file with one prompt per line."
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--sample_prompts {path} cannot be read as UTF-8 text ({first_line(error)}).") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def uses_adapter(adapter_args):
    """Whether the run puts an adapter into the model: one to train, or a saved one that is only evaluated."""
    return bool(adapter_args.train_adapter or adapter_args.load_adapter)


def check_adapter_arguments(adapter_args, training_args):
    if adapter_args.load_adapter and training_args.do_train and not adapter_args.train_adapter:
        raise UsageError(
            f"--load_adapter {adapter_args.load_adapter} with --do_train trains the adapter further: add "
            "--train_adapter, or drop --do_train to evaluate the adapter as it is."
        )
    if adapter_args.load_lang_adapter and not uses_adapter(adapter_args):
        raise UsageError(
            "--load_lang_adapter stacks a language adapter under the adapter that --train_adapter trains or "
            "--load_adapter loads: add one of them, or give the language adapter as --load_adapter to evaluate it "
            "alone."
        )
    if adapter_args.adapter_interface:
        if not uses_adapter(adapter_args):
            raise UsageError(
                "--adapter_interface names the model's layers for an adapter: add --train_adapter, or --load_adapter "
                "DIR to evaluate a saved one."
            )
        read_adapter_interface(adapter_args.adapter_interface)
    for flag, location in (("--load_adapter", adapter_args.load_adapter),
                           ("--load_lang_adapter", adapter_args.load_lang_adapter)):
        # A hub adapter is "name" or "org/name"; anything else that is missing must be a mistyped local path.
        if location and not os.path.exists(location) and (location.startswith((".", "/", "~"))
                                                           or location.count("/") > 1):
            raise UsageError(f"{flag} {location} does not exist; give the folder of a saved adapter.")
    if adapter_args.train_adapter:
        check_adapter_config(adapter_args.adapter_config)


def check_hub_is_reachable(model_args, data_args, adapter_args):
    """Without network, a hub name fails now in one line, not after half a minute of retries and a screen of logs."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return  # the libraries then go straight to the local cache
    hub_names = [(flag, name) for flag, name in (
        ("--model_name_or_path", model_args.model_name_or_path), ("--config_name", model_args.config_name),
        ("--tokenizer_name", model_args.tokenizer_name), ("--dataset_name", data_args.dataset_name),
        ("--load_adapter", adapter_args.load_adapter), ("--load_lang_adapter", adapter_args.load_lang_adapter),
    ) if name and not os.path.exists(name)]
    if not hub_names:
        return
    endpoint = huggingface_hub.constants.ENDPOINT
    try:
        huggingface_hub.get_session().head(endpoint, timeout=HUB_PROBE_SECONDS)
    except OSError as error:  # requests' errors: no connection, or no answer within HUB_PROBE_SECONDS
        flag, name = hub_names[0]
        raise UsageError(
            f"{flag} {name} is not a local folder, and the Hugging Face Hub ({endpoint}) cannot be reached "
            f"({type(error).__name__}); give a local folder, or set HF_HUB_OFFLINE=1 to use a copy already in the "
            "local cache."
        ) from None


def check_adapter_config(spec):
    try:
        config = AdapterConfig.load(spec)
    except (ValueError, TypeError, KeyError, OSError, SyntaxError) as error:
        raise UsageError(
            f"--adapter_config {spec} is not an adapter configuration ({shorten(first_line(error))}); use a name "
            "such as seq_bn, lora or prefix_tuning, name[key=value,...], a union a|b, or a config .json file."
        ) from None
    components = config.configs if isinstance(config, ConfigUnion) else [config]
    if any(isinstance(component, ReftConfig) and not component.subtract_projection for component in components):
        raise UsageError(
            f"--adapter_config {spec}: adapters {adapters.__version__} does not save DiReFT's subtract_projection, "
            "so a saved DiReFT adapter would reload as NoReFT with other results; use loreft or noreft instead."
        )


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
def check_quantization_arguments(model_args, adapter_args):
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return
    flag = quantization_flag(model_args)
    if model_args.load_in_4bit and model_args.load_in_8bit:
        raise UsageError("--load_in_4bit and --load_in_8bit exclude each other; pass one of them.")
    if not model_args.model_name_or_path:
        raise UsageError(f"{flag} quantizes a pretrained model's weights: pass --model_name_or_path, not --model_type.")
    if not uses_adapter(adapter_args):
        raise UsageError(
            f"{flag} needs --train_adapter, or --load_adapter DIR to evaluate a saved adapter: the quantized weights "
            "stay frozen, only an adapter can train."
        )
    if model_args.torch_dtype not in (None, "float32"):
        raise UsageError(
            f"--torch_dtype {model_args.torch_dtype} cannot be combined with {flag}: the layers left unquantized run "
            "in float32 like the adapter, which adapters cannot mix with 16-bit layers; leave --torch_dtype out."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(f"{flag} needs the bitsandbytes package: pip install -r requirements-quantization.txt")


def quantization_flag(model_args):
    return "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit"


def check_merge_arguments(training_args, adapter_args):
    if not adapter_args.merge_adapter:
        return
    if not (adapter_args.train_adapter and training_args.do_train) and not adapter_args.load_adapter:
        raise UsageError(
            "--merge_adapter has no adapter to merge: train one (--do_train --train_adapter) or load one "
            "(--load_adapter DIR)."
        )
    if adapter_args.load_lang_adapter:
        raise UsageError(
            "--merge_adapter cannot fold an adapter stacked on a language adapter (--load_lang_adapter) into one "
            "model; drop one of the two flags."
        )


def check_gradient_checkpointing_arguments(training_args, adapter_args):
    reentrant = (training_args.gradient_checkpointing_kwargs or {}).get("use_reentrant")
    if training_args.gradient_checkpointing and adapter_args.train_adapter and reentrant:
        raise UsageError(
            "--gradient_checkpointing_kwargs with use_reentrant true does not work with --train_adapter: adapters "
            "carries its forward context into the recomputation only without it; leave use_reentrant out."
        )


def shorten(text, limit=200):
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_data_file(flag, path):
    """Catch missing, empty and non-UTF-8 files now, not as a traceback from deep inside `datasets`."""
    extension = file_extension(path)
    if extension not in FILE_BUILDERS:
        raise UsageError(
            f"{flag} {path} has an unsupported extension; use one of: {', '.join('.' + e for e in FILE_BUILDERS)}."
        )
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path} does not exist; check the path.")
    if os.path.getsize(path) == 0:
        raise UsageError(f"{flag} {path} is empty; give a file with text in it.")
    if extension == "parquet":
        return
    with open(path, "rb") as file:
        start = file.read(1 << 20)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(start, final=False)
    except UnicodeDecodeError as error:
        raise UsageError(
            f"{flag} {path} is not UTF-8 text (byte {start[error.start]:#04x} at offset {error.start}); "
            "convert it, e.g. with `iconv -t utf-8`."
        ) from None


def file_extension(path):
    return path.rsplit(".", 1)[-1].lower()


def is_complete_checkpoint(folder):
    # The Trainer writes trainer_state.json last, so a checkpoint cut short by a crash has none or a broken one.
    try:
        json.loads((Path(folder) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir):
    steps = {int(path.name.split("-")[1]): path for path in Path(output_dir).glob("checkpoint-*")
             if path.name.split("-")[1].isdigit()}
    for step in sorted(steps, reverse=True):
        if is_complete_checkpoint(steps[step]):
            return str(steps[step])
        logger.warning(f"Ignoring {steps[step]}: the run stopped before it was completely written.")
    return None


@contextmanager
def claimed_output_dir(training_args):
    """Hold --output_dir for the run: create it, and lock it so that a second run into it is refused while this one
    lives (a killed run's lock goes with its process). A full disk or a folder that cannot be written, met at any
    point of the run, ends in one line naming the folder; the checkpoints already written stay usable."""
    output_dir = Path(training_args.output_dir)
    if not training_args.should_save:  # only the main process writes, so only it holds the folder
        yield
        return
    created = not output_dir.exists()
    lock = lock_output_dir(output_dir)
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        reason = write_failure(error, output_dir)
        if reason is None:
            raise
        raise UsageError(
            f"Could not write to --output_dir {output_dir} ({reason}); make room or fix the permissions, then run "
            "the same command again: it resumes from the last complete checkpoint."
        ) from None
    finally:
        Path(lock.name).unlink(missing_ok=True)
        lock.close()
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()  # a run that failed before writing anything leaves no empty folder behind


def lock_output_dir(output_dir):
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock = open(output_dir / LOCK_FILE, "a+")
    except OSError as error:
        raise UsageError(
            f"--output_dir {output_dir} cannot be written ({error.strerror}); give a folder you can write to."
        ) from None
    if fcntl is None:
        return lock
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # A run that ended just now removed the file after this one opened it: the lock is then on a dead file.
        if os.fstat(lock.fileno()).st_ino != os.stat(lock.name).st_ino:
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise UsageError(
            f"--output_dir {output_dir} is in use by another run (process {holder}); wait for it to end, or choose "
            "another folder."
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def write_failure(error, folder):
    """Why writing into folder failed, when the machine is the cause (full, read-only, not permitted); else None."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
        return error.strerror
    # torch.save and safetensors report a full disk as RuntimeError / SafetensorError, without an errno.
    if not isinstance(error, OSError) and shutil.disk_usage(folder).free < 1 << 20:
        return os.strerror(errno.ENOSPC)
    return None


def detect_last_checkpoint(training_args):
    """Find the checkpoint to resume from, and refuse to write into a folder that holds other work."""
    output_dir = Path(training_args.output_dir)
    if not output_dir.is_dir() or training_args.overwrite_output_dir:
        return None
    last_checkpoint = last_complete_checkpoint(output_dir)
    if last_checkpoint is None and any(path.name != LOCK_FILE for path in output_dir.iterdir()):
        raise UsageError(
            f"--output_dir {output_dir} already exists, is not empty and holds no checkpoint to resume from; "
            "choose another folder, or pass --overwrite_output_dir to write into it anyway."
        )
    if not training_args.do_train:
        return None
    if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
        logger.info(
            f"Resuming training from {last_checkpoint}; pass --overwrite_output_dir to start from scratch instead."
        )
    return last_checkpoint


def check_resume_checkpoint(last_checkpoint, training_args, adapter_args):
    """A checkpoint of another kind of run (full fine-tuning, another adapter or adapter settings) would fail deep
    inside the optimizer once everything is loaded: refuse it now, naming how it differs."""
    checkpoint = training_args.resume_from_checkpoint or last_checkpoint
    if not (training_args.do_train and checkpoint):
        return
    folder = Path(checkpoint)
    holds_model = any((folder / name).is_file() for name in MODEL_WEIGHT_FILES)
    adapter_config_file = folder / adapter_args.adapter_name / "adapter_config.json"
    if not adapter_args.train_adapter:
        found = None if holds_model else "an adapter, not a fully fine-tuned model"
    elif not adapter_config_file.is_file():
        found = "a fully fine-tuned model" if holds_model else f"no adapter named '{adapter_args.adapter_name}'"
    else:
        saved = AdapterConfig.load(json.loads(adapter_config_file.read_text())["config"])
        wanted = AdapterConfig.load(adapter_args.adapter_config)
        # With --load_adapter the trained adapter's settings are the loaded one's, not --adapter_config.
        same = adapter_args.load_adapter or saved.to_dict() == wanted.to_dict()
        found = None if same else "an adapter of another configuration"
    if found is None:
        return
    trains = f"the adapter '{adapter_args.adapter_name}' ({adapter_args.adapter_config})" if (
        adapter_args.train_adapter) else "the whole model"
    if training_args.resume_from_checkpoint:
        raise UsageError(
            f"--resume_from_checkpoint {checkpoint} holds {found}, but this run trains {trains}; give a checkpoint "
            "of the same kind of run, or start afresh without --resume_from_checkpoint."
        )
    raise UsageError(
        f"--output_dir {training_args.output_dir} holds {folder.name} with {found}, but this run trains {trains}; "
        "rerun the command that wrote it to resume, or choose another folder (or pass --overwrite_output_dir) to "
        "start afresh."
    )


def load_raw_datasets(model_args, data_args, training_args):
    """Load the train and validation splits that the run needs, carving validation out of train if missing."""
    hub_kwargs = {"cache_dir": model_args.cache_dir, "token": model_args.token, "streaming": data_args.streaming}
    if data_args.dataset_name is not None:
        if is_saved_dataset(data_args.dataset_name):
            raw_datasets = load_from_disk(data_args.dataset_name)
            if isinstance(raw_datasets, datasets.Dataset):
                raw_datasets = DatasetDict(train=raw_datasets)
            if data_args.streaming:
                raw_datasets = IterableDatasetDict({k: v.to_iterable_dataset() for k, v in raw_datasets.items()})
        else:
            with reported_as_usage_error("--dataset_name", data_args.dataset_name):
                raw_datasets = load_dataset(data_args.dataset_name, data_args.dataset_config_name, **hub_kwargs)
    else:
        raw_datasets = load_data_files(data_args, hub_kwargs)
    if "validation" not in raw_datasets and "train" in raw_datasets:
        raw_datasets = carve_validation_split(raw_datasets["train"], data_args.validation_split_percentage)
    wanted = {"train": training_args.do_train, "validation": training_args.do_eval}
    needed = [split for split in wanted if wanted[split]]
    for split in needed:
        if split not in raw_datasets:
            raise UsageError(f"The data has no {split} split; pass --{split}_file or a dataset that has one.")
    return select_texts(type(raw_datasets)({split: raw_datasets[split] for split in needed}), data_args)


def load_data_files(data_args, hub_kwargs):
    """Read --train_file and --validation_file, each as the format its own extension names."""
    splits = {}
    for split, flag, path in (("train", "--train_file", data_args.train_file),
                              ("validation", "--validation_file", data_args.validation_file)):
        if path is None:
            continue
        if split == "validation" and "train" in splits and os.path.samefile(path, data_args.train_file):
            splits[split] = splits["train"]  # read once, and then preprocessed once: one dataset under two names
            continue
        with reported_as_usage_error(flag, path, fix=FIX_DATA_FILE):
            splits[split] = load_dataset(FILE_BUILDERS[file_extension(path)], data_files={split: path}, split=split,
                                         **hub_kwargs)
    return (IterableDatasetDict if data_args.streaming else DatasetDict)(splits)


@contextmanager
def reported_as_usage_error(flag, name, fix="give a local folder, or a hub name while online"):
    """Turn a failed load of a hub name or local path into one line naming the flag."""
    try:
        yield
    except (OSError, ValueError, TypeError, ConnectionError, DatasetGenerationError, SafetensorError) as error:
        # datasets wraps the reader's own error, which says what is wrong with the file.
        reason = first_line(error.__cause__ if isinstance(error, DatasetGenerationError) and error.__cause__ else error)
        raise UsageError(f"{flag} {name} could not be loaded ({shorten(reason)}); {fix}.") from None


def data_source(data_args, split):
    """The flag and value that the given split's data comes from."""
    if data_args.dataset_name is not None:
        return "--dataset_name", data_args.dataset_name
    if split == "validation" and data_args.validation_file is not None:
        return "--validation_file", data_args.validation_file
    return "--train_file", data_args.train_file


def select_texts(raw_datasets, data_args):
    """Give every split one column, `text`, taken from its `text` column or else its first one, without empty
    texts (None or "", and with --line_by_line lines of only whitespace too). Data with no text is refused."""
    selected = {}  # by dataset: a file serving as both splits is read and preprocessed once
    for split, dataset in raw_datasets.items():
        if id(dataset) not in selected:
            selected[id(dataset)] = texts_of(dataset, split, data_args)
    return type(raw_datasets)({split: selected[id(dataset)] for split, dataset in raw_datasets.items()})


def texts_of(dataset, split, data_args):
    flag, name = data_source(data_args, split)
    text_column = text_column_of(dataset, split, flag, name)
    dataset = dataset.select_columns([text_column])
    if text_column != "text":
        dataset = dataset.rename_column(text_column, "text")
    # Whitespace is text where texts are concatenated (line breaks), but no example on its own line.
    skip_blank = getattr(data_args, "line_by_line", False)
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.filter(lambda example: bool(example["text"]) and not (skip_blank and example["text"].isspace()))
    texts = dataset.with_format("arrow")["text"]
    if not pa.types.is_string(texts.type) and not pa.types.is_large_string(texts.type):
        texts = texts.cast(pa.string())  # a csv column of empty cells alone is read as numbers, all null
    empty = pc.fill_null(pc.equal(pc.utf8_length(texts), 0), True)
    blank = pc.or_(empty, pc.fill_null(pc.utf8_is_space(texts), True))
    if pc.all(blank).as_py():
        raise UsageError(
            f"The {split} data ({flag} {name}) has no text: all its {len(dataset):,} texts in column "
            f"'{text_column}' are empty or whitespace; check the file and its text column."
        )
    kept = np.flatnonzero(pc.invert(blank if skip_blank else empty).to_numpy(zero_copy_only=False))
    if len(kept) < len(dataset):
        logger.info(f"Skipping {len(dataset) - len(kept):,} empty texts of the {split} data.")
        dataset = dataset.select(kept)
    return dataset


def text_column_of(dataset, split, flag, name):
    """The `text` column, else the first one; it must hold text (a stream's columns are known once it is read)."""
    with reported_as_usage_error(flag, name, fix=FIX_DATA_FILE):  # the first read of a stream
        columns = dataset.column_names or list(next(iter(dataset)).keys())
    text_column = "text" if "text" in columns else columns[0]
    feature = (dataset.features or {}).get(text_column)  # streamed json/csv: unknown until read
    all_missing = not isinstance(dataset, datasets.IterableDataset) and (
        dataset.with_format("arrow")[text_column].null_count == len(dataset))  # refused for that, in texts_of
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string") and not all_missing:
        raise UsageError(
            f"The {split} data's text column '{text_column}' holds {feature}, not text; name the text column "
            "'text' or put it first."
        )
    return text_column


def is_saved_dataset(path):
    folder = Path(path)
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def carve_validation_split(train, percentage):
    if isinstance(train, datasets.IterableDataset):
        # A stream has no length to take a percentage of, so every n-th example goes to validation instead.
        every = max(2, round(100 / percentage))
        return IterableDatasetDict(
            train=train.filter(lambda _, index: index % every != 0, with_indices=True),
            validation=train.filter(lambda _, index: index % every == 0, with_indices=True),
        )
    held_out = math.ceil(len(train) * percentage / 100)
    if held_out >= len(train):
        raise UsageError(
            f"The training data has {len(train)} texts, too few to hold out {percentage}% for validation; "
            "pass --validation_file or more data."
        )
    return DatasetDict(train=train.select(range(held_out, len(train))), validation=train.select(range(held_out)))


def load_config(model_args):
    hub_kwargs = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    if model_args.config_name or model_args.model_name_or_path:
        flag, name = ("--config_name", model_args.config_name) if model_args.config_name else (
            "--model_name_or_path", model_args.model_name_or_path)
        with reported_as_usage_error(flag, name, fix=FIX_MODEL_FOLDER):
            return AutoConfig.from_pretrained(name, **hub_kwargs)
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


def load_tokenizer(model_args):
    flag, name = ("--tokenizer_name", model_args.tokenizer_name) if model_args.tokenizer_name else (
        "--model_name_or_path", model_args.model_name_or_path)
    with reported_as_usage_error(flag, name):
        tokenizer = AutoTokenizer.from_pretrained(
            name,
            cache_dir=model_args.cache_dir,
            use_fast=model_args.use_fast_tokenizer,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
        )
    if tokenizer.mask_token is None:
        raise UsageError(
            f"{flag} {name} has no mask token, so it cannot train a masked language model; use the tokenizer of "
            "one such as roberta-base or bert-base-uncased (or run_clm.py for causal language modeling)."
        )
    return tokenizer


def load_model(model_args, config, tokenizer):
    if model_args.model_name_or_path:
        dtype = model_args.torch_dtype
        if dtype not in ("auto", None):
            dtype = getattr(torch, dtype)
        quantization = quantization_config(model_args)
        with reported_as_usage_error("--model_name_or_path", model_args.model_name_or_path, fix=FIX_MODEL_FOLDER):
            model = AutoModelForMaskedLM.from_pretrained(
                model_args.model_name_or_path,
                config=config,
                cache_dir=model_args.cache_dir,
                revision=model_args.model_revision,
                token=model_args.token,
                trust_remote_code=model_args.trust_remote_code,
                dtype=torch.float32 if quantization else dtype,
                low_cpu_mem_usage=model_args.low_cpu_mem_usage,
                quantization_config=quantization,
            )
    else:
        take_special_tokens_from(tokenizer, config)
        model = AutoModelForMaskedLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
        logger.info(f"New model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    # Models whose class name does not say their task leave transformers to guess the loss, with a warning, and its
    # guess is the causal LM loss.
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForMaskedLM"
    # A tokenizer with more tokens than the model's embedding would index past it; fewer tokens are harmless.
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return model


def quantization_config(model_args):
    """bitsandbytes settings for --load_in_4bit (QLoRA's NF4 with double quantization) or --load_in_8bit, else None.

    The layers left unquantized (embeddings, norms, the head) are loaded in float32, the adapter's dtype: transformers
    would load them in float16 otherwise, which the adapter's layers cannot take as input.
    """
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(is_not_int8_cast_notice)
    return BitsAndBytesConfig(
        load_in_4bit=model_args.load_in_4bit,
        load_in_8bit=model_args.load_in_8bit,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


def is_not_int8_cast_notice(record):
    # LLM.int8 always quantizes a layer's input by way of float16; bitsandbytes says so at every matrix product.
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")
def take_special_tokens_from(tokenizer, config):
    # A new config has the special token ids of its model type's own vocabulary (GPT-2's 50256), which the Trainer
    # would replace by the tokenizer's, with a warning, once the model is built.
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, key) is not None:
            setattr(config, key, getattr(tokenizer, key))


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
    # Activating the first adapter opens a forward context before the adapter is active, and adapters warns that
    # none is: a false alarm.
    with log_message_dropped("adapters.model_mixin", "There are adapters available but none are activated"):
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
    loaded = {tensor.data_ptr() for key, tensor in state.items() if key not in missing}
    misfits = loading_info.get("unexpected_keys", []) + [
        key for key in missing if key not in state or state[key].data_ptr() not in loaded]
    if misfits:
        raise UsageError(
            f"{flag} {location} does not fit this {model.config.model_type} model: {len(misfits)} weights have no "
            f"place in it, e.g. {misfits[0]}; {FIX_ADAPTER}."
        )
    return name
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
    """Refuse now, before any data is read, what adapters cannot do with this adapter: merge it, or run it quantized."""
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
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    if quantized and any(isinstance(module, LoRAMergedLinear) for module in model.modules()):
        flag = quantization_flag(model_args)
        raise UsageError(
            f"{flag} does not work on a {model.config.model_type} model: adapters {adapters.__version__} wraps its "
            "fused query/key/value projection in a layer that cannot compute with quantized weights; drop "
            f"{flag}, or use a model with separate projections such as Llama or RoBERTa."
        )


def can_merge(config):
    # adapters' merge_adapter folds the weight changes of LoRA-style methods into the layers they change, and silently
    # skips every other method; it refuses gates (UniPELT), and folds MTL-LoRA into weights of the wrong shape.
    components = config.configs if isinstance(config, ConfigUnion) else [config]
    return all(isinstance(component, LoRAConfig) and not isinstance(component, MTLLoRAConfig)
               and not component.use_gating for component in components)


def choose_max_seq_length(data_args, tokenizer, config):
    limits = [tokenizer.model_max_length]
    if getattr(config, "max_position_embeddings", None):
        positions = config.max_position_embeddings
        if config.model_type in POSITIONS_AFTER_PADDING:
            positions -= config.pad_token_id + 1
        limits.append(positions)
    limit = min(limits)
    # A line's own special tokens (<s> and </s>) take part of its length and are never masked.
    shortest = tokenizer.num_special_tokens_to_add() + 1 if data_args.line_by_line else 2
    if data_args.max_seq_length is not None and data_args.max_seq_length < shortest:
        raise UsageError(
            f"--max_seq_length {data_args.max_seq_length} leaves no token to mask in a line after its "
            f"{shortest - 1} special tokens; give at least {shortest}."
        )
    if data_args.max_seq_length is None:
        return min(MAX_DEFAULT_SEQ_LENGTH, limit)
    if data_args.max_seq_length > limit:
        logger.warning(
            f"--max_seq_length {data_args.max_seq_length} is longer than the model and tokenizer allow; using {limit}."
        )
        return limit
    return data_args.max_seq_length


def preprocess(raw_datasets, tokenizer, max_seq_length, data_args, training_args):
    """Tokenize the texts into examples of max_seq_length tokens: one per line, or concatenated and cut."""
    if data_args.line_by_line:
        padding = "max_length" if data_args.pad_to_max_length else False
        tokenizer_kwargs = {"padding": padding, "truncation": True, "max_length": max_seq_length}
    else:
        tokenizer_kwargs = {"return_attention_mask": False}  # group_texts makes them

    def tokenize(examples):
        # verbose=False: texts longer than the model's limit are expected, grouping cuts them into blocks afterwards.
        # The special-tokens mask keeps <s>, </s> and padding out of the masking.
        return tokenizer(examples["text"], return_special_tokens_mask=True, verbose=False, **tokenizer_kwargs)

    map_kwargs, tokenize_kwargs = {}, {}
    if not data_args.streaming:
        map_kwargs = {"load_from_cache_file": not data_args.overwrite_cache}
        # Only tokenizing is worth worker processes: starting a pool takes longer than grouping a corpus of
        # millions of tokens in Arrow.
        tokenize_kwargs = {"num_proc": data_args.preprocessing_num_workers}
    # The same dataset as training and validation (see load_raw_datasets) is preprocessed once.
    shared_validation = "train" in raw_datasets and raw_datasets.get("validation") is raw_datasets["train"]
    if shared_validation:
        raw_datasets = type(raw_datasets)(train=raw_datasets["train"])
    with training_args.main_process_first(desc="tokenizing and grouping"):
        tokenized = raw_datasets.map(
            tokenize, batched=True, remove_columns=["text"], **map_kwargs, **tokenize_kwargs,
            **describe("Tokenizing", data_args),
        )
        lm_datasets = tokenized if data_args.line_by_line else tokenized.with_format("arrow").map(
            group_texts, batched=True, fn_kwargs={"block_size": max_seq_length}, **map_kwargs,
            **describe(f"Grouping texts in blocks of {max_seq_length}", data_args),
        ).with_format(None)
    for split, dataset in lm_datasets.items():
        if next(iter(dataset), None) is None:
            raise UsageError(no_block_message(split, tokenized[split], max_seq_length, data_args))
    if shared_validation:
        lm_datasets["validation"] = lm_datasets["train"]
    return lm_datasets


def group_texts(batch, block_size):
    """Concatenate a batch of tokenized texts (an Arrow table) and cut it into blocks of block_size tokens.

    Each batch is cut on its own, dropping at most block_size - 1 tokens: the blocks of the list-chaining
    group_texts of the Hugging Face examples, in the same order, but no token ever becomes a Python object.
    Concatenated text is attended everywhere, so the attention mask is made here instead of tokenized.
    """
    columns = {name: pc.list_flatten(batch.column(name)).to_numpy() for name in batch.column_names}
    usable = len(columns["input_ids"]) // block_size * block_size
    columns["attention_mask"] = np.ones(usable, dtype=np.int8)
    return pa.table({
        name: pa.FixedSizeListArray.from_arrays(tokens[:usable], block_size) for name, tokens in columns.items()
    })


def describe(description, data_args):
    # Progress bars come with `desc`; streamed datasets are processed lazily and take no such argument.
    return {} if data_args.streaming else {"desc": description}


def no_block_message(split, tokenized_split, max_seq_length, data_args):
    if data_args.line_by_line:
        return f"The {split} data has no non-empty line to make an example of; check the file and its text column."
    if data_args.streaming:
        size = "too few tokens"
    else:
        size = f"{sum(len(ids) for ids in tokenized_split['input_ids']):,} tokens in {len(tokenized_split):,} texts"
    return (
        f"The {split} data has {size}, not enough for one block of {max_seq_length} tokens; "
        "pass a smaller --max_seq_length, --line_by_line, or more data."
    )


def select_samples(lm_datasets, data_args):
    train_dataset = take_first(lm_datasets.get("train"), data_args.max_train_samples)
    eval_dataset = take_first(lm_datasets.get("validation"), data_args.max_eval_samples)
    return train_dataset, eval_dataset


def take_first(dataset, count):
    if dataset is None or count is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(count)
    return dataset.select(range(min(count, len(dataset))))


def preprocess_logits_for_metrics(logits, labels):
    # Keep only the predicted token ids and each token's loss: gathering full logits over an eval set would need
    # vocab-size times the memory.
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1), token_losses(logits, labels)


def token_losses(logits, labels):
    """The cross-entropy of each labelled token, 0 where the label is -100; in float32 whatever the model's dtype."""
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
    return losses.view_as(labels)


def mean_token_loss(token_losses, labels):
    """The eval loss as the mean over all labelled tokens. The Trainer's own is a mean of batch means, which moves
    with the eval batch size and the number of processes whenever batches differ in their number of labelled tokens
    (masked LM batches always do, a short last batch does for any model)."""
    counted = labels != -100
    return float(token_losses[counted].sum(dtype=np.float64) / counted.sum())


def compute_metrics(eval_prediction):
    (predictions, losses), labels = eval_prediction
    # Only the masked positions carry a label; every other position is -100.
    counted = labels != -100
    accuracy = float((predictions[counted] == labels[counted]).mean())
    return {"accuracy": accuracy, "loss": mean_token_loss(losses, labels)}  # "loss" replaces the Trainer's eval_loss


def loss_per_masked_token(outputs, labels, num_items_in_batch=None):
    """The training loss per masked token of the whole step, over every process and accumulated batch, as one process
    with all of it would compute it: the model's own loss is a mean per batch, and batches differ in their number of
    masked tokens. The Trainer counts the step's masked tokens (over all processes, unless
    --average_tokens_across_devices false) and scales the loss by the number of processes, whose gradients are
    averaged."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    count = (labels != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return token_losses(logits, labels).sum() / count


class MaskingCollator(DataCollatorForLanguageModeling, TrainerCallback):
    """Masks training examples afresh in every epoch; validation examples, masked once beforehand, are only padded.

    Each training example's masks come from a generator seeded by the run's seed, the epoch and the example's own
    tokens (before padding), never from the global random state nor from the rest of the batch: the Trainer restores
    the global random state on resume only after it has collated the first batch, data loader workers each have
    their own, and the rest of the batch changes with the batch size and the number of processes. So a run masks
    the same whether resumed or not, on any number of processes and with any batch size. (Identical examples are
    masked alike within an epoch.)
    """

    epoch = 0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch = math.floor(state.epoch or 0)  # state.epoch counts fractions of an epoch, restored on resume

    def torch_call(self, examples):
        if "labels" not in examples[0]:
            examples = [self.mask_example(example) for example in examples]
        labels = [example["labels"] for example in examples]
        inputs = [{key: value for key, value in example.items() if key != "labels"} for example in examples]
        # Without the tip that a fast tokenizer pads faster when it tokenizes: these examples are tokenized already.
        batch = pad_without_fast_tokenizer_warning(
            self.tokenizer, inputs, return_tensors="pt", pad_to_multiple_of=self.pad_to_multiple_of
        )
        length = batch["input_ids"].shape[1]
        padded = [
            [-100] * (length - len(row)) + list(row) if self.tokenizer.padding_side == "left"
            else list(row) + [-100] * (length - len(row))
            for row in labels
        ]
        batch["labels"] = torch.tensor(padded, dtype=torch.long)
        return batch

    def mask_example(self, example):
        tokens = torch.tensor([example["input_ids"]], dtype=torch.long)
        salt = f"{self.seed}/{self.epoch}".encode()
        digest = hashlib.blake2b(tokens.numpy().tobytes(), digest_size=8, key=salt).digest()
        self.generator = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
        # The tokenizer tells the special tokens, padding included, which are never masked: the Trainer has dropped
        # the special_tokens_mask column, an input the model does not take.
        input_ids, labels = self.torch_mask_tokens(tokens)
        inputs = {key: value for key, value in example.items() if key != "special_tokens_mask"}
        return {**inputs, "input_ids": input_ids[0].tolist(), "labels": labels[0].tolist()}


def mask_eval_dataset(eval_dataset, tokenizer, data_args, seed):
    """Mask the validation examples once, identically for every run with this seed, so eval losses compare."""
    if eval_dataset is None:
        return None
    masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=data_args.mlm_probability)

    def mask(example, index):
        # A generator per example, seeded by its position: the masks depend on neither batching nor workers.
        masker.generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        input_ids, labels = masker.torch_mask_tokens(
            torch.tensor([example["input_ids"]]), special_tokens_mask=torch.tensor([example["special_tokens_mask"]])
        )
        return {"input_ids": input_ids[0].tolist(), "labels": labels[0].tolist()}

    masked = eval_dataset.map(
        mask, with_indices=True, remove_columns=["special_tokens_mask"],
        **describe("Masking validation data", data_args),
    )
    if not isinstance(masked, datasets.IterableDataset) and not pc.any(
            pc.not_equal(pc.list_flatten(masked.with_format("arrow")["labels"]), -100)).as_py():
        raise UsageError(
            f"The validation data has no token to evaluate: none of its {len(masked):,} examples got a masked token "
            "(they hold only special tokens, or are very short); give more text or a larger --mlm_probability."
        )
    return masked


class PromptLabelCollator:
    """Gives the virtual tokens of prompt tuning the label -100: the model's output is longer than its input by
    the prompt, and the loss and the metrics need labels of the same length."""

    def __init__(self, collator, start, length):
        self.collator, self.start, self.length = collator, start, length

    def __call__(self, examples):
        batch = self.collator(examples)
        labels = batch["labels"]
        prompt = labels.new_full((labels.shape[0], self.length), -100)
        batch["labels"] = torch.cat([labels[:, : self.start], prompt, labels[:, self.start :]], dim=1)
        return batch


def with_prompt_labels(collator, model):
    prompt_tuning = getattr(model.base_model, "prompt_tuning", None)
    active = getattr(model, "active_adapters", None)
    if prompt_tuning is None or not active or active.first() not in prompt_tuning.prompt_tunings:
        return collator  # adapters applies the prompt of the first active adapter only
    config = model.adapters_config.match(active.first(), PromptTuningConfig)
    return PromptLabelCollator(collator, 1 if config.combine == "prefix_after_bos" else 0, config.prompt_length)


def build_data_collator(tokenizer, model, data_args, training_args):
    # Batches padded to a multiple of 8 let fp16/bf16 matrix kernels run at full speed.
    pad_to_multiple_of_8 = (
        data_args.line_by_line and not data_args.pad_to_max_length and (training_args.fp16 or training_args.bf16)
    )
    masking_collator = MaskingCollator(
        tokenizer=tokenizer,
        mlm_probability=data_args.mlm_probability,
        pad_to_multiple_of=8 if pad_to_multiple_of_8 else None,
        seed=training_args.seed,
    )
    return with_prompt_labels(masking_collator, model)


def check_adapter_trains(model, tokenizer, data_collator, model_args, training_args, adapter_args):
    """One forward and backward pass on a sentence: a method this model cannot train is refused now, in seconds,
    and so is a model that cannot compute at all in the chosen dtype, naming the flags that set it."""
    if not adapter_args.train_adapter:
        return
    if model.dtype != torch.float32 and not (training_args.bf16 or training_args.fp16):
        raise UsageError(
            f"--torch_dtype {model_args.torch_dtype} loads the base model in {model.dtype} while the adapter trains "
            "in float32: add --bf16 (or --fp16 on a GPU) to compute in mixed precision, or drop --torch_dtype."
        )
    example = tokenizer("Adapters are checked on one short sentence before any training starts.")
    example["labels"] = list(example["input_ids"])
    random_state = torch.get_rng_state()
    batch = data_collator([example])
    model.eval()  # no dropout: the check draws no random numbers that training would have drawn
    try:
        with half_precision_autocast(model):
            model(**batch).loss.backward()
    except TRIAL_STEP_ERRORS as error:
        if model.dtype != torch.float32 and not runs_without_adapter(model, batch):
            raise UsageError(
                f"The {model.config.model_type} model cannot compute in {model.dtype} here "
                f"({shorten(first_line(error))}); check --torch_dtype, --bf16/--fp16 and --use_cpu."
            ) from None
        raise UsageError(cannot_train_message(adapter_args, model, error)) from None
    finally:
        torch.set_rng_state(random_state)
        model.train()
    reached = any(parameter.grad is not None for parameter in model.parameters() if parameter.requires_grad)
    model.zero_grad(set_to_none=True)
    if not reached:
        raise UsageError(cannot_train_message(
            adapter_args, model, "none of its weights reach the loss: its settings leave out every layer, or it "
            "sits under a language adapter that only the first adapter of a stack can use"))


def half_precision_autocast(model):
    # A base model loaded in half precision trains under autocast (--bf16/--fp16); the check runs on the CPU,
    # before the Trainer moves the model, so it computes there in the base model's dtype.
    return torch.autocast("cpu", dtype=model.dtype, enabled=model.dtype in (torch.bfloat16, torch.float16))


def runs_without_adapter(model, batch):
    """Whether the base model alone computes the batch: if not, the adapter is not what fails."""
    active = model.active_adapters
    model.set_active_adapters(None)
    try:
        with torch.no_grad(), half_precision_autocast(model):
            model(input_ids=batch["input_ids"])
    except TRIAL_STEP_ERRORS:
        return False
    finally:
        model.set_active_adapters(active)
    return True


class LanguageModelingTrainer(Trainer):
    """The Trainer, except that a resumed run reports the train_loss of the uninterrupted run: the Trainer divides
    the losses of this session alone by all steps, so every checkpoint here keeps the sum of the losses before it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(LogLossWhereItCounts)
        self.loss_sum_before_resume = 0.0

    def train(self, resume_from_checkpoint=None, **kwargs):
        loss_file = Path(resume_from_checkpoint or "") / LOSS_SUM_FILE
        self.loss_sum_before_resume = json.loads(loss_file.read_text())["loss_sum"] if (
            resume_from_checkpoint and loss_file.is_file()) else 0.0
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        train_loss = self.loss_sum() / max(self.state.global_step, 1)
        output.metrics["train_loss"] = train_loss
        self.state.log_history[-1]["train_loss"] = train_loss  # the summary that train() logged last
        return output._replace(training_loss=train_loss)

    def loss_sum(self):
        return self.loss_sum_before_resume + self._total_loss_scalar

    def _save_checkpoint(self, model, trial):
        # Written before trainer_state.json, which marks a checkpoint complete (see is_complete_checkpoint).
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / LOSS_SUM_FILE).write_text(json.dumps({"loss_sum": self.loss_sum()}))
        super()._save_checkpoint(model, trial)


class LogLossWhereItCounts(TrainerCallback):
    """Has the Trainer log the training loss at every checkpoint and at the last step. Only a log averages the loss
    over the processes and adds it to the sum that train_loss comes from: the steps since the last log would
    otherwise be counted from this process alone, and left out of the sum that a checkpoint keeps."""

    def on_step_end(self, args, state, control, **kwargs):
        control.should_log = control.should_log or control.should_save or state.global_step >= state.max_steps

    on_epoch_end = on_step_end


class AdapterOnlyTrainer(LanguageModelingTrainer, AdapterTrainer):
    """Saves and restores exactly the trained adapter, as safetensors unless --save_safetensors false: no head
    (with tied embeddings as large as the vocabulary matrix) and no frozen language adapter."""

    def __init__(self, *args, adapter_name, **kwargs):
        self.adapter_name = adapter_name
        super().__init__(*args, **kwargs)

    def _save(self, output_dir=None, state_dict=None):
        output_dir = Path(output_dir or self.args.output_dir)
        # A state_dict comes only under FSDP or DeepSpeed: gathered from the shards that each process holds.
        save_adapter_files(self.model, output_dir / self.adapter_name, self.adapter_name, self.args.save_safetensors,
                           gathered_state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, output_dir / "training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self.load_trained_adapter(Path(resume_from_checkpoint) / self.adapter_name)

    def _load_best_model(self):
        self.load_trained_adapter(Path(self.state.best_model_checkpoint) / self.adapter_name)

    def load_trained_adapter(self, folder):
        # Loading over the adapter in training is the point here, so adapters' warning that it does is noise.
        with log_message_dropped("adapters.loading", "Overwriting existing adapter"):
            load_saved_adapter(self.model, "--resume_from_checkpoint", str(folder), load_as=self.adapter_name)

    def push_to_hub(self, commit_message="End of training", blocking=True, token=None, revision=None, **card):
        """Publish the adapter where `model.load_adapter("user/repo")` looks for it: its files and a model card at
        the root of the repository. The Trainer's own push uploads output_dir, where the adapter is a subfolder."""
        self.create_model_card(**card)
        if not self.is_world_process_zero():
            return None
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token)
        folder = Path(self.args.output_dir) / self.adapter_name
        save_adapter_files(self.model, folder, self.adapter_name, self.args.save_safetensors)
        (folder / "README.md").write_text(adapter_card(self, card))
        return HfApi(token=token).upload_folder(
            repo_id=self.hub_model_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision or self.args.hub_revision,
            run_as_future=not blocking,
            # A weights file in the other format, from an earlier push, would otherwise be loaded instead.
            delete_patterns=["adapter.safetensors", "pytorch_adapter.bin"],
        )


@contextmanager
def log_message_dropped(logger_name, message_start):
    """Silence one known message of a library's logger while the block runs, and nothing else."""
    def keep(record):
        return not record.getMessage().startswith(message_start)

    library_logger = logging.getLogger(logger_name)
    library_logger.addFilter(keep)
    try:
        yield
    finally:
        library_logger.removeFilter(keep)


def save_adapter_files(model, folder, adapter_name, use_safetensors, gathered_state_dict=None):
    """Write the adapter as adapters' save_adapter does (adapter_config.json and the weights, no head), but name
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
        identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if identity not in seen:
            seen.add(identity)
            unique[key] = tensor.contiguous()
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if use_safetensors:
        save_file(unique, folder / "adapter.safetensors")
    else:
        torch.save(unique, folder / "pytorch_adapter.bin")
    if interface := getattr(model.base_model, "adapter_interface", None):
        # As save_adapter does: the layer names that the adapter's weights are named after, for --adapter_interface.
        interface._save(str(folder), model.config)


def adapter_card(trainer, card):
    """The hub repository's README.md: what the adapter adapts, how well it did, and how to load it."""
    model = trainer.model
    # The Trainer's save_model pushes too, without the card's details, which publish() fills in afterwards.
    base_model = card.get("finetuned_from") or model.name_or_path
    metadata = ModelCardData(
        base_model=base_model if base_model and not os.path.isdir(base_model) else None,  # the hub takes hub names
        library_name="adapter-transformers",
        pipeline_tag=card.get("tasks"),
        tags=[tag for tag in ("adapter-transformers", model.config.model_type, card.get("tasks")) if tag],
        datasets=card.get("dataset_tags"),
    )
    method = type(model.adapters_config.get(trainer.adapter_name)).__name__
    trained_on = f" on {card['dataset']}" if card.get("dataset") else ""
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    results = ""
    if evaluations:
        last = evaluations[-1]
        results = f"Evaluation: loss {last['eval_loss']:.4f}, perplexity {math.exp(min(last['eval_loss'], 700)):.2f}"
        results += f", accuracy {last['eval_accuracy']:.4f}.\n\n" if "eval_accuracy" in last else ".\n\n"
    model_class = type(model).__name__
    base_name = base_model or "path/to/the/base/model"  # a model built from scratch has no name to load it by
    return (
        f"---\n{metadata.to_yaml()}\n---\n\n# {trainer.hub_model_id}\n\n"
        f"An adapter of the [adapters](https://docs.adapterhub.ml) library ({method}, settings in "
        f"`adapter_config.json`) for `{base_name}`, trained with `{Path(__file__).name}`{trained_on}. The base "
        f"model stays as it is: load it, then the adapter.\n\n{results}"
        f"```python\nimport adapters\nfrom transformers import {model_class}\n\n"
        f'model = {model_class}.from_pretrained("{base_name}")\nadapters.init(model)\n'
        f'model.load_adapter("{trainer.hub_model_id}", set_active=True)\n```\n'
    )


def build_trainer(model, tokenizer, data_collator, train_dataset, eval_dataset, training_args, adapter_args):
    trainer_class = LanguageModelingTrainer
    trainer_kwargs = {}
    # Also for an adapter that is only evaluated: the Trainer refuses a quantized model without one.
    if uses_adapter(adapter_args):
        trainer_class, trainer_kwargs = AdapterOnlyTrainer, {"adapter_name": adapter_args.adapter_name}
    return trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=data_collator,
        compute_metrics=compute_metrics if training_args.do_eval else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if training_args.do_eval else None,
        # The Trainer would skip --label_smoothing_factor for a compute_loss_func: a smoothed run keeps its loss.
        compute_loss_func=None if training_args.label_smoothing_factor else loss_per_masked_token,
        # The masking collator learns the epoch from the Trainer, so that every epoch masks the text differently.
        callbacks=[getattr(data_collator, "collator", data_collator)],
        **trainer_kwargs,
    )


def add_early_stopping(trainer, evaluation_args):
    if evaluation_args.early_stopping_patience is not None:
        trainer.add_callback(EarlyStoppingCallback(
            evaluation_args.early_stopping_patience, evaluation_args.early_stopping_threshold
        ))
def check_sharding(trainer, adapter_args):
    """Refuse before training a sharding mode whose adapter could not be saved whole, and say so when a launcher's
    FSDP or DeepSpeed configuration does not apply."""
    for name, enabled in (("FSDP", trainer.is_fsdp_enabled), ("DeepSpeed", trainer.is_deepspeed_enabled)):
        if os.environ.get(f"ACCELERATE_USE_{name.upper()}", "false").lower() == "true" and not enabled:
            logger.warning(
                f"{name} is configured, but accelerate runs it on GPUs and other accelerators only: on CPUs this run "
                "is plain data parallel, each process holding the whole model."
            )
    if not adapter_args.train_adapter:
        return
    state = trainer.accelerator.state
    if trainer.is_fsdp_enabled and state.fsdp_plugin.fsdp_version != 2:
        raise UsageError(
            "--train_adapter under FSDP needs fsdp_version: 2 in the accelerate config: with FSDP1 the adapter cannot "
            "be saved from the sharded model (configs/fsdp.yaml is a configuration that works)."
        )
    if trainer.is_fsdp_enabled and "FULL_STATE_DICT" not in str(state.fsdp_plugin.state_dict_type):
        raise UsageError(
            f"--train_adapter under FSDP with {state.fsdp_plugin.state_dict_type} would save no adapter; set "
            "fsdp_state_dict_type: FULL_STATE_DICT in the accelerate config."
        )
    zero = state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}) if trainer.is_deepspeed_enabled else {}
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise UsageError(
            "--train_adapter under DeepSpeed ZeRO-3 needs \"stage3_gather_16bit_weights_on_model_save\": true in "
            "zero_optimization of the DeepSpeed config, or the adapter cannot be gathered to be saved."
        )


def train(trainer, train_dataset, last_checkpoint, training_args):
    checkpoint = training_args.resume_from_checkpoint or last_checkpoint
    with cache_off_while_checkpointing(trainer.model, training_args):
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()  # with an AdapterTrainer: the adapter alone, in <output_dir>/<adapter_name>/
    metrics = train_result.metrics
    if not isinstance(train_dataset, datasets.IterableDataset):
        metrics["train_samples"] = len(train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


@contextmanager
def cache_off_while_checkpointing(model, training_args):
    """A model trained with gradient checkpointing keeps no cache of attention keys and values; asked for one, it
    warns at the first step that it will not. The model's own setting is back once training ends."""
    use_cache = getattr(model.config, "use_cache", None)
    if training_args.gradient_checkpointing and use_cache:
        model.config.use_cache = False
    try:
        yield
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache


def evaluate(trainer, eval_dataset):
    metrics = trainer.evaluate()
    if not isinstance(eval_dataset, datasets.IterableDataset):
        metrics["eval_samples"] = len(eval_dataset)
    metrics["perplexity"] = perplexity(metrics["eval_loss"])
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return metrics


def write_samples(trainer, tokenizer, raw_datasets, max_length, evaluation_args, training_args, adapter_args):
    """Show what the model now does on a few prompts, the base model (adapters off) beside the adapted one, and
    write them to <output_dir>/samples.jsonl. Greedy and without dropout: the same model gives the same samples."""
    if evaluation_args.num_samples == 0 or not trainer.is_world_process_zero():
        return None
    texts = sample_texts(raw_datasets, tokenizer, evaluation_args)
    if not texts:
        return None
    model = trainer.model
    records, prompts = zip(*(sample_prompt(tokenizer, text, max_length) for text in texts))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if uses_adapter(adapter_args):
            with adapters_off(model):
                outputs = {"base": [complete_sample(model, tokenizer, prompt) for prompt in prompts]}
            outputs["adapted"] = [complete_sample(model, tokenizer, prompt) for prompt in prompts]
        else:
            outputs = {"output": [complete_sample(model, tokenizer, prompt) for prompt in prompts]}
    model.train(was_training)
    samples = [{**record, **{key: values[index] for key, values in outputs.items()}}
               for index, record in enumerate(records)]
    path = Path(training_args.output_dir) / "samples.jsonl"
    path.write_text("".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples))
    return path, samples


def sample_texts(raw_datasets, tokenizer, evaluation_args):
    """The prompts of --sample_prompts, or else the beginnings of the first validation texts."""
    count = evaluation_args.num_samples
    if evaluation_args.sample_prompts is not None:
        return read_prompts(evaluation_args.sample_prompts)[:count]
    validation = raw_datasets.get("validation")
    if validation is None:
        return []
    texts = []
    for example in validation:
        text = example["text"].strip()
        if text:
            beginning = tokenizer(text, add_special_tokens=False)["input_ids"][:SAMPLE_PROMPT_TOKENS]
            texts.append(tokenizer.decode(beginning))
        if len(texts) == count:
            break
    return texts


@contextmanager
def adapters_off(model):
    trained_setup, skip_layers = model.active_adapters, model.adapters_config.skip_layers
    # Switching back passes through a moment without adapters too, which adapters also warns about.
    with log_message_dropped("adapters.model_mixin", "There are adapters available but none are activated"):
        model.set_active_adapters(None)
        try:
            yield
        finally:
            model.set_active_adapters(trained_setup, skip_layers=skip_layers)


def sample_prompt(tokenizer, text, max_length):
    """The prompt's own mask tokens to fill, or else evenly spaced tokens of it, masked; the record shows the
    masked prompt and, where the script masked it, the original text."""
    ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    masked = [index for index, token in enumerate(ids) if token == tokenizer.mask_token_id]
    original = None
    if not masked:
        words = [index for index, token in enumerate(ids) if token not in tokenizer.all_special_ids]
        count = max(1, round(len(words) * SAMPLE_MASKED_SHARE))
        step = max(1, len(words) // count)
        masked = words[step // 2::step][:count]
        original = tokenizer.decode(ids, skip_special_tokens=True)
        ids = [tokenizer.mask_token_id if index in masked else token for index, token in enumerate(ids)]
    shown = [token for token in ids if token == tokenizer.mask_token_id or token not in tokenizer.all_special_ids]
    record = {"prompt": tokenizer.decode(shown)}
    if original is not None:
        record["expected"] = original
    return record, (ids, masked)


def complete_sample(model, tokenizer, prompt):
    """The prompt with each mask replaced by the model's top prediction."""
    ids, masked = prompt
    labels = [token if index in masked else -100 for index, token in enumerate(ids)]
    # Prompt tuning puts virtual tokens before the text; its collator moves the labels to where the logits are.
    collate = with_prompt_labels(default_data_collator, model)
    batch = collate([{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}])
    at_masks = batch.pop("labels")[0] != -100
    logits = model(**{name: tensor.to(model.device) for name, tensor in batch.items()}).logits
    filled = list(ids)
    for index, token in zip(masked, logits[0, at_masks].argmax(dim=-1).tolist()):
        filled[index] = token
    return tokenizer.decode(filled, skip_special_tokens=True)
def write_merged_model(model, tokenizer, model_args, training_args, adapter_args):
    """With --merge_adapter, write <output_dir>/merged/: the model with the adapter folded into its weights as a plain
    transformers model, and the tokenizer. It must give the adapter model's logits on a sentence to be written."""
    if not (adapter_args.merge_adapter and training_args.should_save):
        return None
    adapter_model = copy_to_merge(model, tokenizer, model_args, adapter_args)
    adapter_model.eval()
    inputs = tokenizer("A merged model must say what the adapter says.", return_tensors="pt").to(adapter_model.device)
    with torch.no_grad():
        expected = adapter_model(**inputs).logits
    adapter_model.merge_adapter(adapter_args.adapter_name)
    merged = plain_model(adapter_model)
    del adapter_model
    merged.eval()
    with torch.no_grad():
        difference = (merged(**inputs).logits - expected).abs().max().item()
    # Folded weights change the order of floating-point sums: a few units of the dtype's precision, relative to the
    # logits. A forgotten or misplaced weight change is far larger.
    tolerance = max(1e-4, 4 * torch.finfo(expected.dtype).eps) * max(1.0, expected.abs().max().item())
    if difference > tolerance:
        raise RuntimeError(
            f"The merged model's logits differ from the adapter model's by {difference:.3g}, more than "
            f"{tolerance:.3g}; it was not written. The adapter itself is saved; please report this with the "
            "--adapter_config used."
        )
    folder = Path(training_args.output_dir) / "merged"
    merged.save_pretrained(folder, safe_serialization=training_args.save_safetensors)
    tokenizer.save_pretrained(folder)
    return folder


def copy_to_merge(model, tokenizer, model_args, adapter_args):
    """A copy of the model with its adapter, to merge while the trained model stays as it is. A quantized model's
    base is reloaded in full precision instead, with the trained adapter on top: merged into 4-bit or 8-bit weights,
    the adapter's change would be rounded away."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return copy.deepcopy(model)
    full_precision = replace(model_args, load_in_4bit=False, load_in_8bit=False)
    base = load_model(full_precision, load_config(full_precision), tokenizer)
    init_adapters(base, adapter_args)
    with tempfile.TemporaryDirectory() as folder:
        save_adapter_files(model, Path(folder), adapter_args.adapter_name, use_safetensors=True)
        base.load_adapter(folder, load_as=adapter_args.adapter_name, with_head=False, use_safetensors=True,
                          set_active=True)
    return base


def plain_model(model):
    """The weights of a model with adapters, without the adapters' own, in a model of its plain transformers class."""
    # adapters.init swaps the model's class for a subclass with adapters' mixins: the first class up the hierarchy
    # that comes from transformers is the plain one.
    model_class = next(cls for cls in type(model).__mro__ if cls.__module__.startswith("transformers."))
    with torch.device("meta"):  # only the names of its weights are needed: nothing is allocated
        names = model_class(model.config).state_dict().keys()
    state_dict = model.state_dict()
    return model_class.from_pretrained(
        None, config=model.config, state_dict={name: state_dict[name] for name in names}, dtype=model.dtype
    )


def publish(trainer, model_args, data_args, training_args):
    """Write a model card, and push to the hub when --push_to_hub asks for it."""
    card = {"finetuned_from": model_args.model_name_or_path, "tasks": "fill-mask"}
    if data_args.dataset_name is not None:
        card["dataset_tags"] = data_args.dataset_name
        card["dataset"] = " ".join(filter(None, [data_args.dataset_name, data_args.dataset_config_name]))
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)


def tokens_per_example(max_seq_length, data_args):
    # Line-by-line examples are padded per batch, so only fixed-length examples give an exact token count.
    fixed_length = not data_args.line_by_line or data_args.pad_to_max_length
    return max_seq_length if fixed_length else None


def plot_training_curves(trainer, training_args):
    """Draw the losses, and eval perplexity and accuracy, against steps into training_curves.png.

    Returns the line for the summary: the plot's path, or why there is none; None for a run that trained nothing.
    """
    if not (training_args.do_train and trainer.is_world_process_zero()):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: works without a display
        import matplotlib.pyplot as plt
    except ImportError:
        return "not drawn: matplotlib is missing (pip install matplotlib)"
    history = trainer.state.log_history
    train_points = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    # The final evaluation repeats the last periodic one when both fall on the last step.
    evaluations = list({entry["step"]: entry for entry in history if "eval_loss" in entry}.values())
    curves = len(evaluations) > 1
    figure, axes = plt.subplots(1, 3 if curves else 1, figsize=(15, 4) if curves else (7, 4), squeeze=False)
    loss_axes = axes[0][0]
    if train_points:
        loss_axes.plot(*zip(*train_points), label="train loss")
    if curves:
        steps = [entry["step"] for entry in evaluations]
        loss_axes.plot(steps, [entry["eval_loss"] for entry in evaluations], "o-", label="eval loss")
        perplexity_axes, accuracy_axes = axes[0][1:]
        perplexity_axes.plot(steps, [perplexity(entry["eval_loss"]) for entry in evaluations], "o-", color="tab:orange")
        perplexity_axes.set(xlabel="step", ylabel="perplexity", title="Eval perplexity")
        accuracy_axes.plot(steps, [entry["eval_accuracy"] for entry in evaluations], "o-", color="tab:green")
        accuracy_axes.set(xlabel="step", ylabel="accuracy", title="Eval accuracy")
    elif evaluations:
        [final] = evaluations
        loss_axes.text(
            0.97, 0.95,
            f"eval at step {final['step']}: loss {final['eval_loss']:.3f},\nperplexity "
            f"{perplexity(final['eval_loss']):.2f}, accuracy {final['eval_accuracy']:.4f}\n"
            "(--eval_strategy steps --eval_steps N\ndraws eval curves)",
            transform=loss_axes.transAxes, ha="right", va="top", multialignment="left",
            bbox={"facecolor": "white", "alpha": 0.8},
        )
    loss_axes.set(xlabel="step", ylabel="loss", title="Loss")
    if train_points or curves:  # a run shorter than --logging_steps logs no loss
        loss_axes.legend(loc="best" if curves else "lower left")  # a falling loss leaves the corners free
    for subplot in axes[0]:
        subplot.grid(alpha=0.3)
    figure.suptitle(str(training_args.output_dir))
    figure.tight_layout()
    path = Path(training_args.output_dir) / "training_curves.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(path)


def perplexity(loss):
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def print_summary(trainer, metrics, tokens_per_example, curves, samples, merged, training_args, adapter_args):
    """End the run with what a user looks for first: what was trained, how fast, how well, and where it went."""
    if not trainer.is_world_process_zero():
        return
    if training_args.do_train:
        lines = training_summary(trainer.model, metrics, tokens_per_example, training_args, adapter_args)
    else:
        lines = [evaluated_model_summary(trainer.model, adapter_args)]
    if training_args.do_eval:
        lines.append(evaluation_summary(trainer, metrics, training_args))
    if merged is not None:
        lines.append(f"merged model: {merged} ({megabytes(weight_files(merged))})")
    if curves is not None:
        lines.append(f"training curves: {curves}")
    if samples is not None:
        path, records = samples
        lines.append(f"samples (greedy): {path}")
        for record in records:
            width = max(map(len, record)) + 1
            lines += [f"  {key + ':':{width}} {shorten(json.dumps(text, ensure_ascii=False), 100)}"
                      for key, text in record.items()]
    tip = bf16_tip(training_args)
    if tip:
        lines.append(tip)
    print("\n".join(["***** summary *****", *(f"  {line}" for line in lines)]), flush=True)


def bf16_tip(training_args):
    """A line for the summary of an fp32 training run on a CPU with native bf16, where --bf16 is faster."""
    flags = native_bf16_flags()
    in_fp32_on_cpu = training_args.device.type == "cpu" and not (training_args.bf16 or training_args.fp16)
    if training_args.do_train and in_fp32_on_cpu and flags:
        return f"tip: this CPU has native bf16 ({', '.join(flags)}): --use_cpu --bf16 trains faster than fp32 on it"
    return None
def training_summary(model, metrics, tokens_per_example, training_args, adapter_args):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    output_dir = Path(training_args.output_dir)
    if adapter_args.train_adapter:
        saved = output_dir / adapter_args.adapter_name
        files = [path for path in saved.rglob("*") if path.is_file()]
    else:
        saved = output_dir
        files = weight_files(output_dir)
    throughput = f"{metrics['train_samples_per_second']:.1f} samples/s"
    if tokens_per_example:
        throughput += f", {metrics['train_samples_per_second'] * tokens_per_example:,.0f} tokens/s"
    return [
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)",
        f"training: {metrics['train_runtime']:.1f} s ({throughput})",
        f"saved {'adapter' if adapter_args.train_adapter else 'model'}: {saved} ({megabytes(files)})",
    ]


def evaluation_summary(trainer, metrics, training_args):
    line = (f"evaluation: {metrics['eval_runtime']:.1f} s, perplexity {metrics['perplexity']:.2f}, "
            f"accuracy {metrics['eval_accuracy']:.4f}")
    if training_args.do_train and training_args.eval_on_start:
        start = next(entry for entry in trainer.state.log_history if "eval_loss" in entry)
        line += (f" (before training: perplexity {perplexity(start['eval_loss']):.2f}, "
                 f"accuracy {start['eval_accuracy']:.4f})")
    return line


def evaluated_model_summary(model, adapter_args):
    total = sum(p.numel() for p in model.parameters())
    line = f"model: frozen, nothing trained: {total:,} parameters evaluated"
    if not uses_adapter(adapter_args):
        return line + " as loaded"
    belongs_to_adapter = AdapterLoader(model).filter_func(adapter_args.adapter_name)
    in_adapter = sum(p.numel() for name, p in model.named_parameters() if belongs_to_adapter(name))
    line += f", {in_adapter:,} ({100 * in_adapter / total:.2f}%) of them in adapter {adapter_args.adapter_name}"
    if adapter_args.load_adapter and os.path.isdir(adapter_args.load_adapter):
        files = [path for path in Path(adapter_args.load_adapter).rglob("*") if path.is_file()]
        line += f" ({adapter_args.load_adapter}, {megabytes(files)})"
    return line


def weight_files(folder):
    return [*folder.glob("*.safetensors"), *folder.glob("*.bin")]


def megabytes(files):
    return f"{sum(path.stat().st_size for path in files) / 1e6:.2f} MB"


def main(argv=None):
    model_args, data_args, training_args, adapter_args, evaluation_args = parse_arguments(argv)
    setup_logging(training_args)
    check_arguments(model_args, data_args, training_args, adapter_args, evaluation_args)
    with claimed_output_dir(training_args):
        last_checkpoint = detect_last_checkpoint(training_args)
        check_resume_checkpoint(last_checkpoint, training_args, adapter_args)
        set_seed(training_args.seed)

        config = load_config(model_args)
        tokenizer = load_tokenizer(model_args)
        raw_datasets = load_raw_datasets(model_args, data_args, training_args)
        model = load_model(model_args, config, tokenizer)
        setup_adapter(model, adapter_args)
        check_adapter_options(model, model_args, adapter_args)
        data_collator = build_data_collator(tokenizer, model, data_args, training_args)
        check_adapter_trains(model, tokenizer, data_collator, model_args, training_args, adapter_args)

        max_seq_length = choose_max_seq_length(data_args, tokenizer, config)
        lm_datasets = preprocess(raw_datasets, tokenizer, max_seq_length, data_args, training_args)
        train_dataset, eval_dataset = select_samples(lm_datasets, data_args)
        eval_dataset = mask_eval_dataset(eval_dataset, tokenizer, data_args, training_args.seed)
        trainer = build_trainer(model, tokenizer, data_collator, train_dataset, eval_dataset, training_args,
                                adapter_args)
        add_early_stopping(trainer, evaluation_args)
        check_sharding(trainer, adapter_args)

        metrics = {}
        if training_args.do_train:
            metrics.update(train(trainer, train_dataset, last_checkpoint, training_args))
        if training_args.do_eval:
            metrics.update(evaluate(trainer, eval_dataset))
        samples = write_samples(trainer, tokenizer, raw_datasets, max_seq_length, evaluation_args, training_args,
                                adapter_args)
        merged = write_merged_model(trainer.model, tokenizer, model_args, training_args, adapter_args)
        publish(trainer, model_args, data_args, training_args)
        curves = plot_training_curves(trainer, training_args)
        print_summary(trainer, metrics, tokens_per_example(max_seq_length, data_args), curves, samples, merged,
                      training_args, adapter_args)
    return metrics


def _mp_fn(index):
    # Entry point for TPU spawners such as xla_spawn.py: the same one-line errors as the command line.
    status = cli()
    if status:
        sys.exit(status)


def cli(argv=None):
    """Run from the command line: a usage error ends in one line on stderr and exit status 2, not a traceback."""
    use_cpu_process_group_under_launcher()
    try:
        main(argv)
    except UsageError as error:
        print(f"{Path(__file__).name}: error: {error}", file=sys.stderr)
        return 2
    return 0


def use_cpu_process_group_under_launcher():
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
        # torchrun on CPUs: accelerate forms a (gloo) process group over CPUs only when told to; otherwise every
        # process would train alone on all the data and write the same outputs.
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


if __name__ == "__main__":
    sys.exit(cli())
