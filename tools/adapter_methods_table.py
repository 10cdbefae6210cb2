"""Regenerate README.md's table of which adapter methods train on which model family.

Each name in `adapters.ADAPTER_CONFIG_MAP` is trained for 2 steps, in-process, by run_clm.py on a tiny GPT-2 and
by run_mlm.py on a tiny RoBERTa: a run that trains gives the adapter's trainable parameters and its size on disk,
a refused run the reason from its one-line error. The table is printed and replaces the text between the
adapter-methods markers in README.md.

Usage: python tools/adapter_methods_table.py [--check]    (about a minute on 2 CPU cores)
--check changes nothing and exits 1 when README's table differs from a fresh run (for maintainers; not in CI).
The tiny models come from tiny/ (`python tools/make_tiny_assets.py tiny --models`), else from a temporary build.
"""
import os

# Before any import of transformers/datasets/torch: they read these once, at import time.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")

import argparse
import contextlib
import io
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]  # the scripts and make_tiny_assets are plain files, not a package

import adapters  # noqa: E402
import make_tiny_assets  # noqa: E402
from readme_table import wrap, write_or_check  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM  # noqa: E402

import run_clm  # noqa: E402
import run_mlm  # noqa: E402
from lmtune.adapter_files import adapter_files  # noqa: E402
from lmtune.errors import shorten  # noqa: E402
from lmtune.modeling import load_config, load_model, load_tokenizer  # noqa: E402

START, END = "<!-- adapter-methods:start -->", "<!-- adapter-methods:end -->"
# (column title, script, tiny model folder, the script's length flag)
FAMILIES = [("GPT-2 (run_clm)", run_clm, "tiny-gpt2", "--block_size"),
            ("RoBERTa (run_mlm)", run_mlm, "tiny-roberta", "--max_seq_length")]
# adapters keeps these older names as copies of the newer configs; each shares its row when the results agree.
ALIASES = {"pfeiffer": "seq_bn", "houlsby": "double_seq_bn", "parallel": "par_bn", "scaled_parallel": "scaled_par_bn",
           "pfeiffer+inv": "seq_bn_inv", "houlsby+inv": "double_seq_bn_inv"}
# Refusals quote adapters' or torch's own errors, which name internals; these say the same in table-cell length.
# Anything not listed here is shown as the script wrote it, cut to 80 characters.
SHORTER = [
    (r"Argument `out_features`=(\d+) is not divis.* `phm_dim`(\d+)", r"bottleneck \1 not divisible by phm_dim \2"),
    (r"Adapter config or type .* not supported by this model.*", "adapters does not support it on this model"),
    (r"The size of tensor a \((\d+)\) must match the size of tensor b \((\d+)\).*", r"tensor sizes \1 and \2 differ"),
    (r"Expected (\d)-dimensional input .* got (\d)-dimensional input.*", r"first step fails: \2-D input, \1-D weight"),
    (r"'(\w+)' object has no attribute '(\w+)'", r"first step fails: \1 has no \2"),
    (r"adapters [\w.]+ does not save (DiReFT's subtract_projection).*", r"adapters does not save \1"),
]


def tiny_assets(stack):
    """The tiny models and corpus: tiny/ if it was built, else a fresh build in a folder removed at exit."""
    tiny = ROOT / "tiny"
    if all((tiny / name).exists() for name in ("tiny-gpt2", "tiny-roberta", "train.txt")):
        return tiny
    tiny = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    print(f"building tiny assets in {tiny} ...", file=sys.stderr)
    train, _ = make_tiny_assets.build_corpus(tiny)
    for kind in ("gpt2", "roberta"):
        tokenizer = make_tiny_assets.build_tokenizer(kind, [train], tiny / f"{kind}-tokenizer")
        make_tiny_assets.build_model(kind, tokenizer, tiny / f"tiny-{kind}")
    return tiny


