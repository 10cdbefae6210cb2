"""Paths for devices that this machine does not have (GPUs, TPUs), checked where they can be without them: every
adapter and the merged model are put where the model is, shown on torch's "meta" device, which no computation
reaches; a TPU launched with torchrun keeps XLA; weights that XLA tensors hold apart are saved apart; no samples are
generated on XLA. The runs themselves on a GPU or a TPU are not made here (README, Scaling out)."""

import logging
from types import SimpleNamespace

import adapters
import pytest
import torch
from conftest import tiny_run_arguments
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer

import run_clm
from lmtune import hardware
from lmtune.adapter_files import save_adapter_files
from lmtune.adapter_setup import setup_adapter
from lmtune.merge import plain_model
from lmtune.samples import write_samples
from lmtune.stopping import worker_ignoring_stop_signals, workers_ignoring_stop_signals
from lmtune.trainer import AdapterOnlyTrainer


def saved_adapter(base, folder, name, config):
    """An adapter of base, freshly initialised and saved into folder as adapters saves one."""
    model = AutoModelForCausalLM.from_pretrained(base)
    adapters.init(model)
    model.add_adapter(name, config=config)
    model.save_adapter(str(folder), name)
    return folder


def adapter_arguments(assets, tmp_path, *flags):
    return run_clm.parse_arguments(tiny_run_arguments(run_clm, assets, tmp_path / "out", *flags))[3]


@pytest.mark.parametrize("flags", [
    ["--train_adapter", "--adapter_config", "seq_bn"],
    ["--train_adapter", "--adapter_config", "prefix_tuning"],
    ["--train_adapter", "--adapter_config", "loreft"],
    ["--train_adapter", "--load_adapter", "SAVED", "--load_lang_adapter", "LANGUAGE"],
    ["--do_eval", "--load_adapter", "SAVED"],
], ids=["seq_bn", "prefix_tuning", "loreft", "load_adapter-and-lang_adapter", "evaluate-loaded"])
def test_every_adapter_added_or_loaded_lands_on_the_models_device(flags, assets, tmp_path):
    # On a GPU, bitsandbytes puts a quantized base there and the Trainer leaves it: adapters created its bottleneck,
    # prefix and ReFT weights on the CPU beside it. "meta" stands for that device here.
    saved = {"SAVED": saved_adapter(assets.tiny_gpt2, tmp_path / "saved", "clm", "seq_bn"),
             "LANGUAGE": saved_adapter(assets.tiny_gpt2, tmp_path / "language", "language", "seq_bn")}
    adapter_args = adapter_arguments(assets, tmp_path, *(str(saved.get(flag, flag)) for flag in flags))
    model = AutoModelForCausalLM.from_pretrained(assets.tiny_gpt2).to("meta")
    setup_adapter(model, adapter_args)
    assert len(model.adapters_config.adapters) == (2 if "--load_lang_adapter" in flags else 1)
    elsewhere = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()]
                 if tensor.device.type != "meta"]
    assert not elsewhere, elsewhere
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())  # the adapter trains in float32


def test_the_merged_copy_is_built_on_the_adapter_models_device_and_dtype(assets):
    model = AutoModelForCausalLM.from_pretrained(assets.tiny_gpt2, dtype=torch.bfloat16)
    adapters.init(model)
    model.add_adapter("clm", config="lora")
    model.merge_adapter("clm")
    merged = plain_model(model.to("meta"))  # from_pretrained built it on the CPU, away from the comparison's inputs
    assert type(merged).__name__ == "GPT2LMHeadModel"
    assert {tensor.device.type for tensor in merged.state_dict().values()} == {"meta"}
    assert {parameter.dtype for parameter in merged.parameters()} == {torch.bfloat16}


