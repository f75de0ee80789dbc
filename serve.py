"""A local page to try any labels on any photo, and a JSON API for programs: one model in memory, served with
Python's standard library (http.server), requests run through the model one at a time.

    python serve.py --checkpoint=CKPT --clip_weights=ViT-B-32.pt [--port=8000] [--host=127.0.0.1]
    then open http://127.0.0.1:8000/ (the page: drop a photo, type labels, move the "unknown below" slider)

Labels are embedded as predict.py embeds them (--embeddings=TABLE: rows named by the labels; --clip_weights: each
label's sentence embedded on request), once per label set (the last --label_cache sets stay in memory).
  GET  /              the page (serve_page.py)
  GET  /api/health    {"status": "ok", "checkpoint", "device", "precision", "base_size", "limits", "served"}
  POST /api/segment   a JSON object (any Content-Type), Content-Length required:
         image          base64 of the image file's bytes (JPEG, PNG, ...; a "data:...;base64," prefix is allowed)
         labels         ["sky", "road"] or "sky, road" (label i -> id i)
         sentences      optional {label: sentence} to embed instead of the label's own (label_sentences.yaml's, or
                        the label as a word)
         unknown_below  optional cosine in [-1, 1]: pixels whose winning label's cosine is under it are unknown
                        (-1, the default, = never)
         background     optional "default" or [labels]: more labels whose winning pixels are unknown
         maps           optional bool: also return winner_png and cosine_png (what the page re-thresholds)
       -> {"labels", "size": [w, h], "unknown_id", "colours": {label: "#rrggbb"},
           "shares": {label: fraction of the pixels}, "unknown_share": the fraction of unknown pixels,
           "scores": {label: mean cosine of its pixels with it, or null where it has none},
           "ids_png": base64 grey PNG of ids (8-bit; 16-bit over 255 labels), "overlay_png": base64 RGB PNG (colours
           over the photo, legend below), "seconds"; with maps also "winner_png" (RGB, R + 256 G = the winning label
           before any threshold) and "cosine_png" (RGB, 256 R + G = round((cosine + 1) / 2 * 65535) of that label)}
All outputs are at the size the model saw: the photo's shorter side resized to base_size (0: the photo's own size).
Bad input is a 4xx status with {"error": "..."}: 400 malformed or invalid, 404 path, 405 method, 411 no
Content-Length, 413 body over max_body (refused before reading it) or image over max_pixels (before decoding it);
503 when max_waiting requests already wait for the model.
"""
import base64
import binascii
import io
import json
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image, ImageOps

from checkpoints import check_width
from runtime import pick_device, set_threads
from errors import InputError, run_main
from inference import (Protocol, background_labels, ids_from_scores, infer, label_embeddings, load_for_inference,
                       resolve_precision, short_side_size, unknown_id)
from labels import TEXT_MODES, label_texts_for, load_label_spec
from overlays import label_colour, overlay_with_legend
from readers import decode_rgb, open_image
from serve_page import PAGE
from settings import one_of, parse_settings, print_settings, require
from transforms import eval_image


@dataclass
class ServeSettings(Protocol):     # + the inference protocol's settings (inference.Protocol)
    checkpoint: str = ""           # from train.py
    embeddings: str = ""           # label table with a row per label asked for ...
    clip_weights: str = ""         # ... or CLIP weights to embed the label texts on request
    mode: str = "sentence"         # sentence | word
    host: str = "127.0.0.1"        # loopback: this machine only (the server has no authentication)
    port: int = 8000               # 0 = any free port (printed)
    max_labels: int = 256          # labels (with background) in one request
    max_body: int = 40_000_000     # bytes of a request body, refused from its Content-Length before it is read
    max_pixels: int = 25_000_000   # pixels of an uploaded image, refused from its header before it is decoded
    max_waiting: int = 16          # requests waiting for the model beyond which a request gets 503
    label_cache: int = 64          # label sets whose embeddings stay in memory
    warmup: str = "sky,road"       # labels segmented once at start on a grey image: a bad label source fails now
    device: str = "auto"
    threads: int = 0               # torch's CPU threads; 0 = from the usable cores (distributed.set_threads)

    def validate(self):
        super().validate()
        require(self, "max_body max_pixels max_waiting", lambda v: v >= 1, "must be >= 1")
        require(self, "max_labels", lambda v: 1 <= v <= 65535, "must be in 1..65535 (16-bit id PNGs)")
        require(self, "label_cache", lambda v: v >= 0, "must be >= 0")
        require(self, "port", lambda v: 0 <= v <= 65535, "must be in 0..65535")
        require(self, "warmup", lambda v: any(x.strip() for x in v.split(",")), "must name at least one label")
        one_of(self, "mode", TEXT_MODES)


