"""The page and the JSON API of serve.py (torch) and serve_onnx.py (onnxruntime alone), on Python's standard library
(http.server) and Pillow, no torch: the routes, request parsing, limits and errors. A server is a
serve_segmenter.Segmenter (the answer from its label embeddings and scores) under make_server.

  GET  /              the page (serve_page.py)
  GET  /api/health    {"status": "ok", "base_size", "limits", "served", ...: serve.py's "checkpoint", "device",
                      "precision"; serve_onnx.py's "image_graph", "text_graph", "checkpoint"}
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
Bad input is a 4xx status with {"error": "..."} naming the field: 400 malformed or invalid (a blank label, text that
is not valid Unicode, JSON nested too deep, a malformed request line or header ...), 404 path, 405 method, 408 a
body that did not arrive within `timeout` seconds, 411 no Content-Length, 413 body over max_body (refused before
reading it) or an image over the budget, from its header before decoding it: more than max_pixels pixels, an aspect
ratio over max_aspect, or more than max_pixels pixels at the size the model would process it at (base_size, padding);
503 when max_waiting requests are already in progress (refused before reading the body). After an error whose body
was not read, the server closes the connection (what follows cannot be told from a request), reading and discarding
what the client still sends for a moment first, so that the client gets the answer rather than a reset. 500 is a bug.
The listen backlog is the kernel's largest (a burst of clients is queued, then admitted or answered 503).
"""
import base64
import binascii
import io
import ipaddress
import json
import socket
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from PIL import Image

from errors import InputError
from label_spec import label_list_problem
from serve_page import PAGE


class HttpError(Exception):
    """A request the client must fix: its status (4xx/5xx) and the message of {"error": ...}."""

    def __init__(self, status, message, allow=""):
        super().__init__(message)
        self.status, self.allow = status, allow  # allow: the methods a 405's Allow header names


class Upload(io.BytesIO):
    """The uploaded bytes, named in readers' error messages (which start with the 'path')."""

    def __str__(self):
        return "the uploaded image"


def label_list(body, field, max_labels):
    """body[field], a list of strings or one comma-separated string -> the labels, stripped; HttpError 400 where one
    is blank (label i gets id i) or not valid Unicode (a lone surrogate), where they are too many or repeated."""
    labels = body.get(field)
    if isinstance(labels, str):
        labels = labels.split(",")
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        required = "required, " if field == "labels" else ""
        raise HttpError(400, f"{field}: {required}a list of strings or one comma-separated string")
    problem = label_list_problem(labels, max_labels, f"this server takes (max_labels={max_labels})")
    if problem:
        raise HttpError(400, f"{field}: {problem}")
    return [x.strip() for x in labels]


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
    if image.startswith("data:"):
        if "," not in image:
            raise HttpError(400, "image: a data: URL without the comma before its base64 (data:image/png;base64,...)")
        image = image.split(",", 1)[1]
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError) as e:
        raise HttpError(400, f"image: not base64 ({e})") from None
    labels = label_list(body, "labels", max_labels)
    if not labels:
        raise HttpError(400, "labels: no labels given")
    sentences = body.get("sentences") or {}
    if not isinstance(sentences, dict) or not all(isinstance(v, str) for v in sentences.values()):
        raise HttpError(400, "sentences: expected an object {label: sentence}")
    stray = sorted(set(sentences) - set(labels))
    if stray:
        raise HttpError(400, f"sentences: {stray} are not among the labels")
    for label, sentence in sentences.items():
        if not sentence.strip():
            raise HttpError(400, f"sentences: {label!r}: blank sentence (leave the label out to embed its own)")
        try:
            sentence.encode("utf-8")
        except UnicodeEncodeError:
            raise HttpError(400, f"sentences: {label!r}: not valid Unicode ({sentence!r:.80})") from None
    unknown_below = body.get("unknown_below", -1.0)
    if type(unknown_below) not in (int, float) or not -1 <= unknown_below <= 1:
        raise HttpError(400, f"unknown_below: expected a number in [-1, 1], got {unknown_below!r:.50}")
    background = body.get("background", "")
    if background not in ("", "default"):
        background = ",".join(label_list(body, "background", max_labels))
    maps = body.get("maps", False)
    if not isinstance(maps, bool):
        raise HttpError(400, f"maps: expected true or false, got {maps!r:.50}")
    return data, labels, {k: v.strip() for k, v in sentences.items()}, float(unknown_below), background, maps


def png_base64(array_or_image):
    """(H, W) uint8/uint16 or (H, W, 3) uint8 array, or a PIL image -> base64 PNG text."""
    im = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)  # a fast level: these travel over loopback, once
    return base64.b64encode(buf.getvalue()).decode()


LINGER_S = 2.0  # seconds a connection closed after an error keeps reading (and dropping) what the client still sends


