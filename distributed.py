"""torchrun plumbing shared by train.py and evaluate.py, the device and CPU thread count every script starts with,
and BatchNorm synchronised across processes.

torch.nn.SyncBatchNorm only runs on GPUs, so a gloo (CPU) run would normalise each process's slice of the global
batch with its own statistics and drift away from a one-process run over the same batch. AllReduceBatchNorm2d
computes the statistics of the whole global batch with two differentiable all-reduces, on any backend; on CUDA the
faster torch.nn.SyncBatchNorm is used instead.
"""
import os

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn

from errors import ConfigError


def pick_device(name="auto"):
    """"auto" -> cuda when available, else cpu; any other name as torch.device. For one-process scripts too."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def usable_cores():
    """CPU cores this process may run on (its affinity mask: taskset, cgroup cpusets, a batch scheduler's share),
    which can be fewer than the machine has; os.cpu_count() where the mask cannot be read."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def thread_count(threads=0, workers=0):
    """The intra-op thread count for torch and why -> (n, reason). `threads` > 0 wins; else OMP_NUM_THREADS; else
    the usable cores, divided among torchrun's processes on this node (LOCAL_WORLD_SIZE), less this process's
    DataLoader `workers` (each of which computes on a core of its own), at least 1. More threads than cores make
    them wait on each other (oneDNN and OpenMP spin), which can be slower than one thread.

    torchrun sets OMP_NUM_THREADS=1 for its processes when it is unset (nproc_per_node > 1); that is honoured like a
    user's value (tests pin it so), and the reason says so: an empty OMP_NUM_THREADS= before torchrun, or --threads,
    gets the automatic count instead."""
    override = "--threads or OMP_NUM_THREADS to override"
    if threads < 0:
        raise ConfigError(f"settings: threads={threads} must be >= 0 (0 = from the usable cores)")
    if threads > 0:
        return threads, "set by --threads"
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")  # torchrun: processes on this node, sharing its cores
    local = int(local) if local.isdigit() and int(local) > 0 else 1
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ConfigError(f"OMP_NUM_THREADS={env!r} must be a whole number >= 1 (or unset)")
        if local > 1 and env == "1":
            return 1, ("set by OMP_NUM_THREADS, which torchrun sets to 1 when unset; --threads=N, or an empty "
                       "OMP_NUM_THREADS= before torchrun for usable cores / processes")
        return int(env), "set by OMP_NUM_THREADS; --threads to override"
    cores = usable_cores()
    n = max(1, cores // local - workers)
    why = f"{cores} usable cores"
    if local > 1:
        why += f" / {local} processes on this node"
    if workers:
        why += f" - {workers} DataLoader worker{'s' if workers > 1 else ''}"
    return n, f"{why}; {override}"


def set_threads(threads=0, workers=0, verbose=True):
    """torch.set_num_threads(thread_count(...)) and print one line saying the count and why (scripts call it first,
    so a log shows why a run is fast or slow). Returns the count."""
    n, why = thread_count(threads, workers)
    torch.set_num_threads(n)
    if verbose:
        print(f"threads: {n} ({why})", flush=True)
    return n


def setup(device_name="auto"):
    """Start the process group when launched by torchrun (RANK set). Returns (rank, world_size, device), the device
    being cuda:LOCAL_RANK under torchrun on GPUs."""
    device = pick_device(device_name)
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":  # one GPU per process, current before NCCL starts so its communicator uses it
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # NCCL reduces CUDA tensors only; gloo on the CPU side too, so a CPU tensor handed to a collective (an object
    # collective, a barrier, a counter someone reduces where it was made) works instead of failing at run time.
    # What train.py and evaluate.py reduce stays on the training device, on NCCL's fast path.
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over the global batch of all processes; identical to BatchNorm2d in one process or in eval."""

    def forward(self, x):
        if not (self.training and is_distributed()):
            return super().forward(x)
        # (B, C, H, W): per-channel sums over this process's B*H*W values, summed over processes.
        # Two passes (mean, then squared deviations) as BatchNorm2d does, not E[x^2] - E[x]^2, for accuracy.
        xf = x.float()
        count = torch.tensor([xf.numel() / xf.shape[1]], dtype=xf.dtype, device=xf.device)
        total = dist_nn.all_reduce(torch.cat([xf.sum((0, 2, 3)), count]))  # (C + 1,)
        n = total[-1]
        mean = total[:-1] / n  # (C,)
        centred = xf - mean[None, :, None, None]
        var = dist_nn.all_reduce(centred.pow(2).sum((0, 2, 3))) / n  # (C,) biased, used to normalise
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)  # unbiased, as BatchNorm2d
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(module, device):
    """Swap every BatchNorm2d for its synchronised form: torch's SyncBatchNorm on CUDA, AllReduceBatchNorm2d else."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if type(module) is nn.BatchNorm2d:
        synced = AllReduceBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                      module.track_running_stats)
        synced.load_state_dict(module.state_dict())
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module


def all_reduce_mean(values):
    """Average a 1-D tensor over processes (a no-op in one process): what every logged number goes through."""
    if is_distributed():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values
