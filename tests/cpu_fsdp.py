"""Run a script under `accelerate launch` with FSDP on CPU processes: `accelerate launch --config_file
configs/fsdp.yaml tests/cpu_fsdp.py run_mlm.py ARGS`.

accelerate (1.16) turns an FSDP configuration into FSDP on GPUs and other accelerators only; on CPUs it quietly runs
plain data parallel instead. torch's FSDP2 itself shards over CPU processes (gloo), so this lifts that one gate, and a
test can check on CPUs what the scripts do with a sharded model: train it, and save a complete adapter from it.
"""

import importlib
import runpy
import sys
from pathlib import Path

import accelerate.state
from accelerate.utils import DistributedType

accelerator_state_init = accelerate.state.AcceleratorState.__init__


def init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # Every later AcceleratorState copies the distributed type from PartialState's shared state.
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


accelerate.state.AcceleratorState.__init__ = init_with_fsdp_on_cpu
script, sys.argv = sys.argv[1], sys.argv[1:]
sys.path.insert(0, str(Path(script).resolve().parent))  # as `python script` does: lmtune/ beside it is importable
# The scripts' own checks, made before the Trainer's accelerator exists, follow accelerate's gate: lifted alike.
importlib.import_module("lmtune.checks").FSDP_DISTRIBUTED_TYPES.add(DistributedType.MULTI_CPU)
runpy.run_path(script, run_name="__main__")
