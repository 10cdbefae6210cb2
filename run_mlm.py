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
import hashlib
import json
import logging
import math
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import transformers
from datasets import DatasetDict, IterableDatasetDict, load_dataset, load_from_disk
from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError
from safetensors.torch import save_file
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForMaskedLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.data.data_collator import pad_without_fast_tokenizer_warning

import adapters
from adapters import AdapterArguments, AdapterConfig, AdapterTrainer, ConfigUnion, PromptTuningConfig, Stack
from adapters.configuration.adapter_config import ReftConfig
from adapters.loading import AdapterLoader

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
    """Read the four argument groups from the command line, or from a single .json file of arguments."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments, AdapterGroupArguments),
                            every_flag="--help-all" in argv)
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            arguments = parser.parse_dict(read_json_arguments(Path(argv[0])))
        else:
            arguments = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # unknown flags or JSON keys, or a combination that TrainingArguments rejects
        raise UsageError(f"{first_line(error)}; see --help for the flags and their values.") from None
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


def check_arguments(model_args, data_args, training_args, adapter_args):
    """Refuse mistakes before anything slow happens, each with one sentence naming the flag and the fix."""
    check_model_arguments(model_args)
    check_data_arguments(data_args, training_args)
    check_training_arguments(training_args)
    check_adapter_arguments(adapter_args, training_args)
    check_hub_is_reachable(model_args, data_args, adapter_args)


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
    if data_args.max_seq_length is not None and data_args.max_seq_length < 1:
        raise UsageError(f"--max_seq_length {data_args.max_seq_length} must be a positive number of tokens.")
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
    if training_args.resume_from_checkpoint and not is_complete_checkpoint(training_args.resume_from_checkpoint):
        raise UsageError(
            f"--resume_from_checkpoint {training_args.resume_from_checkpoint} is not a complete checkpoint; give a "
            "checkpoint folder with a trainer_state.json, such as <output_dir>/checkpoint-500."
        )


def check_adapter_arguments(adapter_args, training_args):
    if adapter_args.load_adapter and training_args.do_train and not adapter_args.train_adapter:
        raise UsageError(
            f"--load_adapter {adapter_args.load_adapter} with --do_train trains the adapter further: add "
            "--train_adapter, or drop --do_train to evaluate the adapter as it is."
        )
    if adapter_args.load_lang_adapter and not (adapter_args.train_adapter or adapter_args.load_adapter):
        raise UsageError(
            "--load_lang_adapter stacks a language adapter under the adapter that --train_adapter trains or "
            "--load_adapter loads: add one of them, or give the language adapter as --load_adapter to evaluate it "
            "alone."
        )
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


def detect_last_checkpoint(training_args):
    """Find the checkpoint to resume from, and refuse to train into a folder that holds other work."""
    output_dir = training_args.output_dir
    if not (training_args.do_train and os.path.isdir(output_dir)) or training_args.overwrite_output_dir:
        return None
    last_checkpoint = last_complete_checkpoint(output_dir)
    if last_checkpoint is None and os.listdir(output_dir):
        raise UsageError(
            f"--output_dir {output_dir} already exists, is not empty and holds no checkpoint to resume from; "
            "choose another folder, or pass --overwrite_output_dir to train into it anyway."
        )
    if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
        logger.info(
            f"Resuming training from {last_checkpoint}; pass --overwrite_output_dir to start from scratch instead."
        )
    return last_checkpoint


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
        data_files = {}
        if data_args.train_file is not None:
            data_files["train"] = data_args.train_file
        # A validation file that is the training file is read once, and is then one dataset under two names.
        same_file = data_args.train_file is not None and data_args.validation_file is not None and os.path.samefile(
            data_args.train_file, data_args.validation_file
        )
        if data_args.validation_file is not None and not same_file:
            data_files["validation"] = data_args.validation_file
        extension = file_extension(next(iter(data_files.values())))
        builder = FILE_BUILDERS[extension]
        try:
            raw_datasets = load_dataset(builder, data_files=data_files, **hub_kwargs)
        except DatasetGenerationError as error:
            reason = first_line(error.__cause__ or error)
            raise UsageError(
                f"Could not read {' and '.join(data_files.values())} as {extension}: {reason}; "
                "fix the file or give it the extension of its format."
            ) from None
        if same_file:
            raw_datasets["validation"] = raw_datasets["train"]
    if "validation" not in raw_datasets and "train" in raw_datasets:
        raw_datasets = carve_validation_split(raw_datasets["train"], data_args.validation_split_percentage)
    wanted = {"train": training_args.do_train, "validation": training_args.do_eval}
    needed = [split for split in wanted if wanted[split]]
    for split in needed:
        if split not in raw_datasets:
            raise UsageError(f"The data has no {split} split; pass --{split}_file or a dataset that has one.")
    return type(raw_datasets)({split: raw_datasets[split] for split in needed})


@contextmanager
def reported_as_usage_error(flag, name):
    """Turn a failed load of a hub name or local path into one line naming the flag."""
    try:
        yield
    except (OSError, ConnectionError, DatasetNotFoundError) as error:
        raise UsageError(
            f"{flag} {name} could not be loaded ({first_line(error)}); give a local folder, or a hub name while online."
        ) from None


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
        with reported_as_usage_error(flag, name):
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
        model = AutoModelForMaskedLM.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
            dtype=dtype,
            low_cpu_mem_usage=model_args.low_cpu_mem_usage,
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


def take_special_tokens_from(tokenizer, config):
    # A new config has the special token ids of its model type's own vocabulary (GPT-2's 50256), which the Trainer
    # would replace by the tokenizer's, with a warning, once the model is built.
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, key) is not None:
            setattr(config, key, getattr(tokenizer, key))


def setup_adapter(model, adapter_args):
    """With --train_adapter, add a fresh (or loaded) adapter to the model and freeze everything else; with
    --load_adapter alone, load the saved adapter to evaluate it, everything frozen."""
    if not (adapter_args.train_adapter or adapter_args.load_adapter):
        return
    # A model saved by an adapters-initialised full fine-tuning carries an "adapters" dict in its config;
    # adapters.init would share it with the new adapter setup, whose objects can then not be written to JSON.
    if isinstance(getattr(model.config, "adapters", None), dict):
        del model.config.adapters
    adapters.init(model)
    check_language_adapter_name(adapter_args)
    with reported_as_usage_error("--load_adapter", adapter_args.load_adapter or adapter_args.load_lang_adapter):
        try:
            add_adapters(model, adapter_args)
        except (ValueError, TypeError, AssertionError, RuntimeError) as error:  # adapters' own checks in add_adapter
            raise UsageError(cannot_train_message(adapter_args, model, error)) from None
    # adapters' train_adapter leaves some head weights trainable (RoBERTa's lm_head.dense); they would change
    # without being saved with the adapter, so the saved adapter would not reproduce the trained model.
    belongs_to_adapter = AdapterLoader(model).filter_func(adapter_args.adapter_name)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = adapter_args.train_adapter and parameter.requires_grad and belongs_to_adapter(name)


def add_adapters(model, adapter_args):
    """Add the adapter to train or load a saved one, stack the language adapter under it, and activate them.

    What adapters' setup_adapter_training does, except that a loaded adapter may also be only evaluated, and that it
    keeps the configuration saved with it: setup_adapter_training passes --adapter_config along, which only the
    retired AdapterHub repository used, and warns about it even for a local folder.
    """
    # use_safetensors reads adapter.safetensors where present and falls back to pytorch_adapter.bin.
    load_kwargs = {"with_head": False, "use_safetensors": True}
    name = adapter_args.adapter_name
    if adapter_args.load_adapter:
        model.load_adapter(adapter_args.load_adapter, load_as=name, **load_kwargs)
    else:
        model.add_adapter(name, config=AdapterConfig.load(adapter_args.adapter_config))
    active = name
    if adapter_args.load_lang_adapter:
        active = Stack(model.load_adapter(adapter_args.load_lang_adapter, **load_kwargs), name)
    # Activating the first adapter opens a forward context before the adapter is active, and adapters warns that
    # none is: a false alarm.
    with log_message_dropped("adapters.model_mixin", "There are adapters available but none are activated"):
        if adapter_args.train_adapter:
            model.train_adapter(name)  # freezes the rest of the model
        model.set_active_adapters(active)


@contextmanager
def log_message_dropped(logger_name, message_start):
    """Drop one message that a library logs by mistake, only while the call that logs it runs."""

    def keep(record):
        return not record.getMessage().startswith(message_start)

    library_logger = logging.getLogger(logger_name)
    library_logger.addFilter(keep)
    try:
        yield
    finally:
        library_logger.removeFilter(keep)


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
    return (
        f"--adapter_config {adapter_args.adapter_config} cannot be trained on a {model.config.model_type} model "
        f"({shorten(reason)}); choose another method such as seq_bn or lora, or change its settings "
        "with name[key=value,...]."
    )


def choose_max_seq_length(data_args, tokenizer, config):
    limits = [tokenizer.model_max_length]
    if getattr(config, "max_position_embeddings", None):
        positions = config.max_position_embeddings
        if config.model_type in POSITIONS_AFTER_PADDING:
            positions -= config.pad_token_id + 1
        limits.append(positions)
    limit = min(limits)
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
    column_names = column_names_of(next(iter(raw_datasets.values())))
    text_column = "text" if "text" in column_names else column_names[0]
    check_text_column(raw_datasets, text_column)
    if data_args.line_by_line:
        padding = "max_length" if data_args.pad_to_max_length else False
        tokenizer_kwargs = {"padding": padding, "truncation": True, "max_length": max_seq_length}
    else:
        tokenizer_kwargs = {"return_attention_mask": False}  # group_texts makes them

    def tokenize(examples):
        texts = examples[text_column]
        if data_args.line_by_line:
            texts = [text for text in texts if text and not text.isspace()]
        # verbose=False: texts longer than the model's limit are expected, grouping cuts them into blocks afterwards.
        # The special-tokens mask keeps <s>, </s> and padding out of the masking.
        return tokenizer(texts, return_special_tokens_mask=True, verbose=False, **tokenizer_kwargs)

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
        # Every column is removed, so extra columns of csv/json files never reach the model.
        tokenized = raw_datasets.map(
            tokenize, batched=True, remove_columns=column_names, **map_kwargs, **tokenize_kwargs,
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


def check_text_column(raw_datasets, text_column):
    for split, dataset in raw_datasets.items():
        feature = (dataset.features or {}).get(text_column)  # streamed json/csv: unknown until read
        if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise UsageError(
                f"The {split} data's text column '{text_column}' holds {feature}, not text; name the text column "
                "'text' or put it first."
            )


def column_names_of(dataset):
    if dataset.column_names is not None:
        return dataset.column_names
    return list(next(iter(dataset)).keys())  # streamed json/csv: the columns are known once an example is read


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
    # Keep only the predicted token ids: gathering full logits over an eval set would need vocab-size times the memory.
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def compute_metrics(eval_prediction):
    predictions, labels = eval_prediction
    # Only the masked positions carry a label; every other position is -100.
    counted = labels != -100
    return {"accuracy": float((predictions[counted] == labels[counted]).mean())}


class MaskingCollator(DataCollatorForLanguageModeling, TrainerCallback):
    """Masks training batches afresh in every epoch; validation examples, masked once beforehand, are only padded.

    A training batch's masks come from a generator seeded by the run's seed, the epoch and the batch's tokens, not
    from the global random state: the Trainer collates the first batch after a resume before it restores that
    state, and data loader workers each have their own. A resumed run thus masks exactly as an uninterrupted one.
    """

    epoch = 0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch = math.floor(state.epoch or 0)  # state.epoch counts fractions of an epoch, restored on resume

    def torch_call(self, examples):
        if "labels" not in examples[0]:
            return super().torch_call(examples)
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

    def torch_mask_tokens(self, inputs, **masks):
        key = f"{self.seed}/{self.epoch}".encode()
        digest = hashlib.blake2b(inputs.numpy().tobytes(), digest_size=8, key=key).digest()
        self.generator = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
        return super().torch_mask_tokens(inputs, **masks)


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

    return eval_dataset.map(
        mask, with_indices=True, remove_columns=["special_tokens_mask"],
        **describe("Masking validation data", data_args),
    )


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


def check_adapter_trains(model, tokenizer, data_collator, adapter_args):
    """One forward and backward pass on a sentence: a method this model cannot train is refused now, in seconds."""
    if not adapter_args.train_adapter:
        return
    example = tokenizer("Adapters are checked on one short sentence before any training starts.")
    example["labels"] = list(example["input_ids"])
    random_state = torch.get_rng_state()
    model.eval()  # no dropout: the check draws no random numbers that training would have drawn
    try:
        model(**data_collator([example])).loss.backward()
    except (RuntimeError, ValueError, TypeError, AttributeError, AssertionError, IndexError) as error:
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


class AdapterOnlyTrainer(AdapterTrainer):
    """Saves and restores exactly the trained adapter, as safetensors unless --save_safetensors false: no head
    (with tied embeddings as large as the vocabulary matrix) and no frozen language adapter."""

    def __init__(self, *args, adapter_name, **kwargs):
        self.adapter_name = adapter_name
        super().__init__(*args, **kwargs)

    def _save(self, output_dir=None, state_dict=None):
        output_dir = Path(output_dir or self.args.output_dir)
        save_adapter_files(self.model, output_dir / self.adapter_name, self.adapter_name, self.args.save_safetensors)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, output_dir / "training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self.load_trained_adapter(Path(resume_from_checkpoint) / self.adapter_name)

    def _load_best_model(self):
        self.load_trained_adapter(Path(self.state.best_model_checkpoint) / self.adapter_name)

    def load_trained_adapter(self, folder):
        self.model.load_adapter(str(folder), load_as=self.adapter_name, with_head=False, use_safetensors=True)


def save_adapter_files(model, folder, adapter_name, use_safetensors):
    """Write the adapter as adapters' save_adapter does (adapter_config.json and the weights, no head), but name
    each tensor once: prefix tuning keeps one pool of weights that every layer also references, so the state dict
    names a tensor several times, which safetensors refuses to write. The shortest name is kept; loading it
    restores the others, which are the same parameter."""
    folder.mkdir(parents=True, exist_ok=True)
    if not use_safetensors:  # torch.save keeps shared tensors shared
        model.save_adapter(str(folder), adapter_name, with_head=False, use_safetensors=False)
        return
    model.apply_to_adapter_layers(lambda _, layer: layer.pre_save_adapters())  # e.g. ReFT's contiguous weights
    state_dict, config = AdapterLoader(model).save_to_state_dict(adapter_name)
    unique, seen = {}, set()
    for key in sorted(state_dict, key=lambda key: (len(key), key)):
        tensor = state_dict[key]
        identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if identity not in seen:
            seen.add(identity)
            unique[key] = tensor.contiguous()
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(unique, folder / "adapter.safetensors")


def build_trainer(model, tokenizer, data_collator, train_dataset, eval_dataset, training_args, adapter_args):
    trainer_class = Trainer
    trainer_kwargs = {}
    if adapter_args.train_adapter:
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
        # The masking collator learns the epoch from the Trainer, so that every epoch masks the text differently.
        callbacks=[getattr(data_collator, "collator", data_collator)],
        **trainer_kwargs,
    )


def train(trainer, train_dataset, last_checkpoint, training_args):
    checkpoint = training_args.resume_from_checkpoint or last_checkpoint
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()  # with an AdapterTrainer: the adapter alone, in <output_dir>/<adapter_name>/
    metrics = train_result.metrics
    if not isinstance(train_dataset, datasets.IterableDataset):
        metrics["train_samples"] = len(train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


def evaluate(trainer, eval_dataset):
    metrics = trainer.evaluate()
    if not isinstance(eval_dataset, datasets.IterableDataset):
        metrics["eval_samples"] = len(eval_dataset)
    metrics["perplexity"] = perplexity(metrics["eval_loss"])
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return metrics


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


def print_summary(trainer, metrics, tokens_per_example, curves, training_args, adapter_args):
    """End the run with what a user looks for first: what was trained, how fast, how well, and where it went."""
    if not trainer.is_world_process_zero():
        return
    if training_args.do_train:
        lines = training_summary(trainer.model, metrics, tokens_per_example, training_args, adapter_args)
    else:
        lines = [evaluated_model_summary(trainer.model, adapter_args)]
    if training_args.do_eval:
        lines.append(evaluation_summary(trainer, metrics, training_args))
    if curves is not None:
        lines.append(f"training curves: {curves}")
    print("\n".join(["***** summary *****", *(f"  {line}" for line in lines)]), flush=True)


def training_summary(model, metrics, tokens_per_example, training_args, adapter_args):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    output_dir = Path(training_args.output_dir)
    if adapter_args.train_adapter:
        saved = output_dir / adapter_args.adapter_name
        files = [path for path in saved.rglob("*") if path.is_file()]
    else:
        saved = output_dir
        files = [*output_dir.glob("*.safetensors"), *output_dir.glob("*.bin")]
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
    if not (adapter_args.train_adapter or adapter_args.load_adapter):
        return line + " as loaded"
    belongs_to_adapter = AdapterLoader(model).filter_func(adapter_args.adapter_name)
    in_adapter = sum(p.numel() for name, p in model.named_parameters() if belongs_to_adapter(name))
    line += f", {in_adapter:,} ({100 * in_adapter / total:.2f}%) of them in adapter {adapter_args.adapter_name}"
    if adapter_args.load_adapter and os.path.isdir(adapter_args.load_adapter):
        files = [path for path in Path(adapter_args.load_adapter).rglob("*") if path.is_file()]
        line += f" ({adapter_args.load_adapter}, {megabytes(files)})"
    return line


def megabytes(files):
    return f"{sum(path.stat().st_size for path in files) / 1e6:.2f} MB"


def main(argv=None):
    model_args, data_args, training_args, adapter_args = parse_arguments(argv)
    setup_logging(training_args)
    check_arguments(model_args, data_args, training_args, adapter_args)
    last_checkpoint = detect_last_checkpoint(training_args)
    set_seed(training_args.seed)

    config = load_config(model_args)
    tokenizer = load_tokenizer(model_args)
    raw_datasets = load_raw_datasets(model_args, data_args, training_args)
    model = load_model(model_args, config, tokenizer)
    setup_adapter(model, adapter_args)
    data_collator = build_data_collator(tokenizer, model, data_args, training_args)
    check_adapter_trains(model, tokenizer, data_collator, adapter_args)

    max_seq_length = choose_max_seq_length(data_args, tokenizer, config)
    lm_datasets = preprocess(raw_datasets, tokenizer, max_seq_length, data_args, training_args)
    train_dataset, eval_dataset = select_samples(lm_datasets, data_args)
    eval_dataset = mask_eval_dataset(eval_dataset, tokenizer, data_args, training_args.seed)
    trainer = build_trainer(model, tokenizer, data_collator, train_dataset, eval_dataset, training_args, adapter_args)

    metrics = {}
    if training_args.do_train:
        metrics.update(train(trainer, train_dataset, last_checkpoint, training_args))
    if training_args.do_eval:
        metrics.update(evaluate(trainer, eval_dataset))
    publish(trainer, model_args, data_args, training_args)
    curves = plot_training_curves(trainer, training_args)
    print_summary(trainer, metrics, tokens_per_example(max_seq_length, data_args), curves, training_args,
                  adapter_args)
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
