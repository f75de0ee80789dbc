"""losses.py: hand-computed values per equation, gradcheck, the drop rule, the temperature's gradient, roi_align against
a direct transcription of torchvision's per-box loop, and compute_losses on the batch contract."""
import math

import pytest
import torch
import torch.nn.functional as F

from losses import (coarse_keep, compute_losses, downsample_labels, loss_boxes, loss_coarse, loss_dense, pixel_nll,
                    roi_align, source_nll)


# ------------------------------------------------------------------------------------------------ L_HD (eqs. 1-3)

def test_dense_hand_values():
    # 3 labels (rows) x 3 pixels (columns); pixel 0 is label 2, pixel 1 is label 0, pixel 2 is ignored
    logits = torch.tensor([[1.0, 0.0, 5.0], [2.0, 3.0, 4.0], [0.0, 0.0, 0.0]]).reshape(1, 3, 1, 3)
    target = torch.tensor([[[2, 0, -1]]])
    nll0 = math.log(math.exp(1) + math.exp(2) + math.exp(0)) - 0.0  # -log softmax(1, 2, 0)[2]
    nll1 = math.log(math.exp(0) + math.exp(3) + math.exp(0)) - 0.0  # -log softmax(0, 3, 0)[0]
    assert loss_dense(*pixel_nll(logits, target)).item() == pytest.approx((nll0 + nll1) / 2, rel=1e-6)
    nll, valid = pixel_nll(logits, target)
    assert valid.tolist() == [[[True, True, False]]] and nll[0, 0, 2].item() == 0.0


def test_dense_all_ignored_is_zero_with_finite_gradient():
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = loss_dense(*pixel_nll(logits, torch.full((2, 3, 3), -1)))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0


def test_temperature_gradient_matches_hand_derivation():
    # logits = s * z with s = exp(t): dL/dt = s * dL/ds = -(s / M) sum_i (z_i,y_i - sum_j p_ij z_ij)
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(2, 5, 3, 4, dtype=torch.float64), dim=1)  # (B, D, H, W)
    lab = F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=1)  # (N, D)
    z = torch.einsum("bdhw,nd->bnhw", emb, lab)  # cosines (B, N, H, W)
    target = torch.randint(-1, 6, (2, 3, 4))
    t = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    loss_dense(*pixel_nll(z * t.exp(), target)).backward()
    s = math.exp(t.item())
    p = torch.softmax(s * z, dim=1)
    valid = target >= 0
    z_true = z.gather(1, target.clamp(min=0)[:, None])[:, 0]  # (B, H, W)
    expected = -(s / valid.sum().item()) * ((z_true - (p * z).sum(1))[valid]).sum()
    assert t.grad.item() == pytest.approx(expected.item(), rel=1e-10)
    # and by finite differences
    f = lambda tt: loss_dense(*pixel_nll(z * math.exp(tt), target)).item()  # noqa: E731
    assert t.grad.item() == pytest.approx((f(t.item() + 1e-6) - f(t.item() - 1e-6)) / 2e-6, rel=1e-5)


# ------------------------------------------------------------------------------------------------ L_LD (eqs. 4-5)

def test_coarse_hand_values():
    # two labels, logits (d, 0) at the true label 0: nll = log(1 + exp(-d))
    d = torch.tensor([4.0, 1.0, -2.0, 0.5, 3.0])
    logits = torch.stack([d, torch.zeros(5)]).reshape(1, 2, 1, 5)
    target = torch.tensor([[[0, 0, 0, 0, -1]]])  # 4 valid pixels: floor(0.3 * 4) = 1 dropped (d = -2)
    nll = [math.log1p(math.exp(-x)) for x in (4.0, 1.0, 0.5)]
    nll_map, valid = pixel_nll(logits, target)
    assert loss_coarse(nll_map, valid, 0.3).item() == pytest.approx(sum(nll) / 4, rel=1e-6)  # 1/M over all valid
    assert loss_coarse(nll_map, valid, 0.0).item() == pytest.approx(loss_dense(nll_map, valid).item(), rel=1e-6)


