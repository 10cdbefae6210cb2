"""The machine: what its CPU computes natively, whether it has an accelerator, and what a launcher set up for the
run."""

import logging
import os
from pathlib import Path

import torch
from transformers.utils import is_torch_xla_available

logger = logging.getLogger(__name__)


# Where Linux lists the CPU's features, and those that compute bf16 matrix products natively (without them, CPU
# autocast emulates bf16, far slower than fp32).
CPUINFO = Path("/proc/cpuinfo")


NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# What `accelerate launch` tells a run through the environment, and what a run's TrainingArguments write there (the
# precision, torch.compile's backend, FSDP and DeepSpeed settings) for accelerate to read.
LAUNCHER_SETTINGS_PREFIX = "ACCELERATE_"


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


def bf16_tip(training_args):
    """A line for the summary of an fp32 training run on a CPU with native bf16, where --bf16 is faster."""
    flags = native_bf16_flags()
    in_fp32_on_cpu = training_args.device.type == "cpu" and not (training_args.bf16 or training_args.fp16)
    if training_args.do_train and in_fp32_on_cpu and flags:
        return f"tip: this CPU has native bf16 ({', '.join(flags)}): --use_cpu --bf16 trains faster than fp32 on it"
    return None


def unpin_memory_without_accelerator(training_args):
    # Pinned memory only speeds up copies to an accelerator; without one, torch ignores it with a warning.
    if training_args.dataloader_pin_memory and not torch.accelerator.is_available():
        training_args.dataloader_pin_memory = False


class LauncherEnvironment:
    """The environment that accelerate reads, as the launcher (accelerate launch, torchrun) set it for each run of this
    process: TrainingArguments writes its own settings there (the precision, torch.compile's backend, FSDP and
    DeepSpeed settings), where a later run in the same process would take them for the launcher's."""

    def __init__(self):
        self.written_over = {}  # what the last run's arguments changed: each setting's value before, None if unset

    def restored(self):
        """Put back what the last run's arguments wrote, and give torchrun on CPUs a CPU process group."""
        for name, value in self.written_over.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self.written_over = {}
        use_cpu_process_group_under_launcher()
        return accelerate_settings()

    def note_written(self, before):
        """Remember what the arguments just parsed changed of the settings before (restored's)."""
        after = accelerate_settings()
        self.written_over = {name: before.get(name) for name in before.keys() | after.keys()
                             if before.get(name) != after.get(name)}


def accelerate_settings():
    return {name: value for name, value in os.environ.items() if name.startswith(LAUNCHER_SETTINGS_PREFIX)}


def use_cpu_process_group_under_launcher():
    # torch.accelerator knows no XLA device: on a TPU it is unavailable too, but transformers trains on XLA wherever
    # torch_xla is installed (its own check, asked here), and ACCELERATE_USE_CPU would move the run onto the CPU.
    on_accelerator = torch.accelerator.is_available() or is_torch_xla_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not on_accelerator:
        # torchrun on CPUs: accelerate forms a (gloo) process group over CPUs only when told to; otherwise every
        # process would train alone on all the data and write the same outputs.
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def launcher_configures(engine):
    """Whether `accelerate launch` was configured for engine, "FSDP" or "DeepSpeed" (accelerate applies it on
    accelerators only)."""
    return os.environ.get(f"ACCELERATE_USE_{engine.upper()}", "false").lower() == "true"
