"""Mistakes of the command line or its inputs: one plain line naming the flag and the fix, never a traceback."""

import logging
import sys
from contextlib import contextmanager

from datasets.exceptions import DatasetGenerationError
from safetensors import SafetensorError

from lmtune.hardware import use_cpu_process_group_under_launcher

logger = logging.getLogger(__name__)

# The fixes that messages of failed loads end in.
FIX_MODEL_FOLDER = "give a complete folder written by save_pretrained, or a hub name while online"


FIX_ADAPTER = "give an adapter saved for this model (by --train_adapter with the same --model_name_or_path)"


FIX_DATA_FILE = "fix the file, or give it the extension of its format"


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported as one line on stderr, exit status 2."""


def one_line(error):
    # TrainingArguments puts the values that clash on lines of their own, after the sentence that names the flags.
    return " ".join(str(error).split()) or type(error).__name__


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def shorten(text, limit=200):
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextmanager
def reported_as_usage_error(flag, name, fix="give a local folder, or a hub name while online"):
    """Turn a failed load of a hub name or local path into one line naming the flag."""
    try:
        yield
    except (OSError, ValueError, TypeError, ConnectionError, DatasetGenerationError, SafetensorError) as error:
        # datasets wraps the reader's own error, which says what is wrong with the file.
        reason = first_line(error.__cause__ if isinstance(error, DatasetGenerationError) and error.__cause__ else error)
        raise UsageError(f"{flag} {name} could not be loaded ({shorten(reason)}); {fix}.") from None


def run_from_command_line(main, argv, script_name):
    """Run a script's main: a usage error ends in one line on stderr and exit status 2, not a traceback."""
    use_cpu_process_group_under_launcher()
    try:
        main(argv)
    except UsageError as error:
        print(f"{script_name}: error: {error}", file=sys.stderr)
        return 2
    return 0
