"""What a process runs on, chosen once at its start and printed so a user sees why a run is fast or slow: the device
(pick_device), the CPU thread count (set_threads: the usable cores less those other processes keep busy;
docs/threads.md) and the precision the network runs in (choose_precision: bf16 where the hardware has the units;
docs/precision.md). Every script starts with these, single-process ones too; distributed.py is torchrun's part.
And whether the network is compiled (compiled: torch.compile with a persistent cache, eager with one warning line
where it cannot work; docs/speed.md).
"""
import os
import sys
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


# ----------------------------------------------------------------------------------------------------------------
# torch.compile: on by default for inference (inference.in_precision), off with --compile=false or SSIW_COMPILE=0;
# train.py's --compile=true uses it too

COMPILE_ENV = "SSIW_COMPILE"  # 0 | off | false: the default of inference's `compile` setting becomes false (the tests)


def compile_default():
    """The default of the `compile` settings: true, unless $SSIW_COMPILE is 0/off/false (the test suite sets it, so
    only the tests of compiling compile). A flag --compile=true|false still wins. Anything else in it raises."""
    env = os.environ.get(COMPILE_ENV, "").strip().lower()
    if env not in ("", "1", "on", "true", "0", "off", "false"):
        raise ConfigError(f"{COMPILE_ENV}={os.environ[COMPILE_ENV]!r} must be 0/off/false or 1/on/true (or unset)")
    return env not in ("0", "off", "false")


def compile_cache_dir():
    """Where inductor keeps its compiled kernels between runs (its FX graph and AOTAutograd caches), so a second run
    of the same network and sizes reads them instead of compiling: $TORCHINDUCTOR_CACHE_DIR where set, else
    <$SSIW_CACHE or ~/.cache/ssiw>/inductor (the user's cache folder, as text_cache's; inductor's own default is a
    folder of /tmp, which a reboot empties). Sets TORCHINDUCTOR_CACHE_DIR to it, which inductor reads."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    set_by_inductor = os.path.abspath(default_cache_dir())  # inductor writes its default into the variable when used
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", set_by_inductor) == set_by_inductor:
        root = os.environ.get("SSIW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ssiw")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "inductor")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def compile_unavailable(device):
    """Why torch.compile (inductor) cannot work here, or "" where it can as far as can be told before compiling:
    dynamo unsupported on this Python/platform, or no C++ compiler for inductor's CPU kernels (GPU kernels are Triton's,
    which needs the triton package)."""
    import torch._dynamo
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile is not supported on this platform (Python {sys.version.split()[0]}, {sys.platform})"
    if torch.device(device).type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
            get_cpp_compiler()
        except Exception as e:  # inductor raises its own error types (InvalidCxxCompiler, RuntimeError, ...)
            return f"no C++ compiler for inductor's CPU kernels ({first_line(e)}); install g++ or set CXX"
    elif torch.device(device).type == "cuda":
        import importlib.util
        if importlib.util.find_spec("triton") is None:
            return "no triton package for inductor's GPU kernels"
    return ""


def first_line(error):
    """`TypeName: first line of the message` of an exception, for one-line warnings."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def compile_errors():
    """The exceptions that mean "compiling failed" (not "the network failed"): dynamo's and inductor's."""
    import torch._dynamo.exc
    import torch._inductor.exc
    return torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError, torch._inductor.exc.CppCompileError


def compiled(fn, setting, device, what="the network"):
    """fn run through torch.compile where `setting` (a `compile` setting) is true and compiling works, else fn itself.

    Prints one line at the first call saying which and why: `compile: on (...)`, or `compile: off (compile=false ...)`.
    Where compiling cannot work (compile_unavailable), the first compiled call raises (an op inductor cannot lower,
    a compiler error) or a later call fails to compile (a new input size), one `warning:` line naming why, and fn
    runs eager from then on.

    Shapes are static unless the caller marks a dimension dynamic (torch._dynamo.maybe_mark_dynamic, as
    inference.in_precision marks the number of labels): each image size compiles once (sliding windows: one size;
    whole images: one per distinct size, and CamVid's are all one), because symbolic sizes measured worse (docs/speed.md):
    EfficientNet-Lite's TF padding made inductor fail on the second size, and with that worked around, the symbolic
    graph of a tiny Lite0 took 83 s to compile against 6 s for a static one and still recompiled at the third size.
    Past torch._dynamo.config.recompile_limit (8) sizes, dynamo runs the function eager and logs a warning."""
    device = torch.device(device)
    state = {"fn": None}

    def choose():
        if not setting:
            print(f"compile: off (compile=false{'; ' + COMPILE_ENV + ' sets the default' if not compile_default() else ''}; "
                  f"--compile=true to compile {what})", flush=True)
            return fn
        cache = compile_cache_dir()  # before anything of inductor's reads it
        why = compile_unavailable(device)
        if why:
            print(f"warning: compile: {what} runs eager: {why}", flush=True)
            return fn
        print(f"compile: on (torch.compile, inductor; compile cache {cache}; --compile=false to run eager)", flush=True)
        return torch.compile(fn)

    def run(*args, **kwargs):
        first = state["fn"] is None
        if first:
            state["fn"] = choose()
        if state["fn"] is fn:
            return fn(*args, **kwargs)
        try:
            # sizes stay static where a caller did not mark them dynamic (maybe_mark_dynamic): no automatic
            # dynamic shapes, whose symbolic image sizes measured worse (above)
            with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
                return state["fn"](*args, **kwargs)
        except Exception as e:  # at the first call any error (a real error of fn raises again below, eager)
            if not first and not isinstance(e, compile_errors()):
                raise
            print(f"warning: compile: {what} runs eager: {'the first compiled call' if first else 'compiling'} "
                  f"failed ({first_line(e)})", flush=True)
            state["fn"] = fn
            return fn(*args, **kwargs)
    return run
