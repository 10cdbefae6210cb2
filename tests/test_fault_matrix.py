"""Writes that fail, crossed: every place a run writes (a checkpoint, the trained adapter, the metrics in the output
folder, the merged model, the PEFT export, the plot, the samples) with every way the machine refuses a write (errno 28
from the OS, a Rust library's plain Exception "(os error 28)", a read-only file system, no permission, and a file or
folder in the way). Each cell ends in one line naming what was being written, loses nothing already written, and the
same command run again completes with the numbers of the run that nothing interrupted.

The failures are injected in-process at the call that writes each place, in a run of each script per place; the
line of every way at every place is checked without a run."""

import errno
import json
import os
import pathlib
import shutil
from types import SimpleNamespace

import pytest
import transformers
from conftest import read_json, tiny_run_arguments
from matplotlib.figure import Figure

import run_clm
import run_mlm
from lmtune import peft_export, trainer
from lmtune.errors import UsageError
from lmtune.output_dir import last_complete_checkpoint, writing

# How each way fails a write to path.
FAILURES = {
    "ENOSPC": lambda path: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)),
    "os error 28": lambda path: Exception("No space left on device (os error 28)"),
    "EROFS": lambda path: OSError(errno.EROFS, os.strerror(errno.EROFS), str(path)),
    "EACCES": lambda path: PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path)),
}
REASONS = {"ENOSPC": "No space left on device", "os error 28": "No space left on device",
           "EROFS": "Read-only file system", "EACCES": "Permission denied"}


def fail_checkpoint(monkeypatch, failure):
    # The last checkpoint, cut short after its adapter is written: the one before it is what a rerun resumes from.
    save = transformers.Trainer._save_optimizer_and_scheduler

    def failing(self, output_dir):
        if output_dir.endswith("checkpoint-4"):
            raise failure(pathlib.Path(output_dir) / "optimizer.pt")
        save(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", failing)


def fail_adapter(monkeypatch, failure):
    save = trainer.save_adapter_files  # as the Trainer subclass calls it

    def failing(model, folder, *args, **kwargs):
        if not folder.parent.name.startswith("checkpoint-"):  # the adapter saved once training ends
            raise failure(folder / "adapter.safetensors")
        save(model, folder, *args, **kwargs)

    monkeypatch.setattr(trainer, "save_adapter_files", failing)


def fail_metrics(monkeypatch, failure):
    def failing(self, split, metrics, combined=True):
        raise failure(pathlib.Path(self.args.output_dir) / f"{split}_results.json")

    monkeypatch.setattr(transformers.Trainer, "save_metrics", failing)


def fail_merged(monkeypatch, failure):
    def failing(self, folder, *args, **kwargs):
        raise failure(pathlib.Path(folder) / "model.safetensors")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", failing)


def fail_peft(monkeypatch, failure):
    def failing(tensors, path, metadata=None):
        raise failure(path)

    monkeypatch.setattr(peft_export, "save_file", failing)


def fail_plot(monkeypatch, failure):
    def failing(self, path, *args, **kwargs):
        raise failure(path)

    monkeypatch.setattr(Figure, "savefig", failing)


def fail_samples(monkeypatch, failure):
    write_text = pathlib.Path.write_text

    def failing(self, *args, **kwargs):
        if self.name == "samples.jsonl":
            raise failure(self)
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", failing)


# Each place: how to fail its write, what the line names, and what is in its way when an entry of the other kind
# takes its name (a file where a folder goes, or the reverse), {adapter} standing for the adapter's name.
PLACES = {
    "checkpoint": (fail_checkpoint, "Could not write a checkpoint", "checkpoint-4"),
    "adapter": (fail_adapter, "Could not write the trained adapter", "{adapter}"),
    "output folder": (fail_metrics, "Could not write the metrics", "all_results.json/"),
    "merged model": (fail_merged, "Could not write the merged model", "merged"),
    "PEFT export": (fail_peft, "Could not write the PEFT adapter", "peft"),
    "plot": (fail_plot, "Could not write the plot of the training curves", "training_curves.png/"),
    "samples": (fail_samples, "Could not write the samples", "samples.jsonl/"),
}
SCRIPTS = {"clm": run_clm, "mlm": run_mlm}
# A run of run_clm.py for every place, the ways a write fails taken in turn, and of run_mlm.py for the places where
# its runs differ (its masking when resuming, its adapter's name, PEFT's task type); all ways at all places are
# crossed without a run by test_every_way_a_write_fails_is_named_at_every_place.
CELLS = [("clm", place, list(FAILURES)[index % len(FAILURES)]) for index, place in enumerate(PLACES)] + [
    ("mlm", "checkpoint", "EROFS"), ("mlm", "adapter", "EACCES"), ("mlm", "PEFT export", "os error 28")]
# The runs refused for an entry in the way that are run again once it is gone: one per script (a refused run has
# written nothing, so the run again is a run afresh).
RUN_AGAIN_AFTER_REFUSAL = {("clm", "merged model"), ("mlm", "samples")}


def arguments(script, assets, output_dir, *extra):
    # Checkpoints at steps 2 and 4, the last one; every place of the matrix written.
    return tiny_run_arguments(script, assets, output_dir, "--do_train", "--do_eval", "--train_adapter",
                              "--adapter_config", "lora", "--merge_adapter", "--export_peft", "--max_steps", "4",
                              "--save_strategy", "steps", "--save_steps", "2", "--num_samples", "2",
                              "--max_train_samples", "32", *extra, eval_samples=8)


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    """The metrics of each script's run that nothing interrupted, computed once for the module."""
    results = {}

    def metrics(name):
        if name not in results:
            script = SCRIPTS[name]
            results[name] = script.main(arguments(script, assets, tmp_path_factory.mktemp(f"straight-{name}")))
        return results[name]

    return metrics


def last_line(capsys):
    stderr = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in stderr)
    return stderr[-1]


