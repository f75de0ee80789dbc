"""A training run's out_dir: one run writes in it (lock, and never over an earlier run's checkpoints by accident),
its checkpoints (atomic save, pruning, the state check, resume lookup and restore) and its log (`Progress`: the log
lines and log.jsonl).

    claim_out_dir("runs/x", resume="", overwrite=False)              # rank 0, before anything is written
    step = restore_checkpoint(find_resume("auto", "runs/x"), model, optimizer, scaler, sampler, meta)
    save_checkpoint("runs/x/ckpt_00001000.pt", payload, keep_last=3)

Rebuilding a model from a checkpoint for evaluation is checkpoints.load_checkpoint.
"""
import atexit
import fcntl
import json
import os
import socket
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import distributed

from checkpoints import CHECKPOINT, read_checkpoint
from errors import DivergedError, InputError, WeightsError
from labels import label_table_sha256
from model import ModelConfig
from torch_files import read_torch_file, save_torch_file


def nonfinite_tensors(obj, name: str = "") -> list[str]:
    """Names (dotted paths) of the floating-point tensors in a nested dict/list/tuple that hold NaN or inf."""
    if torch.is_tensor(obj):
        return [name] if obj.is_floating_point() and not torch.isfinite(obj).all() else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [bad for k, v in items for bad in nonfinite_tensors(v, f"{name}.{k}" if name else str(k))]


def save_checkpoint(path, payload, keep_last):
    """Write `payload` to path atomically, then prune older ckpt_*.pt beyond keep_last.

    - A NaN or inf anywhere in the model or optimizer state raises DivergedError naming the step, before anything is
      written or pruned: a diverged run never replaces a good checkpoint.
    - Temp file (named by the pid, so two writers never share one), fsync, rename: a kill mid-write never leaves a
      half-written ckpt_*.pt. A failed write (disk full, quota) removes the temp file, keeps every older checkpoint
      and raises OSError naming the checkpoint and the cause.
    - Pruning keeps the keep_last newest, and always the one before the new one: the new state has not trained a
      step yet and may be finite yet diverging (weights of 1e30 after a huge lr); the one before it has trained.
    """
    path = Path(path)
    bad = nonfinite_tensors({"model": payload["model"], "optimizer": payload["optimizer"]})
    if bad:
        raise DivergedError(f"step {payload['step']}: the model/optimizer state holds NaN or inf in {len(bad)} "
                            f"tensors (e.g. {', '.join(bad[:3])}); {path.name} is not written and the older "
                            f"checkpoints are kept. Resume from the last one with a lower lr or grad_clip")
    try:
        save_torch_file(payload, path)
    except BaseException as e:
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__  # torch reports a failed write as a RuntimeError raised while handling it
        if cause is not None:
            raise OSError(cause.errno, f"could not write checkpoint {path}: {cause.strerror or cause}; the older "
                                       f"checkpoints are kept") from e
        raise
    older = [p for p in sorted(path.parent.glob("ckpt_*.pt")) if p.name < path.name]
    for old in older[:max(len(older) - max(keep_last - 1, 1), 0)]:
        old.unlink()


def set_aside(path) -> str:
    """Rename a checkpoint whose state gave a non-finite loss to <name>.diverged (kept to inspect; --resume=auto
    and pruning skip it). Returns a sentence saying so, for the error message."""
    path = Path(path)
    if not path.is_file():
        return ""
    aside = path.with_name(path.name + ".diverged")
    os.replace(path, aside)
    previous = find_resume("auto", path.parent)
    return (f"{path.name}, which holds that state, is renamed {aside.name}; --resume=auto continues from "
            f"{previous or 'scratch'}")


def find_resume(resume, out_dir):
    """The checkpoint to resume from: `resume` itself, or with "auto" the latest ckpt_*.pt in out_dir ("" if none)."""
    if resume != "auto":
        return resume
    found = sorted(Path(out_dir).glob("ckpt_*.pt"))
    return str(found[-1]) if found else ""


RESUME_KEYS = ("model", "optimizer", "scaler", "step", "sampler", "model_args", "label_table")


def newest_finite_before(path) -> str:
    """For an error message: the newest ckpt_*.pt older than `path` in its folder whose model and optimizer state is
    finite, as a sentence saying how to resume from it (or that there is none)."""
    path = Path(path)
    for older in sorted(path.parent.glob("ckpt_*.pt"), reverse=True):
        if older.name < path.name:
            ckpt = read_torch_file(older, CHECKPOINT)
            if isinstance(ckpt, dict) and not nonfinite_tensors({k: ckpt.get(k) for k in ("model", "optimizer")}):
                return f"the newest finite checkpoint before it is {older.name}: resume with --resume={older}"
    return (f"no older checkpoint in {path.parent} is finite: start over (--overwrite=true) or from other weights "
            f"(--pretrained)")