def test_drop_rule_exact_fraction_per_image_not_per_batch():
    torch.manual_seed(0)
    nll = torch.rand(4, 7, 9)
    nll[0] += 10.0  # image 0 has all the high losses: a batch-wide threshold would drop only its pixels
    nll[2] = torch.round(nll[2] * 3) / 3  # heavy ties
    valid = torch.rand(4, 7, 9) > 0.2
    valid[3] = False  # all ignored
    keep = coarse_keep(nll, valid, 0.3)
    for b in range(4):
        m = int(valid[b].sum())
        assert int(keep[b].sum()) == m - math.floor(0.3 * m)  # exact count, ties included
        assert not (keep[b] & ~valid[b]).any()
        kept, dropped = nll[b][keep[b]], nll[b][valid[b] & ~keep[b]]
        if len(kept) and len(dropped):
            assert kept.max() <= dropped.min()  # the highest losses are the ones dropped
    assert keep[0].sum() > 0 and (valid[1] & ~keep[1]).sum() > 0


def test_drop_rule_ties_broken_by_raster_order():
    nll, valid = torch.ones(1, 2, 5), torch.ones(1, 2, 5, dtype=torch.bool)
    keep = coarse_keep(nll, valid, 0.3)  # 10 valid, 3 dropped: the first three in raster order
    assert keep.flatten().tolist() == [False] * 3 + [True] * 7
    assert loss_coarse(nll, valid, 0.3).item() == pytest.approx(7 / 10)


def test_coarse_all_ignored_and_bad_fraction():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = loss_coarse(*pixel_nll(logits, torch.full((1, 2, 2), -1)), 0.3)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="drop_fraction"):
        loss_coarse(*pixel_nll(logits, torch.zeros(1, 2, 2, dtype=torch.long)), 1.0)


# ------------------------------------------------------------------------------------------------------- roi_align

def _bilinear_reference(fm, y, x):
    """torchvision/csrc/ops/cpu/roi_align_common.h bilinear_interpolate, one sample, written out."""
    C, H, W = fm.shape
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return torch.zeros(C, dtype=fm.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= H - 1:
        y_high = y_low = H - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= W - 1:
        x_high = x_low = W - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * fm[:, y_low, x_low] + hy * lx * fm[:, y_low, x_high]
            + ly * hx * fm[:, y_high, x_low] + ly * lx * fm[:, y_high, x_high])


def _roi_align_reference(x, boxes, out_h, out_w, spatial_scale, g):
    """torchvision roi_align_forward_kernel_impl with aligned=True, one box and one sample at a time."""
    out = torch.zeros(len(boxes), x.shape[1], out_h, out_w, dtype=x.dtype)
    for k, (b, x1, y1, x2, y2) in enumerate(boxes.tolist()):
        start_w, start_h = x1 * spatial_scale - 0.5, y1 * spatial_scale - 0.5
        bin_w, bin_h = (x2 * spatial_scale - 0.5 - start_w) / out_w, (y2 * spatial_scale - 0.5 - start_h) / out_h
        for ph in range(out_h):
            for pw in range(out_w):
                acc = torch.zeros(x.shape[1], dtype=x.dtype)
                for iy in range(g):
                    yy = start_h + ph * bin_h + (iy + 0.5) * bin_h / g
                    for ix in range(g):
                        xx = start_w + pw * bin_w + (ix + 0.5) * bin_w / g
                        acc += _bilinear_reference(x[int(b)], yy, xx)
                out[k, :, ph, pw] = acc / (g * g)
    return out


def _boxes(n, img_w, img_h, gen):
    """Random [x1, y1, x2, y2] boxes in image pixels, x1 < x2."""
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * torch.tensor([img_w, img_h])
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * torch.tensor([img_w, img_h]) * 0.6
    return torch.cat([xy, xy + wh], dim=1)


def _test_boxes(img_w, img_h, gen):
    """Interior, border, tiny and degenerate boxes, plus boxes after flip / scale / crop of the image."""
    base = _boxes(6, img_w, img_h, gen)
    special = torch.tensor([[0, 0, img_w, img_h], [0, 0, 3, 2], [img_w - 2.5, img_h - 1.5, img_w, img_h],
                            [-3.0, -2.0, 5.0, 4.0], [img_w - 4.0, 1.0, img_w + 6.0, 9.0],  # past the borders
                            [5.3, 6.1, 5.4, 6.15], [7.0, 3.0, 7.0, 3.0],  # tiny, zero-size
                            [-30.0, -30.0, -20.0, -25.0]], dtype=torch.float64)  # wholly outside
    flipped = torch.stack([img_w - base[:, 2], base[:, 1], img_w - base[:, 0], base[:, 3]], 1)
    scaled = base * 0.7
    cropped = base - torch.tensor([5.0, 3.0, 5.0, 3.0], dtype=torch.float64)  # crop origin (5, 3): some cut off
    return torch.cat([base, special, flipped, scaled, cropped])


