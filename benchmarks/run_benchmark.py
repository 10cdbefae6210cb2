#!/usr/bin/env python
"""Benchmark run_clm.py and run_mlm.py on this machine, offline, and report each figure as a ratio to a ceiling.

    python benchmarks/run_benchmark.py            # GPT-2 small / RoBERTa base width, 6 layers: ~13 min on 2 cores
    python benchmarks/run_benchmark.py --quick    # 2 layers, 256 wide, one round, no compile: ~2 min
    python benchmarks/run_benchmark.py --memory   # memory only, 12 layers (checkpointing, 4-bit): ~18 min
    python benchmarks/run_benchmark.py --smoke    # the tests' tiny models: checks that it runs, ~1 min
    python benchmarks/run_benchmark.py --lean     # the lean loss against the model's own forward: ~10 min

Everything is built on the spot, in a temporary folder, from text that every Python install has (the standard
library's source): a corpus, byte-level BPE tokenizers with GPT-2 and RoBERTa special tokens, and models with
random weights. What is measured, all with the scripts' own functions:

* preprocessing: the scripts' `preprocess` (tokenizing and grouping through `datasets`) against the bare tokenizer
  on the same text in the same process, on 1 and 2 workers; the scripts' `group_texts` against the list-chaining
  version of the Hugging Face examples, alone and inside `Dataset.map`; and how much longer preprocessing takes
  when the validation file is the training file;
* training: tokens/s and peak memory of full fine-tuning and of --train_adapter with seq_bn, lora and
  prefix_tuning, for both scripts, each run in a fresh process, interleaved and repeated (the fastest timed step
  of each configuration); model FLOPs (counted by PyTorch) per second against the fastest fp32 matmul measured
  (one before every run); and the share of each step spent waiting for data;
* --bf16 and --torch_compile against fp32 eager, on the small shape (on CPUs without native bf16 a bf16 step of
  the large shape takes minutes, and compiling it alone takes about 3 minutes);
* with --memory, instead of all this: the memory a training step takes with and without --gradient_checkpointing,
  and with the base loaded in fp32, 4 bits and 8 bits (bitsandbytes), at GPT-2 small's and RoBERTa base's full
  depth (a Llama of GPT-2 small's shape stands in for GPT-2 under quantization, which adapters cannot run on it).

* with --lean, instead of all this: peak memory and tokens/s of a training step with the lean loss (the default)
  against the model's own forward and loss (--no_lean_loss, what upstream runs), on the shapes of issue 29 with
  fewer layers (CPU minutes): a Llama of vocabulary 49,152 at 1024 tokens, batch 4, with and without
  --gradient_checkpointing; a vocabulary of 256,000 with a small hidden size at 1024 tokens; RoBERTa base's width
  (run_mlm) at 512 tokens.

Results are written to OUT/results.json and OUT/results.md, with --memory to OUT/memory.json and OUT/memory.md, with
--lean to OUT/lean.json and OUT/lean.md (--out, default benchmarks/results).
"""

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Optional
from unittest import mock

# Set before transformers/datasets are imported, here and in every training process started from here.
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
    HF_DATASETS_DISABLE_PROGRESS_BARS="1",
)

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import make_tiny_assets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset, load_from_disk  # noqa: E402
from list_chaining import chained_group_texts  # noqa: E402

import run_clm  # noqa: E402
import run_mlm  # noqa: E402
from lmtune import hardware  # noqa: E402

SCRIPTS = {"run_clm": run_clm, "run_mlm": run_mlm}
MODEL_KIND = {"run_clm": "gpt2", "run_mlm": "roberta"}
LENGTH_FLAG = {"run_clm": "--block_size", "run_mlm": "--max_seq_length"}
REAL_VOCAB = {"gpt2": 50257, "roberta": 50265}
# The memory comparison of 4-bit loading needs a causal LM that adapters can run quantized, which GPT-2 is not: a Llama
# of GPT-2 small's shape (and vocabulary, with GPT-2's tokenizer) stands in.
LLAMA_VOCAB = REAL_VOCAB["gpt2"]
METHODS = ("full", "seq_bn", "lora", "prefix_tuning")
BATCH_TEXTS = 1000  # texts per batch, as `datasets` maps by default
GROUPING_REPEATS = 3  # grouping is quick to repeat, and noisy
TRAINING_TIMEOUT_S = 900
# Other work only ever slows a measurement down, on this machine or, unseen in its counters, on other virtual
# machines of the same host (the matmul below varied 2x between runs on the development machine). So every figure
# is the fastest of its repeats, ceilings included, and ratios compare fastest with fastest.


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    heads: int
    block: int
    vocab: Optional[int] = None  # None: the real vocabulary size of each model
    batch: int = 4

    def vocab_size(self, kind):
        return self.vocab or (LLAMA_VOCAB if kind == "llama" else REAL_VOCAB[kind])

    def config(self, kind):
        """Config overrides for make_tiny_assets.build_model (and, as for RoBERTa, for a LlamaConfig)."""
        if kind == "gpt2":
            return {"n_layer": self.layers, "n_embd": self.hidden, "n_head": self.heads, "n_positions": 1024,
                    "vocab_size": self.vocab_size(kind)}
        return {"num_hidden_layers": self.layers, "hidden_size": self.hidden, "num_attention_heads": self.heads,
                "intermediate_size": 4 * self.hidden, "max_position_embeddings": 514,
                "vocab_size": self.vocab_size(kind)}


# GPT-2 small and RoBERTa base with 6 of their 12 layers.
BASE = Shape("6x768", layers=6, hidden=768, heads=12, block=256)
# Their full depth, for the memory measurements (--memory): each run takes only the steps peak memory needs.
FULL_DEPTH = Shape("12x768", layers=12, hidden=768, heads=12, block=256)
# With the real vocabulary, the output layer alone would make the small shape's steps as slow as the large ones.
SMALL = Shape("2x256", layers=2, hidden=256, heads=4, block=128, vocab=8192)
# The tests' size, for --smoke: a check that every part of the benchmark still runs, not a measurement.
TINY = Shape("2x64", layers=2, hidden=64, heads=2, block=32, vocab=1000)


