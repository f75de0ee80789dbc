"""The three heterogeneous losses of SSIW (Yin et al. 2022, section 3) as pure functions of tensors.

  L_HD  loss_dense   (eqs. 1-3)  well-annotated masks: mean NLL of the true label over the M valid pixels.
  L_LD  loss_coarse  (eqs. 4-5)  coarse masks: per image, the highest `drop_fraction` of pixel losses get w_i = 0.
  L_WD  loss_boxes   (eqs. 6-7)  boxes: L1 between the normalised RoI-pooled box embedding and a CLIP image embedding.

L_HD and L_LD take per-pixel NLLs (pixel_nll of the cosine logits, eqs. 1-2) so that each source's images are scored
against that source's labels only. `compute_losses` wires the three to the batch contract (data.py's collate) and
returns DETR-style named terms; the total is a weighted sum with the weights of train.py's settings (the paper's
total is L_HD + L_LD + L_WD; the auxiliary head's weight is mmseg's for its FCN auxiliary head). Everything is computed in fp32 (float64 stays float64, for gradcheck) with autocast switched off:
log-softmax over hundreds of labels at scale 100 and the ranking of the coarse loss are not safe in fp16.
"""
import torch
import torch.nn.functional as F

from model import similarity, upsample_logits  # cosine x scale; the project's one bilinear resize rule

# Where the label-resolution loss meets the 1/4-resolution embeddings. tools/bench_losses.py, L_HD forward+backward
# at 238 labels, 640x640 labels, D=512, batch 2, CPU (peak = ru_maxrss growth; full table in its docstring):
#   "logits"      cosine logits at 1/4 resolution, bilinearly upsampled to the labels     2.2 GiB    6 s CPU
#   "embeddings"  embeddings upsampled to the labels, then cosine logits                   9.4 GiB   24 s CPU
#   "labels"      labels downsampled (nearest) to 1/4 resolution, logits stay at 1/4       0.5 GiB    2 s CPU
# Default "logits": it supervises every labelled pixel at its own resolution (thin poles and boundaries survive,
# unlike "labels") for about a quarter of the memory and time of "embeddings", whose D=512 channels at
# full resolution (upsampled, normalised, then contracted) outweigh the N=238 logit channels. It is also mmseg's
# practice and model.py's stated resize policy. "labels" is the option for memory-bound runs (train.py's
# `loss_resize` setting).
RESIZE_MODES = ("logits", "embeddings", "labels")