def restore_checkpoint(path, model, optimizer, scaler, sampler, meta, allow_new_label_table=False,
                       verbose=True) -> int:
    """Continue a run from a train.py checkpoint: its model, optimizer, scaler and sampler state into the given
    objects (strictly). `meta` is what this run's checkpoints carry (train.checkpoint_meta): the checkpoint's
    model_args and label table (sha256 of its names and embeddings) must be this run's, the label table unless
    allow_new_label_table. A NaN or inf in the model or optimizer state raises DivergedError naming the tensors and
    the newest finite checkpoint before it: training from such a state cannot recover. Returns the step it was
    saved at."""
    ckpt = read_checkpoint(path, RESUME_KEYS)
    # a field this code added since the checkpoint was written takes its default, as load_checkpoint rebuilds it
    if {**asdict(ModelConfig()), **ckpt["model_args"]} != meta["model_args"]:
        raise WeightsError(f"{path}: model_args {ckpt['model_args']} differ from this run's {meta['model_args']}")
    bad = nonfinite_tensors({"model": ckpt["model"], "optimizer": ckpt["optimizer"]})
    if bad:
        raise DivergedError(f"{path} holds NaN or inf in {len(bad)} tensors ({', '.join(bad[:3])}"
                            f"{', ...' if len(bad) > 3 else ''}), from which training cannot recover; "
                            f"{newest_finite_before(path)}")
    old, new = ckpt["label_table"], meta["label_table"]
    old_sha = ckpt.get("label_table_sha256") or label_table_sha256(old)  # checkpoints before the hash was stored
    if old_sha != meta["label_table_sha256"]:
        change = (f"{path} was trained with label table sha256 {old_sha[:12]} ({old['encoder']}, {len(old['names'])}"
                  f" labels), this run's {meta['config']['label_table']} is sha256 "
                  f"{meta['label_table_sha256'][:12]} ({new['encoder']}, {len(new['names'])} labels)")
        if not allow_new_label_table:
            raise WeightsError(f"{change}: give the run's own table, or --allow_new_label_table=true if the change "
                               f"is meant")
        if verbose:
            print(f"note: {change}; allowed by --allow_new_label_table, the next checkpoints carry the new table")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    try:
        sampler.load_state_dict(ckpt["sampler"])
    except ValueError as e:  # its only errors: the sources, batch size or seed differ from the checkpoint's
        raise WeightsError(f"{path}: {e}") from None
    return ckpt["step"]


