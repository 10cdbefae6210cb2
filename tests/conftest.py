"""Shared fixtures: tiny tokenizers, models and corpora built offline in a temporary folder once per session.

Two text domains make adapter training measurable on a tiny model: the base model is first fully trained on
standard-library docstrings (English prose), and adapters are then trained on standard-library source code,
where the base model is clearly worse, so a working adapter lowers perplexity a lot.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

# Set before transformers/datasets are imported anywhere, so nothing waits on the network or writes to ~/.cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
# Each test process (pytest-xdist starts one per core) gets its own caches.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf-home-")
# The test models are tiny: one thread per process beats two threads fighting over matrices of 64 columns.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import make_tiny_assets  # noqa: E402

# Arguments every test run shares: quiet, no integrations, no checkpoints unless a test asks for them.
QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", "--seed", "7", "--num_samples", "0"]

# Library messages that a run used to print and that mean nothing to its user; none may come back.
NOISE = {
    "adapters' false alarm": "There are adapters available but none are activated",
    "transformers' loss guess": "was set in the config but it is unrecognized",
    "torch's pin_memory": "'pin_memory' argument is set as true but no accelerator is found",
    "the single process's rank": "Process rank:",
    "adapters' legacy hub": "legacy Hub",
    "the fast tokenizer tip": "with a fast tokenizer, using the `__call__` method is faster",
    "the Trainer's token alignment": "The tokenizer has new PAD/BOS/EOS tokens",
    "the tokenizer's length warning": "Token indices sequence length is longer than the specified maximum",
    "bitsandbytes' CPU kernel notice": "Failed to load CPU gemm_4bit_forward from kernels-community",
}


def noise_in(text):
    """The names of the NOISE messages found in a run's output."""
    return [name for name, message in NOISE.items() if message in text]


