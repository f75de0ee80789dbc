"""What a process runs on, chosen once at its start and printed so a user sees why a run is fast or slow: the device
(pick_device), the CPU thread count (set_threads: the usable cores less those other processes keep busy;
docs/threads.md) and the precision the network runs in (choose_precision: bf16 where the hardware has the units;
docs/precision.md). Every script starts with these, single-process ones too; distributed.py is torchrun's part.
"""
import os
import time

import torch

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


def busy_cores(seconds=0.2):
    """How many of this process's usable cores other processes keep busy right now: the non-idle share of each core's
    time in /proc/stat over `seconds`, summed over the cores of the affinity mask. 0.0 where /proc/stat is missing
    (not Linux) or unreadable."""
    try:
        mine = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        mine = None

    def sample():  # core -> (idle + iowait jiffies, all jiffies)
        stats = {}
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3].isdigit():
                    name, *values = line.split()
                    v = [int(x) for x in values[:8]]  # user nice system idle iowait irq softirq steal
                    stats[int(name[3:])] = (v[3] + v[4], sum(v))
        return stats
    try:
        before = sample()
        time.sleep(seconds)
        after = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    busy = 0.0
    for core, (idle, total) in after.items():
        if core in before and (mine is None or core in mine) and total > before[core][1]:
            busy += 1 - (idle - before[core][0]) / (total - before[core][1])
    return busy


def thread_count(threads=0):
    """The intra-op thread count for torch and why -> (n, reason). `threads` > 0 wins; else OMP_NUM_THREADS; else
    the usable cores, divided among torchrun's processes on this node (LOCAL_WORLD_SIZE), less the cores other
    processes keep busy right now (busy_cores), at least 1. Measured on 2 cores (docs/threads.md): beside one busy
    process 2 threads ran at 0.37-0.58x of 1 thread (OpenMP threads wait on the one that lost its core), on an idle
    machine at 1.33-1.34x, DataLoader worker included; so a busy core is given up, a worker's is not.

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
    busy = round(busy_cores()) if local == 1 else 0  # torchrun's siblings start together: their start is no load
    n = max(1, cores // local - busy)
    why = f"{cores} usable cores"
    if local > 1:
        why += f" / {local} processes on this node"
    if busy:
        why += f" - {busy} kept busy by other processes"
    return n, f"{why}; {override}"


def set_threads(threads=0, verbose=True):
    """torch.set_num_threads(thread_count(...)) and print one line saying the count and why (scripts call it first,
    so a log shows why a run is fast or slow). Returns the count."""
    n, why = thread_count(threads)
    torch.set_num_threads(n)
    if verbose:
        print(f"threads: {n} ({why})", flush=True)
    return n


def cpu_has_bf16():
    """Whether this CPU has bf16 units (x86 AVX512-BF16 or AMX-BF16, as torch's cpuinfo reads them). Without them
    oneDNN emulates bf16 (fp32 arithmetic plus conversions), which saves nothing. A torch without
    torch.cpu.get_capabilities (2.13 has it) counts as without."""
    get = getattr(torch.cpu, "get_capabilities", None)
    caps = get() if get else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


PRECISIONS = {"auto": None, "fp32": "fp32", "off": "fp32", "bf16": "bf16", "fp16": "fp16"}  # train's amp: off = fp32


def choose_precision(setting, device):
    """The precision the network runs in, training (amp) and inference (precision) alike, and the line saying why.

    setting: auto | fp32 (or off) | bf16 | fp16. auto is bf16 on a CUDA GPU that supports it and on a CPU with bf16
    units (cpu_has_bf16), else fp32; docs/precision.md has the measurements behind it. Returns (precision, line):
    precision is "fp32", "bf16" or "fp16"; line e.g. "precision: bf16 (auto; cpu, bf16 units: yes)", printed at start
    so a user sees why a run is fast or slow."""
    device = torch.device(device)
    if device.type == "cuda":
        units = torch.cuda.is_bf16_supported()
    else:
        units = device.type == "cpu" and cpu_has_bf16()
    precision = PRECISIONS[setting] or ("bf16" if units else "fp32")
    how = "auto" if setting == "auto" else "as set"
    return precision, f"precision: {precision} ({how}; {device.type}, bf16 units: {'yes' if units else 'no'})"
