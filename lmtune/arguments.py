"""The command line: the argument groups both scripts share, a parser with a readable --help and one-line
errors, and small questions about the arguments that several phases ask."""

import argparse
import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import yaml
from adapters import AdapterArguments
from transformers import HfArgumentParser, TrainingArguments
from transformers.training_args import OptimizerNames

from lmtune.errors import UsageError, first_line, one_line, shorten
from lmtune.hardware import LauncherEnvironment, unpin_memory_without_accelerator

# The launcher's settings for accelerate, put back before each run in this process parses its arguments.
LAUNCHER_ENVIRONMENT = LauncherEnvironment()
# A single argument that ends so is a file of arguments, the flags as keys.
ARGUMENTS_FILE_EXTENSIONS = (".json", ".yaml", ".yml")
COMMON_TRAINER_FLAGS = {
    "output_dir", "overwrite_output_dir", "do_train", "do_eval", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "learning_rate",
    "logging_steps", "eval_strategy", "eval_steps", "eval_on_start", "save_strategy", "save_steps", "save_total_limit",
    "resume_from_checkpoint", "seed", "bf16", "fp16", "torch_compile", "report_to", "push_to_hub",
}


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
            "model type such as gpt2 or llama (run_clm.py), roberta or bert (run_mlm.py)."
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
    lean_loss: bool = field(
        default=True,
        metadata={
            "help": "Compute the loss without the full batch x length x vocabulary logits, for less memory; used "
            "where the first batch gives the model's own loss and gradients (README: The lean loss)."
        },
    )


