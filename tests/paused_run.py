"""Run a script held at one phase of its run, for the tests that signal it there: `python tests/paused_run.py PHASE
FOLDER script.py ARGS`.

When a process of the run reaches PHASE it writes FOLDER/reached and waits there until the test, having sent its
signal, writes FOLDER/sent (for a minute at most): the signal then arrives in that phase however fast the machine is.
The phases: "tokenizing" (a worker of the datasets pool, in the tokenizer), "training" (the main process, in the third
training step), "saving" (the main process, in the first checkpoint, after the adapter and before the optimizer is
written) and "evaluating" (the main process, in the first batch of an evaluation).
"""

import os
import runpy
import sys
import time
from pathlib import Path

import transformers

PATIENCE_SECONDS = 60

phase, folder, script = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
sys.argv = sys.argv[3:]
main_process = os.getpid()
calls = {"count": 0}


def hold():
    (folder / "reached").touch()
    deadline = time.monotonic() + PATIENCE_SECONDS
    while not (folder / "sent").exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def held(original, reached):
    def method(*args, **kwargs):
        calls["count"] += 1
        if reached() and not (folder / "reached").exists():
            hold()
        return original(*args, **kwargs)

    return method


places = {
    "tokenizing": (transformers.PreTrainedTokenizerBase, "__call__", lambda: os.getpid() != main_process),
    "training": (transformers.Trainer, "training_step", lambda: calls["count"] == 3),
    "saving": (transformers.Trainer, "_save_optimizer_and_scheduler", lambda: True),
    "evaluating": (transformers.Trainer, "prediction_step", lambda: True),
}
owner, name, reached = places[phase]
setattr(owner, name, held(getattr(owner, name), reached))
sys.path.insert(0, str(Path(script).resolve().parent))  # as `python script` does: lmtune/ beside it is importable
runpy.run_path(script, run_name="__main__")