def snapshot(folder):
    """Every file under folder with its content, to tell what a failed run lost."""
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def assert_same_numbers(metrics, expected):
    for key in ("train_loss", "eval_loss", "eval_accuracy", "perplexity"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-6), key


@pytest.mark.parametrize(("name", "place", "failure"), CELLS, ids=["-".join(cell) for cell in CELLS])
def test_a_failed_write_ends_in_one_line_naming_its_place_and_loses_nothing(name, place, failure, assets, tmp_path,
                                                                             capsys, monkeypatch, uninterrupted):
    script, (fail, named, _) = SCRIPTS[name], PLACES[place]
    output_dir = tmp_path / "out"
    argv = arguments(script, assets, output_dir)
    with monkeypatch.context() as patched:
        fail(patched, FAILURES[failure])
        assert script.cli(argv) == 2
    line = last_line(capsys)
    assert line.startswith(f"{name.join(['run_', '.py'])}: error: {named} to --output_dir {output_dir} "
                           f"({REASONS[failure]}"), line
    assert "make room or fix the permissions, then run the same command again: it resumes from checkpoint-" in line
    # What was written before the failure is whole: the checkpoint before the one that failed, or the last one, and
    # the adapter once saved.
    checkpoint = output_dir / ("checkpoint-2" if place == "checkpoint" else "checkpoint-4")
    assert last_complete_checkpoint(output_dir) == str(checkpoint)
    assert read_json(checkpoint / "trainer_state.json")["global_step"] == int(checkpoint.name.split("-")[1])
    if place not in ("checkpoint", "adapter"):
        assert (output_dir / name / "adapter.safetensors").is_file()

    assert_same_numbers(script.main(argv), uninterrupted(name))  # the same command again
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert read_json(output_dir / "trainer_state.json")["global_step"] == 4


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("place", PLACES)
def test_every_way_a_write_fails_is_named_at_every_place(place, failure, tmp_path):
    """The line of test_a_failed_write_ends_in_one_line_naming_its_place_and_loses_nothing for every way at every
    place, from the context that each place's write runs in."""
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    training_args = SimpleNamespace(output_dir=str(tmp_path), overwrite_output_dir=False, do_train=True)
    what = PLACES[place][1].removeprefix("Could not write ")
    with pytest.raises(UsageError) as refusal, writing(what, training_args):
        raise FAILURES[failure](tmp_path / "merged" / "model.safetensors")
    at = "" if failure == "os error 28" else ": merged/model.safetensors"
    assert str(refusal.value) == (
        f"Could not write {what} to --output_dir {tmp_path} ({REASONS[failure]}{at}); make room or fix the "
        "permissions, then run the same command again: it resumes from checkpoint-4.")


@pytest.mark.parametrize(("name", "place"), [(name, place) for name in SCRIPTS for place in PLACES],
                         ids=[f"{name}-{place}" for name in SCRIPTS for place in PLACES])
def test_an_entry_in_the_way_of_a_place_is_refused_before_training(name, place, assets, tmp_path, capsys,
                                                                    uninterrupted):
    script, blocker = SCRIPTS[name], PLACES[place][2].format(adapter=name)
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    in_the_way = output_dir / blocker.rstrip("/")
    if blocker.endswith("/"):  # a folder where the run writes a file
        in_the_way.mkdir()
        (in_the_way / "notes.txt").write_text("mine")
    else:
        in_the_way.write_text("mine")
    argv = arguments(script, assets, output_dir, "--overwrite_output_dir")
    assert script.cli(argv) == 2
    line = last_line(capsys)
    assert line.startswith(f"{name.join(['run_', '.py'])}: error: {in_the_way} is a ") and (
        line.endswith("move it out of the way, or choose another --output_dir.")), line
    assert not list(output_dir.glob("*/trainer_state.json"))  # refused before training
    assert snapshot(output_dir) == ({in_the_way / "notes.txt": b"mine"} if blocker.endswith("/") else
                                    {in_the_way: b"mine"})

    if (name, place) in RUN_AGAIN_AFTER_REFUSAL:
        shutil.rmtree(in_the_way) if in_the_way.is_dir() else in_the_way.unlink()
        assert_same_numbers(script.main(argv), uninterrupted(name))


def test_the_summary_claims_only_what_was_written(assets, tmp_path, capsys, monkeypatch):
    # transformers' save_pretrained logs an error and returns where its folder is a file: no line may claim it.
    def not_written(self, folder, *args, **kwargs):
        pathlib.Path(folder).mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", not_written)
    run_clm.main(arguments(run_clm, assets, tmp_path / "out", "--save_strategy", "no", "--export_peft", "false"))
    summary = capsys.readouterr().out
    assert "merged model:" not in summary and f"saved adapter: {tmp_path / 'out' / 'clm'}" in summary
    assert json.loads((tmp_path / "out" / "all_results.json").read_text())["eval_loss"] > 0
