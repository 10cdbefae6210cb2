"""Run a script as one process of a launch, checking how the processes keep together: `torchrun --nproc_per_node 2
tests/distributed_probe.py FOLDER script.py ARGS`.

- The default process group says it is NCCL's, as on GPUs, and no second group can be made: the processes must agree
  on a stop through the group they train with (a gloo group beside NCCL would need gloo networking on every node).
- Process 1 writes its random state a second late, and each checkpoint's trainer_state.json, which marks it complete,
  records in FOLDER/completeness.txt whether rng_state_1.pth was there when it was written.
"""

import os
import runpy
import sys
import time
from pathlib import Path

import torch.distributed
import transformers

folder, script = Path(sys.argv[1]), sys.argv[2]
sys.argv = sys.argv[2:]


def no_second_group(*args, **kwargs):
    raise RuntimeError("distributed_probe: no process group besides the default one")


torch.distributed.get_backend = lambda group=None: "nccl"
torch.distributed.new_group = no_second_group

save_rng_state, save_to_json = transformers.Trainer._save_rng_state, transformers.TrainerState.save_to_json


def late_rng_state(self, output_dir):
    if os.environ.get("RANK") == "1":
        time.sleep(1)
    save_rng_state(self, output_dir)


def recording_completeness(self, json_path):
    checkpoint = Path(json_path).parent
    if checkpoint.name.startswith("checkpoint-"):
        with (folder / "completeness.txt").open("a") as record:
            record.write(f"{checkpoint.name} {(checkpoint / 'rng_state_1.pth').is_file()}\n")
    save_to_json(self, json_path)


transformers.Trainer._save_rng_state = late_rng_state
transformers.TrainerState.save_to_json = recording_completeness
sys.path.insert(0, str(Path(script).resolve().parent))  # as `python script` does: lmtune/ beside it is importable
runpy.run_path(script, run_name="__main__")
