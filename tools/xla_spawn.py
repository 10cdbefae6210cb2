"""Run run_clm.py or run_mlm.py under torch_xla's process spawner, as on a TPU (PJRT_DEVICE=CPU runs it on XLA's CPU
device, which is how tools/xla_check.sh and tests/test_xla.py test the XLA path without a TPU).

Usage: PJRT_DEVICE=CPU python tools/xla_spawn.py [--num_cores 1|0] run_clm.py --flag value ...
"""
import argparse
import importlib.util
import os
import sys
from pathlib import Path

import torch_xla.distributed.xla_multiprocessing as xmp
import torch_xla.runtime as xr


def run(index, entry_point):
    # accelerate takes a process's local index from xm.get_local_ordinal() on a TPU, but from LOCAL_RANK on XLA's CPU
    # and GPU devices, where -1 (unset) makes every process a "replica" that logs at --log_level_replica only: set it
    # as a TPU would have it.
    os.environ.setdefault("LOCAL_RANK", str(xr.local_ordinal()))
    entry_point(index)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_cores", type=int, default=1,
                        help="1 (one process; XLA's CPU device) or 0 (one per device, nprocs=None: torch_xla 2.9 "
                             "takes no other number, X_NUM_DEVICES limits the devices)")
    parser.add_argument("script", type=Path, help="run_clm.py or run_mlm.py")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    sys.path.insert(0, str(args.script.resolve().parent))  # as `python script` does: lmtune/ beside it imports
    spec = importlib.util.spec_from_file_location(args.script.stem, args.script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.argv = [str(args.script), *args.script_args]  # what the script's cli() parses
    xmp.spawn(run, args=(module._mp_fn,), nprocs=args.num_cores or None)


if __name__ == "__main__":
    main()