@dataclass(frozen=True)
class Mode:
    shape: Shape
    corpus_chars: int  # the fixed costs of a `datasets` map (worker pools, cache files) weigh on small corpora
    preprocessing_repeats: int
    rounds: int  # of training runs
    steps: int  # timed optimizer steps per training run, after one warm-up step
    methods: tuple
    variants: tuple  # run on SMALL: "bf16", "compile"
    trained: tuple = ("run_clm", "run_mlm")  # the scripts whose training is measured


MODES = {
    # Each run spends about 15 s starting up and warming up; 2 rounds of 3 timed steps keep the whole under 15 min.
    "full": Mode(BASE, corpus_chars=5_000_000, preprocessing_repeats=2, rounds=2, steps=3, methods=METHODS,
                 variants=("bf16", "compile")),
    # Compiling alone would take most of a minute.
    "quick": Mode(SMALL, corpus_chars=1_000_000, preprocessing_repeats=1, rounds=1, steps=2, methods=METHODS,
                  variants=("bf16",)),
    "smoke": Mode(TINY, corpus_chars=100_000, preprocessing_repeats=1, rounds=1, steps=1, methods=("seq_bn",),
                  variants=(), trained=("run_clm",)),
}

START = time.perf_counter()


def progress(message):
    print(f"[{time.perf_counter() - START:6.0f}s] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------- assets


def build_corpus(path, chars):
    """Non-empty lines of the standard library's source, file by file in sorted order, up to `chars` characters."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines, total = [], 0
    for source in sorted(stdlib.rglob("*.py")):
        if "site-packages" in source.parts:
            continue
        try:
            text = source.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # a few test files are deliberately not UTF-8
            continue
        for line in text.splitlines():
            if line.strip():
                lines.append(line.rstrip())
                total += len(lines[-1]) + 1
        if total >= chars:
            break
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def build_assets(work, mode):
    """The corpus, a small training file, and per model kind and shape a tokenizer and a random-weight model."""
    corpus = build_corpus(work / "corpus.txt", mode.corpus_chars)
    # Training runs need only a few steps' worth of blocks; a small file keeps their start-up short.
    train_file = build_corpus(work / "train.txt", 200_000)
    tokenizers, models = {}, {}
    for shape in {mode.shape, SMALL} if mode.variants else {mode.shape}:
        for kind in REAL_VOCAB:
            folder = work / f"{kind}-{shape.name}"
            tokenizer = make_tiny_assets.build_tokenizer(
                kind, [corpus], f"{folder}-tokenizer", vocab_size=shape.vocab_size(kind)
            )
            tokenizers[kind, shape] = tokenizer
            # The model keeps the full vocabulary width even where BPE ran out of pairs to merge before it.
            models[kind, shape] = make_tiny_assets.build_model(kind, tokenizer, folder, **shape.config(kind))
    return corpus, train_file, tokenizers, models


# ---------------------------------------------------------------------------------------------------- machine


def machine_description():
    model_name = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )
    return {
        "cpu": model_name,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # The scripts' own reading: the native bf16 features found (avx512_bf16, amx_bf16), none, or None if unknown.
        "native_bf16": hardware.native_bf16_flags(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def busy_cpu_seconds():
    """CPU time the whole machine has spent busy since boot (all processes and cores; stolen time included)."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds():
    """CPU time of this process and of the child processes it has waited for."""
    return sum(usage.ru_utime + usage.ru_stime
               for usage in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


class Stopwatch:
    """Wall time of a with-block, and how many cores' worth of CPU other processes took meanwhile.

    Other work on the machine only ever slows a measurement down, so the second figure says how far to trust it.
    """

    def __enter__(self):
        self._start = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()
        return self

    def __exit__(self, *exc_info):
        start, busy, own = self._start
        self.seconds = time.perf_counter() - start
        self.others = max(0.0, busy_cpu_seconds() - busy - (own_cpu_seconds() - own)) / self.seconds


def fastest(stopwatches):
    """Seconds of the fastest measurement, and how many cores other processes used during it."""
    best = min(stopwatches, key=lambda watch: watch.seconds)
    return best.seconds, best.others


def matmul_gflops(size=2048, repeats=5):
    """fp32 matmul throughput: the ceiling for training FLOP/s. The fastest of a few after a warm-up."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e9


def bf16_linear_speedup(tokens=1024, hidden=768, repeats=3):
    """How much faster a linear layer runs under --bf16's CPU autocast than in fp32 (below 1: slower)."""
    layer, inputs = torch.nn.Linear(hidden, 4 * hidden), torch.randn(tokens, hidden)

    def seconds(autocast):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            layer(inputs)
            start = time.perf_counter()
            for _ in range(repeats):
                layer(inputs)
        return time.perf_counter() - start

    return seconds(False) / seconds(True)


# ---------------------------------------------------------------------------------------------------- preprocessing


def script_arguments(name, tokenizer_dir, block, corpus, work, *extra):
    """The argument groups, as the script parses them from a command line."""
    return SCRIPTS[name].parse_arguments([
        "--tokenizer_name", str(tokenizer_dir), "--train_file", str(corpus), "--do_train",
        LENGTH_FLAG[name], str(block), "--output_dir", str(work / "preprocess-output"),
        "--cache_dir", str(work / "cache"), "--overwrite_cache", "--report_to", "none", *extra,
    ])


def time_preprocess(name, tokenizer_dir, block, corpus, work, workers, same_file_validation=False):
    """A Stopwatch of the script's own preprocess tokenizing and grouping the corpus (loading it is not timed)."""
    module = SCRIPTS[name]
    # Without the flag the script maps in-process, where the tokenizer runs on every core by itself.
    extra = ["--preprocessing_num_workers", str(workers)] if workers > 1 else []
    if same_file_validation:
        extra += ["--validation_file", str(corpus), "--do_eval"]
    model_args, data_args, training_args, *_ = script_arguments(name, tokenizer_dir, block, corpus, work, *extra)
    raw_datasets = module.load_raw_datasets(model_args, data_args, training_args)
    tokenizer = module.load_tokenizer(model_args)
    with Stopwatch() as watch:
        module.preprocess(raw_datasets, tokenizer, block, data_args, training_args)
    return watch


def corpus_texts(name, tokenizer_dir, block, corpus, work):
    """The texts exactly as the script reads them (one per line, line breaks kept)."""
    module = SCRIPTS[name]
    model_args, data_args, training_args, *_ = script_arguments(name, tokenizer_dir, block, corpus, work)
    return list(module.load_raw_datasets(model_args, data_args, training_args)["train"]["text"])


_FORKED = {}  # what bare-tokenizer worker processes inherit when forked, instead of receiving it pickled


def _count_tokens(bounds):
    tokenizer, texts = _FORKED["tokenizer"], _FORKED["texts"]
    start, stop = bounds
    return sum(
        len(ids) for i in range(start, stop, BATCH_TEXTS)
        for ids in tokenizer(texts[i:min(i + BATCH_TEXTS, stop)])["input_ids"]
    )


def fresh_tokenizer(name, tokenizer_dir, work):
    """The tokenizer as the script loads it. BPE caches the words it has seen, so a used one would be faster."""
    model_args = SCRIPTS[name].parse_arguments(
        ["--tokenizer_name", str(tokenizer_dir), "--output_dir", str(work / "preprocess-output"), "--report_to", "none"]
    )[0]
    return SCRIPTS[name].load_tokenizer(model_args)


def time_bare_tokenizer(tokenizer, texts, workers):
    """A Stopwatch of the tokenizer alone on the texts, in batches as `datasets` makes (the ceiling), and tokens."""
    _FORKED.update(tokenizer=tokenizer, texts=texts)
    shards = np.array_split(np.arange(len(texts)), workers)
    bounds = [(int(shard[0]), int(shard[-1]) + 1) for shard in shards]
    with Stopwatch() as watch:
        if workers == 1:
            tokens = _count_tokens(bounds[0])
        else:
            # As `datasets` does for its workers: forked processes tokenize on one thread each.
            with mock.patch.dict(os.environ, TOKENIZERS_PARALLELISM="false"), \
                    multiprocessing.get_context("fork").Pool(workers) as pool:
                tokens = sum(pool.map(_count_tokens, bounds))
    return watch, tokens


def measure_grouping(name, tokenizer, texts, block, work):
    """Tokens/s of the script's group_texts and of list chaining, alone and inside Dataset.map; checks equality.

    Each gets the input its script makes: the examples' tokenizer output with attention masks, as Python lists;
    the scripts' tokenizer output without them (group_texts makes them), as Arrow tables.
    """
    with_labels = name == "run_clm"
    special_tokens = {"return_special_tokens_mask": True} if name == "run_mlm" else {}
    lists = [dict(tokenizer(texts[i:i + BATCH_TEXTS], **special_tokens)) for i in range(0, len(texts), BATCH_TEXTS)]
    tokens = sum(len(ids) for batch in lists for ids in batch["input_ids"])
    columns = {key: [ids for batch in lists for ids in batch[key]] for key in lists[0]}
    # Saved and reloaded, so that map reads from and writes to cache files as it does in the script.
    Dataset.from_dict(columns).save_to_disk(work / f"tokenized-{name}")
    chaining_dataset = load_from_disk(work / f"tokenized-{name}")
    script_dataset = chaining_dataset.remove_columns("attention_mask").with_format("arrow")
    tables = [script_dataset[i:i + BATCH_TEXTS] for i in range(0, len(script_dataset), BATCH_TEXTS)]
    # run_clm's group_texts adds labels to the blocks that run_mlm cuts with lmtune.data's concatenate_and_cut.
    group_texts = getattr(SCRIPTS[name], "group_texts" if with_labels else "concatenate_and_cut")
    chaining = partial(chained_group_texts, with_labels=with_labels)
    for table, batch in zip(tables, lists):
        ours = group_texts(table, block)
        if {key: ours.column(key).to_pylist() for key in ours.column_names} != chaining(batch, block):
            raise AssertionError(f"{name}.group_texts cut different blocks from the list-chaining version")

    runs = {
        "script": lambda: [group_texts(table, block) for table in tables],
        "chaining": lambda: [chaining(batch, block) for batch in lists],
        "script_in_map": lambda: script_dataset.map(
            group_texts, batched=True, fn_kwargs={"block_size": block}, load_from_cache_file=False),
        "chaining_in_map": lambda: chaining_dataset.map(
            chaining, batched=True, fn_kwargs={"block_size": block}, load_from_cache_file=False),
    }
    seconds = {key: [] for key in runs}
    for repeat in range(GROUPING_REPEATS + 1):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            if repeat > 0:  # the first round warms up: the first map of a process is slower
                seconds[key].append(time.perf_counter() - start)
    return {key: tokens / statistics.median(values) for key, values in seconds.items()}


def measure_preprocessing(mode, corpus, train_file, tokenizers, work):
    """Throughputs of the scripts' preprocessing and grouping, each next to its ceiling or reference."""
    results = {}
    block = mode.shape.block
    for name in SCRIPTS:
        tokenizer_dir = tokenizers[MODEL_KIND[name], mode.shape]
        texts = corpus_texts(name, tokenizer_dir, block, corpus, work)
        results[name] = {"texts": len(texts), "workers": {}}
        for workers in (1, 2):
            # Warm-up on the small file: the first map, worker pool and tokenizer call of a process are slower.
            time_preprocess(name, tokenizer_dir, block, train_file, work, workers)
            time_bare_tokenizer(fresh_tokenizer(name, tokenizer_dir, work), texts[:BATCH_TEXTS], workers)
            bare, script = [], []
            for _ in range(mode.preprocessing_repeats):  # interleaved, so that both see the same load
                watch, tokens = time_bare_tokenizer(fresh_tokenizer(name, tokenizer_dir, work), texts, workers)
                bare.append(watch)
                script.append(time_preprocess(name, tokenizer_dir, block, corpus, work, workers))
            (bare_seconds, bare_others), (script_seconds, script_others) = fastest(bare), fastest(script)
            figures = results[name]["workers"][workers] = {
                "bare_tokens_per_s": tokens / bare_seconds,
                "script_tokens_per_s": tokens / script_seconds,
                "others": max(bare_others, script_others),
            }
            results[name]["tokens"] = tokens
            progress(f"preprocessing {name}, {workers} worker(s): bare tokenizer "
                     f"{figures['bare_tokens_per_s']:,.0f} tokens/s, script {figures['script_tokens_per_s']:,.0f}")
        tokenizer = fresh_tokenizer(name, tokenizer_dir, work)
        grouping = results[name]["grouping"] = measure_grouping(name, tokenizer, texts, block, work)
        progress(f"grouping {name} (tokens/s): " + ", ".join(f"{key} {value:,.0f}" for key, value in grouping.items()))
    # A validation file that is the training file: does the script tokenize the same text twice?
    gpt2_tokenizer = tokenizers["gpt2", mode.shape]
    alone = time_preprocess("run_clm", gpt2_tokenizer, block, corpus, work, 1)
    both = time_preprocess("run_clm", gpt2_tokenizer, block, corpus, work, 1, same_file_validation=True)
    results["same_file_validation"] = {
        "time_ratio": both.seconds / alone.seconds, "others": max(alone.others, both.others),
    }
    return results


# ---------------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Run:
    script: str
    method: str  # "full" or an adapter config
    shape: Shape
    variant: str = "fp32"  # "fp32" (eager), "bf16", "compile", "checkpointing", "4bit" or "8bit"
    model: Optional[str] = None  # the kind of model, when not the script's usual one (MODEL_KIND)
    lean: bool = True  # False: --no_lean_loss, the model's own forward and loss

    @property
    def kind(self):
        return self.model or MODEL_KIND[self.script]

    def argv(self, model_dir, train_file, work, output_dir, steps):
        argv = [
            "--model_name_or_path", str(model_dir), "--train_file", str(train_file), "--cache_dir", str(work / "cache"),
            LENGTH_FLAG[self.script], str(self.shape.block), "--per_device_train_batch_size", str(self.shape.batch),
            "--do_train", "--max_steps", str(steps + 1), "--output_dir", str(output_dir), "--overwrite_output_dir",
            "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--log_level", "warning",
        ]
        if self.method != "full":
            argv += ["--train_adapter", "--adapter_config", self.method]
        if self.variant == "bf16":
            argv += ["--use_cpu", "--bf16"]  # without --use_cpu, transformers refuses --bf16 on a machine with no GPU
        elif self.variant == "compile":
            argv += ["--torch_compile"]
        elif self.variant == "checkpointing":
            argv += ["--gradient_checkpointing"]
        elif self.variant in ("4bit", "8bit"):
            argv += [f"--load_in_{self.variant}"]
        if not self.lean:
            argv += ["--no_lean_loss"]
        return argv


def schedule(mode):
    """Rounds of training runs: every script and method once per round, in reverse order every other round."""
    grid = [Run(script, method, mode.shape) for method in mode.methods for script in mode.trained]
    rounds = [grid if index % 2 == 0 else grid[::-1] for index in range(mode.rounds)]
    variants = [Run("run_clm", "seq_bn", SMALL, variant) for variant in mode.variants]
    if variants and mode.shape != SMALL:
        variants.insert(0, Run("run_clm", "seq_bn", SMALL))  # the fp32 baseline the variants are compared with
    rounds[-1] = rounds[-1] + variants
    return rounds


def train_once(run, models, train_file, work, steps, index, count_flops=True):
    """One training run of the script in a fresh process; returns its timings, or the error it ended with."""
    run_dir = work / f"run-{index}"
    run_dir.mkdir()
    spec = {
        "script": run.script,
        "argv": run.argv(models[run.kind, run.shape], train_file, work, run_dir / "output", steps),
        # The flop counter and the compiler do not mix; the compiled model does the same FLOPs as the eager one.
        "count_flops": count_flops and run.variant != "compile",
        "result": str(run_dir / "result.json"),
    }
    (run_dir / "spec.json").write_text(json.dumps(spec))
    log = work / f"run-{index}.log"
    with open(log, "w") as output, Stopwatch() as watch:
        completed = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "train_once.py"), str(run_dir / "spec.json")],
            stdout=output, stderr=subprocess.STDOUT, timeout=TRAINING_TIMEOUT_S,
        )
    if completed.returncode == 0:
        result = {**json.loads((run_dir / "result.json").read_text()), "others": watch.others}
    else:
        last_lines = log.read_text().strip().splitlines()[-1:]
        result = {"error": last_lines[0] if last_lines else f"exit status {completed.returncode}"}
    shutil.rmtree(run_dir)  # a fully fine-tuned model is hundreds of MB
    return result


