"""What serve.py (torch) and serve_onnx.py (onnxruntime alone) share besides HTTP (serve_http.py), with numpy and
Pillow (no torch): the settings of a server, and a Segmenter that turns an upload and labels into the answer of
POST /api/segment (its fields: serve_http.py's docstring) from the label embeddings and the scores a subclass gives.
"""
import io
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image

from images import (MAX_ASPECT, ImageBudget, decode_rgb, normalized, quarter_turned, read_header, short_side_size,
                    upright)
from label_spec import TEXT_MODES, label_texts_for, load_label_spec, parse_labels
from overlays import label_colour, overlay_with_legend
from score_rules import background_labels, ids_from_scores, unknown_id
from serve_http import HttpError, Upload, png_base64
from settings import one_of, require


@dataclass
class HttpSettings:
    """The settings every server shares (serve.py's and serve_onnx.py's settings extend it)."""
    mode: str = "sentence"         # sentence | word
    host: str = "127.0.0.1"        # loopback: this machine only (the server has no authentication)
    port: int = 8000               # 0 = any free port (printed)
    max_labels: int = 256          # labels (with background) in one request
    max_body: int = 40_000_000     # bytes of a request body, refused from its Content-Length before it is read
    max_pixels: int = 25_000_000   # pixels of an uploaded image, and of the size the model would process it at (after
                                   # the short-side resize and padding), refused from its header before it is decoded
    max_aspect: float = MAX_ASPECT # longer side / shorter side of an uploaded image, refused so too
    max_waiting: int = 16          # requests in progress (read, decoded, waiting for or in the model) beyond which a
                                   # request gets 503 before its body is read
    timeout: float = 60.0          # seconds a connection may sit idle, or take to send a request's body (408)
    label_cache: int = 64          # label sets whose embeddings stay in memory
    warmup: str = "sky,road"       # labels segmented once at start on a grey image: a bad label source fails now

    def validate(self):
        require(self, "max_body max_pixels max_waiting max_aspect", lambda v: v >= 1, "must be >= 1")
        require(self, "timeout", lambda v: v > 0, "must be > 0")
        require(self, "max_labels", lambda v: 1 <= v <= 65535, "must be in 1..65535 (16-bit id PNGs)")
        require(self, "label_cache", lambda v: v >= 0, "must be >= 0")
        require(self, "port", lambda v: 0 <= v <= 65535, "must be in 0..65535")
        require(self, "warmup", lambda v: parse_labels(v, "--warmup"), "must name at least one label")
        one_of(self, "mode", TEXT_MODES)


