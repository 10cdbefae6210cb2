"""Mistakes of the command line or its inputs: one plain line naming the flag and the fix, never a traceback."""

import errno
import os
import re
import sys
from contextlib import contextmanager

from datasets.exceptions import DatasetGenerationError
from safetensors import SafetensorError
from tqdm import tqdm

from lmtune.stopping import stop_signals

# What the OS says when the machine refuses a write: a full disk or quota, a read-only file system, no permission.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
# How datasets' own error begins where it finds less free space in its cache than a dataset needs: a plain OSError.
DATASETS_DISK_SPACE = "Not enough disk space"
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
def reported_as_usage_error(flag, name, fix="give a local folder, or a hub name while online", cache=None):
    """Turn a failed load of a hub name or local path into one line naming the flag, or, where the machine could
    not write (a full or read-only cache), naming what could not be written: the file, else the cache folder."""
    try:
        yield
    except (OSError, ValueError, TypeError, ConnectionError, ImportError, DatasetGenerationError,
            SafetensorError) as error:
        failure = write_failure(error)
        if failure is not None and failure[1] != name:  # a file it could not read is the flag's own problem
            reason, path = failure
            raise UsageError(cache_write_refusal(path or cache, f"loading {flag} {name}", reason)) from None
        # datasets wraps the reader's own error, which says what is wrong with the file.
        reason = first_line(error.__cause__ if isinstance(error, DatasetGenerationError) and error.__cause__ else error)
        if isinstance(error, ImportError):  # e.g. a slow tokenizer's conversion, which needs protobuf or sentencepiece
            raise UsageError(
                f"{flag} {name} needs a package that is not installed ({shorten(reason)}); install it with pip, then "
                "run the same command again."
            ) from None
        raise UsageError(f"{flag} {name} could not be loaded ({shorten(reason)}); {fix}.") from None


@contextmanager
def cache_writes_reported(cache, doing):
    """A write to the cache folder that the machine refuses while doing something (tokenizing) ends in one line
    naming the file, else the folder, rather than the output folder that the run is writing to."""
    try:
        yield
    except UsageError:
        raise
    except Exception as error:  # the Rust libraries report a full disk as a plain Exception
        failure = write_failure(error)
        if failure is None:
            raise
        reason, path = failure
        raise UsageError(cache_write_refusal(path or cache, doing, reason)) from None


def cache_write_refusal(where, doing, reason):
    return (f"Could not write {where or 'to the cache'} while {doing} ({reason}); make room or fix the permissions, "
            "or give another cache folder with --cache_dir or HF_HOME, then run the same command again.")


def write_failure(error):
    """(reason, path or None) where error, or an error it was raised from, is the machine refusing a write: a full
    disk or quota, a read-only file system, no permission; else None. The Rust libraries (tokenizers, safetensors)
    raise a plain Exception for it, which names the OS error only in its text, and datasets an OSError of its own
    words where it finds too little free space."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
            return error.strerror, error.filename
        if isinstance(error, OSError) and str(error).startswith(DATASETS_DISK_SPACE):
            return first_line(error), None
        code = re.search(r"\(os error (\d+)\)", str(error))
        if code and int(code.group(1)) in WRITE_ERRNOS:
            return os.strerror(int(code.group(1))), None
        error = error.__cause__ or error.__context__
    return None


def run_from_command_line(main, argv, script_name):
    """Run a script's main: a usage error ends in one line on stderr and exit status 2, not a traceback; a run stopped
    by a signal, in one line saying what it saved, and the signal's exit status."""
    with stop_signals.handled():
        try:
            main(argv)
        except BaseException as error:
            stop = stop_signals.stop_behind(error)
            if stop is not None:
                return report(script_name, f"stopped: {stop}", stop.exit_status)
            if isinstance(error, UsageError):
                return report(script_name, f"error: {error}", 2)
            raise
    return 0


def report(script_name, line, exit_status):
    # Progress bars still open (the Trainer's, which its callback closes only at the end of training; datasets')
    # would end on the same line, or be drawn again after it when they are collected: closed first, the line is the
    # last one the user sees.
    for bar in list(tqdm._instances):
        bar.close()
    print(f"{script_name}: {line}", file=sys.stderr)
    return exit_status
