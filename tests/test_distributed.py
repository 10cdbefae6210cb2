"""Beyond one process: launched on two processes (torchrun on one node or two, accelerate with FSDP), a run computes
what one process computes with the whole batch.

Two processes with B examples each take the same steps on the same examples as one process with 2B, so the reported
train_loss, eval_loss and eval accuracy must agree up to float rounding: each process sums the losses of its share,
and the shares are added in another order than one process adds them, which moves a float32 loss of about 7 by
~1e-7 per step (measured: at most 7e-7 here). A real difference is 1e-3 or more (3.4e-3 in run_clm's train_loss and
1.5e-2 in run_mlm's before the scripts averaged over all processes and masked per example), so 1e-5 tells them
apart. The models have no dropout, whose random draws would differ between processes.
"""

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from types import SimpleNamespace

import psutil
import pytest
import torch
from accelerate.utils import DistributedType
from conftest import REPO, assert_refused_in_one_line, read_json, tiny_run_arguments
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import run_clm
import run_mlm
from lmtune.checks import check_sharding
from lmtune.output_dir import last_complete_checkpoint

MODES = {"adapter": ["--train_adapter"], "full": []}
METRICS = ("train_loss", "eval_loss", "eval_accuracy")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def arguments(script, assets, dropout_free, output_dir, mode, *extra):
    # 24 validation examples in batches of 5: the last batch is short, and split unevenly over two processes.
    model = dropout_free.gpt2 if script is run_clm else dropout_free.roberta
    return tiny_run_arguments(script, assets, output_dir, "--do_train", "--do_eval", "--max_steps", "3",
                              "--per_device_eval_batch_size", "5", "--num_samples", "1", *MODES[mode], *extra,
                              eval_samples=24, model=model)


