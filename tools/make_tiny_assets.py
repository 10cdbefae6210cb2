"""Build tiny, offline language-model assets for the tests and the README quick start.

Everything is made from text that every Python install has (standard-library
docstrings), so no network access, Hub download or data set is needed:

* ``train.txt`` / ``validation.txt``: a few hundred KB of English prose;
* ``code_train.txt`` / ``code_validation.txt``: standard-library source code, a second domain to adapt a
  model trained on the prose to (an adapter has something to learn there);
* ``gpt2-tokenizer/`` and ``roberta-tokenizer/``: byte-level BPE tokenizers
  with GPT-2 and RoBERTa special tokens, loadable with ``AutoTokenizer``;
* with ``--models``: ``tiny-gpt2/`` and ``tiny-roberta/``, randomly initialised
  models small enough to train for a few steps on a CPU.

Usage: ``python tools/make_tiny_assets.py OUT_DIR [--models]``

The output is deterministic for a given Python version (docstrings change
between Python releases, so the corpus does too).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import re
import shutil
import sys
import time
from pathlib import Path

# Pure-Python modules only: C modules have sparse docstrings, and these are
# all present in every CPython build.  Kept sorted so the corpus order is fixed.
MODULES = sorted([
    "abc", "argparse", "ast", "asyncio.events", "base64", "calendar", "codecs",
    "collections", "configparser", "contextlib", "dataclasses", "difflib",
    "doctest", "email.message", "email.utils", "enum", "ftplib", "functools",
    "gzip", "http.client", "http.server", "imaplib", "inspect", "ipaddress",
    "json", "logging", "mailbox", "optparse", "pathlib", "pdb", "queue", "random",
    "shutil", "smtplib", "socketserver", "statistics", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "traceback", "unittest.case",
    "urllib.parse", "urllib.request", "uuid", "xml.etree.ElementTree", "zipfile",
])
# Source code for the second domain: a handful of long pure-Python modules, kept sorted.
SOURCE_MODULES = ["argparse", "collections", "http.client", "json.decoder", "logging", "pathlib", "textwrap"]
VALIDATION_EVERY = 10  # every 10th paragraph goes to validation (~10%)
MIN_WORDS = 4  # shorter paragraphs are mostly headings or bare names

GPT2_SPECIAL = ["<|endoftext|>"]
ROBERTA_SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, as in RoBERTa


def _docstrings(module_name: str) -> list[str]:
    """Docstrings of a module, its classes (and their methods) and functions."""
    module = importlib.import_module(module_name)
    docs = [inspect.getdoc(module)]
    # Sorted by name so the order is fixed whatever the import side effects;
    # the __module__ check skips names re-exported from other modules.
    for _, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module_name:
            continue
        if inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj))
        elif inspect.isclass(obj):
            docs.append(inspect.getdoc(obj))
            for attr in sorted(vars(obj)):
                member = getattr(obj, attr, None)
                if inspect.isfunction(member) or inspect.ismethod(member):
                    docs.append(inspect.getdoc(member))
    return [d for d in docs if d]


def _paragraphs(doc: str) -> list[str]:
    """Prose paragraphs of a docstring, whitespace collapsed to single spaces."""
    out = []
    for block in re.split(r"\n\s*\n", doc):
        lines = block.splitlines()
        # Indented lines and doctests are code, not English.
        if any(line.startswith((" ", "\t")) or ">>>" in line for line in lines):
            continue
        text = " ".join(block.split())
        if len(text.split()) >= MIN_WORDS:
            out.append(text)
    return out


def build_corpus(out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``train.txt`` and ``validation.txt`` (one paragraph per line)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paragraphs = dict.fromkeys(  # dict keeps first-seen order while deduplicating
        p for name in MODULES for doc in _docstrings(name) for p in _paragraphs(doc)
    )
    train, validation = [], []
    for i, paragraph in enumerate(paragraphs):
        (validation if i % VALIDATION_EVERY == VALIDATION_EVERY - 1 else train).append(paragraph)
    paths = out_dir / "train.txt", out_dir / "validation.txt"
    for path, lines in zip(paths, (train, validation)):
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def build_code_corpus(out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``code_train.txt`` and ``code_validation.txt`` (non-empty source lines)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        line.rstrip()
        for name in SOURCE_MODULES
        for line in inspect.getsource(importlib.import_module(name)).splitlines()
        if line.strip()
    ]
    train, validation = [], []
    for i, line in enumerate(lines):
        (validation if i % VALIDATION_EVERY == VALIDATION_EVERY - 1 else train).append(line)
    paths = out_dir / "code_train.txt", out_dir / "code_validation.txt"
    for path, chunk in zip(paths, (train, validation)):
        path.write_text("\n".join(chunk) + "\n", encoding="utf-8")
    return paths


def build_tokenizer(
    kind: str, corpus_files: list[str | Path], out_dir: str | Path, vocab_size: int = 1000
) -> Path:
    """Train a byte-level BPE tokenizer ("gpt2" or "roberta") and save it with transformers."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2TokenizerFast, RobertaTokenizerFast

    if kind not in ("gpt2", "roberta"):
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'gpt2' or 'roberta'")
    special = GPT2_SPECIAL if kind == "gpt2" else ROBERTA_SPECIAL
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,  # listed first, so they get ids 0..n-1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
        show_progress=False,
    )
    tokenizer.train([str(f) for f in corpus_files], trainer)

    if kind == "gpt2":
        # Like real GPT-2: no BOS/EOS added on encode and no pad token.
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        wrapped = GPT2TokenizerFast(
            tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
            unk_token="<|endoftext|>", model_max_length=1024,
        )
    else:
        # "<s> ... </s>" around each text, so special-token masks exist for MLM.
        tokenizer.post_processor = processors.RobertaProcessing(
            sep=("</s>", tokenizer.token_to_id("</s>")), cls=("<s>", tokenizer.token_to_id("<s>")),
            trim_offsets=True, add_prefix_space=False,
        )
        wrapped = RobertaTokenizerFast(
            tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>",
            cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
            mask_token=AddedToken("<mask>", lstrip=True, rstrip=False),  # "a <mask>" as RoBERTa
            model_max_length=512,
        )
    out_dir = _fresh_dir(out_dir)
    wrapped.save_pretrained(out_dir)
    return out_dir