def claim_out_dir(out_dir, resume, overwrite):
    """Make out_dir and take it for this run (lock_run_dir); then refuse to start a new run over the checkpoints of
    an earlier one, which it would replace one by one (and --resume=auto would later mix with its own): unless
    `resume` continues from a checkpoint, or `overwrite` deletes them (train.py keeps the earlier log.jsonl, see
    set_aside_log). Only the process that writes checkpoints calls it."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    lock_run_dir(out_dir)  # first: a live run in out_dir is reported as such, not as an earlier one
    old = sorted(Path(out_dir).glob("ckpt_*.pt"))
    if resume or not old:
        return
    which = f"{len(old)} checkpoint(s) of an earlier run ({old[0].name}{' .. ' + old[-1].name if old[1:] else ''})"
    if not overwrite:
        raise InputError(f"{out_dir} holds {which}, which a new run would replace: --resume=auto continues that run, "
                         f"--overwrite=true deletes them and starts over (keeping its log.jsonl as log-<time>.jsonl),"
                         f" or give another --out_dir")
    for path in old:
        path.unlink()
    print(f"{out_dir}: --overwrite: deleted {which}")


def set_aside_log(out_dir) -> str:
    """A run starting at step 0 writes a new log.jsonl: an earlier run's, if any, is renamed log-<its last write,
    UTC>.jsonl instead of being appended to. Returns a sentence saying so ("" if there was none)."""
    log = Path(out_dir) / "log.jsonl"
    if not log.is_file() or log.stat().st_size == 0:
        return ""
    kept = log.with_name(time.strftime("log-%Y%m%d-%H%M%S.jsonl", time.gmtime(log.stat().st_mtime)))
    os.replace(log, kept)
    return f"{out_dir}: the log.jsonl of an earlier run is kept as {kept.name}"


_LOCKS = {}  # out_dir (resolved) -> lock file held by this process


def lock_run_dir(out_dir):
    """Claim out_dir for this process until it exits: no other training run can write in it meanwhile.

    An exclusive flock on out_dir/run.lock, which the kernel releases when the process ends however it ends (kill -9
    included), so a dead run never blocks a new one. The file names its holder (pid, host, start); a live holder
    makes this raise InputError naming it. The name is cleared at a normal exit, so a name found on taking the lock
    is that of a run that was killed: it is reported as taken over, and the temp files of checkpoint writes it left
    behind are removed. Only the process that writes checkpoints and log.jsonl (torchrun's rank 0) takes it; a
    process calling train.main twice (tests) keeps the lock it has.
    """
    key = os.path.realpath(out_dir)
    if key in _LOCKS:
        return
    path = Path(out_dir) / "run.lock"
    f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = f.read().strip() or "one that is just starting"
        f.close()
        raise InputError(f"{out_dir} is in use by another training run ({holder}); two runs in one out_dir would "
                         f"overwrite each other's checkpoints: give this one another --out_dir, or stop the other")
    except OSError as e:  # a file system without locks (e.g. Lustre mounted without -o flock)
        f.close()
        print(f"warning: cannot lock {path} ({e.strerror}); nothing stops a second run in {out_dir}")
        return
    previous = f.read().strip()
    if previous:
        print(f"{path}: taking over from a run that did not exit normally ({previous})")
    for tmp in Path(out_dir).glob(".ckpt_*.tmp"):
        print(f"{out_dir}: removing {tmp.name}, a checkpoint write that was interrupted")
        tmp.unlink()
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _LOCKS[key] = f


@atexit.register
def _release_locks():
    """At a normal exit (also by an exception, or SIGTERM's clean stop): clear the holder's name, then unlock."""
    for f in _LOCKS.values():
        f.seek(0)
        f.truncate()
        f.close()


class Progress:
    """What the log lines report: the mean loss terms, images per second, images per source since the last line,
    skipped samples. Every rank counts its own; log() reduces them (every rank must call it), rank 0 prints the line
    and appends it to out_dir/log.jsonl."""

    def __init__(self, s, sources, world, device, master, step):
        self.s, self.sources, self.world, self.device = s, sources, world, device
        if master and step == 0:  # a new run: its own log.jsonl, not appended to an earlier run's
            kept = set_aside_log(s.out_dir)
            if kept:
                print(kept)
        self.file = open(Path(s.out_dir) / "log.jsonl", "a") if master else None
        self.start, self.first_step, self.seen = time.time(), step, 0
        self.drawn = np.zeros(len(sources), np.int64)  # this rank's images per source since the last log line

    def count(self, batch):
        """One micro-batch of this rank drawn."""
        self.seen += len(batch["source"]) * self.world
        np.add.at(self.drawn, [source for source, _ in batch["key"]], 1)  # key: (source index, sample)

    def log(self, step, lr, terms, scale, skipped):
        s = self.s
        logged = distributed.all_reduce_mean(torch.stack([terms[k].detach().float() for k in sorted(terms)]))
        *per_source, n_skipped = distributed.sum_over_ranks([*self.drawn.tolist(), skipped], self.device)  # one collective
        self.drawn[:] = 0
        if not self.file:
            return
        now = time.time()
        rate = self.seen / (now - self.start)
        record = {"step": step, "time": round(now, 3), "elapsed_s": round(now - self.start, 3),  # unix time; this run's
                  "lr": lr, "images_per_s": rate, "scale": scale,
                  **{k: float(v) + 0.0 for k, v in zip(sorted(terms), logged)},  # + 0.0: no "-0.0" terms
                  "sources": {src.name: n for src, n in zip(self.sources, per_source)}}  # images since last line
        if s.skip_bad:
            record["skipped"] = n_skipped
        eta = (s.max_steps - step) * s.batch_size * self.world * s.accum_steps / max(rate, 1e-9)
        losses = " ".join(f"{k} {record[k]:.4f}" for k in sorted(terms))
        print(f"step {step}/{s.max_steps} | {losses} | lr {lr:.2e} | {rate:.1f} img/s | "
              f"eta {eta / 60:.1f} min" + (f" | skipped {n_skipped}" if s.skip_bad else ""), flush=True)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self, step, last_checkpoint, skipped):
        """The end of the run: with skip_bad, the samples all ranks skipped (every rank must call it); the summary
        line (rank 0; none if it trained no step); the end of log.jsonl."""
        if self.s.skip_bad:
            n_skipped = distributed.sum_over_ranks([skipped], self.device)[0]
            if self.file:
                print(f"skipped {n_skipped} bad samples in this run (all ranks; messages of the first ones above)")
        if not self.file:
            return
        self.file.close()
        seconds = time.time() - self.start
        if step > self.first_step:
            print(f"trained steps {self.first_step + 1}..{step} ({step - self.first_step} steps, {self.seen} images) "
                  f"in {seconds / 60:.1f} min, {self.seen / seconds:.1f} images/s; last checkpoint {last_checkpoint}")