def test_torchrun_on_a_tpu_keeps_xla_rather_than_a_cpu_process_group(monkeypatch):
    # torch.accelerator knows no XLA device: a TPU run under torchrun was sent to the CPU, with gloo.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(hardware.torch.accelerator, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "is_torch_xla_available", lambda: True)
    hardware.use_cpu_process_group_under_launcher()
    assert "ACCELERATE_USE_CPU" not in hardware.os.environ
    monkeypatch.setattr(hardware, "is_torch_xla_available", lambda: False)  # CPUs alone: their process group
    hardware.use_cpu_process_group_under_launcher()
    assert hardware.os.environ["ACCELERATE_USE_CPU"] == "true"


class WithoutDataPointer(torch.Tensor):
    """A CPU tensor that reports data_ptr() 0, as an XLA tensor does; what it writes is a plain tensor."""

    def data_ptr(self):
        return 0

    def contiguous(self, *args, **kwargs):
        return super().contiguous(*args, **kwargs).as_subclass(torch.Tensor)


@pytest.mark.parametrize("config", ["seq_bn", "prefix_tuning"])
def test_weights_without_a_data_pointer_are_saved_apart_and_shared_ones_once(config, assets, tmp_path):
    # XLA tensors report data_ptr() 0, all of them: every pair of weights of one shape was taken for one weight and
    # saved once. Prefix tuning's pool, named by every layer, is one weight and is still saved once.
    model = AutoModelForCausalLM.from_pretrained(assets.tiny_gpt2)
    adapters.init(model)
    model.add_adapter("clm", config=config)
    expected = tmp_path / "expected"
    save_adapter_files(model, expected, "clm", use_safetensors=True)
    state_dict = {name: tensor.as_subclass(WithoutDataPointer) for name, tensor in model.state_dict().items()}
    save_adapter_files(model, tmp_path / "xla", "clm", use_safetensors=True, gathered_state_dict=state_dict)
    weights, reference = load_file(tmp_path / "xla/adapter.safetensors"), load_file(expected / "adapter.safetensors")
    assert weights.keys() == reference.keys() and len(weights) > 2
    assert all(torch.equal(weights[key], reference[key]) for key in weights)
    assert torch.load(tmp_path / "xla/pytorch_adapter.bin").keys() == weights.keys()


def test_no_samples_are_generated_on_xla_said_in_one_line(caplog):
    # Generating on XLA compiles a new graph for every token: on XLA's CPU device the run then died (exit 139).
    trainer = SimpleNamespace(args=SimpleNamespace(device=torch.device("xla")), model=torch.nn.Linear(1, 1))
    with caplog.at_level(logging.WARNING, logger="lmtune.samples"):
        assert write_samples(None, trainer, None, None, 32, SimpleNamespace(num_samples=3), None) is None
    assert "No samples on XLA (TPUs)" in caplog.text


def test_loader_workers_ignore_the_stop_signals_behind_xlas_device_loader():
    # On XLA the Trainer's loader is torch_xla's device loader around accelerate's: the run failed at its first step.
    loader = torch.utils.data.DataLoader(list(range(4)), num_workers=1)
    device_loader = SimpleNamespace(_loader=loader)  # what torch_xla's MpDeviceLoader keeps of the loader it wraps
    assert workers_ignoring_stop_signals(device_loader) is device_loader
    assert loader.worker_init_fn.func is worker_ignoring_stop_signals


def test_the_best_checkpoint_under_deepspeed_is_loaded_by_the_engine(monkeypatch):
    # Under ZeRO-3 each process holds partitions of every weight: adapters' load_adapter, which the best checkpoint
    # went through, copies whole tensors. GPU only, so the calls are what is shown here.
    calls = []
    monkeypatch.setattr(Trainer, "_load_best_model", lambda self: calls.append("engine"))
    trainer = AdapterOnlyTrainer.__new__(AdapterOnlyTrainer)
    trainer.load_trained_adapter = lambda folder: calls.append("adapter")
    trainer.adapter_name, trainer.state = "clm", SimpleNamespace(best_model_checkpoint="out/checkpoint-2")
    for deepspeed in (True, False):
        trainer.is_deepspeed_enabled = deepspeed
        trainer._load_best_model()
    assert calls == ["engine", "adapter"]