def measure(script, argv):
    """Train through the script's own cli; the table cell: what it trained, or why it refused."""
    err = io.StringIO()
    # stdout carries the run's metrics and summary, stderr its warnings and the refusal: keep both off the table.
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = script.cli(argv)
    if status != 0:
        error = next(line for line in err.getvalue().splitlines() if ": error: " in line)
        return "✗ " + short_reason(error).replace("|", "\\|")  # a | would end the table cell
    # Count with the script's own setup: it freezes head weights that adapters would leave trainable (RoBERTa's
    # lm_head.dense), so this is the number the script's own summary prints.
    model_args, _, training_args, adapter_args, _ = script.parse_arguments(argv)
    auto_class, loss_type = {run_clm: (AutoModelForCausalLM, "ForCausalLM"),
                             run_mlm: (AutoModelForMaskedLM, "ForMaskedLM")}[script]
    model = load_model(model_args, load_config(model_args), load_tokenizer(model_args), auto_class, loss_type)
    script.setup_adapter(model, adapter_args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    saved = Path(training_args.output_dir) / adapter_args.adapter_name
    size = sum(path.stat().st_size for path in adapter_files(saved))
    return f"✓ {trainable:,} params ({100 * trainable / total:.2f}%), {size / 1000:,.1f} kB"


def short_reason(error):
    # "... cannot be trained on a gpt2 model (REASON); choose ..." or "--adapter_config NAME: REASON, so ..."
    match = re.search(r"cannot be trained on an? \w+ model \((.*)\); choose", error)
    reason = match.group(1) if match else error.split(": ", 3)[-1]
    for pattern, replacement in SHORTER:
        if re.fullmatch(pattern, reason):
            return re.sub(pattern, replacement, reason)
    return shorten(reason, 80)


def run_arguments(tiny, model, length_flag, method, output_dir):
    """Two training steps of the method on a tiny model, as the table reports them."""
    return ["--model_name_or_path", str(tiny / model), "--train_file", str(tiny / "train.txt"), "--train_adapter",
            "--adapter_config", method, "--do_train", "--max_steps", "2", length_flag, "32", "--report_to", "none",
            "--save_strategy", "no", "--disable_tqdm", "true", "--log_level", "error", "--output_dir", str(output_dir)]


def build_table(tiny):
    rows = {name: [] for name in adapters.ADAPTER_CONFIG_MAP}  # method name -> its cells, one per family
    for name, cells in rows.items():
        for _, script, model, length_flag in FAMILIES:
            with tempfile.TemporaryDirectory() as tmp:
                cells.append(measure(script, run_arguments(tiny, model, length_flag, name, Path(tmp) / "out")))
    folded = {alias for alias, name in ALIASES.items() if rows.get(alias) == rows.get(name)}
    lines = ["| method | " + " | ".join(title for title, *_ in FAMILIES) + " |", "| --- " * (len(FAMILIES) + 1) + "|"]
    for name, cells in rows.items():
        if name in folded:
            continue
        label = f"`{name}`" + "".join(f" (`{alias}`)" for alias in folded if ALIASES[alias] == name)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    config = AutoConfig.from_pretrained(tiny / "tiny-gpt2")  # the tiny RoBERTa has the same sizes
    note = (f"Older alias names in parentheses. Measured with adapters {adapters.__version__} on the tiny, randomly "
            f"initialised GPT-2 and RoBERTa of `tools/make_tiny_assets.py` (hidden size {config.n_embd}, "
            f"{config.n_layer} layers, vocab {config.vocab_size}), 2 training steps of 32 tokens; percentages are of "
            "all the model's parameters, sizes those of the saved adapter (its weights counted once).")
    intro = ("Which methods train on which model family, as `--adapter_config NAME` with default settings "
             "(✓: trainable parameters and the saved adapter's size; ✗: why the script refuses it):")
    return "\n".join([wrap(intro), "", *lines, "", wrap(note),
                      "Regenerate with `python tools/adapter_methods_table.py`."])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md's table is out of date")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        table = build_table(tiny_assets(stack))
    print(table)
    print(f"measured in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return write_or_check(table, START, END, "adapter_methods_table.py", args.check)


if __name__ == "__main__":
    sys.exit(main())
