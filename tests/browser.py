"""A headless Chromium driven over the Chrome DevTools protocol, for the triage page tests.

Uses Debian's ``chromium`` (or ``$MENDIS_CHROMIUM``) and the ``websockets`` client; tests
that need it call :func:`chromium_or_skip`, which skips cleanly where either is absent.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def find_chromium() -> str | None:
    for name in (os.environ.get("MENDIS_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome"):  # fmt: skip
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def chromium_or_skip(tmp: Path) -> Browser:
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium on PATH (apt-get install chromium, or set MENDIS_CHROMIUM)")
    pytest.importorskip("websockets.sync.client", reason="needs the websockets package")
    return Browser(exe, tmp)


class Browser:
    """One headless Chromium with one page; ``close()`` ends it."""

    def __init__(self, exe: str, tmp: Path, width: int = 1400, height: int = 950) -> None:
        from websockets.sync.client import connect

        profile = tmp / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        args = [exe, "--headless=new", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--remote-debugging-port=0",
                f"--user-data-dir={profile}", f"--window-size={width},{height}",
                "--remote-allow-origins=*", "about:blank"]  # fmt: skip
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root otherwise
        (profile / "DevToolsActivePort").unlink(missing_ok=True)  # a stale one from before
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ws = None
        try:
            self.ws = self._connect(profile / "DevToolsActivePort", connect)
        except BaseException:
            self.close()
            raise
        self._ids = itertools.count(1)
        self.call("Page.enable")
        self.call("Runtime.enable")

    def _connect(self, port_file: Path, connect):
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("chromium did not start (no DevToolsActivePort)")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=20)
        return ws.__enter__()  # websockets >= 16 wants its context entered

    def call(self, method: str, timeout: float = 60, **params: object) -> dict:
        """Send one command and return its result (events in between are dropped)."""
        k = next(self._ids)
        self.ws.send(json.dumps({"id": k, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == k:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expr: str, await_promise: bool = False) -> object:
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True,
                      awaitPromise=await_promise)  # fmt: skip
        if "exceptionDetails" in r:
            raise RuntimeError(f"page error: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expr: str, timeout: float = 30) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expr)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"page never satisfied {expr!r}")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && document.body && "
                      "document.body.dataset.ready === '1'")  # fmt: skip

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) at the centre of ``selector``."""
        js = (
            "(() => { const e = document.querySelector(SEL); e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        box = self.eval(js.replace("SEL", json.dumps(selector)))
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1],
                      button="left", clickCount=1)  # fmt: skip

    def drag(self, x0: float, x1: float, y: float) -> None:
        """Drag the mouse from (x0, y) to (x1, y) in page pixels."""
        self.call("Input.dispatchMouseEvent", type="mousePressed", x=x0, y=y, button="left",
                  clickCount=1)  # fmt: skip
        for x in (x0 + (x1 - x0) * t / 5 for t in range(1, 6)):
            self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, button="left")
        self.call("Input.dispatchMouseEvent", type="mouseReleased", x=x1, y=y, button="left",
                  clickCount=1)  # fmt: skip

    def allow_downloads(self, folder: Path) -> None:
        self.call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(folder))

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            if self.ws is not None:
                self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
