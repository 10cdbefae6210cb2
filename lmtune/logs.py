"""Logging: what the run prints, and the libraries' messages that mean nothing to its user, silenced at their
source."""

import logging
import sys
from contextlib import contextmanager

import datasets
import transformers

logger = logging.getLogger(__name__)


def setup_logging(training_args, script_logger):
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    # Only the main process logs at the chosen level, so that N processes do not print everything N times.
    log_level = training_args.get_process_log_level()
    for own_logger in (script_logger, logging.getLogger("lmtune")):
        own_logger.setLevel(log_level)
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


def is_not_int8_cast_notice(record):
    # LLM.int8 always quantizes a layer's input by way of float16; bitsandbytes says so at every matrix product.
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def silence_bitsandbytes_kernel_notice():
    """bitsandbytes says at import, on every CPU with avx512_bf16, that an optional package of faster 4-bit kernels
    is missing: a note about its own speed that every run would print, whether it quantizes or not."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
    )
