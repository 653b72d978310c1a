"""`pipmm serve` as a real process on 127.0.0.1 for the server tests: start, wait for /health, stop."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from helpers import ROOT


class ServerProcess:
    def __init__(self, bundle, *options, log: Path, startup_s: float = 60.0):
        """bundle: a directory, or None for the embedded default model."""
        self.log = Path(log)
        self.process = subprocess.Popen([sys.executable, "-m", "sdk.cli", "serve", *([str(bundle)] if bundle else []), "--port", "0",
                                         *map(str, options)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                        stderr=self.log.open("w"))  # a file: a pipe nobody reads would fill up
        self.url = self.wait_for(r"listening on (http://\S+)", startup_s)
        deadline = time.monotonic() + startup_s
        while self.get("/health")[0] != 200:
            assert self.process.poll() is None, f"the server exited: {self.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.05)

    def wait_for(self, pattern: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if found := re.search(pattern, self.log.read_text()):
                return found.group(1)
            assert self.process.poll() is None, f"the server exited: {self.log.read_text()[-2000:]}"
            time.sleep(0.02)
        raise AssertionError(f"no {pattern!r} in the server's log: {self.log.read_text()[-2000:]}")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """-> (status, body bytes), for errors too."""
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def get(self, path: str, headers: dict | None = None):
        try:
            return self.request("GET", path, headers=headers)
        except (urllib.error.URLError, ConnectionError):
            return 0, b""

    def post_json(self, body, headers: dict | None = None, path: str = "/v1/chat/completions"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, raw = self.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
        return status, json.loads(raw)

    def request_json(self, method: str, path: str):
        status, raw = self.request(method, path)
        return status, json.loads(raw)

    def rss_bytes(self) -> int:
        fields = Path(f"/proc/{self.process.pid}/statm").read_text().split()
        return int(fields[1]) * 4096

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def png_bytes(array) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def user_turn(prompt: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": prompt},
                                         {"type": "image_url", "image_url": {"url": url}}]}]