@pytest.mark.parametrize("spatial_scale,out_size,g", [(1.0, (2, 3), 2), (0.25, (3, 3), 1), (0.25, (2, 2), 3)])
def test_roi_align_matches_reference_loop(spatial_scale, out_size, g):
    gen = torch.Generator().manual_seed(0)
    H, W = 7, 9
    x = torch.randn(2, 3, H, W, generator=gen, dtype=torch.float64)
    xyxy = _test_boxes(W / spatial_scale, H / spatial_scale, gen)
    boxes = torch.cat([torch.randint(0, 2, (len(xyxy), 1), generator=gen).double(), xyxy], dim=1)
    got = roi_align(x, boxes, out_size, spatial_scale, g)
    want = _roi_align_reference(x, boxes, *out_size, spatial_scale, g)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_roi_align_flip_scale_crop_equivariance():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 12, 16, generator=gen, dtype=torch.float64)  # feature map of a 48 x 64 image (scale 1/4)
    xyxy = _boxes(10, 64, 48, gen)
    boxes = torch.cat([torch.zeros(10, 1, dtype=torch.float64), xyxy], 1)
    ref = roi_align(x, boxes, 3, 0.25, 2)
    # horizontal flip of image and map: the output mirrors
    flipped = boxes.clone()
    flipped[:, 1], flipped[:, 3] = 64 - boxes[:, 3], 64 - boxes[:, 1]
    torch.testing.assert_close(roi_align(x.flip(-1), flipped, 3, 0.25, 2), ref.flip(-1))
    # scaled image coordinates with the matching spatial scale
    torch.testing.assert_close(roi_align(x, boxes * torch.tensor([1, 2.5, 2.5, 2.5, 2.5]), 3, 0.1, 2), ref)
    # crop of 4 x 8 feature pixels off the top-left (16 x 32 image pixels), boxes kept inside the crop
    # (every sample at least half a feature pixel inside the crop, so no border rule differs between the two)
    inside = torch.cat([torch.zeros(5, 1, dtype=torch.float64), _boxes(5, 10, 14, gen)], 1)  # x in [0, 16), y [0, 23)
    inside += torch.tensor([0.0, 40.0, 20.0, 40.0, 20.0], dtype=torch.float64)  # x in [40, 56), y in [20, 43)
    crop = inside - torch.tensor([0.0, 32.0, 16.0, 32.0, 16.0], dtype=torch.float64)
    torch.testing.assert_close(roi_align(x[:, :, 4:, 8:], crop, 3, 0.25, 2), roi_align(x, inside, 3, 0.25, 2))


def test_roi_align_bad_input_raises():
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), 2, 1.0, 0)
    with pytest.raises(ValueError, match=r"\[0, 2\).*\[2\]"):
        roi_align(torch.zeros(2, 1, 4, 4), torch.tensor([[2.0, 0, 0, 1, 1]]), 2)


# ------------------------------------------------------------------------------------------------ L_WD (eqs. 6-7)

def test_boxes_hand_values():
    box_map = torch.zeros(2, 2, 5, 5)
    box_map[0, 0], box_map[0, 1] = 3.0, 4.0  # image 0 is the constant vector (3, 4): V_r = (0.6, 0.8)
    box_map[1, 0], box_map[1, 1] = 1.0, 1.0  # image 1: (1, 1) / sqrt(2)
    boxes = torch.tensor([[0, 2.0, 2.0, 10.0, 12.0], [1, 0.0, 4.0, 8.0, 8.0]])  # inside the 20 x 20 image
    targets = torch.tensor([[7.0, 0.0], [0.0, 2.0]])  # normalised: (1, 0), (0, 1)
    r = 1 / math.sqrt(2)
    expected = ((0.4 + 0.8) + (r + (1 - r))) / 2
    assert loss_boxes(box_map, boxes, targets, 0.25).item() == pytest.approx(expected, rel=1e-6)


def test_boxes_empty_is_zero_with_finite_gradient():
    box_map = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = loss_boxes(box_map, torch.zeros(0, 5), torch.zeros(0, 3), 0.25)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(box_map.grad).all()


# ------------------------------------------------------------------------------------------------------- gradcheck

def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(-1, 4, (2, 3, 5), generator=gen)
    assert torch.autograd.gradcheck(lambda lg: loss_dense(*pixel_nll(lg, target)), (logits,))
    assert torch.autograd.gradcheck(lambda lg: loss_coarse(*pixel_nll(lg, target), 0.3), (logits,))
    fmap = torch.randn(2, 3, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[0, 1.3, 2.2, 20.1, 17.7], [1, -2.0, 3.1, 9.4, 30.0], [1, 24.5, 0.2, 27.9, 2.6]],
                         dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: roi_align(f, boxes, (2, 3), 0.25, 2), (fmap,))
    targets = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: loss_boxes(f, boxes, targets, 0.25), (fmap,))


