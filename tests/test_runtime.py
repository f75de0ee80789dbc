"""The device, CPU thread count and precision every script starts with (runtime.py): the thread count is arithmetic
on a faked machine (no timing); precision=auto's choice is tests/test_precision.py's."""
import io
import os

import pytest
import torch

import runtime
from errors import ConfigError

@pytest.fixture
def machine(monkeypatch):
    """A process allowed on `cores` cores (its affinity mask), `busy` of them kept busy by other processes, without
    OMP_NUM_THREADS or torchrun's variables."""
    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)

    def allow(cores, busy=0.0):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        monkeypatch.setattr(runtime, "busy_cores", lambda: busy)
    return allow


def test_threads_are_the_usable_cores_less_those_other_processes_keep_busy(machine, monkeypatch):
    machine(2)
    assert runtime.thread_count() == (2, "2 usable cores; --threads or OMP_NUM_THREADS to override")
    machine(2, busy=0.9)  # one busy process beside us: its core is given up
    assert runtime.thread_count() == (
        1, "2 usable cores - 1 kept busy by other processes; --threads or OMP_NUM_THREADS to override")
    machine(2, busy=0.3)  # a passing blip is not a busy core
    assert runtime.thread_count()[0] == 2
    machine(2, busy=5.0)
    assert runtime.thread_count()[0] == 1  # at least one
    machine(16, busy=4.2)
    assert runtime.thread_count()[0] == 12
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 processes share this node's cores (and start together)
    assert runtime.thread_count() == (
        4, "16 usable cores / 4 processes on this node; --threads or OMP_NUM_THREADS to override")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: (_ for _ in ()).throw(OSError()), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)  # no affinity mask to read: every core of the machine
    assert runtime.thread_count()[0] == 8 - 4


def test_busy_cores_reads_the_cores_of_the_affinity_mask(monkeypatch, tmp_path):
    """Two /proc/stat samples by hand: core 0 half idle, core 1 fully busy, core 2 outside the mask."""
    samples = iter([
        "cpu  0 0 0 0 0 0 0 0\ncpu0 100 0 0 100 0 0 0 0\ncpu1 100 0 0 100 0 0 0 0\ncpu2 0 0 0 0 0 0 0 0\n",
        "cpu  0 0 0 0 0 0 0 0\ncpu0 150 0 0 150 0 0 0 0\ncpu1 200 0 0 100 0 0 0 0\ncpu2 100 0 0 0 0 0 0 0\n"])
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: io.StringIO(next(samples)) if path == "/proc/stat"
                        else real_open(path, *a, **k))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert runtime.busy_cores(seconds=0) == pytest.approx(0.5 + 1.0)


def test_the_threads_setting_then_omp_num_threads_win(machine, monkeypatch):
    machine(8)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.thread_count() == (3, "set by OMP_NUM_THREADS; --threads to override")
    assert runtime.thread_count(threads=5) == (5, "set by --threads")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's own OMP_NUM_THREADS=1 (or a user's): honoured, explained
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert runtime.thread_count()[0] == 1 and "torchrun sets to 1" in runtime.thread_count()[1]
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # empty: the automatic count
    assert runtime.thread_count()[0] == 4
    with pytest.raises(ConfigError, match=r"threads=-1 must be >= 0"):
        runtime.thread_count(threads=-1)
    monkeypatch.setenv("OMP_NUM_THREADS", "four")
    with pytest.raises(ConfigError, match=r"OMP_NUM_THREADS='four' must be a whole number >= 1"):
        runtime.thread_count()


def test_set_threads_sets_torch_and_says_why(machine, capsys):
    machine(3)
    before = torch.get_num_threads()
    try:
        assert runtime.set_threads() == 3 and torch.get_num_threads() == 3
        assert capsys.readouterr().out == "threads: 3 (3 usable cores; --threads or OMP_NUM_THREADS to override)\n"
    finally:
        torch.set_num_threads(before)
