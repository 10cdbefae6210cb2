"""Regenerate README.md's table of which model families train with seq_bn, lora and full fine-tuning.

Each family of FAMILIES is a tiny, randomly initialised model of its transformers model type (hidden size 32,
2 layers, vocabulary 1000), built offline in a fraction of a second. Through the script's own cli, in-process, it
trains for one step with `--adapter_config seq_bn` and with `lora`, each adapter then reloaded onto the unchanged
base model by a second, eval-only run, and fully fine-tuned for one step. A cell is ✓ when the run trained, saved
and (for an adapter) reloaded to the same eval loss; ✗ gives the reason of the one-line refusal. The table is
printed and replaces the text between the model-families markers in README.md. tests/test_families.py runs the
same families through the same functions and checks every cell of README's table against what it measures.

Usage: python tools/model_families_table.py [--check]    (about two minutes on 2 CPU cores)
--check changes nothing and exits 1 when README's table differs from a fresh run (for maintainers; not in CI).
"""
import os

# Before any import of transformers/datasets/torch: they read these once, at import time.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")

import argparse
import contextlib
import importlib
import inspect
import io
import json
import math
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]  # the scripts and make_tiny_assets are plain files, not a package

import adapters  # noqa: E402
import make_tiny_assets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from adapters.wrappers.interfaces import CUSTOM_INTERFACES  # noqa: E402
from adapters.wrappers.model import get_module_name  # noqa: E402
from readme_table import wrap, write_or_check  # noqa: E402
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer  # noqa: E402

import run_clm  # noqa: E402
import run_mlm  # noqa: E402
from lmtune.errors import shorten  # noqa: E402
from lmtune.interfaces import BUILT_IN_INTERFACES  # noqa: E402

START, END = "<!-- model-families:start -->", "<!-- model-families:end -->"
METHODS = ("seq_bn", "lora")
LENGTH = 16  # tokens per example
# Every config takes those of these sizes that it has (GPT-2's n_embd and the like through its attribute map).
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
         "intermediate_size": 64, "head_dim": 16, "max_position_embeddings": 66}
# The ids of the conftest tokenizers: GPT-2's <|endoftext|> is 0; RoBERTa's <s>, <pad>, </s> are 0, 1, 2.
TOKEN_IDS = {"run_clm": {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None},
             "run_mlm": {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, "cls_token_id": 0,
                         "sep_token_id": 2}}
# The README's example of --adapter_interface: CamemBERT is RoBERTa with another tokenizer, but adapters has no
# model code for it.
CAMEMBERT_INTERFACE = {
    "adapter_methods": ["bottleneck", "lora"],
    "model_embeddings": "embeddings",
    "model_layers": "encoder.layer",
    "layer_self_attn": "attention",
    "attn_q_proj": "self.query",
    "attn_k_proj": "self.key",
    "attn_v_proj": "self.value",
    "attn_o_proj": "output.dense",
    "layer_intermediate_proj": "intermediate.dense",
    "layer_output_proj": "output.dense",
}


@dataclass(frozen=True)
class Family:
    model_type: str
    script: str  # "run_clm" or "run_mlm"
    config: dict = field(default_factory=dict)  # set after SMALL and TOKEN_IDS
    interface: Optional[dict] = None  # the fields of an --adapter_interface file

    @property
    def id(self):
        return f"{self.model_type}-{self.script[4:]}" + ("-interface-file" if self.interface else "")

    @property
    def module(self):
        return run_clm if self.script == "run_clm" else run_mlm

    @property
    def route(self):
        """How adapters reaches the model's layers."""
        if self.interface:
            return "--adapter_interface"
        if self.model_type in BUILT_IN_INTERFACES:
            return "interface in the scripts"
        return adapters_support(self.model_type) or "none"


def adapters_support(model_type):
    """What adapters itself brings for a model type, looked up as adapters.init looks it up; None if nothing."""
    if model_type in CUSTOM_INTERFACES:
        return "interface in adapters"
    module = get_module_name(model_type)
    try:
        importlib.import_module(f"adapters.models.{module}.modeling_{module}")
    except ImportError:
        return None
    return "model code in adapters"


# The encoder-decoder types (BART, mBART, PLBart, Whisper): the decoder's sizes beside the encoder's.
BART_SIZES = {"decoder_layers": 2, "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
              "decoder_ffn_dim": 64}

# RoBERTa's position ids count from its padding id, which GPT-2's tokenizer lacks: <|endoftext|> (0), absent from
# the tokenized corpus, plays that part.
ROBERTA_DECODER = {"is_decoder": True, "pad_token_id": 0}