@dataclass
class DataArguments:
    """Which data to train and evaluate on. Each script adds how it cuts the data into examples (a subclass)."""

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
        metadata={"help": "Keep only the first this many training examples, for debugging or quicker runs."},
    )
    max_eval_samples: Optional[int] = field(
        default=None,
        metadata={"help": "Keep only the first this many validation examples, for debugging or quicker runs."},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Read the data as a stream instead of loading it whole; needs --max_steps to train."},
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

    def check_own_flags(self, training_args):
        """Refuse values of a script's own data flags (its subclass's), with the other checks of the arguments."""

    def text_file_options(self):
        """Options for the `datasets` reader of .txt files; a script's subclass adds those of its flags."""
        return {}

    def skips_blank_texts(self):
        """Whether texts of only whitespace are left out as well as empty ones: true where each text makes an
        example of its own (--line_by_line), where whitespace alone is no example."""
        return False


@dataclass
class AdapterGroupArguments(AdapterArguments):
    """The adapters library's AdapterArguments, under a heading of their own in --help and with help texts that say
    what each flag takes here (the library's speak of its retired AdapterHub repository). Each script names the
    adapter after its objective (a subclass)."""

    _argument_group_name = "Adapter"
    ADAPTER_NAME_HELP = "Name of the trained or loaded adapter; a trained one is saved in <output_dir>/<adapter_name>/."

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
    adapter_name: str = field(default="adapter", metadata={"help": ADAPTER_NAME_HELP})
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
    export_peft: bool = field(
        default=False,
        metadata={
            "help": "After training (or with --load_adapter, without it), also write <output_dir>/peft/: the LoRA "
            "adapter in PEFT's layout (adapter_config.json, adapter_model.safetensors) on --model_name_or_path, "
            "which PeftModel.from_pretrained, vLLM and TGI load. Only plain LoRA (no gating, DoRA, VeRA or (IA)^3) "
            "has that form; loading it needs `pip install -r requirements-peft.txt`."
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
            "help": "After evaluation, run this many prompts (the first validation texts, or --sample_prompts) "
            "through the base model and the adapted model (run_clm.py continues them greedily, run_mlm.py fills "
            "their masks with its top predictions), show them in the summary and write them to "
            "<output_dir>/samples.jsonl; 0 turns samples off."
        },
    )
    sample_prompts: Optional[str] = field(
        default=None,
        metadata={
            "help": "Text file with one prompt per line for the samples, instead of the first validation texts. "
            "For run_mlm.py the tokenizer's mask token marks what to fill; in a prompt without one, some tokens "
            "are masked."
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


def parse_command_line(argv, data_arguments, adapter_arguments):
    """Read the five argument groups from the command line, or from a single .json or .yaml file of arguments; the
    script hands in its own data and adapter argument classes."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser(
        (ModelArguments, data_arguments, TrainingArguments, adapter_arguments, EvaluationArguments),
        every_flag="--help-all" in argv,
    )
    launcher_settings = LAUNCHER_ENVIRONMENT.restored()  # before TrainingArguments reads and writes them
    try:
        arguments = parsed_groups(parser, argv)
    finally:
        LAUNCHER_ENVIRONMENT.note_written(launcher_settings)
    unpin_memory_without_accelerator(arguments[2])
    choose_optimizer_for_xla(arguments[2], optim_given(parser, argv))
    return arguments


def parsed_groups(parser, argv):
    """The argument groups of argv as parser reads them; a mistake in them refused in one line."""
    try:
        if len(argv) == 1 and argv[0].endswith(ARGUMENTS_FILE_EXTENSIONS):
            return parser.parse_dict(numbers_typed(parser, read_arguments_file(argv[0]), argv[0]))
        return parser.parse_args_into_dataclasses(args=argv)
    except ImportError as error:  # TrainingArguments looks for the packages of a few flags (--deepspeed) itself
        raise UsageError(
            f"{flag_needing_a_package(parser, argv)} needs a package that is not installed "
            f"({shorten(first_line(error))}); install it, or drop the flag."
        ) from None
    except ValueError as error:  # unknown flags or keys, or a combination that TrainingArguments rejects
        if "setup doesn't support bf16" in str(error):  # TrainingArguments' message for hardware without bf16
            raise UsageError(
                "--bf16 needs a GPU with bf16 support; on a CPU add --use_cpu (fast only on CPUs with native bf16, "
                "avx512_bf16 or amx_bf16 in /proc/cpuinfo), or drop --bf16."
            ) from None
        raise UsageError(f"{one_line(error)}; see --help for the flags and their values.") from None


def read_arguments_file(path):
    """The flags of a .json or .yaml arguments file, as a mapping of names to values (what HfArgumentParser's
    parse_json_file and parse_yaml_file read, refused in one line where they would fail)."""
    kind = "YAML" if path.endswith((".yaml", ".yml")) else "JSON"
    try:
        text = Path(path).read_text(encoding="utf-8")
        values = yaml.safe_load(text) if kind == "YAML" else json.loads(text)
    except FileNotFoundError:
        raise UsageError(f"The arguments file {path} does not exist; give the path of an existing .json or .yaml "
                         "file.") from None
    except OSError as error:
        raise UsageError(f"The arguments file {path} cannot be read ({error.strerror}); give the path of an existing "
                         ".json or .yaml file.") from None
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as error:
        raise UsageError(f"The arguments file {path} is not valid {kind} ({one_line(error)}); fix the file.") from None
    if not isinstance(values, dict):
        raise UsageError(f"The arguments file {path} holds no mapping of flags to values; write one flag per key, "
                         "e.g. output_dir: out.")
    return values


def flag_needing_a_package(parser, argv):
    """The Trainer flag given that TrainingArguments, made with it alone, finds a package missing for."""
    if len(argv) == 1 and argv[0].endswith(ARGUMENTS_FILE_EXTENSIONS):
        given = read_arguments_file(argv[0])
    else:
        given = vars(parser.parse_known_args(argv)[0])
    for trainer_field in dataclasses.fields(TrainingArguments):
        value = given.get(trainer_field.name, trainer_field.default)
        if not trainer_field.init or trainer_field.name == "output_dir" or value == trainer_field.default:
            continue
        try:
            TrainingArguments("unused", **{trainer_field.name: value})
        except ImportError:
            return f"--{trainer_field.name} {value}"
        except (ValueError, TypeError):  # a flag that needs another flag beside it
            continue
    return "A flag of the Trainer's"


def choose_optimizer_for_xla(training_args, given):
    """transformers' default optimizer, adamw_torch_fused, has no kernel for XLA tensors: torch refuses them at the
    first optimizer step. On XLA (TPUs), a run without --optim trains with adamw_torch instead, and an explicit
    --optim adamw_torch_fused is refused before anything slow happens."""
    if training_args.device.type != "xla" or training_args.optim != OptimizerNames.ADAMW_TORCH_FUSED:
        return
    if given:
        raise UsageError(
            f"--optim adamw_torch_fused has no XLA kernel in torch {torch.__version__}: torch refuses XLA tensors at "
            "the first optimizer step; use --optim adamw_torch on XLA (TPUs)."
        )
    training_args.optim = OptimizerNames.ADAMW_TORCH  # said in the log by checks.note_xla_optimizer


def numbers_typed(parser, values, path):
    """The values of the arguments file path, those of numeric flags as numbers where they are text: YAML reads 1e-4
    as text (its floats need a dot), and the Trainer would compare it with numbers. The command line converts them
    with the same types."""
    number_types = {action.dest: action.type for action in parser._actions if action.type in (int, float)}
    typed = dict(values)
    for key, value in values.items():
        if isinstance(value, str) and key in number_types:
            try:
                typed[key] = number_types[key](value)
            except ValueError:
                raise UsageError(f"{key}: {value} in the arguments file {path} is not a number; give "
                                 f"{key} a {number_types[key].__name__} value.") from None
    return typed


def optim_given(parser, argv):
    """Whether the command line, or the file of arguments, names --optim. argparse fills in a flag's default only where
    the flag is absent, so a marker put in its place beforehand stays exactly then (whatever the spelling: --optim=X,
    or a prefix that argparse accepts)."""
    if len(argv) == 1 and argv[0].endswith(ARGUMENTS_FILE_EXTENSIONS):
        return "optim" in read_arguments_file(argv[0])
    absent = object()
    namespace, _ = parser.parse_known_args(argv, namespace=argparse.Namespace(optim=absent))
    return namespace.optim is not absent


def uses_adapter(adapter_args):
    """Whether the run puts an adapter into the model: one to train, or a saved one that is only evaluated."""
    return bool(adapter_args.train_adapter or adapter_args.load_adapter)


def ends_with_an_adapter(training_args, adapter_args):
    """Whether the run ends with an adapter to merge or export: one it trains, or a saved one it loads."""
    return bool(adapter_args.train_adapter and training_args.do_train or adapter_args.load_adapter)


def quantization_flag(model_args):
    return "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit"


def quantizes(model_args):
    """Whether the base model's weights are loaded quantized (--load_in_4bit or --load_in_8bit)."""
    return model_args.load_in_4bit or model_args.load_in_8bit
