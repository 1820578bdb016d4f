"""The real `edge-serve` as the tests start it (a subprocess on a free loopback port) and a small HTTP client.

Shared by test_serve.py and test_serve_browser.py. The client is the standard library's http.client with a
hand-built multipart body, so a test sees exactly what went over the wire; a raw socket is used where a
test must stop half way through an upload.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

START_TIMEOUT_S = 180
READY = re.compile(r"^edge-serve: notice: serving .* at (http://\S+/) ")


def edge_serve_command() -> list[str]:
    """The installed console script, next to this interpreter (missing is the package's defect)."""
    script = Path(sys.executable).parent / "edge-serve"
    if not script.is_file():
        pytest.fail(f"{script} is missing: the package under test does not install the edge-serve command")
    return [str(script)]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 0

    def log(self) -> list[str]:
        """The server's stderr lines so far."""
        return list(self.lines)

    def wait_for_log(self, count: int, timeout: float = 30.0) -> list[str]:
        """The log once it has at least ``count`` lines (a line is written just after its response)."""
        deadline = time.monotonic() + timeout
        while len(self.lines) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.log()


@contextmanager
def running_server(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    """Start `edge-serve --port 0 ARGS` in ``cwd``, wait for its start line, stop it (SIGTERM) at the end."""
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", **(env or {}))
    process = subprocess.Popen([*edge_serve_command(), "--port", "0", *args], cwd=cwd, env=full_env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()
    found: list[str] = []

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line.rstrip("\n"))
            match = READY.match(line)
            if match and not found:
                found.append(match.group(1))
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not ready.wait(START_TIMEOUT_S) or not found:
            process.kill()
            process.wait(30)
            reader.join(10)
            pytest.fail(f"edge-serve did not start (exit {process.returncode}): " + " | ".join(lines))
        server = Server(found[0], process, lines)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)
        reader.join(10)


def multipart(data: bytes, filename: str, field_name: str = "file") -> tuple[bytes, str]:
    """A multipart/form-data body holding one file, and its Content-Type."""
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field_name}\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def request(server: Server, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 120.0) -> Reply:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def classify(server: Server, data: bytes, filename: str, *, query: str = "", token: str | None = None) -> Reply:
    body, content_type = multipart(data, filename)
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return request(server, "POST", "/api/classify" + query, body, headers)


def open_upload(server: Server, body: bytes, content_type: str, sent: int) -> socket.socket:
    """A raw connection that has sent the headers of a POST /api/classify and the first ``sent`` bytes of
    its body, and then waits: the upload is in progress for as long as the test likes."""
    sock = socket.create_connection((server.host, server.port), timeout=60)
    head = (f"POST /api/classify HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body[:sent])
    return sock


def read_reply(sock: socket.socket) -> Reply:
    """Read one HTTP response from a raw socket (http.client parses it)."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
