"""The lean loss (lmtune/lean_loss.py): the model's own loss and gradients without the full logits, for each family
and method; the same metrics through the scripts, --eval_stride included; and the model's own forward, with one
line, where the lean path would differ."""

import inspect
from types import SimpleNamespace

import model_families_table as families
import pytest
import torch
from conftest import read_json, tiny_run_arguments
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, Gemma2Config

import run_clm
import run_mlm
from lmtune.adapter_setup import init_adapters
from lmtune.errors import UsageError
from lmtune.lean_loss import (
    CAUSAL,
    MASKED,
    TOLERANCES,
    first_difference,
    fixed_reason,
    lean_evaluation,
    lean_loss,
    loss_and_gradients,
    refuse_liger_with_invertible_adapters,
)
from lmtune.metrics import token_losses

VOCAB = 300
FAMILIES = {
    "llama": ("run_clm", {}), "gpt2": ("run_clm", {}), "gpt_neox": ("run_clm", {}),
    "opt": ("run_clm", {"ffn_dim": 64, "word_embed_proj_dim": 32}),
    "bert": ("run_mlm", {}), "roberta": ("run_mlm", {}), "distilbert": ("run_mlm", {"hidden_dim": 64}),
    "electra": ("run_mlm", {"embedding_size": 32}),
}
METHODS = ("seq_bn", "lora", "full")
# Gradient accumulation: the Trainer divides each batch's summed loss by the labelled tokens of the whole step.
ACCUMULATED = 3
# A short run of each script, with gradient accumulation.
RUN = ["--do_train", "--do_eval", "--max_steps", "2", "--gradient_accumulation_steps", "2", "--log_level", "info"]


def tiny_model(model_type, method):
    """The family's tiny random model (hidden size 32, no dropout) with a trainable adapter, or all of it trainable;
    LoRA's B is made non-zero so that every LoRA weight gets a gradient."""
    script, extra = FAMILIES[model_type]
    config_class = CONFIG_MAPPING[model_type]
    accepted = inspect.signature(config_class.__init__).parameters.keys() | config_class.attribute_map.keys()
    settings = {key: value for key, value in {**families.SMALL, **families.TOKEN_IDS[script]}.items()
                if key in accepted}
    config = config_class(**{**settings, **extra}, vocab_size=VOCAB)
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "dropout", "attention_dropout", "hidden_dropout", "activation_dropout"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    torch.manual_seed(0)
    model = (AutoModelForCausalLM if script == "run_clm" else AutoModelForMaskedLM).from_config(config)
    if method != "full":
        init_adapters(model, SimpleNamespace(adapter_interface=None))
        model.add_adapter("lean", config=method)
        model.train_adapter("lean")
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.02)
    return model.train(), CAUSAL if script == "run_clm" else MASKED


def tiny_batch(objective):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, VOCAB, (2, 16), generator=generator)
    labels = input_ids.clone()
    if objective == CAUSAL:
        labels[:, 0] = -100  # as run_clm labels each block's first token
    else:
        labels[torch.rand(input_ids.shape, generator=generator) > 0.3] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def both_ways(model, objective, inputs):
    """(loss, gradients of the trained weights) of the model's own path, as the Trainer computes it with
    num_items_in_batch (run_mlm: loss_per_masked_token), and of the lean path; and the weights' names."""
    labels = inputs["labels"]
    items = ((labels[:, 1:] if objective == CAUSAL else labels) != -100).sum() * ACCUMULATED
    trained = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]

    def own():
        if objective == CAUSAL:
            return model(**inputs, num_items_in_batch=items).loss
        logits = model(**{name: value for name, value in inputs.items() if name != "labels"}).logits
        return run_mlm.loss_per_masked_token({"logits": logits}, labels, items)

    own_result = loss_and_gradients(own, trained, 1.0)
    lean_result = loss_and_gradients(lambda: lean_loss(objective, model, model, inputs, items), trained, 1.0)
    return own_result, lean_result, [name for name, _ in trained]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_loss_gradients_and_evaluation_equal_the_models_own(model_type, method):
    model, objective = tiny_model(model_type, method)
    inputs = tiny_batch(objective)
    own, lean, names = both_ways(model, objective, inputs)
    assert first_difference(own, lean, names, TOLERANCES[torch.float32])[0] is None
    assert lean[0] == pytest.approx(float(own[0]), rel=1e-6)
    total = torch.sqrt(sum((grad ** 2).sum() for grad in own[1]))
    for own_grad, lean_grad in zip(own[1], lean[1]):
        assert float((lean_grad - own_grad).norm()) <= 1e-5 * max(float(own_grad.norm()), 1e-3 * float(total))
    # Evaluation: what preprocess_logits_for_metrics keeps of the full logits, at every labelled position.
    model.eval()
    offset = 1 if objective == CAUSAL else 0
    with torch.no_grad():
        logits = model(**{name: value for name, value in inputs.items() if name != "labels"}).logits
        predictions, losses = lean_evaluation(objective, model, model, inputs)
    labels = inputs["labels"][:, offset:]
    counted = labels != -100
    length = logits.shape[1] - offset
    assert torch.equal(predictions[:, :length][counted], logits.argmax(dim=-1)[:, :length][counted])
    torch.testing.assert_close(losses[:, :length], token_losses(logits[:, :length], labels), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "roberta"])
