"""The checks made before anything slow happens: a mistake in the command line, or a setting that the libraries
would reject later or that gives a result nobody should trust, is refused in one sentence naming the flag and the
fix."""

import codecs
import importlib.util
import logging
import os
import re
from pathlib import Path

import datasets
import huggingface_hub
import torch
import transformers
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from datasets.data_files import resolve_pattern
from fsspec.core import url_to_fs
from transformers import CONFIG_MAPPING, Trainer
from transformers.integrations import get_reporting_integration_callbacks
from transformers.training_args import OptimizerNames
from transformers.utils import is_liger_kernel_available

from lmtune.adapter_setup import check_adapter_config
from lmtune.arguments import ends_with_an_adapter, quantization_flag, quantizes, uses_adapter
from lmtune.data import FILE_BUILDERS, file_extension, read_prompts
from lmtune.errors import UsageError, first_line, shorten
from lmtune.hardware import launcher_configures, warn_if_bf16_is_emulated
from lmtune.hub import check_hub_is_reachable, use_local_cache_only
from lmtune.interfaces import read_adapter_interface
from lmtune.output_dir import is_complete_checkpoint

logger = logging.getLogger(__name__)

# accelerate's distributed types in which an FSDP configuration applies (AcceleratorState): several processes on
# accelerators. On CPUs (MULTI_CPU) accelerate runs plain data parallel instead.
FSDP_DISTRIBUTED_TYPES = {kind for kind in DistributedType
                          if kind.name.startswith("MULTI_") and kind is not DistributedType.MULTI_CPU}
# torch.compile backends that torch lists (or not) but that run only with a package of their own.
COMPILE_BACKEND_PACKAGES = {"tensorrt": "torch_tensorrt", "torch_tensorrt": "torch_tensorrt", "onnxrt": "onnxruntime",
                            "tvm": "tvm", "openxla": "torch_xla", "openxla_eval": "torch_xla",
                            "ipex": "intel_extension_for_pytorch"}


def check_arguments(model_args, data_args, training_args, adapter_args, evaluation_args):
    """Refuse mistakes before anything slow happens, each with one sentence naming the flag and the fix. Where the
    hub cannot be reached but its local cache holds every hub name given, the run then loads from that cache alone.

    The checks that need more than the arguments follow in the scripts' main(), each as soon as what it needs is
    there, in this order: the output folder's (output_dir.detect_last_checkpoint, check_resume_checkpoint,
    check_nothing_in_the_way); the tokenizer's (run_mlm's load_tokenizer_with_mask); the adapter's, in the model
    (adapter_setup.setup_adapter, check_adapter_options, then the trial step, trial_step.check_adapter_trains); the
    examples' length, once the model's limit is known (run_clm's validation_windows, run_mlm's choose_max_seq_length);
    and the data's, once tokenized (data.tokenize_and_group, run_mlm's mask_eval_dataset)."""
    check_model_arguments(model_args)
    check_cache_folders(model_args)
    check_data_arguments(data_args, training_args)
    check_training_arguments(training_args)
    check_best_model_arguments(training_args)
    check_adapter_arguments(adapter_args, training_args)
    check_evaluation_arguments(evaluation_args, training_args)
    check_quantization_arguments(model_args, adapter_args)
    check_merge_arguments(training_args, adapter_args)
    check_export_peft_arguments(model_args, training_args, adapter_args)
    check_gradient_checkpointing_arguments(training_args, adapter_args)
    check_sharding(training_args, adapter_args)
    if not check_hub_is_reachable(model_args, data_args, adapter_args, training_args):
        use_local_cache_only()
    warn_if_bf16_is_emulated(training_args)
    note_xla_optimizer(training_args)


def note_xla_optimizer(training_args):
    # Said once logging is set up: parse_command_line chose adamw_torch where no --optim was given.
    if training_args.device.type == "xla" and training_args.optim == OptimizerNames.ADAMW_TORCH:
        logger.info("Training with --optim adamw_torch: transformers' default, adamw_torch_fused, has no XLA kernel.")


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
            f"--model_type {model_args.model_type} is not a transformers model type; use one such as gpt2 or llama "
            "(causal), roberta or bert (masked)."
        )
    if not (model_args.tokenizer_name or model_args.model_name_or_path):
        raise UsageError(
            "A model built from scratch still needs a tokenizer: pass --tokenizer_name with a hub name or a folder "
            "saved with save_pretrained."
        )


