"""AllReduceBatchNorm2d over 2 gloo processes == BatchNorm2d over the whole batch in one process; the CPU thread
count every script starts with (arithmetic only: no timing)."""
import copy
import io
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import distributed
from distributed import AllReduceBatchNorm2d, convert_sync_batchnorm
from errors import ConfigError


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


# ---------------------------------------------------------------------------------------------------------------
# Threads

@pytest.fixture
def machine(monkeypatch):
    """A process allowed on `cores` cores (its affinity mask), `busy` of them kept busy by other processes, without
    OMP_NUM_THREADS or torchrun's variables."""
    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)

    def allow(cores, busy=0.0):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        monkeypatch.setattr(distributed, "busy_cores", lambda: busy)
    return allow


def test_threads_are_the_usable_cores_less_those_other_processes_keep_busy(machine, monkeypatch):
    machine(2)
    assert distributed.thread_count() == (2, "2 usable cores; --threads or OMP_NUM_THREADS to override")
    machine(2, busy=0.9)  # one busy process beside us: its core is given up
    assert distributed.thread_count() == (
        1, "2 usable cores - 1 kept busy by other processes; --threads or OMP_NUM_THREADS to override")
    machine(2, busy=0.3)  # a passing blip is not a busy core
    assert distributed.thread_count()[0] == 2
    machine(2, busy=5.0)
    assert distributed.thread_count()[0] == 1  # at least one
    machine(16, busy=4.2)
    assert distributed.thread_count()[0] == 12
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 processes share this node's cores (and start together)
    assert distributed.thread_count() == (
        4, "16 usable cores / 4 processes on this node; --threads or OMP_NUM_THREADS to override")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: (_ for _ in ()).throw(OSError()), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)  # no affinity mask to read: every core of the machine
    assert distributed.thread_count()[0] == 8 - 4


def test_busy_cores_reads_the_cores_of_the_affinity_mask(monkeypatch, tmp_path):
    """Two /proc/stat samples by hand: core 0 half idle, core 1 fully busy, core 2 outside the mask."""
    samples = iter([
        "cpu  0 0 0 0 0 0 0 0\ncpu0 100 0 0 100 0 0 0 0\ncpu1 100 0 0 100 0 0 0 0\ncpu2 0 0 0 0 0 0 0 0\n",
        "cpu  0 0 0 0 0 0 0 0\ncpu0 150 0 0 150 0 0 0 0\ncpu1 200 0 0 100 0 0 0 0\ncpu2 100 0 0 0 0 0 0 0\n"])
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: io.StringIO(next(samples)) if path == "/proc/stat"
                        else real_open(path, *a, **k))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert distributed.busy_cores(seconds=0) == pytest.approx(0.5 + 1.0)


def test_the_threads_setting_then_omp_num_threads_win(machine, monkeypatch):
    machine(8)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert distributed.thread_count() == (3, "set by OMP_NUM_THREADS; --threads to override")
    assert distributed.thread_count(threads=5) == (5, "set by --threads")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's own OMP_NUM_THREADS=1 (or a user's): honoured, explained
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert distributed.thread_count()[0] == 1 and "torchrun sets to 1" in distributed.thread_count()[1]
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # empty: the automatic count
    assert distributed.thread_count()[0] == 4
    with pytest.raises(ConfigError, match=r"threads=-1 must be >= 0"):
        distributed.thread_count(threads=-1)
    monkeypatch.setenv("OMP_NUM_THREADS", "four")
    with pytest.raises(ConfigError, match=r"OMP_NUM_THREADS='four' must be a whole number >= 1"):
        distributed.thread_count()


def test_set_threads_sets_torch_and_says_why(machine, capsys):
    machine(3)
    before = torch.get_num_threads()
    try:
        assert distributed.set_threads() == 3 and torch.get_num_threads() == 3
        assert capsys.readouterr().out == "threads: 3 (3 usable cores; --threads or OMP_NUM_THREADS to override)\n"
    finally:
        torch.set_num_threads(before)