FAMILIES = [
    Family("gpt2", "run_clm"),
    Family("llama", "run_clm"),
    Family("qwen2", "run_clm"),
    Family("gemma2", "run_clm", {"query_pre_attn_scalar": 16, "sliding_window": 8}),
    Family("phi", "run_clm"),
    Family("gptj", "run_clm", {"rotary_dim": 8}),
    Family("bert", "run_clm", {"is_decoder": True}),
    Family("bart", "run_clm", BART_SIZES),
    Family("opt", "run_clm", {"ffn_dim": 64, "word_embed_proj_dim": 32}),
    Family("gpt_neox", "run_clm"),
    Family("gemma", "run_clm"),
    Family("olmo", "run_clm"),
    Family("stablelm", "run_clm"),
    Family("starcoder2", "run_clm"),
    Family("gpt_neo", "run_clm", {"num_layers": 2, "attention_types": [[["global", "local"], 1]], "window_size": 8}),
    Family("phi3", "run_clm"),
    Family("falcon", "run_clm", {"ffn_hidden_size": 64}),
    Family("mistral", "run_clm"),
    Family("qwen3", "run_clm"),
    Family("gemma3_text", "run_clm", {"query_pre_attn_scalar": 16, "sliding_window": 8}),
    Family("electra", "run_clm", {"is_decoder": True, "embedding_size": 32}),
    Family("bert-generation", "run_clm", {"is_decoder": True}),
    Family("roberta", "run_clm", ROBERTA_DECODER),
    Family("xlm-roberta", "run_clm", ROBERTA_DECODER),
    Family("xmod", "run_clm", {**ROBERTA_DECODER, "default_language": "en_XX"}),
    Family("mbart", "run_clm", BART_SIZES),
    Family("plbart", "run_clm", BART_SIZES),
    Family("whisper", "run_clm", {**BART_SIZES, "max_target_positions": 66}),
    Family("roberta", "run_mlm"),
    Family("bert", "run_mlm"),
    Family("distilbert", "run_mlm", {"hidden_dim": 64}),
    Family("albert", "run_mlm", {"embedding_size": 16}),
    Family("electra", "run_mlm", {"embedding_size": 32}),
    Family("deberta", "run_mlm"),
    Family("deberta-v2", "run_mlm"),
    Family("modernbert", "run_mlm", {"global_attn_every_n_layers": 2, "local_attention": 8}),
    Family("xlm-roberta", "run_mlm"),
    Family("bart", "run_mlm", BART_SIZES),
    Family("mbart", "run_mlm", BART_SIZES),
    Family("xmod", "run_mlm", {"default_language": "en_XX"}),
    Family("camembert", "run_mlm"),
    Family("camembert", "run_mlm", interface=CAMEMBERT_INTERFACE),
]


def small_corpus(train_file, folder):
    """The first lines of the corpus: enough for one training step and a small eval set."""
    lines = Path(train_file).read_text(encoding="utf-8").splitlines()
    data = SimpleNamespace(train=Path(folder) / "small-train.txt", validation=Path(folder) / "small-validation.txt")
    data.train.write_text("\n".join(lines[:40]) + "\n", encoding="utf-8")
    data.validation.write_text("\n".join(lines[40:60]) + "\n", encoding="utf-8")
    return data


def build_model(family, tokenizer_dir, folder):
    """Save the family's tiny random model, with the tokenizer of its script's kind, into folder."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config_class = CONFIG_MAPPING[family.model_type]
    # Given to the constructor, which derives other settings from them (such as Qwen2's layer_types).
    accepted = inspect.signature(config_class.__init__).parameters.keys() | config_class.attribute_map.keys()
    settings = {key: value for key, value in {**SMALL, **TOKEN_IDS[family.script]}.items() if key in accepted}
    config = config_class(**{**settings, **family.config}, vocab_size=len(tokenizer))
    auto_class = AutoModelForCausalLM if family.script == "run_clm" else AutoModelForMaskedLM
    torch.manual_seed(0)  # the same weights on every build
    auto_class.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if family.interface:
        (Path(folder) / "interface.json").write_text(json.dumps(family.interface, indent=2))
    return Path(folder)


@dataclass
class Run:
    status: int
    error: str  # the one-line refusal, or ""
    output_dir: Path

    def results(self):
        return json.loads((self.output_dir / "all_results.json").read_text())


def run(family, model_dir, data, output_dir, *extra):
    """One run of the family's script through its cli, in this process, with its output kept off the console."""
    length_flag = "--block_size" if family.script == "run_clm" else "--max_seq_length"
    argv = [str(value) for value in [
        "--model_name_or_path", model_dir, "--train_file", data.train, "--validation_file", data.validation,
        length_flag, LENGTH, "--per_device_train_batch_size", 2, "--per_device_eval_batch_size", 4,
        "--max_eval_samples", 4, "--max_steps", 1, "--learning_rate", "1e-2", "--report_to", "none",
        "--disable_tqdm", "true", "--save_strategy", "no", "--seed", 7, "--log_level", "error",
        "--output_dir", output_dir, *extra,
    ]]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = family.module.cli(argv)
    errors = [line for line in err.getvalue().splitlines() if line.startswith(f"{family.script}.py: error: ")]
    return Run(status, errors[-1] if errors else "", Path(output_dir))


