"""Load test of serve.py: starts it as its own process on a free loopback port, sends --requests POST /api/segment
from --clients threads (each on one keep-alive connection, as fast as the server answers), stops it, and reports
requests/s, latency p50/p95, errors (anything but 200) and the server's resident memory before and after.

    python -m tools.bench_serve                                           # tiny random mit_b0 (width 32) at 64
    python -m tools.bench_serve --backbone=efficientnet_lite0 --embed_dim=512 --base_size=360 --image=PHOTO.png
    python -m tools.bench_serve --checkpoint=CKPT --embeddings=TABLE --image=PHOTO.jpg --out=bench.json
    python -m tools.bench_serve --edges --base_size=720 --sliding=true             # + thin PNGs, a burst of clients

Without --checkpoint the server gets random weights of --backbone and a random label table of every label key of
label_sentences.yaml (speed does not depend on the weights). Memory: VmRSS of the server process (Linux /proc) after
its warm-up (--clients requests) and after each of --rounds rounds of the requests: flat means it stops growing
after the first rounds (allocator pools reach their high-water mark), i.e. no request leaves anything behind. Everything is bounded: the server must be up in --start_timeout
seconds, each request answers in --request_timeout, and the server is killed at the end whatever happened.
With --edges, after the rounds: a 3000x1 and a 100000x1 PNG (tens of bytes, which the model would process at
2,160,000x720 and 72,000,000x720 at base 720), each timed with the server's RSS before and after, and --burst clients
connecting at once, one request each, counted by status (200 or 503 expected; a reset or timeout is an error).
"""
import base64
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from label_spec import load_label_spec, parse_labels
from labels import LabelTable, save_label_table
from model import ModelConfig, build_model
from provenance import provenance
from settings import parse_settings

REPO = Path(__file__).resolve().parents[1]


@dataclass
class BenchServeSettings:
    checkpoint: str = ""           # a train.py checkpoint; "" = random weights of backbone
    embeddings: str = ""           # label table for the checkpoint ("" = its own training table)
    backbone: str = "mit_b0"       # without checkpoint: mit_b0, efficientnet_lite0, ...
    embed_dim: int = 32            # without checkpoint: the label-embedding width
    image: str = ""                # the photo every request sends; "" = a synthetic 480x360 PNG
    labels: str = "sky,road,building,vegetation,car,person,sidewalk_pavement,pole"
    requests: int = 200
    clients: int = 8
    rounds: int = 4                # the requests in successive rounds, the server's RSS read after each
    base_size: int = 64            # serve.py's: shorter side the model sees
    sliding: bool = False          # serve.py's: False = the whole image in one pass (what a page wants on a CPU)
    crop_size: int = 640           # serve.py's, with sliding
    precision: str = "fp32"        # serve.py's: fp32 | bf16 | auto
    threads: int = 2               # the server's torch threads (OMP_NUM_THREADS)
    start_timeout: float = 120.0
    request_timeout: float = 120.0
    edges: bool = False            # also thin PNGs and a burst of clients at once (see the docstring)
    burst: int = 40                # with edges: clients connecting at once
    out: str = ""                  # results JSON ("" = none)


def random_run(folder, backbone, dim):
    """A random-weight checkpoint and a random table of every label key, in folder: (checkpoint, table)."""
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, embed_dim=dim, drop_path_rate=0.0, dropout=0.0)
    torch.save({"model": build_model(cfg).state_dict(), "model_args": cfg.__dict__.copy(), "label_names": [],
                "config": {}, "step": 0}, folder / "ckpt.pt")
    keys = sorted(load_label_spec().sentences)
    emb = F.normalize(torch.randn(len(keys), dim, generator=torch.Generator().manual_seed(1)), dim=1)
    save_label_table(folder / "table.pt", LabelTable(keys, [""] * len(keys), emb, f"random, width {dim}"))
    return folder / "ckpt.pt", folder / "table.pt"