class HttpError(Exception):
    """A request the client must fix: its status (4xx/5xx) and the message of {"error": ...}."""

    def __init__(self, status, message, allow=""):
        super().__init__(message)
        self.status, self.allow = status, allow  # allow: the methods a 405's Allow header names


class Upload(io.BytesIO):
    """The uploaded bytes, named in readers' error messages (which start with the 'path')."""

    def __str__(self):
        return "the uploaded image"


def parse_request(body, max_labels):
    """A decoded JSON body -> (image bytes, labels, sentences, unknown_below, background, maps); HttpError 400 naming
    the field at fault otherwise."""
    if not isinstance(body, dict):
        raise HttpError(400, f"expected a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - {"image", "labels", "sentences", "unknown_below", "background", "maps"})
    if unknown:
        raise HttpError(400, f"unknown field(s) {unknown}; known: image, labels, sentences, unknown_below, "
                             f"background, maps")
    image = body.get("image")
    if not isinstance(image, str) or not image:
        raise HttpError(400, "image: required, the image file's bytes in base64")
    try:
        data = base64.b64decode(image.split(",", 1)[1] if image.startswith("data:") else image, validate=True)
    except (binascii.Error, ValueError) as e:
        raise HttpError(400, f"image: not base64 ({e})") from None
    labels = body.get("labels")
    if isinstance(labels, str):
        labels = labels.split(",")
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise HttpError(400, "labels: required, a list of strings or one comma-separated string")
    labels = [x.strip() for x in labels if x.strip()]
    if not labels:
        raise HttpError(400, "labels: no labels given")
    if len(labels) > max_labels:
        raise HttpError(400, f"labels: {len(labels)} labels, more than this server takes (max_labels={max_labels})")
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise HttpError(400, f"labels: {dup} asked more than once")
    sentences = body.get("sentences") or {}
    if not isinstance(sentences, dict) or not all(isinstance(v, str) for v in sentences.values()):
        raise HttpError(400, "sentences: expected an object {label: sentence}")
    stray = sorted(set(sentences) - set(labels))
    if stray:
        raise HttpError(400, f"sentences: {stray} are not among the labels")
    unknown_below = body.get("unknown_below", -1.0)
    if type(unknown_below) not in (int, float) or not -1 <= unknown_below <= 1:
        raise HttpError(400, f"unknown_below: expected a number in [-1, 1], got {unknown_below!r:.50}")
    background = body.get("background", "")
    if isinstance(background, list) and all(isinstance(x, str) for x in background):
        background = ",".join(background)
    if not isinstance(background, str):
        raise HttpError(400, "background: expected \"default\" or a list of labels")
    maps = body.get("maps", False)
    if not isinstance(maps, bool):
        raise HttpError(400, f"maps: expected true or false, got {maps!r:.50}")
    return data, labels, {k: v.strip() for k, v in sentences.items() if v.strip()}, float(unknown_below), \
        background, maps


def png_base64(array_or_image):
    """(H, W) uint8/uint16 or (H, W, 3) uint8 array, or a PIL image -> base64 PNG text."""
    im = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)  # a fast level: these travel over loopback, once
    return base64.b64encode(buf.getvalue()).decode()