def build_model(kind: str, tokenizer_dir: str | Path, out_dir: str | Path, **config_overrides) -> Path:
    """Save a tiny random "gpt2" (causal LM) or "roberta" (masked LM) model plus its tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, RobertaConfig, RobertaForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if kind == "gpt2":
        eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        config = GPT2Config(
            vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=256,
            bos_token_id=eos, eos_token_id=eos,
        )
        model_cls = GPT2LMHeadModel
    elif kind == "roberta":
        config = RobertaConfig(
            vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=128, max_position_embeddings=258, pad_token_id=1, bos_token_id=0,
            eos_token_id=2, type_vocab_size=1,
        )
        model_cls = RobertaForMaskedLM
    else:
        raise ValueError(f"unknown model kind {kind!r}; expected 'gpt2' or 'roberta'")
    config.update(config_overrides)
    # RoBERTa position ids start after the padding index, so 2 slots are unusable.
    max_length = config.n_positions if kind == "gpt2" else config.max_position_embeddings - 2

    torch.manual_seed(0)  # identical weights on every run
    model = model_cls(config)
    out_dir = _fresh_dir(out_dir)
    model.save_pretrained(out_dir)
    # The tokenizer must not promise longer inputs than the model has positions,
    # otherwise scripts that default to model_max_length overflow the embeddings.
    tokenizer.model_max_length = min(tokenizer.model_max_length, max_length)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _fresh_dir(path: str | Path) -> Path:
    # Removing first keeps re-runs clean: no stale files from an earlier layout.
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the assets into")
    parser.add_argument("--models", action="store_true", help="also write tiny-gpt2/ and tiny-roberta/")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    train, validation = build_corpus(args.out_dir)
    for path in (train, validation, *build_code_corpus(args.out_dir)):
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    for kind in ("gpt2", "roberta"):
        tokenizer_dir = build_tokenizer(kind, [train], args.out_dir / f"{kind}-tokenizer")
        print(f"wrote {tokenizer_dir}/")
        if args.models:
            print(f"wrote {build_model(kind, tokenizer_dir, args.out_dir / f'tiny-{kind}')}/")
    print(f"done in {time.perf_counter() - start:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