def built_once(tmp_path_factory, name, build):
    """build(folder)'s result, built once per test session. Under pytest-xdist the first process that needs it builds
    it while the others wait, and all of them read the same folder afterwards (tests copy what they change)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    folder = tmp_path_factory.getbasetemp().parent / name  # the session's folder, above each process's own
    result = folder / "built.pickle"
    with FileLock(f"{folder}.lock"):
        if not result.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            result.write_bytes(pickle.dumps(build(folder)))
    return pickle.loads(result.read_bytes())


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return built_once(tmp_path_factory, "assets", build_assets)


def build_assets(folder):
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
def dropout_free(assets, tmp_path_factory):
    """The tiny GPT-2 and RoBERTa without dropout: a training step then computes the same however its batch is split
    (dropout draws its random numbers per process)."""
    return built_once(tmp_path_factory, "dropout-free", lambda folder: SimpleNamespace(
        gpt2=make_tiny_assets.build_model("gpt2", assets.gpt2_tokenizer, folder / "gpt2", resid_pdrop=0.0,
                                          embd_pdrop=0.0, attn_pdrop=0.0),
        roberta=make_tiny_assets.build_model("roberta", assets.roberta_tokenizer, folder / "roberta",
                                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    ))


@pytest.fixture(scope="session")
def pretrained_gpt2(assets, tmp_path_factory):
    """A tiny GPT-2 fully trained for one epoch on docstrings: the 'pretrained' base that adapters adapt."""
    import run_clm

    return built_once(tmp_path_factory, "pretrained-gpt2",
                      lambda folder: pretrain(run_clm, assets.tiny_gpt2, assets.train, folder))


@pytest.fixture(scope="session")
def pretrained_roberta(assets, tmp_path_factory):
    """A tiny RoBERTa fully trained for one epoch on docstrings: the 'pretrained' base that adapters adapt."""
    import run_mlm

    return built_once(tmp_path_factory, "pretrained-roberta",
                      lambda folder: pretrain(run_mlm, assets.tiny_roberta, assets.train, folder))


@pytest.fixture(scope="session")
def tiny_llama(assets, tmp_path_factory):
    """A tiny Llama: separate query, key and value projections, which adapters can wrap around quantized layers."""
    return built_once(tmp_path_factory, "tiny-llama", lambda folder: build_tiny_llama(assets, folder))


def build_tiny_llama(assets, folder):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(assets.gpt2_tokenizer)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# A sentence of token ids that every tiny tokenizer knows, for comparing logits.
TOKEN_IDS = [[5, 17, 42, 99, 3, 250, 7, 11]]


def adapter_model_logits(auto_class, base, adapter_folder):
    """Logits on TOKEN_IDS of the base model with the saved adapter active, as the adapters library computes them."""
    import adapters
    import torch

    model = auto_class.from_pretrained(base)
    adapters.init(model)
    model.load_adapter(str(adapter_folder), set_active=True, use_safetensors=True)
    with torch.no_grad():
        return model.eval()(torch.tensor(TOKEN_IDS)).logits


def pretrain(script, model, train_file, output_dir):
    script.main(tiny_run_arguments(script, None, output_dir, "--do_train", "--num_train_epochs", "1",
                                   "--overwrite_output_dir", model=model, train=train_file, validation=None, length=64,
                                   eval_samples=None, batch_size=8, learning_rate="3e-3"))
    return output_dir


def length_flag(script):
    return "--block_size" if script.__name__ == "run_clm" else "--max_seq_length"


def tiny_run_arguments(script, assets, output_dir, *extra, model=None, train="prose", validation="prose", length=32,
                       eval_samples=16, batch_size=4, learning_rate="1e-2"):
    """The command line of a short, quiet run of run_clm.py or run_mlm.py into output_dir, for every test.

    The tiny model of the script's kind (or model) on the prose corpus. train and validation: "prose", "code", a
    file, or None to leave the flag out; None leaves out --max_eval_samples and --learning_rate too. The extra flags
    come last, so they win over these.
    """
    corpora = {"prose": ("train", "validation"), "code": ("code_train", "code_validation")}
    if train in corpora:
        train = getattr(assets, corpora[train][0])
    if validation in corpora:
        validation = getattr(assets, corpora[validation][1])
    model = model or (assets.tiny_gpt2 if script.__name__ == "run_clm" else assets.tiny_roberta)
    arguments = ["--model_name_or_path", model, length_flag(script), length, "--per_device_train_batch_size",
                 batch_size, "--output_dir", output_dir]
    for flag, value in (("--train_file", train), ("--validation_file", validation),
                        ("--max_eval_samples", eval_samples), ("--learning_rate", learning_rate)):
        if value is not None:
            arguments += [flag, value]
    return [str(value) for value in [*arguments, *QUIET, *extra]]


def read_json(path):
    return json.loads(Path(path).read_text())


def run_script(script, *args, cwd=None):
    """Run a script as a user would, in a new process; returns the CompletedProcess with text output."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=os.environ.copy(), timeout=600,
    )


# The files whose runs take longest (subprocesses, launches of two processes, the README's quick start) go first, so
# that pytest-xdist, which hands out whole files, does not leave one of them to run alone at the end.
LONGEST_FIRST = ["test_distributed.py", "test_signals.py", "test_readme.py", "test_reliability.py",
                 "test_hub_and_files.py", "test_benchmark.py"]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file, and of the other files, stays


@contextmanager
def small_file_system(folder, size):
    """A tmpfs of the given size at folder, to fill up for real; skips where mounting is not allowed."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield lambda new_size: subprocess.run(["mount", "-o", f"remount,size={new_size}", str(folder)], check=True)
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def assert_refused_in_one_line(script, argv, expected, capsys, output_dir):
    """The script ends argv in one line naming expected, exit status 2, no traceback, and writes nothing."""
    capsys.readouterr()
    assert script.cli(argv) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert stderr[-1].startswith(f"{script.__name__}.py: error: ") and expected in stderr[-1], stderr[-1]
    assert not any("Traceback" in line for line in stderr)
    assert not output_dir.exists()  # refused before anything was trained or written