class Handler(BaseHTTPRequestHandler):
    """Routes: GET / (the page), GET /api/health, POST /api/segment. Every answer is complete (Content-Length), so
    connections are kept alive, except after an error whose request body was not read; every error is JSON."""
    protocol_version = "HTTP/1.1"
    server_version = "ssiw-serve"
    ROUTES = {"/": ("GET",), "/api/health": ("GET",), "/api/segment": ("POST",)}

    def setup(self):
        self.timeout = self.server.segmenter.s.timeout  # seconds a connection may sit idle before its thread lets go
        self.linger = False
        super().setup()

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
                with self.server.segmenter.admitted():
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
        lengths = self.headers.get_all("Content-Length") or []
        if self.headers.get("Transfer-Encoding") or not lengths:
            raise HttpError(411, "send the body with a Content-Length (chunked bodies are not read)")
        if len(lengths) > 1:
            raise HttpError(400, f"Content-Length given {len(lengths)} times")
        length = lengths[0]
        if not (length.isascii() and length.isdigit() and len(length) <= 18):  # "²".isdigit(); int() of 5000 digits
            raise HttpError(400, f"Content-Length {length!r:.30} is not a byte count")
        if int(length) > self.server.segmenter.s.max_body:
            raise HttpError(413, f"body of {int(length)} bytes is over this server's max_body "
                                 f"({self.server.segmenter.s.max_body} bytes); refused without reading it")
        raw = self.read_body(int(length))
        try:
            body = json.loads(raw)
        except ValueError as e:  # also a UnicodeDecodeError
            raise HttpError(400, f"body is not JSON ({e})") from None
        except RecursionError:  # [[[[...: the parser recurses once per level
            raise HttpError(400, "body is not JSON (nested deeper than this server parses)") from None
        data, labels, sentences, unknown_below, background, maps = parse_request(body,
                                                                                  self.server.segmenter.s.max_labels)
        out = self.server.segmenter.segment(data, labels, sentences, unknown_below, background, maps)
        self.note = f" {len(labels)} labels {out['image_size'][0]}x{out['image_size'][1]} -> {out['size'][0]}x" \
                    f"{out['size'][1]} in segment {out['seconds']:.3f}s"
        return out

    def read_body(self, n):
        """The n bytes of the body, which must arrive within `timeout` seconds in all (a client that stalls or
        trickles holds a place among max_waiting): HttpError 408, or 400 where the client stops short."""
        timeout = self.server.segmenter.s.timeout
        deadline, raw = time.monotonic() + timeout, bytearray()
        try:
            while len(raw) < n:
                self.connection.settimeout(max(deadline - time.monotonic(), 1e-3))
                chunk = self.rfile.read1(n - len(raw))
                if not chunk:
                    break
                raw += chunk
        except TimeoutError:
            self.close_connection = self.linger = True
            raise HttpError(408, f"body: {len(raw)} of {n} bytes arrived in {timeout:g} s (timeout={timeout:g}); "
                                 f"send the whole body at once") from None
        finally:
            self.connection.settimeout(timeout)
        self.body_read = True
        if len(raw) < n:
            self.close_connection = True
            raise HttpError(400, f"body ended after {len(raw)} of {n} bytes")
        return bytes(raw)

    def send_json(self, status, obj, headers=None):
        return self.send(status, json.dumps(obj).encode(), "application/json", headers)

    def send(self, status, payload, content_type, headers=None):
        request = getattr(self, "headers", None) or {}  # none where the request line itself was malformed
        has_body = request.get("Transfer-Encoding") or request.get("Content-Length", "0") != "0"
        if not getattr(self, "body_read", False) and (has_body or status >= 400):
            # a body left unread (or sent without a Content-Length) would be read as the next request: end the
            # connection, and read out what still comes so that closing does not reset it before the client reads
            self.close_connection = self.linger = True
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

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line or header, a line too long, an unknown method or
        HTTP version) as JSON too, and 4xx: an unknown method is routed (404 or 405), a version is a 400."""
        if code == 501 and getattr(self, "command", None):
            return self.route(self.command)
        if self.request_version == "HTTP/0.9":  # a request line too malformed to name its version: answer in 1.1
            self.request_version = "HTTP/1.1"
        try:
            self.send_json(400 if code >= 500 else code, {"error": message or self.responses[code][0]})
        except OSError:
            self.close_connection = True

    def finish(self):
        super().finish()  # the answer flushed
        if self.linger:  # the client may still be sending: read and drop it, briefly, then the server closes
            try:
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(LINGER_S)
                deadline = time.monotonic() + LINGER_S
                while time.monotonic() < deadline and self.connection.recv(1 << 16):
                    pass
            except OSError:
                pass

    def log_request(self, code="-", size="-"):
        pass  # route() logs one line per request, with its time


class Server(ThreadingHTTPServer):
    request_queue_size = socket.SOMAXCONN  # the listen backlog: a burst of clients waits in it, not reset (5 was)
    daemon_threads = True                  # an idle keep-alive connection does not hold up shutdown


def make_server(segmenter, host="127.0.0.1", port=8000):
    """A ThreadingHTTPServer on (host, port) answering with `segmenter`; port 0 binds a free one
    (server.server_address has it). Call serve_forever() on it."""
    server = Server((host, port), Handler)
    server.segmenter = segmenter
    return server


def exposure_warning(host, port):
    """A `warning:` line where the server listens on an address other machines can reach ("" for loopback)."""
    if ipaddress.ip_address(host).is_loopback:
        return ""
    return (f"warning: serving on {host}:{port}, not a loopback address: anyone who can reach this machine can use "
            f"the server, which has no authentication (--host=127.0.0.1 keeps it to this machine)")


def serve(segmenter, what):
    """Serve `segmenter` on its settings' host and port until Ctrl-C; `what` completes the start line ("CKPT (cpu,
    fp32, 4 threads)")."""
    s = segmenter.s
    server = make_server(segmenter, s.host, s.port)
    host, port = server.server_address[:2]
    if warning := exposure_warning(host, port):
        print(warning, flush=True)
    print(f"serving {what} on http://{host}:{port}/; Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
