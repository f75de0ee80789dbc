"""Run a script with every torch.distributed collective recorded, for tests/test_launch.py:

    torchrun --nproc_per_node=2 tests/collectives_probe.py train.py CONFIG [--key value ...]

NCCL reduces CUDA tensors only and CI has no GPU, so the tests check what NCCL would be handed: each call appends one
JSON line {fn, tensors: [[device, dtype, shape], ...]} to $COLLECTIVES_LOG.rank<RANK>, and init_process_group its
backend. Collectives inside DDP's C++ reducer are not seen here; they take the model's own parameters.
"""
import functools
import json
import os
import runpy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

# every public collective that takes tensors or objects (torch.distributed.nn's autograd all_reduce calls dist's)
COLLECTIVES = ["all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "gather", "scatter",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "recv", "isend",
               "irecv", "barrier", "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list"]
LOG = f"{os.environ['COLLECTIVES_LOG']}.rank{os.environ['RANK']}"


def write(record):
    with open(LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from tensors(v)


def recorded(name, fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        found = [[str(t.device), str(t.dtype), list(t.shape)] for t in tensors([*args, *kwargs.values()])]
        write({"fn": name, "tensors": found})
        return fn(*args, **kwargs)
    return call


def recorded_init(fn):
    @functools.wraps(fn)
    def call(backend=None, *args, **kwargs):
        write({"fn": "init_process_group", "backend": backend})
        return fn(backend, *args, **kwargs)
    return call


for name in COLLECTIVES:
    setattr(dist, name, recorded(name, getattr(dist, name)))
dist.init_process_group = recorded_init(dist.init_process_group)

if __name__ == "__main__":
    script = Path(sys.argv[1]).resolve()
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(script.parent))  # as `python script.py` would: the repository's modules import
    runpy.run_path(str(script), run_name="__main__")
