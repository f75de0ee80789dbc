"""The recipe as its users launch it, on CPU (gloo): the design card's two command lines as written, two torchrun
"nodes" on loopback, an elastic restart after a worker is SIGKILLed, gradient accumulation against one large batch,
and the backend and devices every collective gets (NCCL reduces CUDA tensors only; CI has no GPU).
Uses test_train's tiny synthetic setup (two sources, MiT-B0, 32-px crops)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml
from PIL import Image
from torch import nn

import distributed
import train
from test_train import REPO, STEPS, final, run, setup  # noqa: F401 (setup is a fixture)

TORCHRUN = Path(sys.executable).with_name("torchrun")  # the launcher of the torch this python runs
TORCHRUN = [str(TORCHRUN)] if TORCHRUN.is_file() else [sys.executable, "-m", "torch.distributed.run"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
SGD = ["--optimizer=sgd", "--lr=0.05"]  # SGD: Adam's division by sqrt(v) would magnify float summation-order noise


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, log, cwd=REPO, env=ENV):
    """Start a command line in the background, its output to the file `log` (a pipe could fill and stall it)."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)


def children(pid):
    """{pid: environment} of the processes whose parent is `pid` (torchrun's workers: each in a session of its own)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:  # the fields after (command name): state, ppid
                found[int(stat.parent.name)] = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):  # the process ended while we read it
            continue
    return found


def finish(proc, log, timeout=600):
    """Wait for a launcher; on a timeout kill it and its workers (they would outlive the test) and fail."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in children(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
        raise AssertionError(f"{proc.args} still ran after {timeout} s: {Path(log).read_text()[-4000:]}")
    text = Path(log).read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def wait_for_file(path, proc, log, timeout=300):
    start_time = time.time()
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path.name} appeared: {Path(log).read_text()[-3000:]}"
        assert time.time() - start_time < timeout, f"{path} did not appear"
        time.sleep(0.02)


def same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def close_weights(got, want):
    """Equal up to float summation order (as test_train's DDP test), and trained: not two untouched initialisations."""
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=1e-4, msg=key)
    torch.manual_seed(0)  # train.py's initialisation: seed + rank 0, the model the first draw from torch's generator
    initial = train.build_model(train.ModelConfig(backbone="mit_b0", embed_dim=32, drop_path_rate=0.0,
                                                  dropout=0.0)).state_dict()
    moved = [not torch.equal(initial[k], want[k]) for k in want if want[k].is_floating_point()]
    assert sum(moved) > 0.9 * len(moved)