def _fp32(x):
    """At least fp32: half precision is promoted, float64 (gradcheck) is kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def pixel_nll(logits, target):
    """Per-pixel -log l_i (eqs. 1-2): logits (B, N, H, W) already cosine x scale; target (B, H, W) int64 in [0, N)
    or -1 = ignore. Returns (nll (B, H, W) fp32 with 0 at ignored pixels, valid (B, H, W) bool)."""
    if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
    valid = target >= 0
    logp = F.log_softmax(_fp32(logits), dim=1)  # (B, N, H, W)
    # ignored pixels gather row 0 and are zeroed: no -1 index, no NaN in the backward pass
    nll = -logp.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)  # (B, H, W)
    return nll.masked_fill(~valid, 0.0), valid


def loss_dense(nll, valid):
    """L_HD (eqs. 1-3) from per-pixel NLL (pixel_nll), both (B, H, W): sum over valid pixels / M (M over the whole batch, like cross-entropy with
    ignore_index). An all-ignored batch gives 0 that is still connected to the graph."""
    return nll.sum() / valid.sum().clamp(min=1)


def coarse_keep(nll, valid, drop_fraction):
    """w_i of eq. 4 as a bool mask (B, H, W): in each image, drop exactly floor(drop_fraction * M_img) of its M_img
    valid pixels, those with the highest loss (the adaptive threshold mu is that image's order statistic).

    Ties at the threshold are broken by pixel order (stable sort: among equal losses the earlier pixel in raster order
    is dropped first), so the kept count is exactly M_img - floor(drop_fraction * M_img) whatever the ties; a plain
    `loss <= mu` test would keep every tied pixel and make the kept share depend on the data. The selection carries
    no gradient (w_i is a constant in eq. 5)."""
    if not 0.0 <= drop_fraction < 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction}")
    B = nll.shape[0]
    flat = nll.detach().reshape(B, -1).masked_fill(~valid.reshape(B, -1), float("-inf"))  # (B, P); ignored sort last
    order = flat.argsort(dim=1, descending=True, stable=True)  # (B, P) pixel indices, highest loss first
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand(B, -1))  # rank of each pixel
    m = valid.reshape(B, -1).sum(1)  # (B,) valid pixels per image
    # floor with a small tolerance so that e.g. 0.3 * 10 counts as 3 even when the product rounds just below it
    n_drop = torch.floor(m.double() * drop_fraction + 1e-9).long()  # (B,)
    keep = valid.reshape(B, -1) & (rank >= n_drop[:, None])
    return keep.reshape(valid.shape)


def loss_coarse(nll, valid, drop_fraction):
    """L_LD (eqs. 4-5) from per-pixel NLL (pixel_nll), both (B, H, W): sum of the kept pixels' NLL / M, with M = all valid pixels of the batch's
    coarse images, dropped ones included. That is eq. 5 as written (the same M as eq. 3, the weights w_i inside the
    sum): a kept pixel gets the same gradient weight 1/M as in L_HD, and the term is ~(1 - drop_fraction) of a mean."""
    keep = coarse_keep(nll, valid, drop_fraction)
    return (nll * keep).sum() / valid.sum().clamp(min=1)


def _bilinear_axis(coords, size):
    """torchvision roi_align's bilinear_interpolate along one axis. coords (K, S) sample positions in feature pixels
    (pixel centres at integers). Returns (low, high) int64 indices and their weights (K, S); samples beyond
    [-1, size] weigh 0, those in [-1, 0] read pixel 0 and those in [size-1, size] read pixel size-1."""
    outside = (coords < -1.0) | (coords > size)
    c = coords.clamp(min=0.0)
    low = c.floor().long()
    at_end = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end, torch.zeros_like(c), c - low.to(c.dtype))
    w_high = frac.masked_fill(outside, 0.0)
    w_low = (1.0 - frac).masked_fill(outside, 0.0)
    return low, high, w_low, w_high


def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=2):
    """RoIAlign in plain torch with torchvision's aligned=True semantics.

    input (B, C, H, W); boxes (K, 5) [image_index, x1, y1, x2, y2] in input-image pixels; a box coordinate x maps to
    x * spatial_scale - 0.5 in the feature map (the half-pixel shift of aligned=True puts pixel centres at integers).
    Each of the output_size bins averages sampling_ratio x sampling_ratio bilinear samples. Returns (K, C, S_h, S_w).
    torchvision's adaptive sampling_ratio <= 0 (a per-box sample count) is not supported: it does not vectorise."""
    S_h, S_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    if sampling_ratio <= 0:
        raise ValueError(f"sampling_ratio must be > 0 (adaptive sampling is not supported), got {sampling_ratio}")
    if boxes.ndim != 2 or boxes.shape[1] != 5:
        raise ValueError(f"boxes must be (K, 5) [image_index, x1, y1, x2, y2], got {tuple(boxes.shape)}")
    B, C, H, W = input.shape
    g = sampling_ratio
    b = boxes[:, 0].long()  # (K,)
    if len(b) and (int(b.min()) < 0 or int(b.max()) >= B):
        raise ValueError(f"box image indices must be in [0, {B}), got {sorted(set(b.tolist()))}")
    x1, y1, x2, y2 = (boxes[:, 1:].to(input.dtype) * spatial_scale - 0.5).unbind(1)  # (K,) each
    # sample k along an axis sits at (k + 0.5) / g bins from the box start: bin k // g, sample k % g inside it
    steps_h = (torch.arange(S_h * g, device=input.device, dtype=input.dtype) + 0.5) / g  # (S_h * g,)
    steps_w = (torch.arange(S_w * g, device=input.device, dtype=input.dtype) + 0.5) / g  # (S_w * g,)
    ys = y1[:, None] + steps_h[None] * ((y2 - y1) / S_h)[:, None]  # (K, S_h * g)
    xs = x1[:, None] + steps_w[None] * ((x2 - x1) / S_w)[:, None]  # (K, S_w * g)
    y_lo, y_hi, wy_lo, wy_hi = _bilinear_axis(ys, H)
    x_lo, x_hi, wx_lo, wx_hi = _bilinear_axis(xs, W)

    flat = input.permute(0, 2, 3, 1).reshape(B * H * W, C)  # (B*H*W, C): one gather per corner

    def corner(yi, xi, wy, wx):  # (K, Sy) x (K, Sx) -> (K, Sy, Sx, C)
        idx = (b[:, None, None] * H + yi[:, :, None]) * W + xi[:, None, :]  # (K, Sy, Sx)
        return flat[idx] * (wy[:, :, None] * wx[:, None, :]).unsqueeze(-1)

    samples = (corner(y_lo, x_lo, wy_lo, wx_lo) + corner(y_lo, x_hi, wy_lo, wx_hi)
               + corner(y_hi, x_lo, wy_hi, wx_lo) + corner(y_hi, x_hi, wy_hi, wx_hi))  # (K, S_h*g, S_w*g, C)
    K = boxes.shape[0]
    bins = samples.reshape(K, S_h, g, S_w, g, C).mean(dim=(2, 4))  # (K, S_h, S_w, C)
    return bins.permute(0, 3, 1, 2)  # (K, C, S_h, S_w)


def loss_boxes(box_map, boxes, targets, spatial_scale, output_size=7, sampling_ratio=2):
    """L_WD (eqs. 6-7): (1/P) sum_r || V*_r / |V*_r| - V_r / |V_r| ||_1.

    box_map (B, C, h, w) is the model's `box` output (the 1x1 conv already applied); boxes (P, 5) [image_index, x1,
    y1, x2, y2] in image pixels, spatial_scale = h / H_image; targets (P, C) CLIP image embeddings V*_r. V_r is RoI
    pooling = the mean of the roi_align bins. No boxes gives 0 that is still connected to the graph."""
    if boxes.shape[0] != targets.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes but {targets.shape[0]} box targets")
    if boxes.shape[0] == 0:
        return _fp32(box_map).sum() * 0.0
    if targets.shape[1] != box_map.shape[1]:
        raise ValueError(f"box targets have {targets.shape[1]} channels, the box map {box_map.shape[1]}")
    v = roi_align(_fp32(box_map), boxes, output_size, spatial_scale, sampling_ratio).mean(dim=(2, 3))  # (P, C)
    diff = F.normalize(v, dim=1) - F.normalize(_fp32(targets).to(v.dtype), dim=1)  # (P, C)
    return diff.abs().sum(dim=1).mean()


def downsample_labels(target, size):
    """Nearest label per low-resolution pixel: target (B, H, W) -> (B, h, w). nearest-exact reads the label at the
    centre of each output pixel's footprint, matching the half-pixel convention of the bilinear resizes here."""
    return F.interpolate(target[:, None].float(), size=tuple(size), mode="nearest-exact")[:, 0].long()


def source_nll(emb, label_emb, scale, target, resize):
    """Per-pixel NLL of images that share one label set. emb (b, D, h, w) pixel embeddings; label_emb (n, D) that
    set's label embeddings; target (b, H, W) local indices in [0, n) or -1. Returns (nll, valid) (b, H, W), or
    (b, h, w) for resize="labels"; see RESIZE_MODES."""
    if resize == "logits":
        logits = similarity(emb, label_emb, scale)  # (b, n, h, w)
        logits = upsample_logits(logits, target.shape[-2:])  # (b, n, H, W)
    elif resize == "embeddings":
        emb = F.interpolate(emb, size=target.shape[-2:], mode="bilinear", align_corners=False)  # (b, D, H, W)
        logits = similarity(emb, label_emb, scale)  # (b, n, H, W)
    elif resize == "labels":
        target = downsample_labels(target, emb.shape[-2:])  # (b, h, w)
        logits = similarity(emb, label_emb, scale)  # (b, n, h, w)
    else:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    return pixel_nll(logits, target)


def local_target(target, rows, num_rows, sources):
    """Label-table rows -> indices into `rows` (one source's label set). target (b, H, W) rows or -1; rows (n,).
    A row the source cannot name is a data bug and raises, naming the source(s) and the rows."""
    if target.numel() and int(target.max()) >= num_rows:
        raise ValueError(f"sources {sorted(set(sources))}: target row {int(target.max())} >= table size {num_rows}")
    lut = torch.full((num_rows,), -1, dtype=torch.long, device=target.device)
    lut[rows] = torch.arange(len(rows), device=target.device)
    local = torch.where(target >= 0, lut[target.clamp(min=0)], -1)  # (b, H, W)
    bad = (target >= 0) & (local < 0)
    if bad.any():
        raise ValueError(f"sources {sorted(set(sources))}: target rows {sorted(set(target[bad].tolist()))[:10]} "
                         f"are not among their label_rows")
    return local


def _mask_terms(emb, batch, label_emb, scale, resize, drop_fraction):
    """L_HD and L_LD of one embedding map (B, D, h, w) over the batch's dense and coarse images."""
    kinds, sources = batch["kind"], batch["source"]
    groups = {}  # label set -> image indices: logits only against the labels that image's source can name
    for i, (kind, rows) in enumerate(zip(kinds, batch["label_rows"])):
        if kind in ("dense", "coarse"):
            groups.setdefault(tuple(rows.tolist()), []).append(i)
    parts = {"dense": [], "coarse": []}  # kind -> [(nll, valid)], every image of the batch at the same resolution
    for key, idx in groups.items():
        rows = torch.tensor(key, dtype=torch.long, device=label_emb.device)
        target = local_target(batch["target"][idx].to(emb.device), rows.to(emb.device), label_emb.shape[0],
                              [sources[i] for i in idx])
        nll, valid = source_nll(_fp32(emb[idx]), label_emb[rows], scale, target, resize)  # (b, H', W')
        for kind in parts:
            sel = torch.tensor([kinds[i] == kind for i in idx], device=emb.device)
            if sel.any():
                parts[kind].append((nll[sel], valid[sel]))
    zero = _fp32(emb).sum() * 0.0  # a term with no image still reaches every parameter, and is finite
    dense = loss_dense(*(torch.cat(t) for t in zip(*parts["dense"]))) if parts["dense"] else zero
    coarse = (loss_coarse(*(torch.cat(t) for t in zip(*parts["coarse"])), drop_fraction)
              if parts["coarse"] else zero)
    return dense, coarse


def loss_imagenet(emb, target):
    """Distilling the frozen ImageNet branch (model.ImageNetBranch): emb (B, D, H/4, W/4) the pixel embeddings,
    average-pooled to target's (B, D, H/32, W/32) grid, pulled towards the branch's direction there: 1 - cosine,
    averaged over the grid (labels are matched by cosine, so the direction is all that matters; L_WD's L1 on the raw
    vectors would also fit their lengths). Every pixel of every image counts: the branch has an opinion about all."""
    pooled = F.adaptive_avg_pool2d(emb, target.shape[-2:])          # (B, D, h, w) -> (B, D, H/32, W/32)
    return 1 - F.cosine_similarity(pooled, target, dim=1).mean()


def compute_losses(out, batch, label_emb, scale, weights, resize, drop_fraction):
    """All loss terms of one batch, DETR-style.

    out: the model's train-mode dict {"emb": (B, D, H/4, W/4), "aux": (B, D, H/16, W/16)?, "box": (B, C, H/4, W/4)?}
    and, from train.py, "imagenet": (B, D, H/32, W/32) the ImageNet branch's targets (loss_imagenet) where distilled;
    batch: data.py's collate contract (target (B, H, W) table rows or -1, kind, source, label_rows, boxes (P, 5),
    box_targets (P, C)); label_emb (N, D) the label table; scale exp(logit_scale) (clamped by the model); weights
    {"dense", "coarse", "boxes", "aux": weight}; resize one of RESIZE_MODES; drop_fraction L_LD's share of dropped
    pixels per image. Dense images give L_HD, coarse ones L_LD, boxes L_WD. Returns {"loss": weighted total, "loss_dense", "loss_coarse", "loss_boxes", "loss_aux" (when out has
    "aux": L_HD + L_LD on the aux map)}; terms without images are 0 and still connected to the graph."""
    unknown = set(batch["kind"]) - {"dense", "coarse", "boxes"}
    if unknown:
        raise ValueError(f"unknown annotation kind(s) {sorted(unknown)}; expected dense, coarse or boxes")
    device = out["emb"].device
    with torch.autocast(device_type=device.type, enabled=False):
        label_emb = _fp32(label_emb.to(device))
        scale = _fp32(torch.as_tensor(scale, device=device))
        terms = {}
        terms["loss_dense"], terms["loss_coarse"] = _mask_terms(out["emb"], batch, label_emb, scale, resize,
                                                                drop_fraction)
        if "aux" in out:
            terms["loss_aux"] = sum(_mask_terms(out["aux"], batch, label_emb, scale, resize, drop_fraction))
        boxes = batch.get("boxes")
        n_boxes = 0 if boxes is None else boxes.shape[0]
        if n_boxes and "box" not in out:
            raise ValueError(f"the batch has {n_boxes} boxes but the model has no box head (box_head=False)")
        if n_boxes:
            box_map = out["box"]
            # the map's stride, not h / H: sizes that are not multiples of 32 round the map up (padding), and
            # feature pixel i still covers image pixels [4i, 4i + 4)
            strides = [round(i / m) for i, m in zip(batch["image"].shape[-2:], box_map.shape[-2:])]
            if strides[0] != strides[1]:
                raise ValueError(f"box map {tuple(box_map.shape[-2:])} and image {tuple(batch['image'].shape[-2:])} "
                                 f"have different strides {strides}")
            terms["loss_boxes"] = loss_boxes(box_map, boxes.to(device), batch["box_targets"].to(device),
                                             1.0 / strides[0])
        else:
            terms["loss_boxes"] = _fp32(out.get("box", out["emb"])).sum() * 0.0
        if "imagenet" in out:
            terms["loss_imagenet"] = loss_imagenet(_fp32(out["emb"]), _fp32(out["imagenet"]))
    missing = sorted({name.removeprefix("loss_") for name in terms} - set(weights))
    if missing:
        raise KeyError(f"no weight for loss term(s) {missing}; weights has {sorted(weights)}")
    total = sum(weights[name.removeprefix("loss_")] * value for name, value in terms.items())
    return {"loss": total, **terms}
