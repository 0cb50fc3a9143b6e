"""Start ``python -m pipeline serve`` as a user does, on a free loopback port, and talk to it over HTTP."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from conftest import ROOT


class Server:
    def __init__(self, project: Path, params: str = "params.yaml", env: dict | None = None, sets: tuple = ()):
        environment = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TQDM_DISABLE": "1",
                       "TF_CPP_MIN_LOG_LEVEL": "3", "XDG_CACHE_HOME": os.environ["XDG_CACHE_HOME"], **(env or {})}
        self.project = project
        self.process = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--params", params, "--set",
                                         "serve.port=0", *[a for s in sets for a in ("--set", s)]], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=environment)
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True).start()
        deadline = time.monotonic() + 240
        line = ""
        self.stdout: list[str] = []
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            self.stdout.append(line)
            if not line and self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode}: {''.join(self.stderr)[-2000:]}")
            found = re.search(r"serving on (http://127\.0\.0\.1:(\d+))", line)
            if found:
                self.url, self.port = found.group(1), int(found.group(2))
                break
        else:
            self.stop()
            raise RuntimeError("serve did not start in 240 s")
        self.token = re.search(r'name="csrf" content="([^"]+)"', self.get("/review")[2]).group(1)
        threading.Thread(target=lambda: self.stdout.extend(self.process.stdout), daemon=True).start()

    def request(self, path: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None):
        """(status, headers, body text) of one request; HTTP errors are returned, not raised."""
        request = urllib.request.Request(self.url + path, data=data, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, dict(response.headers), response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read().decode("utf-8", "replace")

    def get(self, path: str, **headers):
        return self.request(path, headers=headers)

    def json(self, path: str, payload=None, token: bool = True, **headers):
        if payload is None:
            status, _, body = self.get(path, **headers)
        else:
            headers = {"Content-Type": "application/json", **({"X-CSRF-Token": self.token} if token else {}), **headers}
            status, _, body = self.request(path, json.dumps(payload).encode(), headers, "POST")
        if status >= 500:  # the server's traceback, not only "Internal Server Error"
            time.sleep(0.2)
            raise AssertionError(f"{path}: {status} {body}\n{''.join(self.stderr)[-3000:]}")
        return status, json.loads(body)

    def send(self, method: str, path: str, payload=None, token: bool = True):
        """(status, JSON body) of a state-changing request with the page's token."""
        headers = {"Content-Type": "application/json", **({"X-CSRF-Token": self.token} if token else {})}
        data = None if payload is None else json.dumps(payload).encode()
        status, _, body = self.request(path, data, headers, method)
        if status >= 500:
            time.sleep(0.2)
            raise AssertionError(f"{method} {path}: {status} {body}\n{''.join(self.stderr)[-3000:]}")
        return status, json.loads(body)

    def upload(self, path: str, files: list[tuple[str, bytes]], field: str = "file", token: bool = False):
        boundary = uuid.uuid4().hex
        parts = []
        for name, data in files:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                         f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}",
                   **({"X-CSRF-Token": self.token} if token else {})}
        status, _, text = self.request(path, body, headers, "POST")
        if status >= 500:
            time.sleep(0.2)
            raise AssertionError(f"{path}: {status} {text}\n{''.join(self.stderr)[-3000:]}")
        return status, json.loads(text)

    def review(self, query: str = "", timeout: float = 300):
        """(status, body) of /api/review once its findings are computed (in the background, once per model)."""
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.json("/api/review" + query)
            if status != 200 or not body.get("computing") or time.monotonic() > deadline:
                return status, body
            time.sleep(0.2)

    def wait_job(self, job: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, state = self.json(f"/api/train/{job}")
            if state["state"] in ("done", "failed"):
                return state
            time.sleep(0.3)
        raise AssertionError(f"job {job} did not finish in {timeout} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