def measure_training(mode, models, train_file, work):
    runs = []
    for number, round_runs in enumerate(schedule(mode), 1):
        progress(f"training round {number}/{mode.rounds}")
        for run in round_runs:
            # Measured just before each run, so that the ratio sees about the same load on the machine as the run.
            matmul = matmul_gflops()
            result = {**train_once(run, models, train_file, work, mode.steps, len(runs)), "matmul_gflops_s": matmul}
            runs.append((run, result))
            outcome = result.get("error") or (
                f"median step {statistics.median(result['step_s']):.2f}s, peak {result['peak_rss_mib']:.0f} MiB, "
                f"other processes used {result['others']:.2f} cores")
            progress(f"  {run.script} {run.method} {run.shape.name} {run.variant}: {outcome}"
                     f" (matmul {matmul:.0f} GFLOP/s)")
    return runs


def summarise_training(runs):
    """Per script, method, shape and variant: its fastest timed step over all its runs, against the fastest matmul."""
    best_matmul = max(result["matmul_gflops_s"] for _, result in runs)
    grouped = {}
    for run, result in runs:
        grouped.setdefault(run, []).append(result)
    eager_flops = {
        (run.script, run.method, run.shape): result["flops_per_step"]
        for run, results in grouped.items() for result in results if result.get("flops_per_step")
    }
    summary = []
    for run, results in grouped.items():
        entry = {"script": run.script, "method": run.method, "shape": run.shape.name, "variant": run.variant}
        done = [result for result in results if "error" not in result]
        if not done:
            summary.append({**entry, "error": results[0]["error"]})
            continue
        step_s = min(chain.from_iterable(result["step_s"] for result in done))
        flops = eager_flops.get((run.script, run.method, run.shape))
        summary.append({
            **entry,
            "runs": len(done),
            "others": max(result["others"] for result in done),
            "tokens_per_s": run.shape.batch * run.shape.block / step_s,
            "peak_rss_mib": statistics.median(result["peak_rss_mib"] for result in done),
            "gflop_per_step": flops / 1e9 if flops else None,
            "gflop_per_s": flops / step_s / 1e9 if flops else None,
            "of_matmul": flops / step_s / 1e9 / best_matmul if flops else None,
            "data_wait_share": statistics.median(chain.from_iterable(r["data_wait_s"] for r in done)) / step_s,
            "first_step_s": statistics.median(result["first_step_s"] for result in done),
        })
    return summary