def test_under_bf16_autocast_within_its_rounding(model_type):
    model, objective = tiny_model(model_type, "seq_bn")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own, lean, names = both_ways(model, objective, tiny_batch(objective))
    assert first_difference(own, lean, names, TOLERANCES[torch.bfloat16])[0] is None


def lean_lines(caplog):
    return [record.getMessage() for record in caplog.records if record.name == "lmtune.lean_loss"]


def same_metrics(lean, own):
    assert lean.keys() == own.keys()
    for key in lean:
        if "runtime" not in key and "per_second" not in key:
            assert lean[key] == pytest.approx(own[key], rel=1e-5, abs=1e-7), key


def test_run_clm_gives_the_same_metrics_with_tied_embeddings_and_eval_stride(assets, tmp_path, caplog):
    def run(*extra):
        return run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path / str(len(extra)), *RUN, "--train_adapter",
                                               "--eval_stride", "16", *extra, eval_samples=8))

    lean = run()
    assert [line.split(" without")[0] for line in lean_lines(caplog)] == [
        "The lean loss computes the training loss", "The lean loss computes the evaluation loss"]
    caplog.clear()
    own = run("--no_lean_loss")
    assert lean_lines(caplog) == []
    same_metrics(lean, own)
    assert "eval_strided_loss" in lean
    assert read_json(tmp_path / "0" / "all_results.json")["eval_loss"] == lean["eval_loss"]


@pytest.mark.parametrize("adapter", [[], ["--train_adapter", "--adapter_config", "prompt_tuning"]],
                         ids=["full", "prompt_tuning"])
def test_run_mlm_gives_the_same_metrics(assets, tmp_path, caplog, adapter):
    """Prompt tuning's virtual tokens are positions of the hidden states whose labels its collator sets to -100:
    the lean path reads them as the model's own loss does, and gives its numbers."""
    def run(*extra):
        return run_mlm.main(tiny_run_arguments(run_mlm, assets, tmp_path / str(len(extra)), *RUN, "--line_by_line",
                                               *adapter, *extra, eval_samples=8))

    lean = run()
    assert len(lean_lines(caplog)) == 2 and "lean loss is off" not in caplog.text
    same_metrics(lean, run("--no_lean_loss"))


@pytest.fixture(scope="module")
def soft_capped(assets, tmp_path_factory):
    """A tiny Gemma 2, whose forward soft-caps the logits after its output layer (at 2, so that it shows)."""
    folder = tmp_path_factory.mktemp("gemma2")
    tokenizer = AutoTokenizer.from_pretrained(assets.gpt2_tokenizer)
    config = Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                          vocab_size=len(tokenizer), final_logit_softcapping=2.0, bos_token_id=0, eos_token_id=0,
                          pad_token_id=None)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_soft_capped_head_keeps_the_models_own_forward_with_one_line(assets, soft_capped, tmp_path, caplog):
    def run(*extra):
        return run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path / str(len(extra)), *RUN, *extra,
                                               model=soft_capped, eval_samples=8))

    lean = run()
    [line] = lean_lines(caplog)
    assert line.startswith("The lean loss is off (training): the model changes its logits after its output layer")
    same_metrics(lean, run("--no_lean_loss"))


def test_the_flag_is_in_help(capsys):
    with pytest.raises(SystemExit):
        run_clm.parse_arguments(["--help"])
    text = capsys.readouterr().out
    assert "--lean_loss" in text and "--no_lean_loss" in text and "without the full batch x length" in " ".join(
        text.split())


def fake_trainer(**settings):
    args = {"device": torch.device("cpu"), "torch_compile": False, "use_liger_kernel": False, **settings}
    return SimpleNamespace(args=SimpleNamespace(**args), is_fsdp_enabled=settings.get("fsdp", False),
                           is_deepspeed_enabled=False, label_smoother=None)


@pytest.mark.parametrize("settings, reason", [
    ({"device": torch.device("xla")}, "on XLA"), ({"fsdp": True}, "FSDP gathers"),
    ({"torch_compile": True}, "--torch_compile"), ({"use_liger_kernel": True}, "--use_liger_kernel"),
])
def test_where_the_lean_path_is_not_proven_the_reason_is_named(settings, reason):
    assert fixed_reason(fake_trainer(**settings)).startswith(reason) and fixed_reason(fake_trainer()) is None


def test_liger_with_an_invertible_adapter_is_refused():
    model, _ = tiny_model("llama", "seq_bn")
    model.add_adapter("inverse", config="seq_bn_inv")
    trainer = fake_trainer(use_liger_kernel=True)
    trainer.model, trainer.accelerator = model, SimpleNamespace(unwrap_model=lambda model: model)
    with pytest.raises(UsageError, match="--use_liger_kernel .* invertible adapter"):
        refuse_liger_with_invertible_adapters(trainer)
    trainer.model, _ = tiny_model("llama", "lora")
    refuse_liger_with_invertible_adapters(trainer)  # any other adapter keeps working with Liger