class Segmenter:
    """The model, its label source and recent label sets' embeddings; segment() serves one request. The model runs
    for one request at a time (self.lock); decoding the upload and encoding the answer happen outside the lock, so
    HTTP threads overlap them with the next request's pass."""

    def __init__(self, s, device):
        self.s, self.device, self.spec = s, device, load_label_spec()
        self.lock, self.count_lock = threading.Lock(), threading.Lock()
        self.waiting = self.served = 0
        self.cache = OrderedDict()  # (keys, texts) -> (N, D) embeddings, least recently used first
        warm = [x.strip() for x in s.warmup.split(",") if x.strip()]
        texts = label_texts_for(warm, {}, s.mode, self.spec)
        self.model, self.ckpt, emb, self.scale = load_for_inference(s.checkpoint, warm, texts, s.embeddings,
                                                                    s.clip_weights, device)
        self.remember((tuple(warm), tuple(texts)), emb)
        grey = io.BytesIO()
        Image.new("RGB", (64, 48), (128, 128, 128)).save(grey, format="PNG")
        self.segment(grey.getvalue(), warm)  # the first pass (allocations, kernels) is not a user's wait
        self.served = 0

    def remember(self, key, emb):
        if self.s.label_cache:
            self.cache[key] = emb
            while len(self.cache) > self.s.label_cache:
                self.cache.popitem(last=False)

    def embeddings_for(self, keys, texts):
        """(N, D) label embeddings of keys/texts, from the cache or inference.label_embeddings (under self.lock)."""
        key = (tuple(keys), tuple(texts))
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        emb = label_embeddings(keys, texts, self.s.embeddings, self.s.clip_weights, self.device,
                               self.ckpt.get("label_table"))               # (N, D)
        check_width(self.ckpt, emb, "the label embeddings")
        self.remember(key, emb)
        return emb

    def read_image(self, data):
        """Upload bytes -> (PIL RGB photo, the working size (w, h), the photo's size (w, h)); DataError or HttpError
        413 (over max_pixels, from the header alone) otherwise."""
        im = open_image(Upload(data))  # header only; readers' process-wide budget (100 MP) is checked there too
        w, h = im.size
        if w * h > self.s.max_pixels:
            raise HttpError(413, f"the uploaded image is {w}x{h} = {w * h / 1e6:.1f} MP, over this server's pixel "
                                 f"budget (max_pixels={self.s.max_pixels}); refused before decoding it")
        hs, ws = short_side_size(h, w, self.s.base_size) if self.s.base_size else (h, w)
        # a JPEG decodes at 1/2..1/8 scale where that still covers the working size (as evaluate's loader drafts)
        rgb = decode_rgb(im, "the uploaded image", draft_size=(ws, hs))
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation: a quarter turn (exif_transpose below)
            w, h, ws, hs = h, w, hs, ws
        return ImageOps.exif_transpose(rgb), (ws, hs), (w, h)  # phone photos upright, as the browser shows them

    def segment(self, data, labels, sentences=None, unknown_below=-1.0, background="", maps=False):
        """One request: image bytes and labels -> the answer's dict (see the module docstring)."""
        t0 = time.perf_counter()
        rgb, (ws, hs), original = self.read_image(data)
        extra = background_labels(background, labels)
        if len(labels) + len(extra) > self.s.max_labels:
            raise HttpError(400, f"labels: {len(labels)} labels + {len(extra)} background labels, more than this "
                                 f"server takes (max_labels={self.s.max_labels})")
        texts = label_texts_for(labels + extra, sentences or {}, self.s.mode, self.spec)
        image = eval_image(rgb)                                               # (3, H, W) normalised
        with self.count_lock:
            if self.waiting >= self.s.max_waiting:
                raise HttpError(503, f"busy: {self.waiting} requests wait for the model; retry later")
            self.waiting += 1
        try:
            with self.lock:
                emb = self.embeddings_for(labels + extra, texts)              # (N, D)
                prob, cos = infer(self.model, image, emb, self.scale, self.s, out_size=(hs, ws), with_cos=True)
        finally:
            with self.count_lock:
                self.waiting -= 1
                self.served += 1
        n = len(labels)
        ids = ids_from_scores(prob, cos, unknown_below, asked=n)             # (hs, ws) uint8 | uint16
        winner = prob.argmax(0)                                              # (hs, ws), before any threshold
        best = cos.gather(0, winner[None])[0].numpy()                        # (hs, ws) its cosine
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
            w = winner.numpy().astype(np.int64)
            q = np.round((best.astype(np.float64) + 1) / 2 * 65535).clip(0, 65535).astype(np.int64)
            zero = np.zeros_like(w)
            out["winner_png"] = png_base64(np.stack([w & 255, w >> 8, zero], -1).astype(np.uint8))
            out["cosine_png"] = png_base64(np.stack([q >> 8, q & 255, zero], -1).astype(np.uint8))
        out["seconds"] = round(time.perf_counter() - t0, 4)
        return out

    def health(self):
        s = self.s
        return {"status": "ok", "checkpoint": s.checkpoint, "backbone": self.ckpt["model_args"].get("backbone"),
                "labels_from": s.embeddings or s.clip_weights or "the checkpoint's training table",
                "device": str(self.device), "precision": resolve_precision(s.precision, self.device),
                "base_size": s.base_size, "served": self.served, "waiting": self.waiting,
                "limits": {"max_labels": s.max_labels, "max_body": s.max_body, "max_pixels": s.max_pixels,
                           "max_waiting": s.max_waiting}}


