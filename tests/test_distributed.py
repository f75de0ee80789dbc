"""AllReduceBatchNorm2d over 2 gloo processes == BatchNorm2d over the whole batch in one process."""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from distributed import AllReduceBatchNorm2d, convert_sync_batchnorm


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_case():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 6) * 3 + 1  # the global batch; each of 2 processes gets 2 images
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return x, bn


def worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x, bn = make_case()
    synced = convert_sync_batchnorm(nn.Sequential(bn), torch.device("cpu"))[0]
    assert isinstance(synced, AllReduceBatchNorm2d)
    local = x[2 * rank:2 * rank + 2].clone().requires_grad_(True)
    y = synced(local)
    # a loss that depends on every value, summed over processes as DDP's gradient averaging implies
    (y * torch.arange(y.numel()).reshape(y.shape).add(y.numel() * rank)).sum().backward()
    for p in (synced.weight, synced.bias):
        dist.all_reduce(p.grad)
    torch.save({"y": y.detach(), "x_grad": local.grad, "w_grad": synced.weight.grad, "b_grad": synced.bias.grad,
                "running_mean": synced.running_mean, "running_var": synced.running_var},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_batchnorm_equals_full_batch_batchnorm(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    x, bn = make_case()
    x = x.clone().requires_grad_(True)
    y = bn(x)
    (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([p["x_grad"] for p in parts]), x.grad, atol=1e-4, rtol=1e-5)
    for p in parts:
        torch.testing.assert_close(p["w_grad"], bn.weight.grad, atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(p["b_grad"], bn.bias.grad, atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(p["running_mean"], bn.running_mean)
        torch.testing.assert_close(p["running_var"], bn.running_var)


def test_one_process_and_eval_fall_back_to_batchnorm():
    x, bn = make_case()
    synced = convert_sync_batchnorm(nn.Sequential(copy.deepcopy(bn)), torch.device("cpu"))[0]
    torch.testing.assert_close(synced(x), bn(x))  # training mode, no process group: plain BatchNorm2d
    torch.testing.assert_close(synced.running_var, bn.running_var)
    torch.testing.assert_close(synced.eval()(x), bn.eval()(x))
