"""torchrun plumbing shared by train.py, evaluate.py and clip_image.py (process group, all-reduces, teardown), and
BatchNorm synchronised across processes. The device, threads and precision every script starts with: runtime.py.

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

from runtime import pick_device


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


def any_rank(flag: bool, device) -> bool:
    """Whether `flag` is true on any rank (itself in one process): every rank must call it."""
    t = torch.tensor([int(flag)], device=device)  # on the device: NCCL reduces CUDA tensors only
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_over_ranks(counts, device):
    """Integer counts summed over ranks, as a list: every rank must call it."""
    n = torch.tensor(counts, dtype=torch.int64, device=device)  # on the device: NCCL reduces CUDA only
    if is_distributed():
        dist.all_reduce(n)
    return n.tolist()


def teardown():
    """End the process group (if any) without hanging at exit. Call it after dropping the DDP model.

    gloo finishes its work objects on worker threads that need the GIL; waiting on a barrier (GIL released) lets them
    finish before the group is torn down, which otherwise can deadlock at exit. The group must also not die inside
    DDP's reducer, which destroys it with the GIL held while such a thread waits for the GIL (seen under load: rank 0
    hung at exit, gdb: ~Reducer -> ~ProcessGroupGloo vs a gloo thread in take_gil). So DDP goes first (the caller's
    `del model`), and the last reference is this Python one, whose release frees the GIL meanwhile.
    """
    if not is_distributed():
        return
    group = dist.group.WORLD
    dist.barrier()
    dist.destroy_process_group()
    del group