class Handler(BaseHTTPRequestHandler):
    """Routes: GET / (the page), GET /api/health, POST /api/segment. Every answer is complete (Content-Length), so
    connections are kept alive; every error is JSON."""
    protocol_version = "HTTP/1.1"
    server_version = "ssiw-serve"
    timeout = 60  # seconds a connection may sit idle or trickle a body before its thread lets it go
    ROUTES = {"/": ("GET",), "/api/health": ("GET",), "/api/segment": ("POST",)}

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_PUT(self):
        self.route("PUT")

    def do_DELETE(self):
        self.route("DELETE")

    def do_PATCH(self):
        self.route("PATCH")

    def route(self, method):
        t0, self.note, self.body_read = time.perf_counter(), "", False
        path = urlsplit(self.path).path
        try:
            if path not in self.ROUTES:
                raise HttpError(404, f"no such path {path!r}; try GET /, GET /api/health or POST /api/segment")
            if method not in self.ROUTES[path]:
                allow = ", ".join(self.ROUTES[path])
                raise HttpError(405, f"{method} {path}: method not allowed (use {allow})", allow)
            if path == "/":
                status = self.send(200, PAGE.encode(), "text/html; charset=utf-8")
            elif path == "/api/health":
                status = self.send_json(200, self.server.segmenter.health())
            else:
                status = self.send_json(200, self.segment())
        except HttpError as e:
            status = self.send_json(e.status, {"error": str(e)}, {"Allow": e.allow} if e.allow else {})
        except InputError as e:  # a bad image, an unknown label in a table, a sentence too long ...
            status = self.send_json(400, {"error": " ".join(str(e).split())})
        except (BrokenPipeError, ConnectionResetError):
            status = "disconnected"
            self.close_connection = True
        except Exception as e:  # a bug: the server keeps serving, the traceback goes to its log
            traceback.print_exc()
            status = self.send_json(500, {"error": f"internal error ({type(e).__name__}: {e}); see the server's log"})
        print(f"{time.strftime('%H:%M:%S')} {self.client_address[0]} {method} {path} {status} "
              f"{time.perf_counter() - t0:.3f}s{self.note}", flush=True)

    def segment(self):
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None:
            raise HttpError(411, "send the body with a Content-Length (chunked bodies are not read)")
        if not length.isdigit():
            raise HttpError(400, f"Content-Length {length!r:.30} is not a byte count")
        if int(length) > self.server.segmenter.s.max_body:
            raise HttpError(413, f"body of {int(length)} bytes is over this server's max_body "
                                 f"({self.server.segmenter.s.max_body} bytes); refused without reading it")
        raw = self.rfile.read(int(length))
        self.body_read = True
        if len(raw) < int(length):
            self.close_connection = True
            raise HttpError(400, f"body ended after {len(raw)} of {length} bytes")
        try:
            body = json.loads(raw)
        except ValueError as e:  # also a UnicodeDecodeError
            raise HttpError(400, f"body is not JSON ({e})") from None
        data, labels, sentences, unknown_below, background, maps = parse_request(body,
                                                                                  self.server.segmenter.s.max_labels)
        out = self.server.segmenter.segment(data, labels, sentences, unknown_below, background, maps)
        self.note = f" {len(labels)} labels {out['image_size'][0]}x{out['image_size'][1]} -> {out['size'][0]}x" \
                    f"{out['size'][1]} in segment {out['seconds']:.3f}s"
        return out

    def send_json(self, status, obj, headers=None):
        return self.send(status, json.dumps(obj).encode(), "application/json", headers)

    def send(self, status, payload, content_type, headers=None):
        unread = self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length", "0") != "0"
        if unread and not self.body_read:
            self.close_connection = True  # a body left unread would be read as the next request: end the connection
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)
        return status

    def log_request(self, code="-", size="-"):
        pass  # route() logs one line per request, with its time


def make_server(segmenter, host="127.0.0.1", port=8000):
    """A ThreadingHTTPServer on (host, port) answering with `segmenter`; port 0 binds a free one
    (server.server_address has it). Call serve_forever() on it."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True  # an idle keep-alive connection does not hold up shutdown
    server.segmenter = segmenter
    return server


def main(argv=None):
    s = parse_settings(ServeSettings, argv)
    set_threads(s.threads)
    print_settings(s)
    device = pick_device(s.device)
    segmenter = Segmenter(s, device)
    server = make_server(segmenter, s.host, s.port)
    host, port = server.server_address[:2]
    print(f"serving {s.checkpoint} on http://{host}:{port}/ ({device}, "
          f"{resolve_precision(s.precision, device)}, {torch.get_num_threads()} threads); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()


if __name__ == "__main__":
    run_main(main)