class Segmenter:
    """What a server segments with: recent label sets' embeddings, the admission count, and segment(), which serves
    one request. A subclass gives `embed(keys, texts)` -> (N, D) label embeddings, `scores(image, emb, size)` ->
    (prob, cos) (N, h, w) float32 numpy at size (h, w) for a (3, H, W) normalised image, `work_size(w, h)` ->
    (W, H, how) (the size it processes a w x h photo at, for the budget; inference.Protocol.work_size), and
    `health()`; then calls start() at the end of its __init__. The model runs for one request at a time (self.lock);
    decoding the upload and encoding the answer happen outside the lock, so HTTP threads overlap them with the next
    request's pass."""

    def __init__(self, s):
        self.s, self.spec = s, load_label_spec()
        self.lock, self.count_lock = threading.Lock(), threading.Lock()
        self.waiting = self.served = 0
        self.cache = OrderedDict()  # (keys, texts) -> (N, D) embeddings, least recently used first

    def start(self):
        """Segment the warmup labels once on a grey image: a bad label source fails now, and the first pass
        (allocations, kernels) is not a user's wait."""
        warm = parse_labels(self.s.warmup, "--warmup")
        grey = io.BytesIO()
        Image.new("RGB", (64, 48), (128, 128, 128)).save(grey, format="PNG")
        self.segment(grey.getvalue(), warm)
        self.served = 0

    def remember(self, key, emb):
        if self.s.label_cache:
            self.cache[key] = emb
            while len(self.cache) > self.s.label_cache:
                self.cache.popitem(last=False)

    def embeddings_for(self, keys, texts):
        """(N, D) label embeddings of keys/texts, from the cache or self.embed (under self.lock)."""
        key = (tuple(keys), tuple(texts))
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        emb = self.embed(keys, texts)                                      # (N, D)
        self.remember(key, emb)
        return emb

    @contextmanager
    def admitted(self):
        """A request in progress, from before its body is read until it is answered; HttpError 503 at once where
        max_waiting are: a burst costs neither the bodies' memory nor their decoding, and every client an answer."""
        with self.count_lock:
            if self.waiting >= self.s.max_waiting:
                raise HttpError(503, f"busy: {self.waiting} requests in progress (max_waiting={self.s.max_waiting}); "
                                     f"retry later")
            self.waiting += 1
        try:
            yield
        finally:
            with self.count_lock:
                self.waiting -= 1

    def read_image(self, data):
        """Upload bytes -> (PIL RGB photo, the working size (w, h), the photo's size (w, h)); DataError or HttpError
        413 (over the budget: max_pixels of the image or of the size the model would process, max_aspect; from the
        header alone) otherwise."""
        im = read_header(Upload(data))  # header only
        w, h = im.size
        problem = ImageBudget(self.s.max_pixels, self.s.max_aspect).problem(w, h, self.work_size(w, h))
        if problem:
            raise HttpError(413, f"the uploaded image: {problem}")
        hs, ws = short_side_size(h, w, self.s.base_size) if self.s.base_size else (h, w)
        # a JPEG decodes at 1/2..1/8 scale where that still covers the working size (as evaluate's loader drafts)
        rgb = decode_rgb(im, "the uploaded image", draft_size=(ws, hs))
        if quarter_turned(im):  # EXIF orientation: width and height swap once upright
            w, h, ws, hs = h, w, hs, ws
        return upright(rgb), (ws, hs), (w, h)  # phone photos upright, as the browser shows them

    def segment(self, data, labels, sentences=None, unknown_below=-1.0, background="", maps=False):
        """One request: image bytes and labels -> the answer's dict (see the module docstring)."""
        t0 = time.perf_counter()
        rgb, (ws, hs), original = self.read_image(data)
        extra = background_labels(background, labels)
        if len(labels) + len(extra) > self.s.max_labels:
            raise HttpError(400, f"labels: {len(labels)} labels + {len(extra)} background labels, more than this "
                                 f"server takes (max_labels={self.s.max_labels})")
        texts = label_texts_for(labels + extra, sentences or {}, self.s.mode, self.spec)
        image = normalized(rgb)                                              # (3, H, W) normalised
        with self.lock:
            emb = self.embeddings_for(labels + extra, texts)                  # (N, D)
            prob, cos = self.scores(image, emb, (hs, ws))                     # (N, hs, ws) each
            self.served += 1
        n = len(labels)
        ids = ids_from_scores(prob, cos, unknown_below, asked=n)             # (hs, ws) uint8 | uint16
        winner = prob.argmax(0)                                              # (hs, ws), before any threshold
        best = np.take_along_axis(cos, winner[None], 0)[0]                   # (hs, ws) its cosine
        unknown = unknown_id(n)
        flat = np.where(ids == unknown, n, ids).ravel().astype(np.int64)     # unknown -> row n
        counts = np.bincount(flat, minlength=n + 1)
        sums = np.bincount(flat, weights=best.ravel(), minlength=n + 1)
        photo = np.asarray(rgb.resize((ws, hs), Image.BILINEAR) if rgb.size != (ws, hs) else rgb)
        out = {"labels": labels, "size": [ws, hs], "image_size": list(original), "unknown_id": unknown,
               "colours": {x: "#%02x%02x%02x" % label_colour(x) for x in labels},
               "texts": dict(zip(labels + extra, texts)), "background": extra,
               "shares": {x: counts[i] / ids.size for i, x in enumerate(labels)}, "unknown_share": counts[n] / ids.size,
               "scores": {x: sums[i] / counts[i] if counts[i] else None for i, x in enumerate(labels)},
               "ids_png": png_base64(ids), "overlay_png": png_base64(overlay_with_legend(photo, ids, labels))}
        if maps:
            w = winner.astype(np.int64)
            q = np.round((best.astype(np.float64) + 1) / 2 * 65535).clip(0, 65535).astype(np.int64)
            zero = np.zeros_like(w)
            out["winner_png"] = png_base64(np.stack([w & 255, w >> 8, zero], -1).astype(np.uint8))
            out["cosine_png"] = png_base64(np.stack([q >> 8, q & 255, zero], -1).astype(np.uint8))
        out["seconds"] = round(time.perf_counter() - t0, 4)
        return out

    def limits(self):
        """health()'s "limits"."""
        s = self.s
        return {"max_labels": s.max_labels, "max_body": s.max_body, "max_pixels": s.max_pixels,
                "max_aspect": s.max_aspect, "max_waiting": s.max_waiting, "timeout": s.timeout}
