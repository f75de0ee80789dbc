"""Where a number came from: the record every results file carries (evaluate.py, tools/bench_protocol.py,
tools/measure_abstention.py).

    {"command": "python evaluate.py --dataset=...", "argv": [...], "cwd": ..., "time_utc": ...,
     "git": {"commit": sha, "dirty": bool, "changed": [path]}, "packages": {"python": ..., "torch": ..., ...},
     "device": {"device": "cpu", "cpu": model name, "cpu_count": n, "torch_threads": n, "gpu": name | null, ...},
     "precision": "fp32", "sha256": {"checkpoint": {"path": ..., "sha256": ...}, "list": ..., ...}}

Paths (cwd and the hashed files) are relative to the repository when they lie under it, else absolute.

A file is hashed as `sha256sum FILE` would; a listing without a file (a folder-pair dataset's pairs) is hashed as the
UTF-8 text given, which the caller documents.
"""
import hashlib
import os
import platform
import shlex
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent
PACKAGES = ("torch", "numpy", "pillow", "pyyaml", "ftfy", "regex")  # the runtime requirements


def repo_relative(path) -> str:
    """path relative to the repository when it lies under it, else absolute: results files and messages then read
    the same on every machine that has the repository."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def sha256_file(path, chunk=1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (checkpoints are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def git_state(repo=REPO) -> dict:
    """{"commit": HEAD sha, "dirty": tracked files differ from HEAD, "changed": the first 20 of them};
    {"commit": None, "why": ...} outside git."""
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "why": head.stderr.strip() or "not a git checkout"}
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"commit": None, "why": f"git not runnable ({e})"}
    changed = [line[3:] for line in status.stdout.splitlines() if line.strip()]  # "XY path"
    return {"commit": head.stdout.strip(), "dirty": bool(changed), "changed": changed[:20]}


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device) -> dict:
    device = torch.device(device)
    info = {"device": str(device), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": None}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        info.update(gpu=torch.cuda.get_device_name(index), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def provenance(script, argv, device, precision, files=None, texts=None) -> dict:
    """The provenance record of a results file (see the module docstring).

    script: the script's path or module (e.g. "evaluate.py", "-m tools.bench_protocol"); argv: the arguments it
    parsed; files: {name: path or ""} hashed as files ("" entries are skipped: an option not used);
    texts: {name: str} hashed as UTF-8 text (listings that exist in no file).
    """
    argv = [str(a) for a in argv]
    hashes = {name: {"path": repo_relative(path), "sha256": sha256_file(path)}
              for name, path in (files or {}).items() if path}
    hashes.update({name: {"text_sha256": hashlib.sha256(text.encode()).hexdigest()}
                   for name, text in (texts or {}).items()})
    return {"command": f"python {script} {shlex.join(argv)}".strip(), "argv": argv,
            "cwd": repo_relative(os.getcwd()), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git": git_state(), "packages": package_versions(), "device": device_info(device),
            "precision": precision, "sha256": hashes}
