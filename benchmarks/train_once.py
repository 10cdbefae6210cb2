"""Run one training run of run_clm.py or run_mlm.py in this process and write its timings as JSON.

Usage: ``python benchmarks/train_once.py SPEC.json``, where the spec holds ``script`` ("run_clm" or "run_mlm"),
``argv`` (the script's command line), ``count_flops`` and ``result`` (where to write the JSON).

The benchmark starts one process per run, so that the peak resident memory read at the end is that run's alone.
The script's own ``main`` runs unchanged; trainer callbacks only record when each optimizer step begins and
ends, count the floating-point operations of the first step (forward and backward) with PyTorch's flop counter,
and read the resident memory when training starts and its peak during training. That first step also pays for
warm-up (and compilation under --torch_compile), so it is left out of the timed steps.
"""

import importlib
import json
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils import flop_counter
from transformers import TrainerCallback, trainer

REPO = Path(__file__).resolve().parents[1]


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# The flop counter knows the CUDA attention kernels but not the CPU one that scaled_dot_product_attention uses here.
CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


class StepTimer(TrainerCallback):
    """Timestamps of every optimizer step, and the FLOPs of the first one's forward and backward passes."""

    def __init__(self, count_flops):
        self.count_flops = count_flops
        self.begins, self.ends = [], []
        self.flops = None
        self._counter = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.begins.append(time.perf_counter())
        if self.count_flops and len(self.begins) == 1:
            self._counter = flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
            self._counter.__enter__()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops = self._counter.get_total_flops()
            self._counter = None

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def summary(self):
        # Step i (i >= 1) runs from the end of step i - 1 to its own end, so it includes fetching its batch;
        # the part before on_step_begin is the time the model waited for data.
        return {
            "first_step_s": self.ends[0] - self.begins[0],
            "step_s": [end - previous for previous, end in zip(self.ends, self.ends[1:])],
            "data_wait_s": [begin - previous for previous, begin in zip(self.ends, self.begins[1:])],
            "flops_per_step": self.flops,
        }


def resident_mib(field):
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak, RssFile: the part that maps
    files, such as a checkpoint read through a memory map), in MiB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


class MemoryMeter(TrainerCallback):
    """Resident memory when training starts and its peak during training alone, without the loading before it.

    Linux resets a process's peak resident memory (VmHWM) to its current one when 5 is written to clear_refs.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model_mib = model.get_memory_footprint() / 2**20
        self.start_mib, self.start_file_mib = resident_mib("VmRSS"), resident_mib("RssFile")
        Path("/proc/self/clear_refs").write_text("5")

    def on_train_end(self, args, state, control, **kwargs):
        self.train_peak_mib = resident_mib("VmHWM")

    def summary(self):
        return {"model_mib": self.model_mib, "train_start_rss_mib": self.start_mib,
                "train_start_file_mib": self.start_file_mib, "train_peak_rss_mib": self.train_peak_mib}


def main(spec_path):
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, str(REPO))
    script = importlib.import_module(spec["script"])
    timer, meter = StepTimer(spec["count_flops"]), MemoryMeter()
    # Every Trainer (and AdapterTrainer) the script builds starts with the default callbacks, so this adds ours
    # without touching the script.
    trainer.DEFAULT_CALLBACKS.extend([timer, meter])
    metrics = script.main(spec["argv"])
    result = {
        **timer.summary(),
        **meter.summary(),
        "train_runtime_s": metrics["train_runtime"],
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(spec["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