def train_adapter(family, method, model_dir, data, folder):
    """Train the method's adapter for a step, then reload it onto the base model: (training run, reload run or
    None when the training run was refused)."""
    interface = ["--adapter_interface", model_dir / "interface.json"] if family.interface else []
    trained = run(family, model_dir, data, folder / f"{method}-train", "--do_train", "--do_eval", "--train_adapter",
                  "--adapter_config", method, *interface)
    if trained.status != 0:
        return trained, None
    saved = trained.output_dir / adapter_name(family)
    # A custom interface is saved with the adapter; the saved file serves as --adapter_interface for the reload.
    interface = ["--adapter_interface", saved / "adapter_interface.json"] if family.interface else []
    reloaded = run(family, model_dir, data, folder / f"{method}-reload", "--do_eval", "--train_adapter",
                   "--load_adapter", saved, *interface)
    return trained, reloaded


def train_fully(family, model_dir, data, folder):
    return run(family, model_dir, data, folder / "full", "--do_train")


def adapter_name(family):
    return family.script[4:]  # the scripts' default --adapter_name: clm or mlm


def adapter_cell(trained, reloaded):
    if trained.status != 0:
        return refusal_cell(trained)
    if reloaded.status != 0:
        return "✗ the saved adapter does not reload: " + refusal_cell(reloaded)[2:]
    if not math.isclose(reloaded.results()["eval_loss"], trained.results()["eval_loss"], abs_tol=1e-6):
        return "✗ the reloaded adapter gives another eval loss"
    return "✓"


def full_cell(trained):
    if trained.status != 0:
        return refusal_cell(trained)
    if not (trained.output_dir / "model.safetensors").is_file():
        return "✗ no model saved"
    return "✓" if math.isfinite(trained.results()["train_loss"]) else "✗ the loss is not finite"


def refusal_cell(failed):
    if failed.status != 2 or not failed.error:
        return f"✗ exit status {failed.status} without a one-line error"
    return "✗ " + short_reason(failed.error).replace("|", "\\|")  # a | would end the table cell


# The refusals quote adapters' or torch's own errors, which name internals; these say the same in cell length.
SHORTER = [
    (r".*has no support for [\w-]+ models.*", "adapters has no model code or interface for it"),
    (r".*cannot be trained .*\(Adapter config or type .* not supported by this model.*\).* supports \(([\w, ]+)\).*",
     r"its interface offers \1 only"),
    (r".*cannot be trained .*\('NoneType' object has no attribute 'shape'\).*",
     "adapters' code for it needs an encoder's output"),
]


def short_reason(error):
    for pattern, replacement in SHORTER:
        if re.fullmatch(pattern, error):
            return re.sub(pattern, replacement, error)
    return shorten(error.split(": error: ", 1)[-1], 80)


def measure(family, model_dir, data, folder):
    """The runs behind the family's row: {method: (training run, reload run)} and the full fine-tuning run."""
    adapter_runs = {method: train_adapter(family, method, model_dir, data, folder) for method in METHODS}
    return adapter_runs, train_fully(family, model_dir, data, folder)


def table_row(family, adapter_runs, full_run):
    cells = [adapter_cell(*adapter_runs[method]) for method in METHODS]
    return [family_label(family), family.script + ".py", family.route, *cells, full_cell(full_run)]


def family_label(family):
    return f"`{family.model_type}`" + (" + interface file" if family.interface else "")


def table_header():
    return ["| model type | script | adapters reaches its layers through | seq_bn | lora | full fine-tuning |",
            "| --- | --- | --- | --- | --- | --- |"]


def build_table(rows):
    lines = table_header() + ["| " + " | ".join(row) + " |" for row in rows]
    note = (f"Measured with adapters {adapters.__version__} and transformers {transformers.__version__} on "
            "tiny random models of each type (hidden size 32, 2 layers, vocabulary 1000), one training step each; ✓ "
            "for an adapter: it trained, saved, and reloaded onto the unchanged base model to the same eval loss.")
    return "\n".join([*lines, "", wrap(note),
                      "Regenerate with `python tools/model_families_table.py`."])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md's table is out of date")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, _ = make_tiny_assets.build_corpus(tmp)
        data = small_corpus(train, tmp)
        tokenizers = {"run_clm": make_tiny_assets.build_tokenizer("gpt2", [train], tmp / "gpt2-tokenizer"),
                      "run_mlm": make_tiny_assets.build_tokenizer("roberta", [train], tmp / "roberta-tokenizer")}
        rows = []
        for family in FAMILIES:
            model_dir = build_model(family, tokenizers[family.script], tmp / family.id / "model")
            rows.append(table_row(family, *measure(family, model_dir, data, tmp / family.id)))
            print(" | ".join(rows[-1]), file=sys.stderr)
    table = build_table(rows)
    print(table)
    print(f"measured in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return write_or_check(table, START, END, "model_families_table.py", args.check)


if __name__ == "__main__":
    sys.exit(main())