# -------------------------------------------------------------------------------------------------- compute_losses

def _batch(dtype=torch.float32, seed=0):
    """Four 16x16 images from three sources over a 7-row label table: A (dense) names rows 0, 2, 5; B (one coarse,
    one dense image) names rows 1, 2, 3, 6; an Objects365-like box source. Embeddings at 1/4 resolution."""
    gen = torch.Generator().manual_seed(seed)
    rows = {"A": torch.tensor([0, 2, 5]), "B": torch.tensor([1, 2, 3, 6]), "O": torch.tensor([4, 5])}
    sources, kinds = ["A", "B", "B", "O"], ["dense", "coarse", "dense", "boxes"]
    target = torch.full((4, 16, 16), -1)
    for i in range(3):
        r = rows[sources[i]]
        target[i] = r[torch.randint(0, len(r), (16, 16), generator=gen)]
        target[i][torch.rand(16, 16, generator=gen) < 0.2] = -1
    batch = {"image": torch.zeros(4, 3, 16, 16), "target": target, "source": sources, "kind": kinds,
             "label_rows": [rows[s] for s in sources],
             "boxes": torch.tensor([[3, 1.0, 2.0, 9.0, 14.0], [3, 8.0, 0.0, 16.0, 5.0]], dtype=dtype),
             "box_rows": torch.tensor([4, 5]), "box_targets": torch.randn(2, 6, generator=gen, dtype=dtype)}
    out = {"emb": torch.randn(4, 5, 4, 4, generator=gen, dtype=dtype),
           "aux": torch.randn(4, 5, 1, 1, generator=gen, dtype=dtype),
           "box": torch.randn(4, 6, 4, 4, generator=gen, dtype=dtype)}
    label_emb = torch.randn(7, 5, generator=gen, dtype=dtype)
    return out, batch, label_emb


WEIGHTS = {"dense": 1.0, "coarse": 1.0, "boxes": 1.0, "aux": 0.4}  # train.py's defaults


def _losses(out, batch, label_emb, scale, weights=WEIGHTS):
    return compute_losses(out, batch, label_emb, scale, weights, resize="logits", drop_fraction=0.3)


def _local(target, rows):
    local = torch.full_like(target, -1)
    for j, r in enumerate(rows.tolist()):
        local[target == r] = j
    return local


def test_compute_losses_matches_per_source_cross_entropy():
    out, batch, label_emb = _batch()
    scale = torch.tensor(12.0)
    terms = _losses(out, batch, label_emb, scale)

    def logits(i):  # image i against its own source's rows only, upsampled to the labels
        e = F.normalize(out["emb"][i:i + 1], dim=1)
        lab = F.normalize(label_emb[batch["label_rows"][i]], dim=1)
        z = scale * torch.einsum("bdhw,nd->bnhw", e, lab)
        return F.interpolate(z, size=(16, 16), mode="bilinear", align_corners=False)

    ce = [F.cross_entropy(logits(i), _local(batch["target"][i:i + 1], batch["label_rows"][i]), ignore_index=-1,
                          reduction="none")[0] for i in range(3)]  # (16, 16) each, 0 where ignored
    valid = [batch["target"][i] >= 0 for i in range(3)]
    dense = (ce[0].sum() + ce[2].sum()) / (valid[0].sum() + valid[2].sum())  # dense images 0 and 2, one M
    kept = ce[1][valid[1]].sort().values  # coarse image 1: drop the floor(0.3 M) highest, divide by M
    m = int(valid[1].sum())
    coarse = kept[:m - math.floor(0.3 * m)].sum() / m
    boxes = loss_boxes(out["box"], batch["boxes"], batch["box_targets"], 0.25)
    torch.testing.assert_close(terms["loss_dense"], dense)
    torch.testing.assert_close(terms["loss_coarse"], coarse)
    torch.testing.assert_close(terms["loss_boxes"], boxes)
    total = terms["loss_dense"] + terms["loss_coarse"] + terms["loss_boxes"] + 0.4 * terms["loss_aux"]
    torch.testing.assert_close(terms["loss"], total)
    assert set(terms) == {"loss", "loss_dense", "loss_coarse", "loss_boxes", "loss_aux"}