@pytest.fixture(scope="module")
def one_process(assets, dropout_free, tmp_path_factory):
    """Runs one process with 8 examples per batch, once per script and mode; returns its output folder."""
    done = {}

    def run(script, mode):
        if (script, mode) not in done:
            output_dir = tmp_path_factory.mktemp(f"one-process-{script.__name__}-{mode}")
            script.main(arguments(script, assets, dropout_free, output_dir, mode, "--per_device_train_batch_size", "8"))
            done[script, mode] = output_dir
        return done[script, mode]

    return run


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(launcher, script, args, logs):
    """Start two processes with 4 examples per batch each, as a user would; returns their combined output."""
    script_path = str(REPO / f"{script.__name__}.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if launcher == "one node":
        commands = [[*torchrun, "--standalone", "--nproc_per_node", "2", script_path, *args]]
    elif launcher == "two nodes":  # what a job on two machines starts, one launch per machine
        endpoint = f"127.0.0.1:{free_port()}"
        commands = [[*torchrun, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1", "--rdzv_backend",
                     "c10d", "--rdzv_endpoint", endpoint, script_path, *args] for rank in (0, 1)]
    else:  # FSDP through accelerate with the shipped configuration
        commands = [[sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                     str(REPO / "configs/fsdp.yaml"), str(REPO / "tests/cpu_fsdp.py"), script_path, *args]]
    log_paths = [logs / f"launch-{index}.log" for index in range(len(commands))]
    processes = [subprocess.Popen(command, stdout=path.open("w"), stderr=subprocess.STDOUT, text=True, env=ENV)
                 for command, path in zip(commands, log_paths)]
    statuses = [process.wait(timeout=600) for process in processes]
    output = "".join(path.read_text() for path in log_paths)
    assert statuses == [0] * len(processes), output[-3000:]
    return output


@pytest.mark.parametrize("script, mode, launcher", [
    (run_clm, "adapter", "one node"),
    (run_mlm, "full", "one node"),
    (run_clm, "full", "two nodes"),
    (run_mlm, "adapter", "two nodes"),
], ids=["clm-adapter-torchrun", "mlm-full-torchrun", "clm-full-two-nodes", "mlm-adapter-two-nodes"])
def test_two_processes_report_what_one_reports_with_twice_the_batch(script, mode, launcher, assets, dropout_free,
                                                                     one_process, tmp_path):
    output_dir = tmp_path / "out"
    output = launch(launcher, script, arguments(script, assets, dropout_free, output_dir, mode), tmp_path)
    single = read_json(one_process(script, mode) / "all_results.json")
    double = read_json(output_dir / "all_results.json")
    for key in METRICS:
        assert double[key] == pytest.approx(single[key], abs=1e-5), key
    # Samples, made by the main process alone while the other one ends: the same as one process makes.
    assert (output_dir / "samples.jsonl").read_text() == (one_process(script, mode) / "samples.jsonl").read_text()
    assert read_json(output_dir / "trainer_state.json")["global_step"] == 3
    assert double["eval_samples"] == 24
    adapter_name = script.__name__.removeprefix("run_")  # the default --adapter_name
    assert (output_dir / (f"{adapter_name}/adapter_config.json" if mode == "adapter" else "config.json")).is_file()
    assert output.count("***** summary *****") == 1  # only the main process reports


def test_a_signal_to_one_process_stops_both_at_the_same_step_with_complete_checkpoints(assets, dropout_free, tmp_path):
    # SLURM signals every process, but a launcher or a node may pass it on to some only: here it reaches rank 1, which
    # logs nothing, while rank 0 gets no signal of its own. Both must save the same step and stop, agreeing through
    # the group they train with, which claims to be NCCL's and allows no second one (tests/distributed_probe.py).
    # Rank 1 writes its random state late: no checkpoint is marked complete without it. (Resuming from such a
    # checkpoint on several processes: test_two_cpu_processes_resume_from_a_checkpoint.)
    output_dir = tmp_path / "out"
    args = arguments(run_clm, assets, dropout_free, output_dir, "adapter", "--max_steps", "12", "--save_strategy",
                     "steps", "--save_steps", "5", "--logging_steps", "1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests/distributed_probe.py"), str(tmp_path), str(REPO / "run_clm.py"), *args]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**ENV, "PYTHONUNBUFFERED": "1"})
    output, losses = [], 0
    for line in launcher.stdout:
        output.append(line)
        losses += "'loss'" in line
        if losses == 6 and "'loss'" in line:  # rank 0 has logged step 6
            rank_1 = next(child for child in psutil.Process(launcher.pid).children()
                          if child.environ().get("RANK") == "1")
            rank_1.send_signal(signal.SIGTERM)
    output = "".join(output)
    assert launcher.wait(timeout=300) != 0, output[-3000:]
    stopped = [line for line in output.splitlines() if "run_clm.py: stopped: SIGTERM received" in line]
    assert stopped, output[-3000:]
    step = int(stopped[0].split("after step ")[1].split()[0])
    assert 6 < step < 12 and all(f"after step {step} of 12" in line for line in stopped), stopped
    checkpoint = output_dir / f"checkpoint-{step}"
    assert last_complete_checkpoint(output_dir) == str(checkpoint)
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    assert read_json(checkpoint / "trainer_state.json")["global_step"] == step
    assert not (output_dir / "all_results.json").exists()
    assert (tmp_path / "completeness.txt").read_text().split() == ["checkpoint-5", "True", checkpoint.name, "True"]


