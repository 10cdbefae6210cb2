"""Shared fixtures: tiny tokenizers, models and corpora built offline in a temporary folder once per session.

Two text domains make adapter training measurable on a tiny model: the base model is first fully trained on
standard-library docstrings (English prose), and adapters are then trained on standard-library source code,
where the base model is clearly worse, so a working adapter lowers perplexity a lot.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

# Set before transformers/datasets are imported anywhere, so nothing waits on the network or writes to ~/.cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf-home-"))
# The test models are tiny: one thread per process beats two threads fighting over matrices of 64 columns.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import make_tiny_assets  # noqa: E402

# Arguments every test run shares: quiet, no integrations, no checkpoints unless a test asks for them.
QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", "--seed", "7"]

# Library messages that a run used to print and that mean nothing to its user; none may come back.
NOISE = {
    "adapters' false alarm": "There are adapters available but none are activated",
    "transformers' loss guess": "was set in the config but it is unrecognized",
    "torch's pin_memory": "'pin_memory' argument is set as true but no accelerator is found",
    "the single process's rank": "Process rank:",
    "adapters' legacy hub": "legacy Hub",
    "the fast tokenizer tip": "with a fast tokenizer, using the `__call__` method is faster",
    "the Trainer's token alignment": "The tokenizer has new PAD/BOS/EOS tokens",
}


def noise_in(text):
    """The names of the NOISE messages found in a run's output."""
    return [name for name, message in NOISE.items() if message in text]


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("assets")
    train, validation = make_tiny_assets.build_corpus(folder)
    code_train, code_validation = make_tiny_assets.build_code_corpus(folder)
    gpt2_tokenizer = make_tiny_assets.build_tokenizer("gpt2", [train], folder / "gpt2-tokenizer")
    roberta_tokenizer = make_tiny_assets.build_tokenizer("roberta", [train], folder / "roberta-tokenizer")
    return SimpleNamespace(
        folder=folder,
        train=train,
        validation=validation,
        code_train=code_train,
        code_validation=code_validation,
        gpt2_tokenizer=gpt2_tokenizer,
        roberta_tokenizer=roberta_tokenizer,
        tiny_gpt2=make_tiny_assets.build_model("gpt2", gpt2_tokenizer, folder / "tiny-gpt2"),
        tiny_roberta=make_tiny_assets.build_model("roberta", roberta_tokenizer, folder / "tiny-roberta"),
    )


@pytest.fixture(scope="session")
def pretrained_gpt2(assets, tmp_path_factory):
    """A tiny GPT-2 fully trained for one epoch on docstrings: the 'pretrained' base that adapters adapt."""
    import run_clm

    return pretrain(run_clm, assets.tiny_gpt2, assets.train, tmp_path_factory.mktemp("pretrained-gpt2"))


@pytest.fixture(scope="session")
def pretrained_roberta(assets, tmp_path_factory):
    """A tiny RoBERTa fully trained for one epoch on docstrings: the 'pretrained' base that adapters adapt."""
    import run_mlm

    return pretrain(run_mlm, assets.tiny_roberta, assets.train, tmp_path_factory.mktemp("pretrained-roberta"))


def pretrain(script, model, train_file, output_dir):
    script.main([str(value) for value in [
        "--model_name_or_path", model, "--train_file", train_file, "--do_train", "--num_train_epochs", "1",
        "--learning_rate", "3e-3", length_flag(script), "64", "--per_device_train_batch_size", "8",
        "--output_dir", output_dir, "--overwrite_output_dir", *QUIET,
    ]])
    return output_dir


def length_flag(script):
    return "--block_size" if script.__name__ == "run_clm" else "--max_seq_length"


def tiny_run_arguments(script, assets, output_dir, *extra, length=32, eval_samples=16):
    """Arguments for a short run of run_clm.py or run_mlm.py on the tiny model of its kind."""
    model = assets.tiny_gpt2 if script.__name__ == "run_clm" else assets.tiny_roberta
    return [str(value) for value in [
        "--model_name_or_path", model, "--train_file", assets.train, "--validation_file", assets.validation,
        "--max_eval_samples", eval_samples, length_flag(script), length, "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--output_dir", output_dir, *QUIET, *extra,
    ]]


def read_json(path):
    return json.loads(Path(path).read_text())


def run_script(script, *args, cwd=None):
    """Run a script as a user would, in a new process; returns the CompletedProcess with text output."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=os.environ.copy(), timeout=600,
    )