def test_compute_losses_gradcheck_and_temperature_gradient():
    out, batch, label_emb = _batch(torch.float64)
    batch["target"], batch["image"] = batch["target"][:, :8, :8], batch["image"][:, :, :8, :8]  # smaller for speed
    out = {"emb": out["emb"][:, :, :2, :2].clone().requires_grad_(), "box": out["box"][:, :, :2, :2]}
    batch["boxes"][:, 1:] /= 2  # coordinates on the 8x8 images
    t = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)

    def f(emb, t):
        return _losses({"emb": emb, "box": out["box"]}, batch, label_emb, t.exp())["loss"]

    assert torch.autograd.gradcheck(f, (out["emb"], t))


def test_compute_losses_degenerate_batches_are_finite():
    out, batch, label_emb = _batch()
    out = {k: v.requires_grad_() for k, v in out.items()}
    batch["target"][:] = -1  # every image all-ignored
    batch["boxes"], batch["box_targets"], batch["box_rows"] = torch.zeros(0, 5), torch.zeros(0, 6), torch.zeros(0)
    terms = _losses(out, batch, label_emb, torch.tensor(100.0))
    terms["loss"].backward()
    assert all(v.item() == 0.0 for v in terms.values())
    assert all(torch.isfinite(v.grad).all() for v in out.values())
    # a batch of box images only (no dense or coarse source), model without aux / box head and no boxes
    out, batch, label_emb = _batch()
    batch["kind"] = ["boxes"] * 4
    batch["boxes"] = torch.zeros(0, 5)
    batch["box_targets"] = torch.zeros(0, 6)
    terms = _losses({"emb": out["emb"]}, batch, label_emb, 10.0)
    assert set(terms) == {"loss", "loss_dense", "loss_coarse", "loss_boxes"}
    assert terms["loss"].item() == 0.0
    # a box head but a batch without any box keys
    for key in ("boxes", "box_rows", "box_targets"):
        del batch[key]
    box = out["box"].requires_grad_()
    terms = _losses({"emb": out["emb"], "box": box}, batch, label_emb, 10.0)
    terms["loss"].backward()
    assert terms["loss_boxes"].item() == 0.0 and torch.isfinite(box.grad).all()


def test_compute_losses_under_bf16_autocast_is_fp32():
    out, batch, label_emb = _batch()
    out = {k: v.bfloat16() for k, v in out.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = _losses(out, batch, label_emb, torch.tensor(50.0))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())


def test_compute_losses_bad_input_raises():
    out, batch, label_emb = _batch()
    batch["target"][0, 0, 0] = 1  # row 1 is not in source A's label set
    with pytest.raises(ValueError, match=r"\['A'\].*\[1\]"):
        _losses(out, batch, label_emb, 10.0)
    out, batch, label_emb = _batch()
    with pytest.raises(KeyError, match="aux"):
        _losses(out, batch, label_emb, 10.0, {"dense": 1.0, "coarse": 1.0, "boxes": 1.0})
    with pytest.raises(ValueError, match="no box head"):
        _losses({"emb": out["emb"]}, batch, label_emb, 10.0)
    batch["kind"][0] = "points"
    with pytest.raises(ValueError, match="points"):
        _losses(out, batch, label_emb, 10.0)


def test_resize_modes():
    out, batch, label_emb = _batch()
    emb, target = out["emb"][:1], _local(batch["target"][:1], batch["label_rows"][0])
    lab = label_emb[batch["label_rows"][0]]
    # "labels": nearest-exact reads the label at the centre of each 4x4 block, i.e. pixel 4i + 2
    small = downsample_labels(target, (4, 4))
    assert torch.equal(small, target[:, 2::4, 2::4])
    nll, valid = source_nll(emb, lab, 10.0, target, "labels")
    z = 10.0 * torch.einsum("bdhw,nd->bnhw", F.normalize(emb, dim=1), F.normalize(lab, dim=1))
    torch.testing.assert_close(nll.sum() / valid.sum(), F.cross_entropy(z, small, ignore_index=-1))
    # "embeddings": full resolution, a different (but close) loss from "logits"
    a = source_nll(emb, lab, 10.0, target, "logits")
    b = source_nll(emb, lab, 10.0, target, "embeddings")
    assert a[0].shape == b[0].shape == (1, 16, 16) and torch.equal(a[1], b[1]) and not torch.allclose(a[0], b[0])
    with pytest.raises(ValueError, match="resize"):
        source_nll(emb, lab, 10.0, target, "pixels")