def test_two_processes_merge_the_trained_lora_on_the_main_process_alone(assets, dropout_free, tmp_path):
    output_dir = tmp_path / "out"
    launch("one node", run_clm, arguments(run_clm, assets, dropout_free, output_dir, "adapter", "--adapter_config",
                                          "lora", "--merge_adapter"), tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(output_dir / "merged")  # plain transformers, written once
    assert not any(name.startswith("adapters") for name in merged.state_dict())
    reloaded = run_clm.main(tiny_run_arguments(run_clm, assets, tmp_path / "merged-eval", "--do_eval",
                                               "--per_device_eval_batch_size", "5", eval_samples=24,
                                               model=output_dir / "merged"))
    assert reloaded["eval_loss"] == pytest.approx(read_json(output_dir / "all_results.json")["eval_loss"], abs=1e-5)


def test_two_cpu_processes_resume_from_a_checkpoint(assets, dropout_free, tmp_path):
    # transformers maps the optimizer state to cpu:<rank> on CPU processes, which torch.load cannot restore to: the
    # second launch ended in "don't know how to restore data location of torch.storage.UntypedStorage".
    output_dir = tmp_path / "out"
    for steps, name in (("2", "first"), ("4", "second")):
        (tmp_path / name).mkdir()
        launch("one node", run_clm, arguments(run_clm, assets, dropout_free, output_dir, "adapter", "--max_steps",
                                              steps, "--save_strategy", "steps", "--save_steps", "2"),
               tmp_path / name)
    state = read_json(output_dir / "trainer_state.json")
    assert state["global_step"] == 4 and last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-4")
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps == [2, 4]  # step 2 from the first launch's checkpoint, then the second launch's two steps
    assert read_json(output_dir / "all_results.json")["train_loss"] > 0


def test_fsdp_trains_and_saves_the_whole_adapter(assets, dropout_free, one_process, tmp_path):
    # run_clm only: accelerate 1.16 cannot shard RoBERTa's LM head with FSDP2 (its bias is tied to lm_head.bias).
    output_dir = tmp_path / "out"
    output = launch("fsdp", run_clm, arguments(run_clm, assets, dropout_free, output_dir, "adapter"), tmp_path)
    single_dir = one_process(run_clm, "adapter")
    single, sharded = read_json(single_dir / "all_results.json"), read_json(output_dir / "all_results.json")
    for key in METRICS:
        assert sharded[key] == pytest.approx(single[key], abs=1e-5), key
    # Every weight of the adapter, whole, though each process held half of each: gathered before it was written.
    weights, single_weights = load_file(output_dir / "clm/adapter.safetensors"), load_file(
        single_dir / "clm/adapter.safetensors")
    assert weights.keys() == single_weights.keys()
    assert all(torch.allclose(weights[key], single_weights[key], atol=1e-6) for key in weights)
    assert (output_dir / "clm/adapter_config.json").read_text() == (single_dir / "clm/adapter_config.json").read_text()
    # No samples from a sharded model, which the main process alone cannot run: said, and nothing hangs.
    assert not (output_dir / "samples.jsonl").exists()
    assert "No samples: the model is sharded over the processes" in output
    reloaded = run_clm.main(tiny_run_arguments(
        run_clm, assets, tmp_path / "reloaded", "--do_eval", "--train_adapter", "--load_adapter", output_dir / "clm",
        "--per_device_eval_batch_size", "5", eval_samples=24, model=dropout_free.gpt2))
    assert reloaded["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-5)


def test_fsdp_resumes_and_reloads_the_best_checkpoint_into_the_sharded_model(assets, dropout_free, tmp_path):
    # adapters' load_adapter copied whole tensors into the shards of each process: both ended in "does not fit".
    # Trained on code, evaluated on prose, where the adapter gets worse: the best checkpoint is the first one.
    def run(output_dir):
        return launch("fsdp", run_clm, tiny_run_arguments(
            run_clm, assets, output_dir, "--do_train", "--do_eval", "--train_adapter", "--max_steps", "4",
            "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2",
            "--load_best_model_at_end", "--learning_rate", "1e-1", "--log_level", "info", train="code",
            model=dropout_free.gpt2), output_dir.parent)

    straight, resumed = tmp_path / "straight" / "out", tmp_path / "resumed" / "out"
    straight.parent.mkdir()
    run(straight)
    state = read_json(straight / "trainer_state.json")
    evaluations = {entry["step"]: entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry}
    assert state["best_model_checkpoint"] == str(straight / "checkpoint-2") and evaluations[2] < evaluations[4]
    assert read_json(straight / "all_results.json")["eval_loss"] == pytest.approx(evaluations[2], abs=1e-6)
    final = load_file(straight / "clm/adapter.safetensors")
    assert all(torch.equal(final[key], weight)
               for key, weight in load_file(straight / "checkpoint-2/clm/adapter.safetensors").items())
    # The adapter is what a resume loads: FSDP's whole-model file, the size of the frozen base, is left out.
    assert not list(straight.glob("checkpoint-*/pytorch_model_fsdp*"))
    assert (straight / "checkpoint-2/optimizer.bin").is_file()  # accelerate's full optimizer state, which it needs

    resumed.mkdir(parents=True)
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    assert "Continuing training from checkpoint" in run(resumed)
    for key in ("train_loss", "eval_loss"):
        assert read_json(resumed / "all_results.json")[key] == pytest.approx(
            read_json(straight / "all_results.json")[key], abs=1e-6)
    assert all(torch.equal(final[key], weight)
               for key, weight in load_file(resumed / "clm/adapter.safetensors").items())


def test_a_batch_split_over_processes_is_masked_as_the_whole_batch(assets):
    tokenizer = AutoTokenizer.from_pretrained(assets.roberta_tokenizer)
    texts = ["the quick brown fox jumps over the lazy dog " * 6, "a short line", "another line of text " * 3,
             "the quick brown fox jumps over the lazy dog " * 6]  # the same text twice: masked alike
    examples = [tokenizer(text) for text in texts]  # of different lengths: batches are padded
    collator = run_mlm.MaskingCollator(tokenizer=tokenizer, mlm_probability=0.15, seed=7)
    collator.on_epoch_begin(None, SimpleNamespace(epoch=1.5), None)

    def masked(batch):
        padded = collator(batch)
        lengths = [len(example["input_ids"]) for example in batch]  # without the padding
        return [(padded["input_ids"][row, :n], padded["labels"][row, :n]) for row, n in enumerate(lengths)]

    whole = masked(examples)
    halves = masked(examples[:2]) + masked(examples[2:])  # two processes
    singles = [pair for example in examples for pair in masked([example])]  # batch size 1
    reordered = masked(examples[::-1])[::-1]
    for split in (halves, singles, reordered):
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(split, whole))
    assert (whole[0][1] != -100).any() and torch.equal(whole[0][1], whole[3][1])
    padded = collator(examples)["labels"]
    assert (padded[1, len(examples[1]["input_ids"]):] == -100).all()  # padding is never a masked token


# An adapter trained, and nothing asked of it that needs the whole model in one process.
ADAPTER_ONLY = SimpleNamespace(train_adapter=True, merge_adapter=False, export_peft=False)

# Shardings by what sets them: FSDP by the environment that `accelerate launch` (or --fsdp) sets, its version and
# state dict type; DeepSpeed by the zero_optimization of --deepspeed's configuration.
FSDP1 = {"fsdp": ("1", "FULL_STATE_DICT")}
FSDP2_SHARDED = {"fsdp": ("2", "SHARDED_STATE_DICT")}
FSDP2 = {"fsdp": ("2", "FULL_STATE_DICT")}
ZERO3_WITHOUT_GATHERING = {"zero": {"stage": 3}}
ZERO3 = {"zero": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}
ZERO2 = {"zero": {"stage": 2}}


def arguments_under(monkeypatch, fsdp=None, zero=None, distributed_type=DistributedType.MULTI_GPU):
    """A stand-in for the training arguments of processes on GPUs, with what check_sharding reads."""
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    if fsdp is not None:
        version, state_dict_type = fsdp
        for key, value in (("ACCELERATE_USE_FSDP", "true"), ("FSDP_VERSION", version),
                           ("FSDP_STATE_DICT_TYPE", state_dict_type)):
            monkeypatch.setenv(key, value)
    deepspeed = None if zero is None else SimpleNamespace(deepspeed_config={"zero_optimization": zero})
    return SimpleNamespace(distributed_state=SimpleNamespace(distributed_type=distributed_type),
                           deepspeed_plugin=deepspeed)


@pytest.mark.parametrize("sharding, flagged", [
    (FSDP1, "fsdp_version: 2"), (FSDP2_SHARDED, "FULL_STATE_DICT"),
    (ZERO3_WITHOUT_GATHERING, "stage3_gather_16bit_weights_on_model_save"),
], ids=["fsdp1", "sharded-state-dict", "zero3-without-gathering"])
def test_a_sharding_the_adapter_could_not_be_saved_from_is_refused(sharding, flagged, monkeypatch):
    training_args = arguments_under(monkeypatch, **sharding)
    with pytest.raises(run_clm.UsageError, match=flagged):
        check_sharding(training_args, ADAPTER_ONLY)
    check_sharding(training_args, SimpleNamespace(train_adapter=False))  # the Trainer saves a whole model itself


@pytest.mark.parametrize("sharding", [FSDP2, ZERO3, ZERO2], ids=["fsdp2-full-state-dict", "zero3-gathering", "zero2"])
def test_a_sharding_the_adapter_can_be_saved_from_is_accepted(sharding, monkeypatch):
    check_sharding(arguments_under(monkeypatch, **sharding), ADAPTER_ONLY)


@pytest.mark.parametrize("flag", ["merge_adapter", "export_peft"])
@pytest.mark.parametrize("sharding", [FSDP2, ZERO3], ids=["fsdp2", "zero3"])
def test_what_needs_the_whole_model_in_one_process_is_refused_under_a_sharded_model(sharding, flag, monkeypatch):
    with pytest.raises(run_clm.UsageError, match=f"--{flag} needs the whole model in one process"):
        check_sharding(arguments_under(monkeypatch, **sharding), SimpleNamespace(**{**vars(ADAPTER_ONLY), flag: True}))
    zero2 = arguments_under(monkeypatch, **ZERO2)
    check_sharding(zero2, SimpleNamespace(**{**vars(ADAPTER_ONLY), flag: True}))  # each process holds it whole


def test_an_fsdp_configuration_that_accelerate_drops_on_cpus_is_pointed_out(monkeypatch, caplog):
    # What `accelerate launch --config_file configs/fsdp.yaml` sets, here with FSDP1, on CPU processes.
    on_cpus = arguments_under(monkeypatch, **FSDP1, distributed_type=DistributedType.MULTI_CPU)
    with caplog.at_level(logging.WARNING, logger="lmtune.checks"):
        check_sharding(on_cpus, ADAPTER_ONLY)  # data parallel after all: nothing to refuse
    assert "FSDP is configured, but accelerate runs it on GPUs and other accelerators only" in caplog.text


def test_a_sharding_the_adapter_could_not_be_saved_from_is_refused_before_the_data_is_read(assets, monkeypatch,
                                                                                            tmp_path, capsys):
    # One process stands for the GPUs that FSDP would apply on; the refusal once came after the data was tokenized
    # and the Trainer built, with the output folder claimed.
    monkeypatch.setattr("lmtune.checks.FSDP_DISTRIBUTED_TYPES", {DistributedType.NO})
    arguments_under(monkeypatch, **FSDP1)
    monkeypatch.setattr(run_clm, "load_raw_datasets", lambda *args: pytest.fail("the data was read"))
    argv = tiny_run_arguments(run_clm, assets, tmp_path / "out", "--do_train", "--train_adapter")
    assert_refused_in_one_line(run_clm, argv, "fsdp_version: 2", capsys, tmp_path / "out")