def write_mseg_camvid(root, n=2, h=40, w=56):
    """A CamVid in MSeg's camvid-11 form: RGB images, 8-bit labels with ids 0..10 and 255 = ignore, a list file.
    Returns the number of labelled (non-ignore) pixels."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    lines, labelled = [], 0
    for i in range(n):
        label = rng.integers(0, 11, (h, w)).astype(np.uint8)
        label[:5] = 255
        labelled += int((label != 255).sum())
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(label).save(root / "labels" / f"{i}.png")
        lines.append(f"images/{i}.png labels/{i}.png")
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    return labelled


# ---------------------------------------------------------------------------------------------------------------
# 1. Collectives on the device the backend serves

def test_setup_under_cuda_gives_each_device_a_backend_that_serves_it(monkeypatch):
    calls = []
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 8)
    assert distributed.setup() == (3, 8, torch.device("cuda", 3))
    backend = dict(calls)["init"]
    served = dist.distributed_c10d.BackendConfig(dist.Backend(backend)).get_device_backend_map()
    assert served == {"cpu": "gloo", "cuda": "nccl"}  # a CPU tensor has a backend too; CUDA tensors go to NCCL
    assert all(device in dist.Backend.backend_capability[b] for device, b in served.items())
    assert calls == [("set_device", torch.device("cuda", 3)), ("init", backend)]  # NCCL starts on this rank's GPU

    calls.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.setup() == (3, 8, torch.device("cpu"))
    assert calls == [("init", "gloo")]


def probe(nproc, script, args, log_dir, device):
    """Run `script` under torchrun with tests/collectives_probe.py recording every collective; returns the records."""
    env = dict(ENV, COLLECTIVES_LOG=str(log_dir / script))
    cmd = [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "tests/collectives_probe.py", script, *args,
           f"--device={device}"]
    finish(start(cmd, log_dir / f"{script}.log", env=env), log_dir / f"{script}.log")
    return [json.loads(line) for rank in range(nproc) for line in Path(f"{log_dir / script}.rank{rank}").open()]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL needs 2 GPUs: the GPU form of this check"))])
@pytest.mark.slow
def test_every_collective_of_training_and_evaluation_gets_a_tensor_on_the_run_device(setup, tmp_path, device):
    """2-process training and evaluation: every tensor handed to a collective is on the device the run computes on
    (on a GPU machine: CUDA, what NCCL serves), and the process group has a backend for it. On CPU every tensor is a
    CPU tensor anyway; the backend test above is the one that fails when a CPU-only backend string comes back."""
    out = tmp_path / "run"
    records = probe(2, "train.py", [str(setup / "config.yaml"), "--out_dir", str(out), "--max_steps", "2"],
                    tmp_path, device)
    camvid = tmp_path / "Camvid"
    labelled = write_mseg_camvid(camvid)
    records += probe(2, "evaluate.py", ["--dataset", "camvid", "--checkpoint", str(out / "ckpt_00000002.pt"),
                                        "--root", str(camvid), "--list", str(camvid / "val.txt"), "--base_size", "64",
                                        "--crop_size", "64", "--out_dir", str(tmp_path / "eval")], tmp_path, device)
    backends = {r["backend"] for r in records if r["fn"] == "init_process_group"}
    assert backends == {"gloo" if device == "cpu" else "cpu:gloo,cuda:nccl"}
    handed = [(r["fn"], *t) for r in records for t in r.get("tensors", [])]
    assert handed and all(dev.split(":")[0] == device for _, dev, _, _ in handed), handed
    reduced = {(dtype, tuple(shape)) for fn, _, dtype, shape in handed if fn == "all_reduce"}
    assert ("torch.int64", (1,)) in reduced         # train.py: the stop flag, every step
    assert ("torch.int64", (11, 11)) in reduced     # evaluate.py: the confusion matrix of camvid-11
    assert ("torch.float32", (4,)) in reduced       # train.py: the four logged loss terms
    result = json.loads(next((tmp_path / "eval").glob("camvid-11_*.json")).read_text())
    assert result["processes"] == 2 and np.sum(result["confusion"]) == labelled


# ---------------------------------------------------------------------------------------------------------------
# 3. Several nodes, restarts, fewer GPUs

@pytest.fixture(scope="module")
def one_rank(setup):
    """One process, batch 4: the global batches the two-rank runs split."""
    out = setup / "one_rank"
    run(setup, out, "--batch_size=4", *SGD)
    return out


@pytest.fixture(scope="module")
def two_nodes(setup):
    """Two torchrun launchers on loopback as two nodes of one process each, batch 2 per process."""
    out, port = setup / "two_nodes", free_port()
    nodes = [start([*TORCHRUN, "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
                    f"--rdzv_endpoint=127.0.0.1:{port}", "train.py", str(setup / "config.yaml"), f"--out_dir={out}",
                    "--batch_size=2", *SGD], setup / f"node{node}.log") for node in (0, 1)]
    for node, proc in enumerate(nodes):
        finish(proc, setup / f"node{node}.log")
    return out


@pytest.mark.slow
def test_two_nodes_on_loopback_equal_one_process_over_the_same_global_batches(one_rank, two_nodes):
    # after 3 steps, as test_train's 2-process test; float summation-order noise grows over more SGD steps
    close_weights(final(two_nodes, 3)["model"], final(one_rank, 3)["model"])


def worker_pid(launcher, rank, timeout=60):
    """The pid of the torchrun worker of `rank`: a child process of the launcher with RANK=rank in its environment."""
    start_time = time.time()
    while time.time() - start_time < timeout:
        for pid, environ in children(launcher).items():
            if f"RANK={rank}".encode() in environ:
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank} under launcher {launcher}")


@pytest.mark.slow
def test_elastic_restart_after_sigkill_resumes_and_ends_bit_identical(setup, two_nodes):
    out, log = setup / "elastic", setup / "elastic.log"
    # torch 2.13's c10d rendezvous hands the restarted workers the store of the first attempt, stale keys included:
    # their process group then dials the dead workers' ports (3 restarts of 4 failed here; pytorch/pytorch#135712)
    env = dict(ENV, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    proc = start([*TORCHRUN, "--standalone", "--nproc_per_node=2", "--max_restarts=1", "train.py",
                  str(setup / "config.yaml"), f"--out_dir={out}", "--resume=auto", "--batch_size=2", *SGD], log, env=env)
    wait_for_file(out / "ckpt_00000003.pt", proc, log)
    os.kill(worker_pid(proc.pid, rank=0), signal.SIGKILL)
    assert not (out / f"ckpt_{STEPS:08d}.pt").exists(), "the run finished before a worker could be killed"
    text = finish(proc, log)
    assert text.count("resumed from") == 1, text[-3000:]  # torchrun restarted the group once; it resumed
    same_weights(final(out)["model"], final(two_nodes)["model"])  # the same 2-rank run, uninterrupted


@pytest.mark.slow
def test_accumulated_micro_batches_equal_one_large_batch(setup, monkeypatch):
    """1 process x 4 micro-batches of 1 and x 2 of 2 == one batch of 4 (the same images per step: test_sampler), on a
    model without batch statistics: its one BatchNorm (the SegFormer decoder's fuse layer) becomes an identity. With
    BatchNorm it is not exact: each micro-batch is normalised by its own statistics, while SyncBatchNorm over 8 GPUs
    normalises over all of them."""
    build = train.build_model

    def without_batchnorm(config):
        model = build(config)
        for module in list(model.modules()):
            for name, child in module.named_children():
                if isinstance(child, nn.BatchNorm2d):
                    setattr(module, name, nn.Identity())
        return model
    monkeypatch.setattr(train, "build_model", without_batchnorm)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # train.main's handlers would outlive it in pytest
    weights = {}
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        out = setup / f"accum_{batch}x{accum}"
        train.main([str(setup / "config.yaml"), f"--out_dir={out}", f"--batch_size={batch}",
                    f"--accum_steps={accum}", "--max_steps=3", *SGD])
        weights[accum] = final(out, 3)["model"]
    assert not any("bn." in key for key in weights[1])
    monkeypatch.undo()
    close_weights(weights[2], weights[1])
    close_weights(weights[4], weights[1])


# ---------------------------------------------------------------------------------------------------------------
# 4. The design card's command lines, verbatim

@pytest.mark.slow
def test_the_design_cards_command_lines_as_written(setup, tmp_path):
    """`torchrun --nproc_per_node=8 train.py config.yaml` and `python evaluate.py --dataset camvid`, run as written
    from a working directory holding config.yaml (tiny settings) and the two scripts (links to the repository's).
    As written, evaluate.py has no checkpoint and no data: it must say what to pass and where CamVid comes from;
    with --checkpoint, --root and --list added (the `--key value` form) it evaluates the 8-process run's checkpoint."""
    for script in ("train.py", "evaluate.py"):
        (tmp_path / script).symlink_to(REPO / script)
    config = yaml.safe_load((setup / "config.yaml").read_text())
    config.update(batch_size=1, max_steps=2, save_every=2, out_dir="runs/card")  # paths in it are absolute
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    log = tmp_path / "train.log"
    assert "step 2/2" in finish(start([*TORCHRUN, "--nproc_per_node=8", "train.py", "config.yaml"], log, tmp_path), log)
    assert final(tmp_path / "runs" / "card", 2)["sampler"]["global_batch"] == 8  # 8 processes x 1 image

    as_written = subprocess.run([sys.executable, "evaluate.py", "--dataset", "camvid"], cwd=tmp_path, env=ENV,
                                capture_output=True, text=True, timeout=300)
    assert as_written.returncode == 2  # an expected error: one line `error: ...` (errors.run_main), no traceback
    message = as_written.stderr.strip().splitlines()[-1]
    assert message.startswith("error: evaluate.py --dataset=camvid-11 needs") and "Traceback" not in as_written.stderr
    for needed in ("--checkpoint CKPT", "--root DIR", "--list FILE"):  # what to pass, on the last line
        assert needed in message, message
    for needed in ("configs/eval/camvid-11.yaml", "mseg_download_camvid.sh", "mseg-api",  # where the data comes from
                   "dataset_lists/camvid-11/list/val.txt"):
        assert needed in as_written.stderr, as_written.stderr
    assert max(map(len, as_written.stderr.splitlines())) < 130 and str(tmp_path) not in as_written.stderr
    assert "unknown dataset" not in as_written.stderr and "--key=value" not in as_written.stderr

    labelled = write_mseg_camvid(tmp_path / "mseg_dataset" / "Camvid")
    evaluated = subprocess.run([sys.executable, "evaluate.py", "--dataset", "camvid", "--checkpoint",
                                "runs/card/ckpt_00000002.pt", "--root", "mseg_dataset/Camvid", "--list",
                                "mseg_dataset/Camvid/val.txt",
                                "--base_size", "64", "--crop_size", "64", "--flip"], cwd=tmp_path, env=ENV,
                               capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "eval" / "camvid-11_64_ss_flip_sentence.json").read_text())
    assert result["images"] == 2 and result["protocol"]["flip"] is True
    assert np.sum(result["confusion"]) == labelled and len(result["class_names"]) == 11