def check_cache_folders(model_args):
    """A file where a cache folder goes would fail the first load with "File exists" or "Not a directory", which
    reads as a problem of the model or the data that is loaded."""
    folders = ([("--cache_dir", model_args.cache_dir)] if model_args.cache_dir else [
        ("the hub cache (HF_HOME or HF_HUB_CACHE)", huggingface_hub.constants.HF_HUB_CACHE),
        ("the datasets cache (HF_HOME or HF_DATASETS_CACHE)", datasets.config.HF_DATASETS_CACHE)])
    for name, folder in folders:
        existing = next(path for path in (Path(folder).absolute(), *Path(folder).absolute().parents) if path.exists())
        if not existing.is_dir():
            raise UsageError(
                f"{name} {folder} cannot be a folder: {existing} is a file; give a folder, or move the file away."
            )


def check_data_arguments(data_args, training_args):
    """The data flags: each script's own (the examples' length, and how they are made), then those both share."""
    data_args.check_own_flags(training_args)
    if data_args.dataset_name is None and data_args.train_file is None and data_args.validation_file is None:
        raise UsageError("No data given: pass --dataset_name, or --train_file and/or --validation_file.")
    for flag, path in (("--train_file", data_args.train_file), ("--validation_file", data_args.validation_file)):
        if path is not None:
            check_data_file(flag, path)
    if training_args.do_train and data_args.dataset_name is None and data_args.train_file is None:
        raise UsageError("--do_train needs training data: pass --train_file or --dataset_name.")
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
    check_reporting_integrations(training_args)
    check_trainer_packages(training_args)
    if training_args.resume_from_checkpoint and not is_complete_checkpoint(training_args.resume_from_checkpoint):
        raise UsageError(
            f"--resume_from_checkpoint {training_args.resume_from_checkpoint} is not a complete checkpoint; give a "
            "checkpoint folder with a trainer_state.json, such as <output_dir>/checkpoint-500."
        )


def check_reporting_integrations(training_args):
    """Each --report_to integration needs its package, which the Trainer would find missing only once the model is
    loaded and the data preprocessed: its callback is what checks, so make each one now."""
    for name, callback in zip(training_args.report_to, get_reporting_integration_callbacks(training_args.report_to)):
        try:
            callback()
        except (RuntimeError, ImportError) as error:
            raise UsageError(
                f"--report_to {name} needs what is missing here ({first_line(error)}); install it, or leave {name} "
                "out of --report_to (none reports nowhere)."
            ) from None


def check_trainer_packages(training_args):
    """The Trainer's flags whose package the Trainer looks for only once the model is loaded and the data
    preprocessed (the others: --optim, --report_to, and --deepspeed and --half_precision_backend when the command line
    is read)."""
    if training_args.use_liger_kernel and not is_liger_kernel_available():  # the Trainer's own test
        raise UsageError(
            "--use_liger_kernel needs the liger-kernel package (0.3.0 or newer), which is not installed; "
            "pip install liger-kernel, or drop --use_liger_kernel."
        )
    backend = training_args.torch_compile_backend
    if not training_args.torch_compile or backend is None:
        return
    package = COMPILE_BACKEND_PACKAGES.get(backend)
    if package is not None and importlib.util.find_spec(package) is None:
        raise UsageError(
            f"--torch_compile_backend {backend} needs the {package} package, which is not installed; install it, or "
            "leave --torch_compile_backend out for inductor."
        )
    try:
        torch._dynamo.lookup_backend(backend)  # what torch.compile itself does with the name, once training starts
    except torch._dynamo.exc.InvalidBackend:
        usable = [name for name in torch._dynamo.list_backends()
                  if importlib.util.find_spec(COMPILE_BACKEND_PACKAGES.get(name, "torch"))]
        raise UsageError(
            f"--torch_compile_backend {backend} is not a torch.compile backend here; use one of {', '.join(usable)}, "
            "or leave it out for inductor."
        ) from None


