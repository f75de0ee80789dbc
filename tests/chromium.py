"""Headless Chromium for tests, driven through the DevTools protocol over --remote-debugging-pipe: the standard
library only (no Selenium, Playwright or websocket client). Chromium reads commands on its fd 3 and writes answers
and events on its fd 4, each message JSON ended by a NUL byte. Every wait is bounded; close() kills the browser."""
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time


def find_chromium():
    """The path of a Chromium (or Chrome) binary on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


class Chromium:
    """One headless browser with one page (a flat session): send(), evaluate(), wait_for(), close()."""

    def __init__(self, binary, user_dir, width=1200, height=900, timeout=30.0):
        to_browser_r, self.to_browser = os.pipe()
        self.from_browser, from_browser_w = os.pipe()

        def pipes_as_fd_3_and_4():  # in the child, before exec; via fds >= 10 so neither dup2 clobbers the other
            a = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.log_path = os.path.join(user_dir, "chromium.log")
        os.makedirs(user_dir, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
                 f"--user-data-dir={user_dir}", "--remote-debugging-pipe", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=pipes_as_fd_3_and_4, pass_fds=(3, 4))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.timeout, self.next_id, self.buffer, self.session = timeout, 0, b"", None
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.close()
            raise

    def _message(self, deadline):
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_browser], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer in time (log: {self.log_path})")
            chunk = os.read(self.from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe (exit {self.proc.poll()}; log: {self.log_path})")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method, params=None, timeout=None):
        """One DevTools command (on the page's session once attached) -> its result; events are skipped."""
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session:
            msg["sessionId"] = self.session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self.to_browser, data):]
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            answer = self._message(deadline)
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def evaluate(self, expression):
        """A JavaScript expression's value in the page (promises awaited); a thrown error raises."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression, timeout=60.0, every=0.2):
        """Poll until the expression is truthy; its value. TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} still falsy after {timeout} s")
            time.sleep(every)

    def node(self, selector):
        """The DOM nodeId of the first element matching a CSS selector."""
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        return self.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]

    def screenshot(self, path):
        """The page as a PNG file at `path`."""
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for fd in (self.to_browser, self.from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