# ---------------------------------------------------------------------------------------------------- memory

# One step: its backward pass holds the activations, and its optimizer step allocates the (small) optimizer state of
# the adapter. A step of the 12-layer models took about 2 minutes on the shared development machine.
MEMORY_STEPS = 1


def build_memory_assets(work):
    """Tokenizers with the real vocabularies and random-weight models of FULL_DEPTH: GPT-2, RoBERTa and a Llama."""
    corpus = build_corpus(work / "corpus.txt", 1_000_000)
    train_file = build_corpus(work / "train.txt", 200_000)
    tokenizers, models = {}, {}
    for kind in REAL_VOCAB:
        tokenizers[kind] = make_tiny_assets.build_tokenizer(
            kind, [corpus], work / f"{kind}-tokenizer", vocab_size=FULL_DEPTH.vocab_size(kind))
        models[kind, FULL_DEPTH] = make_tiny_assets.build_model(
            kind, tokenizers[kind], work / f"{kind}-{FULL_DEPTH.name}", **FULL_DEPTH.config(kind))
    models["llama", FULL_DEPTH] = build_llama(tokenizers["gpt2"], work / f"llama-{FULL_DEPTH.name}", FULL_DEPTH)
    return train_file, models


def build_llama(tokenizer_dir, folder, shape):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # The same layer sizes as the other models, with separate query, key and value projections.
    config = LlamaConfig(**shape.config("llama"), num_key_value_heads=shape.heads,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def memory_schedule():
    """With and without gradient checkpointing: run_clm with each adapter method, run_mlm with LoRA; LoRA on bases
    loaded in fp32 and in 4 bits (8 bits for run_clm too)."""
    runs = [Run("run_clm", method, FULL_DEPTH, variant)
            for method in ("seq_bn", "lora", "prefix_tuning") for variant in ("fp32", "checkpointing")]
    runs += [Run("run_mlm", "lora", FULL_DEPTH, variant) for variant in ("fp32", "checkpointing", "4bit")]
    runs += [Run("run_clm", "lora", FULL_DEPTH, variant, model="llama") for variant in ("fp32", "4bit", "8bit")]
    return runs


def measure_memory(models, train_file, work):
    runs = []
    for run in memory_schedule():
        # The flop counter keeps nothing alive, but it is not what a user runs.
        result = train_once(run, models, train_file, work, MEMORY_STEPS - 1, len(runs), count_flops=False)
        runs.append((run, result))
        outcome = result.get("error") or (
            f"weights {result['model_mib']:,.0f} MiB, resident {result['train_start_rss_mib']:,.0f} MiB at the start "
            f"of training, peak {result['train_peak_rss_mib']:,.0f} MiB")
        progress(f"  {run.script} {run.kind} {run.method} {run.variant}: {outcome}")
    return runs


def summarise_memory(runs):
    """Each run's memory next to its baseline: the same script, model and method, in fp32 without checkpointing."""
    def key(run):
        return run.script, run.kind, run.method

    baselines = {key(run): result for run, result in runs if run.variant == "fp32" and "error" not in result}
    rows = []
    for run, result in runs:
        row = {"script": run.script, "model": run.kind, "method": run.method, "variant": run.variant}
        if "error" in result:
            rows.append({**row, "error": result["error"]})
            continue
        growth = result["train_peak_rss_mib"] - result["train_start_rss_mib"]
        row.update(model_mib=result["model_mib"], train_start_rss_mib=result["train_start_rss_mib"],
                   train_start_file_mib=result["train_start_file_mib"],
                   train_peak_rss_mib=result["train_peak_rss_mib"], training_growth_mib=growth)
        base = baselines.get(key(run))
        if base is not None and run.variant != "fp32":
            base_growth = base["train_peak_rss_mib"] - base["train_start_rss_mib"]
            row.update(model_x=result["model_mib"] / base["model_mib"],
                       train_peak_x=result["train_peak_rss_mib"] / base["train_peak_rss_mib"])
            if base_growth > 0:  # a tiny model may add nothing that the resident memory shows
                row["training_growth_x"] = growth / base_growth
        rows.append(row)
    return rows


def memory_markdown(results):
    machine = results["machine"]
    shape = FULL_DEPTH
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, Python {machine['python']}. "
        f"{results['minutes']:.1f} minutes.",
        "",
        f"{shape.layers} layers {shape.hidden} wide, {shape.heads} heads, vocabulary "
        f"{' / '.join(f'{shape.vocab_size(kind)} ({kind})' for kind in ('gpt2', 'roberta', 'llama'))}, blocks of "
        f"{shape.block}, batch {shape.batch}, {MEMORY_STEPS} training step; one run each. Weights: the model's "
        "parameters and buffers. At start / peak: resident memory of the process when training starts and its peak "
        "during training (loading excluded); of which files: the part that maps files at the start (the checkpoint "
        "is read through a memory map). Added: peak minus start, what training itself needs (activations, gradients, "
        "optimizer state). x: against the same script, model and method in fp32 without checkpointing.",
        "",
        "| script | model | method | variant | weights MiB | x | at start MiB | of which files | peak MiB | x "
        "| added MiB | x |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        cells = [row["script"], row["model"], row["method"], row["variant"]]
        if "error" in row:
            lines.append("| " + " | ".join(cells + [f"failed: {row['error']}"] + [""] * 7) + " |")
            continue

        def ratio(name):
            return f"{row[name]:.2f}" if name in row else ""

        cells += [f"{row['model_mib']:,.0f}", ratio("model_x"), f"{row['train_start_rss_mib']:,.0f}",
                  f"{row['train_start_file_mib']:,.0f}", f"{row['train_peak_rss_mib']:,.0f}", ratio("train_peak_x"),
                  f"{row['training_growth_mib']:,.0f}", ratio("training_growth_x")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_memory_benchmark(out):
    with tempfile.TemporaryDirectory(prefix="lm-memory-") as folder:
        work = Path(folder)
        train_file, models = build_memory_assets(work)
        progress(f"assets built in {work}")
        runs = measure_memory(models, train_file, work)
    results = {
        "machine": machine_description(),
        "minutes": (time.perf_counter() - START) / 60,
        "rows": summarise_memory(runs),
        "runs": [{**asdict(run), **result} for run, result in runs],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "memory.md").write_text(memory_markdown(results))
    print(memory_markdown(results))
    progress(f"wrote {out / 'memory.json'} and {out / 'memory.md'}")


# ---------------------------------------------------------------------------------------------------- report


def find(summary, script, method, shape_name, variant="fp32"):
    return next((entry for entry in summary if (entry["script"], entry["method"], entry["shape"], entry["variant"])
                 == (script, method, shape_name, variant) and "error" not in entry), None)


def baseline(summary, entry):
    """What a row is compared with: full fine-tuning for an fp32 eager run, fp32 eager for a variant."""
    if entry["variant"] != "fp32":
        return find(summary, entry["script"], entry["method"], entry["shape"])
    if entry["method"] != "full":
        return find(summary, entry["script"], "full", entry["shape"])
    return None


def targets(results, mode):
    """Each target of the issue with the measured figure and whether it is met."""
    rows = []
    preprocessing, summary = results["preprocessing"], results["training"]
    for name in SCRIPTS:
        for workers, figures in preprocessing[name]["workers"].items():
            ratio = figures["script_tokens_per_s"] / figures["bare_tokens_per_s"]
            rows.append((f"{name} preprocessing, {workers} worker(s), vs bare tokenizer", ">= 0.9x", f"{ratio:.2f}x",
                         ratio >= 0.9))
        grouping = preprocessing[name]["grouping"]
        for where, label in (("", "alone"), ("_in_map", "in Dataset.map")):
            ratio = grouping[f"script{where}"] / grouping[f"chaining{where}"]
            rows.append((f"{name} group_texts vs list chaining, {label}", ">= 4x", f"{ratio:.2f}x", ratio >= 4))
    for method in mode.methods[1:]:
        full, adapter = (find(summary, "run_clm", m, mode.shape.name) for m in ("full", method))
        if full and adapter:
            speed = adapter["tokens_per_s"] / full["tokens_per_s"]
            memory = adapter["peak_rss_mib"] / full["peak_rss_mib"]
            rows.append((f"run_clm {method} vs full fine-tuning ({mode.shape.name})",
                         ">= 1.6x tokens/s at <= 0.75x peak memory", f"{speed:.2f}x at {memory:.2f}x",
                         speed >= 1.6 and memory <= 0.75))
    for entry in summary:
        if entry.get("of_matmul") is not None and entry["variant"] == "fp32" and entry["shape"] == mode.shape.name:
            rows.append((f"{entry['script']} {entry['method']} FLOP/s vs fp32 matmul", ">= 75%",
                         f"{entry['of_matmul']:.0%}", entry["of_matmul"] >= 0.75))
    fp32, bf16 = (find(summary, "run_clm", "seq_bn", SMALL.name, variant) for variant in ("fp32", "bf16"))
    if fp32 and bf16:
        ratio = bf16["tokens_per_s"] / fp32["tokens_per_s"]
        if results["machine"]["native_bf16"]:
            rows.append((f"--bf16 vs fp32 (run_clm seq_bn, {SMALL.name})", ">= 1.5x", f"{ratio:.2f}x", ratio >= 1.5))
        else:  # emulated bf16 says nothing about the target, which is for CPUs that have it
            rows.append((f"--bf16 vs fp32 (run_clm seq_bn, {SMALL.name})", ">= 1.5x on a CPU with native bf16",
                         f"{ratio:.2f}x, emulated: this CPU has no native bf16", None))
    return rows


def markdown(results, mode):
    machine = results["machine"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch threads), "
        f"native bf16: {', '.join(machine['native_bf16'] or []) or 'none'}; torch {machine['torch']}, "
        f"Python {machine['python']}. Load average before / after: {results['load_before']} / {results['load_after']}. "
        f"Mode: {results['mode']}, {results['minutes']:.1f} minutes.",
        "",
        f"fp32 matmul (2048x2048, fastest of all measurements): {results['matmul_gflops_s']:.0f} GFLOP/s; a linear "
        f"layer under --bf16 autocast runs {results['bf16_linear_speedup']:.2f}x as fast as in fp32.",
        "",
        f"Preprocessing: the fastest of {mode.preprocessing_repeats} interleaved measurements each (others: how many "
        "cores' worth of CPU other processes used during it).",
        "",
        "| Preprocessing | workers | bare tokenizer tokens/s | script tokens/s | ratio | others |",
        "|---|---|---|---|---|---|",
    ]
    preprocessing = results["preprocessing"]
    for name in SCRIPTS:
        for workers, figures in preprocessing[name]["workers"].items():
            lines.append(f"| {name} ({preprocessing[name]['tokens']:,} tokens) | {workers} | "
                         f"{figures['bare_tokens_per_s']:,.0f} | {figures['script_tokens_per_s']:,.0f} | "
                         f"{figures['script_tokens_per_s'] / figures['bare_tokens_per_s']:.2f}x | "
                         f"{figures['others']:.2f} |")
    same_file = preprocessing["same_file_validation"]
    lines += [
        "",
        f"Validation file = training file (run_clm, 1 worker): preprocessing takes {same_file['time_ratio']:.2f}x as "
        f"long as for the training file alone (others: {same_file['others']:.2f}).",
        "",
        "| Grouping (tokens/s) | list chaining | script's group_texts | ratio | chaining in map | script in map "
        "| ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in SCRIPTS:
        g = preprocessing[name]["grouping"]
        lines.append(f"| {name} | {g['chaining']:,.0f} | {g['script']:,.0f} | {g['script'] / g['chaining']:.2f}x | "
                     f"{g['chaining_in_map']:,.0f} | {g['script_in_map']:,.0f} | "
                     f"{g['script_in_map'] / g['chaining_in_map']:.2f}x |")
    shapes = "; ".join(
        f"{shape.name}: {shape.layers} layers {shape.hidden} wide, vocabulary "
        f"{' / '.join(str(shape.vocab_size(kind)) for kind in REAL_VOCAB)}, block {shape.block}, batch {shape.batch}"
        for shape in dict.fromkeys((mode.shape, SMALL) if mode.variants else (mode.shape,))
    )
    lines += [
        "",
        f"Training ({shapes}): the fastest of {mode.steps} timed steps in each of {mode.rounds} interleaved runs, "
        "after a warm-up step; of matmul: against the fastest matmul. Peak memory: median over the runs. Runs: "
        "runs made; others: the most cores' worth of CPU other processes used during a run. "
        "x: ratio to full fine-tuning of the same script and shape, or for bf16 and compile to the fp32 eager run. "
        "Data wait: share of a step spent fetching its batch. First step: warm-up, including compilation.",
        "",
        "| script | method | shape | variant | tokens/s | x | peak RSS MiB | x | GFLOP/step | GFLOP/s | of matmul "
        "| data wait | first step s | runs | others |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = results["training"]
    for entry in summary:
        cells = [entry["script"], entry["method"], entry["shape"], entry["variant"]]
        if "error" in entry:
            lines.append("| " + " | ".join(cells + [f"failed: {entry['error']}"] + [""] * 10) + " |")
            continue
        base = baseline(summary, entry)
        cells += [
            f"{entry['tokens_per_s']:,.0f}", f"{entry['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "",
            f"{entry['peak_rss_mib']:,.0f}", f"{entry['peak_rss_mib'] / base['peak_rss_mib']:.2f}" if base else "",
        ]
        cells += ([f"{entry['gflop_per_step']:.0f}", f"{entry['gflop_per_s']:.0f}", f"{entry['of_matmul']:.0%}"]
                  if entry["gflop_per_step"] else ["", "", ""])
        cells += [f"{entry['data_wait_share']:.1%}", f"{entry['first_step_s']:.1f}",
                  f"{entry['runs']}", f"{entry['others']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| Target | wanted | measured | met |", "|---|---|---|---|"]
    for target, wanted, measured, met in results["targets"]:
        verdict = "not measurable here" if met is None else "yes" if met else "no"
        lines.append(f"| {target} | {wanted} | {measured} | {verdict} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- lean loss

# The shapes of issue 29 with fewer layers than the models they stand for (SmolLM2-135M has 30): on 2 cores a step of
# the first takes about 10 s. Fewer layers make the logits a larger share of a step than at full depth.
LEAN_SHAPES = {
    "llama": Shape("4x576-v49152", layers=4, hidden=576, heads=9, block=1024, vocab=49152),
    "large_vocab": Shape("2x256-v256000", layers=2, hidden=256, heads=4, block=1024, vocab=256000),
    "roberta": Shape("4x768-v50265", layers=4, hidden=768, heads=12, block=512, vocab=50265),
}
LEAN_STEPS = 2  # timed steps per run, after the first (which also compares the two paths)


def build_lean_assets(work):
    corpus = build_corpus(work / "corpus.txt", 1_000_000)
    train_file = build_corpus(work / "train.txt", 400_000)
    models = {}
    for name, shape in LEAN_SHAPES.items():
        kind = "roberta" if name == "roberta" else "gpt2"
        tokenizer = make_tiny_assets.build_tokenizer(kind, [corpus], work / f"{name}-tokenizer",
                                                     vocab_size=shape.vocab)
        if kind == "roberta":
            models["roberta", shape] = make_tiny_assets.build_model(kind, tokenizer, work / name, **shape.config(kind))
        else:
            models["llama", shape] = build_long_llama(tokenizer, work / name, shape)
    return train_file, models


def build_long_llama(tokenizer_dir, folder, shape):
    """A Llama of the shape in SmolLM2's proportions (feed-forward 8/3 of the width, 3 key/value heads, tied
    embeddings), with 2048 positions."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.hidden * 8 // 3,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=3 if shape.heads % 3 == 0 else shape.heads, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lean_schedule():
    """Each comparison as a pair of runs, the model's own forward first: seq_bn, as in the issue's measurement."""
    llama, large, roberta = LEAN_SHAPES["llama"], LEAN_SHAPES["large_vocab"], LEAN_SHAPES["roberta"]
    pairs = [("run_clm", llama, variant, "llama") for variant in ("fp32", "checkpointing")]
    pairs += [("run_clm", large, "fp32", "llama"), ("run_mlm", roberta, "fp32", None)]
    return [[Run(script, "seq_bn", shape, variant, model=model, lean=lean) for lean in (False, True)]
            for script, shape, variant, model in pairs]


def summarise_lean(pairs):
    rows = []
    for (own_run, own), (_, lean) in pairs:
        row = {"script": own_run.script, "shape": own_run.shape.name, "variant": own_run.variant,
               "tokens": own_run.shape.batch * own_run.shape.block}
        for name, result in (("own", own), ("lean", lean)):
            if "error" in result:
                row[f"{name}_error"] = result["error"]
                continue
            row[f"{name}_peak_mib"] = result["train_peak_rss_mib"]
            row[f"{name}_added_mib"] = result["train_peak_rss_mib"] - result["train_start_rss_mib"]
            row[f"{name}_step_s"] = min(result["step_s"])
            row[f"{name}_tokens_per_s"] = row["tokens"] / row[f"{name}_step_s"]
        if "own_error" not in row and "lean_error" not in row:
            row["peak_x"] = row["lean_peak_mib"] / row["own_peak_mib"]
            row["added_x"] = row["lean_added_mib"] / row["own_added_mib"]
            row["step_x"] = row["lean_step_s"] / row["own_step_s"]
        rows.append(row)
    return rows


def lean_markdown(results):
    lines = [
        "# The lean loss against the model's own forward", "",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, torch "
        f"{results['machine']['torch']}; {results['minutes']:.1f} minutes. Each run: seq_bn, fp32, a fresh process, "
        f"{LEAN_STEPS} timed steps after the first. Peak: resident memory of the process during training (weights "
        "included); added: peak minus resident at the start of training. Step: the fastest timed step.", "",
        "| script | shape | variant | own peak MiB | lean peak MiB | peak | added | own tokens/s | lean tokens/s "
        "| step time |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        if "peak_x" not in row:
            lines.append(f"| {row['script']} | {row['shape']} | {row['variant']} | "
                         f"{row.get('own_error', '')} | {row.get('lean_error', '')} | | | | | |")
            continue
        lines.append(
            f"| {row['script']} | {row['shape']} | {row['variant']} | {row['own_peak_mib']:,.0f} | "
            f"{row['lean_peak_mib']:,.0f} | {row['peak_x']:.2f}x | {row['added_x']:.2f}x | "
            f"{row['own_tokens_per_s']:,.0f} | {row['lean_tokens_per_s']:,.0f} | {row['step_x']:.2f}x |")
    return "\n".join(lines) + "\n"


def run_lean_benchmark(out):
    with tempfile.TemporaryDirectory(prefix="lm-lean-") as folder:
        work = Path(folder)
        train_file, models = build_lean_assets(work)
        progress(f"assets built in {work}")
        pairs = []
        for pair in lean_schedule():
            measured = []
            for run in pair:
                result = train_once(run, models, train_file, work, LEAN_STEPS, len(pairs) * 2 + len(measured),
                                    count_flops=False)
                measured.append((run, result))
                outcome = result.get("error") or (
                    f"peak {result['train_peak_rss_mib']:,.0f} MiB, fastest step {min(result['step_s']):.2f} s")
                progress(f"  {run.script} {run.shape.name} {run.variant} {'lean' if run.lean else 'own'}: {outcome}")
            pairs.append(measured)
    results = {"machine": machine_description(), "minutes": (time.perf_counter() - START) / 60,
               "rows": summarise_lean(pairs)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "lean.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "lean.md").write_text(lean_markdown(results))
    print(lean_markdown(results))
    progress(f"wrote {out / 'lean.json'} and {out / 'lean.md'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small shape and one round: under 3 minutes")
    parser.add_argument("--smoke", action="store_true",
                        help="the tests' tiny models, one step per run: checks that the benchmark runs, in a minute")
    parser.add_argument("--memory", action="store_true",
                        help="only the memory of gradient checkpointing and 4-bit/8-bit bases, at 12 layers")
    parser.add_argument("--lean", action="store_true",
                        help="only the lean loss against the model's own forward (--no_lean_loss): peak memory and "
                        "tokens/s on the shapes of issue 29, with fewer layers")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="folder for the results")
    args = parser.parse_args(argv)
    if args.lean:
        run_lean_benchmark(args.out)
        return
    if args.memory:
        run_memory_benchmark(args.out)
        return
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = MODES[mode_name]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lm-benchmark-") as folder:
        work = Path(folder)
        # A fresh compilation cache, so that --torch_compile's first step costs the same on every run of this.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "torchinductor")
        corpus, train_file, tokenizers, models = build_assets(work, mode)
        progress(f"assets built in {work}")
        machine = machine_description()
        bf16_speedup = bf16_linear_speedup()
        preprocessing = measure_preprocessing(mode, corpus, train_file, tokenizers, work)
        runs = measure_training(mode, models, train_file, work)
    results = {
        "mode": mode_name,
        "settings": asdict(mode),
        "machine": machine,
        "load_before": round(load_before, 1),
        "load_after": round(os.getloadavg()[0], 1),
        "minutes": (time.perf_counter() - START) / 60,
        "matmul_gflops_s": max(result["matmul_gflops_s"] for _, result in runs),
        "bf16_linear_speedup": bf16_speedup,
        "preprocessing": preprocessing,
        "training": summarise_training(runs),
        "training_runs": [{**asdict(run), **result} for run, result in runs],
    }
    results["targets"] = targets(results, mode)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results, mode))
    print(markdown(results, mode))
    progress(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