def rss_mb(pid):
    """A process's resident memory in MB (Linux), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def start_server(args, threads, timeout):
    """serve.py in its own process on a free port -> (process, port, its output lines so far and to come)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--port=0", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found, lines = [], []

    def read():  # the server's output, until it exits; the port from its "serving ... on http://host:port/"
        for line in proc.stdout:
            lines.append(line)
            if not found and line.startswith("serving ") and " on http://" in line:
                found.append(int(line.split(" on http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1]))
    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not found:
        proc.kill()
        raise RuntimeError(f"serve.py did not start in {timeout} s:\n" + "".join(lines[-20:]))
    return proc, found[0], lines


def client(port, body, n_requests, timeout, latencies, errors):
    """One keep-alive connection sending n_requests bodies; appends each latency (s) or error."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        for _ in range(n_requests):
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/api/segment", body=body, headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                payload = r.read()
                if r.status != 200:
                    errors.append(f"{r.status} {payload[:200]!r}")
                    continue
                json.loads(payload)
                latencies.append(time.perf_counter() - t0)
            except (OSError, http.client.HTTPException, ValueError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    finally:
        conn.close()


def run_clients(port, body, requests, clients, timeout):
    """requests spread over `clients` threads -> (latencies, errors, wall seconds)."""
    latencies, errors = [], []
    shares = [requests // clients + (i < requests % clients) for i in range(clients)]
    threads = [threading.Thread(target=client, args=(port, body, n, timeout, latencies, errors)) for n in shares]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - t0


def thin_png(w, h):
    buf = io.BytesIO()
    Image.new("1", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def edges(port, pid, labels, burst, timeout):
    """Thin PNGs (status, seconds, server RSS before and after) and a burst of clients ({status or error: count})."""
    import http.client
    out = {}
    for w, h in ((3000, 1), (100_000, 1)):
        body = json.dumps({"image": base64.b64encode(thin_png(w, h)).decode(), "labels": labels})
        before, t0 = rss_mb(pid), time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("POST", "/api/segment", body=body)
            r = conn.getresponse()
            answer = json.loads(r.read())
        finally:
            conn.close()
        out[f"{w}x{h}"] = {"status": r.status, "seconds": time.perf_counter() - t0, "rss_mb_before": before,
                           "rss_mb_after": rss_mb(pid), "error": answer.get("error")}
    body = json.dumps({"image": base64.b64encode(photo_bytes("")).decode(), "labels": labels}).encode()
    start, results = threading.Barrier(burst), []

    def one():
        start.wait(timeout)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("POST", "/api/segment", body=body, headers={"Connection": "close"})
            r = conn.getresponse()
            r.read()
            results.append(str(r.status))
        except (OSError, http.client.HTTPException) as e:
            results.append(type(e).__name__)
        finally:
            conn.close()
    threads = [threading.Thread(target=one) for _ in range(burst)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["burst"] = {x: results.count(x) for x in sorted(set(results))}
    return out


def photo_bytes(path):
    if path:
        return Path(path).read_bytes()
    y, x = np.mgrid[0:360, 0:480]
    rgb = np.stack([x * 255 // 480, y * 255 // 360, (x + y) % 256], -1).astype(np.uint8)  # (360, 480, 3)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def main(argv=None):
    s = parse_settings(BenchServeSettings, argv)
    labels = parse_labels(s.labels, "--labels")
    photo = photo_bytes(s.image)
    size = Image.open(io.BytesIO(photo)).size
    body = json.dumps({"image": base64.b64encode(photo).decode(), "labels": labels}).encode()
    with tempfile.TemporaryDirectory() as folder:
        ckpt, table = (s.checkpoint, s.embeddings) if s.checkpoint else random_run(Path(folder), s.backbone,
                                                                                     s.embed_dim)
        args = [f"--checkpoint={ckpt}", f"--base_size={s.base_size}", f"--crop_size={s.crop_size}", f"--sliding={s.sliding}",
                f"--precision={s.precision}", "--device=cpu", f"--warmup={labels[0]}"]
        args += [f"--embeddings={table}"] if table else []
        proc, port, log = start_server(args, s.threads, s.start_timeout)
        try:
            run_clients(port, body, s.clients, s.clients, s.request_timeout)  # warm-up: one request per client
            rss = [rss_mb(proc.pid)]
            latencies, errors, wall = [], [], 0.0
            for k in range(s.rounds):  # RSS after each round: a leak grows round after round, a high-water mark not
                n = s.requests // s.rounds + (k < s.requests % s.rounds)
                lat, err, seconds = run_clients(port, body, n, s.clients, s.request_timeout)
                latencies, errors, wall = latencies + lat, errors + err, wall + seconds
                rss.append(rss_mb(proc.pid))
            edge = edges(port, proc.pid, labels, s.burst, s.request_timeout) if s.edges else None
        finally:
            proc.kill()
            proc.wait(30)
    lat = sorted(latencies)
    result = {
        "settings": s.__dict__, "model": s.checkpoint or f"random {s.backbone}, width {s.embed_dim}",
        "image_size": list(size), "body_bytes": len(body), "requests": s.requests, "clients": s.clients,
        "ok": len(lat), "errors": len(errors), "error_samples": errors[:5], "wall_s": wall,
        "requests_per_s": len(lat) / wall if wall else None,
        "latency_s": {"p50": statistics.median(lat) if lat else None,
                      "p95": lat[math.ceil(0.95 * len(lat)) - 1] if lat else None,  # nearest rank
                      "max": lat[-1] if lat else None},
        "server_rss_mb": {"after_warmup": rss[0], "after_each_round": rss[1:], "after_bench": rss[-1]},
        "edges": edge}
    print(f"{s.requests} requests from {s.clients} clients, {len(labels)} labels, {size[0]}x{size[1]} photo at "
          f"base_size {s.base_size}: {result['requests_per_s']:.2f} requests/s, latency p50 "
          f"{1000 * (result['latency_s']['p50'] or 0):.0f} ms p95 {1000 * (result['latency_s']['p95'] or 0):.0f} ms, "
          f"{len(errors)} errors; server RSS after warm-up {rss[0] or 0:.0f} MB, "
          f"after each round {', '.join(f'{x or 0:.0f}' for x in rss[1:])} MB")
    for name, e in (edge or {}).items():
        print(f"{name}: {e}" if name == "burst" else f"{name} PNG: {e['status']} in {e['seconds']:.3f} s, server RSS "
              f"{e['rss_mb_before']:.0f} -> {e['rss_mb_after']:.0f} MB: {e['error']}")
    result["provenance"] = provenance("-m tools.bench_serve", sys.argv[1:] if argv is None else argv, "cpu",
                                      s.precision, files={"checkpoint": s.checkpoint, "label_table": s.embeddings,
                                                          "image": s.image})
    if s.out:
        Path(s.out).parent.mkdir(parents=True, exist_ok=True)
        Path(s.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
