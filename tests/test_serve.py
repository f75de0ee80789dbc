"""serve.py: the JSON API on a tiny random model (answers, the page's client-side threshold, one model pass at a
time), every bad input as a 4xx JSON error after which the server still answers, the page in headless Chromium, and
the load test's smoke run."""
import base64
import http.client
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import serve
import serve_http
from errors import ConfigError
from score_rules import unknown_id
from test_evaluate import write_tiny_run

LABELS = ["sky", "road", "car", "building"]


def start_server(folder, **settings):
    """serve.py's server on a free loopback port, in this process: (server, thread); server.shutdown() stops it."""
    folder.mkdir(parents=True, exist_ok=True)
    _, ckpt, table = write_tiny_run(folder)
    s = serve.ServeSettings(**{"checkpoint": str(ckpt), "embeddings": str(table), "base_size": 64, "crop_size": 64,
                               "precision": "fp32", "device": "cpu", "port": 0, **settings})
    s.validate()
    server = serve_http.make_server(serve.TorchSegmenter(s, torch.device("cpu")), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server, thread = start_server(tmp_path_factory.mktemp("serve"), max_pixels=4_000_000)
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


def call(server, method, path, body=None, headers=None):
    """One request on a new connection -> (status, decoded JSON or text, response headers)."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        raw = r.read()
        kind = r.getheader("Content-Type", "")
        return r.status, json.loads(raw) if kind.startswith("application/json") else raw.decode(), r
    finally:
        conn.close()


def photo_b64(w=96, h=72, seed=0, fmt="PNG"):
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def png(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def still_serving(server):
    status, body, _ = call(server, "GET", "/api/health")
    assert status == 200 and body["status"] == "ok"


def test_segment_answers_ids_shares_scores_and_overlay(server):
    status, r, _ = call(server, "POST", "/api/segment", {"image": photo_b64(), "labels": LABELS, "maps": True,
                                                         "sentences": {"car": "An image of a red car."}})
    assert status == 200, r
    w, h = r["size"]
    assert (w, h) == (85, 64) and r["image_size"] == [96, 72]     # the shorter side at base_size=64
    ids = png(r["ids_png"])
    assert ids.shape == (h, w) and ids.dtype == np.uint8 and ids.max() < len(LABELS)  # no threshold: no unknown
    counts = np.bincount(ids.ravel(), minlength=len(LABELS))
    assert [r["shares"][x] for x in LABELS] == pytest.approx(counts / ids.size, abs=1e-12)
    assert r["unknown_share"] == 0
    overlay = png(r["overlay_png"])
    assert overlay.shape[1] == w and overlay.shape[0] > h and overlay.shape[2] == 3  # the legend strip below
    assert r["texts"]["car"] == "An image of a red car." and r["texts"]["sky"].startswith("An image of")
    # the page's maps: the winner is the id map without a threshold; scores are the mean winning cosine per label
    winner, cosine = png(r["winner_png"]).astype(np.int64), png(r["cosine_png"]).astype(np.int64)
    np.testing.assert_array_equal(winner[..., 0] + 256 * winner[..., 1], ids)
    cos = (cosine[..., 0] * 256 + cosine[..., 1]) / 65535 * 2 - 1
    for i, x in enumerate(LABELS):
        want = cos[ids == i].mean() if counts[i] else None
        assert r["scores"][x] == (pytest.approx(want, abs=1e-4) if counts[i] else None)
    # the same request again is served from the label cache and gives the same ids
    status, again, _ = call(server, "POST", "/api/segment", {"image": photo_b64(), "labels": ",".join(LABELS),
                                                             "sentences": {"car": "An image of a red car."}})
    assert status == 200 and np.array_equal(png(again["ids_png"]), ids)


def test_threshold_in_the_page_equals_the_servers(server):
    # the page re-thresholds winner/cosine maps in the browser (pixels under t -> unknown); the server, its scores
    base = {"image": photo_b64(seed=3), "labels": LABELS}
    status, r, _ = call(server, "POST", "/api/segment", {**base, "maps": True})
    assert status == 200
    winner = png(r["winner_png"]).astype(np.int64)
    cosine = png(r["cosine_png"]).astype(np.int64)
    q = cosine[..., 0] * 256 + cosine[..., 1]
    cos = q / 65535 * 2 - 1
    t = float(np.quantile(cos, 0.4))                              # a threshold that makes ~40% unknown
    status, cut, _ = call(server, "POST", "/api/segment", {**base, "unknown_below": t})
    assert status == 200
    ids = png(cut["ids_png"])
    page = np.where(q < round((t + 1) / 2 * 65535), unknown_id(len(LABELS)), winner[..., 0] + 256 * winner[..., 1])
    near = np.abs(cos - t) < 2 / 65535                             # the 16-bit rounding's reach
    assert (ids == page)[~near].all() and near.mean() < 0.01
    assert cut["unknown_share"] == pytest.approx(np.mean(ids == 255)) and 0.3 < cut["unknown_share"] < 0.5


def test_model_runs_one_request_at_a_time(server):
    active, most = [0], [0]

    def enter(*_):
        active[0] += 1
        most[0] = max(most[0], active[0])

    def leave(*_):
        active[0] -= 1
    model = server.segmenter.model
    hooks = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]
    try:
        results = []
        threads = [threading.Thread(target=lambda i=i: results.append(
            call(server, "POST", "/api/segment", {"image": photo_b64(seed=i), "labels": LABELS})[0]))
            for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        for hook in hooks:
            hook.remove()
    assert results == [200] * 6 and most[0] == 1


def test_busy_server_answers_503(server):
    segmenter = server.segmenter
    segmenter.lock.acquire()          # the model is busy: requests wait for it
    old, segmenter.s.max_waiting = segmenter.s.max_waiting, 1
    first = []
    waiter = threading.Thread(target=lambda: first.append(
        call(server, "POST", "/api/segment", {"image": photo_b64(), "labels": LABELS})[0]))
    try:
        waiter.start()
        deadline = time.monotonic() + 30
        while segmenter.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, r, _ = call(server, "POST", "/api/segment", {"image": photo_b64(), "labels": LABELS})
        assert status == 503 and "busy" in r["error"]
    finally:
        segmenter.s.max_waiting = old
        segmenter.lock.release()
        waiter.join(60)
    assert first == [200]


def big_png_b64(w, h):
    buf = io.BytesIO()
    Image.new("1", (w, h)).save(buf, format="PNG")   # 5 MP of one colour: a few kB on disk
    return base64.b64encode(buf.getvalue()).decode()


GOOD = {"image": photo_b64(), "labels": LABELS}
BAD_BODIES = [  # (body, status, words of the error)
    ({**GOOD, "image": base64.b64encode(b"not an image at all").decode()}, 400,
     "the uploaded image: unreadable image (not a format Pillow reads: JPEG, PNG, WebP"),  # no `<... object at 0x..>`
    ({**GOOD, "image": "!!!not base64!!!"}, 400, "image: not base64"),
    ({**GOOD, "image": big_png_b64(2500, 2000)}, 413, "2500x2000 = 5 MP is over max_pixels=4000000 (4 MP), the pixel "
                                                      "budget of one image; refused before decoding it"),
    ({**GOOD, "image": big_png_b64(200, 1)}, 413, "200x1 has an aspect ratio of 200:1, over max_aspect=20"),
    ({**GOOD, "labels": []}, 400, "no labels"),
    ({**GOOD, "labels": " , ,"}, 400, "labels: label 1 of 3 is blank"),
    ({**GOOD, "labels": [f"l{i}" for i in range(10_000)]}, 400, "10000 labels, more than this server takes "
                                                                  "(max_labels=256)"),
    ({**GOOD, "labels": ["sky", "sky"]}, 400, "asked more than once"),
    ({**GOOD, "labels": ["sky", "", "road"]}, 400, "labels: label 2 of 3 is blank"),     # it would shift road's id
    ({**GOOD, "labels": "sky, ,road"}, 400, "labels: label 2 of 3 is blank"),
    ({**GOOD, "labels": ["sky", "ro\ud800ad"]}, 400, "labels: label 2 of 2 is not valid Unicode"),  # lone surrogate
    ({**GOOD, "sentences": {"sky": "An image of \udfff."}}, 400, "sentences: 'sky': not valid Unicode"),
    ({**GOOD, "sentences": {"sky": " "}}, 400, "sentences: 'sky': blank sentence"),
    ({**GOOD, "background": ["wall", ""]}, 400, "background: label 2 of 2 is blank"),
    ({**GOOD, "background": ["\udc80"]}, 400, "background: label 1 of 1 is not valid Unicode"),
    ({**GOOD, "image": "data:image/png;base64"}, 400, "image: a data: URL without the comma"),
    ({**GOOD, "labels": ["sky", "no_such_label"]}, 400, "no row for ['no_such_label']"),
    ({**GOOD, "labels": 7}, 400, "labels: required"),
    ({"labels": LABELS}, 400, "image: required"),
    ({**GOOD, "image": 12}, 400, "image: required"),
    ({**GOOD, "unknown_below": "high"}, 400, "unknown_below: expected a number in [-1, 1]"),
    ({**GOOD, "unknown_below": 1.5}, 400, "unknown_below: expected a number in [-1, 1]"),
    ({**GOOD, "unknown_below": True}, 400, "unknown_below"),
    ({**GOOD, "sentences": ["a"]}, 400, "sentences: expected an object"),
    ({**GOOD, "sentences": {"tree": "An image of a tree."}}, 400, "['tree'] are not among the labels"),
    ({**GOOD, "maps": "yes"}, 400, "maps: expected true or false"),
    ({**GOOD, "unknown_bellow": 0.2}, 400, "unknown field(s) ['unknown_bellow']"),
    ([1, 2], 400, "expected a JSON object, got list"),
    ("{not json", 400, "body is not JSON"),
    (b"\xff\xfe\x00", 400, "body is not JSON"),
    ("[" * 100_000 + "]" * 100_000, 400, "body is not JSON (nested deeper than"),
    ('{"image": "' + GOOD["image"] + '", "labels": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, "nested deeper"),
]


@pytest.mark.parametrize("body,status,words", BAD_BODIES, ids=[w[:28] for _, _, w in BAD_BODIES])
def test_bad_input_is_a_json_error_and_the_server_keeps_serving(server, body, status, words):
    got, r, _ = call(server, "POST", "/api/segment", body)
    assert got == status and words in r["error"], r
    assert " object at 0x" not in r["error"]  # no Python object's repr in what a user reads
    still_serving(server)


def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20


@pytest.mark.parametrize("w, h, processed", [(3000, 1, "192000x64"), (100_000, 1, "6400000x64"),
                                             (1, 100_000, "64x6400000")])
def test_an_extreme_aspect_ratio_is_refused_from_the_header_at_once(server, w, h, processed):
    # at base_size 64 a 100000x1 PNG would be a 6,400,000x64 tensor (4.9 GB as float32 RGB); refused unread
    body = {**GOOD, "image": big_png_b64(w, h)}
    before, t0 = rss_mb(), time.perf_counter()
    status, r, _ = call(server, "POST", "/api/segment", body)
    seconds, after = time.perf_counter() - t0, rss_mb()
    print(f"{w}x{h}: {status} in {seconds:.3f} s, server process RSS {before:.0f} -> {after:.0f} MB")
    assert status == 413, r
    assert f"the uploaded image: {w}x{h} has an aspect ratio of {max(w, h)}:1, over max_aspect=20" in r["error"]
    assert f"the model would process it at {processed}" in r["error"] and "refused before decoding" in r["error"]
    assert seconds < 1 and after - before < 20
    still_serving(server)


def test_the_processed_size_has_the_pixel_budget_too(server):
    # 3000x100 is 0.3 MP, under max_pixels; at base_size 64 the model would process 1920x64 = 0.12 MP: fine. With
    # base_size 2000 it would be 60000x2000 = 120 MP, over max_pixels=4000000
    s = server.segmenter.s
    old = s.base_size, s.max_aspect
    s.base_size, s.max_aspect = 2000, 100
    try:
        status, r, _ = call(server, "POST", "/api/segment", {**GOOD, "image": big_png_b64(3000, 100)})
    finally:
        s.base_size, s.max_aspect = old
    assert status == 413, r
    assert "the uploaded image: 3000x100 is processed at 60000x2000 = 120.0 MP (base_size=2000" in r["error"]
    assert "over max_pixels=4000000" in r["error"]


def test_wrong_paths_and_methods(server):
    status, r, _ = call(server, "GET", "/nope")
    assert status == 404 and "no such path '/nope'" in r["error"]
    status, r, resp = call(server, "GET", "/api/segment")
    assert status == 405 and "use POST" in r["error"] and resp.getheader("Allow") == "POST"
    for method in ("POST", "PUT", "DELETE"):
        status, r, resp = call(server, method, "/", body="x")
        assert status == 405 and resp.getheader("Allow") == "GET"
        assert resp.getheader("Connection") == "close"  # its body was not read: it must not pass for a request
    status, r, resp = call(server, "GET", "/api/health")
    assert resp.getheader("Connection") is None         # nothing unread: the connection stays open
    status, page, _ = call(server, "GET", "/")
    assert status == 200 and "unknown below" in page and "/api/segment" in page
    still_serving(server)


def raw_request(server, head, body=b""):
    """Send bytes on a socket, read the whole answer (the server closes): (status, JSON body, seconds)."""
    t0 = time.monotonic()
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    header, _, payload = data.partition(b"\r\n\r\n")
    return int(header.split()[1]), json.loads(payload), time.monotonic() - t0


def test_oversized_body_is_refused_before_it_is_read(server):
    # 50 MB announced, 1 kB sent: the answer comes at once, so the server never waited for (read) the body
    head = b"POST /api/segment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n"
    status, r, seconds = raw_request(server, head, b"{" + b" " * 1000)
    assert status == 413 and "body of 50000000 bytes is over this server's max_body (40000000 bytes)" in r["error"]
    assert seconds < 10
    head = b"POST /api/segment HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, r, _ = raw_request(server, head, b"5\r\nhello\r\n0\r\n\r\n")
    assert status == 411 and "Content-Length" in r["error"]
    status, r, _ = raw_request(server, b"POST /api/segment HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
    assert status == 400 and "not a byte count" in r["error"]
    still_serving(server)


def exchange(server, data, timeout=30):
    """Send bytes on one connection and read until the server closes it -> every byte it answered."""
    with socket.create_connection(server.server_address[:2], timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_refused_body_is_never_read_as_the_next_request(server):
    # no Content-Length: 411, and the connection ends, so the body cannot pass for a request of its own
    smuggled = b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = exchange(server, b"POST /api/segment HTTP/1.1\r\nHost: x\r\n\r\n" + smuggled)
    assert answer.startswith(b"HTTP/1.1 411 ") and answer.count(b"HTTP/1.1 ") == 1, answer
    assert b"Connection: close" in answer


@pytest.mark.parametrize("value, words", [("\xb2", "not a byte count"), ("9" * 5000, "not a byte count"),
                                          ("5, 5", "not a byte count")])
def test_a_malformed_content_length_is_a_400(server, value, words):
    head = f"POST /api/segment HTTP/1.1\r\nHost: x\r\nContent-Length: {value}\r\n\r\n".encode("latin-1")
    status, r, _ = raw_request(server, head)
    assert status == 400 and words in r["error"], r
    head = b"POST /api/segment HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 9\r\n\r\n{}"
    status, r, _ = raw_request(server, head)
    assert status == 400 and "Content-Length given 2 times" in r["error"]
    still_serving(server)


def test_http_level_mistakes_are_json_too(server):
    for head in (b"NONSENSE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
                 b"FOO /api/segment HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n"):
        answer = exchange(server, head)
        header, _, payload = answer.partition(b"\r\n\r\n")
        assert b"Content-Type: application/json" in header and 400 <= int(header.split()[1]) < 500, answer[:300]
        assert json.loads(payload)["error"]
    still_serving(server)


def test_a_stalled_body_is_a_408(server):
    s = server.segmenter.s
    old, s.timeout = s.timeout, 1.0                                  # new connections read with this timeout
    try:
        head = b"POST /api/segment HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        status, r, seconds = raw_request(server, head, b'{"image": ')  # and then nothing
    finally:
        s.timeout = old
    assert status == 408 and "body: 10 of 1000 bytes arrived in 1 s (timeout=1)" in r["error"], r
    assert seconds < 10
    still_serving(server)


def test_forty_clients_at_once_get_200_or_503_never_a_reset(server):
    # the burst arrives while the server is not accepting (as while its accept loop waits for the GIL): the kernel
    # queues the connections up to the listen backlog and drops the others; then the server answers each admitted
    # request 200 and the rest 503 at once (max_waiting), never a reset or a connection that cannot be made
    burst = serve_http.make_server(server.segmenter, "127.0.0.1", 0)
    body = json.dumps({"image": photo_b64(), "labels": LABELS}).encode()
    request = (b"POST /api/segment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)) + body
    start, tried, results = threading.Barrier(40), threading.Semaphore(0), []

    def client():
        start.wait(30)
        try:
            sock = socket.create_connection(burst.server_address[:2], timeout=2)  # Linux retries a dropped SYN at 1 s
        except OSError as e:
            results.append(type(e).__name__)
            tried.release()
            return
        tried.release()
        with sock:
            try:
                sock.settimeout(120)
                sock.sendall(request)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
                results.append(int(answer.split()[1]))
            except OSError as e:                                      # a reset
                results.append(type(e).__name__)
    threads = [threading.Thread(target=client) for _ in range(40)]
    for t in threads:
        t.start()
    for _ in threads:
        assert tried.acquire(timeout=60)                              # every client connected, or gave up
    serving = threading.Thread(target=burst.serve_forever, daemon=True)
    serving.start()
    try:
        for t in threads:
            t.join(180)
    finally:
        burst.shutdown()
        burst.server_close()
        serving.join(10)
    counts = {x: results.count(x) for x in set(results)}
    print(f"40 clients at once: {counts}")
    assert len(results) == 40 and set(results) <= {200, 503} and 200 in results, counts
    still_serving(server)


def test_a_non_loopback_address_gets_a_warning():
    for host in ("0.0.0.0", "::", "192.168.1.7", "10.0.0.1"):
        assert serve_http.exposure_warning(host, 8000).startswith("warning: serving on ")
    for host in ("127.0.0.1", "::1", "127.0.0.2"):
        assert serve_http.exposure_warning(host, 8000) == ""


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="max_labels=0"):
        serve.main(["--checkpoint=x.pt", "--max_labels=0"])
    with pytest.raises(ConfigError, match="warmup"):
        serve.main(["--checkpoint=x.pt", "--warmup=,"])


@pytest.mark.slow
def test_page_in_headless_chromium(tmp_path, data_root):
    """The page as a user meets it: pick a CamVid photo, type labels, get the overlay and legend, move the slider."""
    binary = chromium_or_skip()
    server, thread = start_server(tmp_path / "run", base_size=240, crop_size=240)
    try:
        check_page(binary, "http://%s:%d/" % server.server_address[:2],
                   data_root / "camvid-11" / "val" / "0016E5_07959.png", tmp_path)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def chromium_or_skip():
    """The Chromium binary, or the test skips saying how to install one."""
    from chromium import find_chromium
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium on PATH (SSIW_INSTALL_CHROMIUM=1 bash tests/run.sh installs Debian's `chromium`)")
    return binary


def check_page(binary, url, photo, tmp_path):
    """The page at url (a server at base_size 240) in headless Chromium (binary), driven as a user would with `photo`
    (a 480x360 CamVid image). tests/test_deploy.py runs it on serve_onnx.py too."""
    from chromium import Chromium
    browser = None
    try:
        browser = Chromium(binary, str(tmp_path / "chromium"))
        browser.send("Page.navigate", {"url": url})
        browser.wait_for("document.readyState === 'complete' && !!document.getElementById('file')", timeout=30)
        browser.evaluate("const t = document.getElementById('labels'); t.value = ''; t.focus(); true")
        browser.send("Input.insertText", {"text": "sky, road, car\nbuilding: An image of houses and walls."})
        browser.send("DOM.setFileInputFiles", {"files": [str(photo)], "nodeId": browser.node("#file")})
        state = browser.wait_for("['done', 'error'].includes(document.body.dataset.state) && "
                                 "document.body.dataset.state", timeout=120)
        assert state == "done", browser.evaluate("document.getElementById('status').textContent")
        legend = browser.evaluate("[...document.querySelectorAll('#legend td.label')].map(td => td.textContent)")
        assert legend == ["sky", "road", "car", "building"]
        shares = browser.evaluate("[...document.querySelectorAll('#legend td.num')].map(td => td.textContent)")
        assert sum(float(s.split()[0]) for s in shares[::2]) == pytest.approx(100, abs=0.3)
        # the overlay: the photo's size at base_size 240 (CamVid 480x360 -> 320x240), and a picture, not a blank
        w, h, colours = browser.evaluate("""(() => { const c = document.getElementById('overlay');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; const seen = new Set();
            for (let k = 0; k < d.length; k += 4) seen.add(d[k] << 16 | d[k + 1] << 8 | d[k + 2]);
            return [c.width, c.height, seen.size]; })()""")
        assert (w, h) == (320, 240) and colours > 1000
        browser.screenshot(tmp_path / "serve_page.png")
        shot = np.asarray(Image.open(tmp_path / "serve_page.png").convert("L"), np.float32)
        assert shot.std() > 20
        # the slider at its top: every pixel is under the threshold, so the legend gains unknown at 100 %
        browser.evaluate("const s = document.getElementById('thr'); s.value = '1';"
                         "s.dispatchEvent(new Event('input')); true")
        rows = browser.evaluate("[...document.querySelectorAll('#legend tr')].map(tr => tr.textContent)")
        assert rows[-1].startswith("unknown") and "100.0 %" in rows[-1]
        print(f"screenshot: {tmp_path / 'serve_page.png'}")
    finally:
        if browser is not None:
            browser.close()


@pytest.mark.slow
def test_load_test_smoke(tmp_path):
    from tools import bench_serve
    out = tmp_path / "bench.json"
    result = bench_serve.main(["--requests=6", "--clients=2", "--threads=1", f"--out={out}"])
    assert result["ok"] == 6 and result["errors"] == 0, result["error_samples"]
    assert result["requests_per_s"] > 0 and 0 < result["latency_s"]["p50"] <= result["latency_s"]["p95"]
    assert json.loads(out.read_text())["server_rss_mb"]["after_bench"] > 0