def check_optimizer_settings(training_args):
    """Build the chosen optimizer on one weight, so that a setting it rejects (betas, epsilon, a missing package)
    is reported now rather than as a traceback once the model is loaded and the data preprocessed. The optimizers
    built around the model's layers (GaLore, APOLLO, LOMO) are checked as far as transformers checks them without
    one: their package and settings."""
    try:
        optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args)
        optimizer_class([torch.nn.Parameter(torch.zeros(1))], **optimizer_kwargs)
    except (ValueError, TypeError, ImportError) as error:
        if re.search(r"pass a `?model`? ", str(error)):  # transformers' word that the rest needs the model
            return
        if isinstance(error, ImportError):
            raise UsageError(
                f"--optim {training_args.optim.value} needs a package that is not installed ({first_line(error)}); "
                "install it, or choose another --optim."
            ) from None
        raise UsageError(
            f"--optim {training_args.optim.value} rejects these settings ({first_line(error)}); check "
            "--learning_rate, --adam_beta1, --adam_beta2, --adam_epsilon, --optim_args and --optim_target_modules."
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
    if training_args.eval_strategy != "steps":
        return
    if 1 <= training_args.max_steps < training_args.eval_steps:
        raise UsageError(
            f"--eval_steps {training_args.eval_steps:g} is more than --max_steps {training_args.max_steps}, so no "
            "evaluation would choose the best model; pass a smaller --eval_steps."
        )
    if training_args.save_steps != training_args.eval_steps:
        # transformers takes saves at a multiple of the evaluations (it refuses others itself), but reloads only a
        # best evaluation that was saved.
        logger.warning(
            f"--load_best_model_at_end chooses among the checkpoints only: with --save_steps "
            f"{training_args.save_steps:g} and --eval_steps {training_args.eval_steps:g}, a best evaluation between "
            f"two saves is passed over; pass --save_steps {training_args.eval_steps:g} to keep every evaluation's "
            "model."
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


def check_quantization_arguments(model_args, adapter_args):
    if not quantizes(model_args):
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


def check_merge_arguments(training_args, adapter_args):
    if not adapter_args.merge_adapter:
        return
    if not ends_with_an_adapter(training_args, adapter_args):
        raise UsageError(
            "--merge_adapter has no adapter to merge: train one (--do_train --train_adapter) or load one "
            "(--load_adapter DIR)."
        )
    if adapter_args.load_lang_adapter:
        raise UsageError(
            "--merge_adapter cannot fold an adapter stacked on a language adapter (--load_lang_adapter) into one "
            "model; drop one of the two flags."
        )


def check_export_peft_arguments(model_args, training_args, adapter_args):
    if not adapter_args.export_peft:
        return
    if not ends_with_an_adapter(training_args, adapter_args):
        raise UsageError(
            "--export_peft has no adapter to export: train a LoRA (--do_train --train_adapter --adapter_config lora) "
            "or load one (--load_adapter DIR)."
        )
    if adapter_args.load_lang_adapter:
        raise UsageError(
            "--export_peft writes one LoRA adapter, which PEFT would run without the language adapter of "
            "--load_lang_adapter stacked under it; drop one of the two flags."
        )
    if not model_args.model_name_or_path:
        raise UsageError(
            "--export_peft names --model_name_or_path as the PEFT adapter's base model, and a model built from "
            "scratch (--model_type) is saved nowhere; start from a saved model, or drop --export_peft."
        )


def check_gradient_checkpointing_arguments(training_args, adapter_args):
    reentrant = (training_args.gradient_checkpointing_kwargs or {}).get("use_reentrant")
    if training_args.gradient_checkpointing and adapter_args.train_adapter and reentrant:
        raise UsageError(
            "--gradient_checkpointing_kwargs with use_reentrant true does not work with --train_adapter: adapters "
            "carries its forward context into the recomputation only without it; leave use_reentrant out."
        )


def check_data_file(flag, path):
    """Catch missing, empty and non-UTF-8 files now, not as a traceback from deep inside `datasets`. A path is
    resolved as `datasets` resolves it: a glob pattern (data/part-*.txt) names every file it matches, and a URL
    (https://, s3://, gs://, hf://) a remote file, which must be reachable but is read only by the load."""
    extension = file_extension(path)
    if extension not in FILE_BUILDERS:
        raise UsageError(
            f"{flag} {path} has an unsupported extension; use one of: {', '.join('.' + e for e in FILE_BUILDERS)}."
        )
    files = resolved_data_files(flag, path)
    if not files:
        raise UsageError(f"{flag} {path} matches no file; check the pattern.")
    if "://" in files[0]:
        return
    if all(os.path.getsize(file_path) == 0 for file_path in files):
        raise UsageError(f"{flag} {path} is empty; give a file with text in it.")
    if extension == "parquet":
        return
    for file_path in files:
        with open(file_path, "rb") as file:
            start = file.read(1 << 20)
        try:
            codecs.getincrementaldecoder("utf-8")().decode(start, final=False)
        except UnicodeDecodeError as error:
            raise UsageError(
                f"{flag} {file_path} is not UTF-8 text (byte {start[error.start]:#04x} at offset {error.start}); "
                "convert it, e.g. with `iconv -t utf-8`."
            ) from None


def why_unreachable(url):
    """Why the file system of url cannot answer for it, or None where it answers that there is no such file:
    datasets' search says neither, and fsspec names the failed connection only as the cause of a missing file."""
    file_system, file_path = url_to_fs(url)
    try:
        file_system.info(file_path)
    except FileNotFoundError as error:
        return first_line(error.__cause__) if isinstance(error.__cause__, OSError) else None
    except Exception as error:  # whatever a remote file system raises is the reason to give
        return first_line(error)
    return None


def resolved_data_files(flag, path):
    """The local paths or URLs of the files that path names, as `datasets` finds them when it loads them."""
    remote = "://" in path
    try:
        return resolve_pattern(path, base_path=os.getcwd())
    except FileNotFoundError:
        if any(character in path for character in "*?["):
            return []
        if remote:
            unreachable = why_unreachable(path)
            if unreachable:
                raise UsageError(
                    f"{flag} {path} cannot be reached ({shorten(unreachable)}); check the URL and the network, or "
                    "give a local file."
                ) from None
            raise UsageError(f"{flag} {path} does not exist there; check the URL.") from None
        raise UsageError(f"{flag} {path} does not exist; check the path.") from None
    except ImportError as error:  # fsspec's file system for s3:// or gs:// comes with a package of its own
        raise UsageError(
            f"{flag} {path} needs a package that is not installed ({shorten(first_line(error))}); install it, then "
            "run the same command again."
        ) from None
    except (OSError, ValueError) as error:  # no connection, refused access, an unknown protocol
        raise UsageError(
            f"{flag} {path} cannot be reached ({shorten(first_line(error))}); check the URL and the network, or give "
            "a local file."
        ) from None


def sharding_engines(training_args):
    """The FSDP plugin and the DeepSpeed plugin that the Trainer's accelerator will run with (None where it will not),
    known from the arguments and the launcher's environment before the Trainer is built, as accelerate decides:
    DeepSpeed from --deepspeed, or from the launcher where accelerate's process state turned to it; FSDP (from
    --fsdp or the launcher, in ACCELERATE_USE_FSDP) where the processes run on accelerators (FSDP_DISTRIBUTED_TYPES).
    A launcher's configuration that does not apply is pointed out."""
    distributed_type = getattr(training_args.distributed_state, "distributed_type", None)  # None: SageMaker MP
    fsdp = None
    if launcher_configures("FSDP") and distributed_type in FSDP_DISTRIBUTED_TYPES:
        fsdp = FullyShardedDataParallelPlugin()  # from the environment, as accelerate's Accelerator builds it
    deepspeed = training_args.deepspeed_plugin
    if deepspeed is None and distributed_type == DistributedType.DEEPSPEED:
        deepspeed = DeepSpeedPlugin()
    for name, plugin in (("FSDP", fsdp), ("DeepSpeed", deepspeed)):
        if launcher_configures(name) and plugin is None:
            logger.warning(
                f"{name} is configured, but accelerate runs it on GPUs and other accelerators only: on CPUs this run "
                "is plain data parallel, each process holding the whole model."
            )
    return fsdp, deepspeed


def check_sharding(training_args, adapter_args):
    """Refuse, with the other checks before any model or data is loaded, a sharding mode whose adapter could not be
    saved whole, and what needs the whole model in one process under one."""
    fsdp, deepspeed = sharding_engines(training_args)
    if not adapter_args.train_adapter:
        return
    zero = deepspeed.deepspeed_config.get("zero_optimization", {}) if deepspeed is not None else {}
    if fsdp is not None or zero.get("stage") == 3:
        flag = next((flag for flag, wanted in (("--merge_adapter", adapter_args.merge_adapter),
                                               ("--export_peft", adapter_args.export_peft)) if wanted), None)
        if flag is not None:
            raise UsageError(
                f"{flag} needs the whole model in one process, which FSDP and DeepSpeed ZeRO-3 shard: drop it here, "
                f"and run it on the saved adapter afterwards in one process (--load_adapter DIR {flag})."
            )
    if fsdp is not None and fsdp.fsdp_version != 2:
        raise UsageError(
            "--train_adapter under FSDP needs fsdp_version: 2 in the accelerate config: with FSDP1 the adapter cannot "
            "be saved from the sharded model (configs/fsdp.yaml is a configuration that works)."
        )
    if fsdp is not None and "FULL_STATE_DICT" not in str(fsdp.state_dict_type):
        raise UsageError(
            f"--train_adapter under FSDP with {fsdp.state_dict_type} would save no adapter; set "
            "fsdp_state_dict_type: FULL_STATE_DICT in the accelerate config."
        )
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise UsageError(
            "--train_adapter under DeepSpeed ZeRO-3 needs \"stage3_gather_16bit_weights_on_model_save\": true in "
            "zero_optimization of the DeepSpeed config, or the adapter cannot be gathered to be saved."
        )
