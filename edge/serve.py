"""edge-serve's web app (Starlette, ASGI): the clinic page and a JSON API over the classification workers.

Routes: ``GET /`` the page, ``GET /assets/...`` its script and style (every asset served by the device, so
the page works with no internet), ``GET /healthz`` (open: what a monitor or the page needs before a token
is given), and behind the access token when one is set: ``GET /api/models`` and ``POST /api/classify``
(multipart field ``file``; ``?top_k=N``). Every error is JSON (an error record: ``status``, ``source``,
``error``) with a 4xx code for the client's mistakes and one log line; 503 with Retry-After when every
worker slot is taken.

Access: ``Authorization: Bearer TOKEN`` on /api/ routes. The page keeps the token the user enters (or that
a link carried as ``#token=...``, which browsers never send to a server) in the browser's local storage
and sends it as that header; no cookie, so no cross-site request can use it.
"""
from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import __version__
from .errors import one_line
from .records import error_record
from .serve_keep import Keeper
from .serve_results import classify_upload
from .serve_upload import UploadError, read_upload
from .serve_workers import Busy, WorkerPool

PAGE_DIR = Path(__file__).resolve().parent / "serve_page"
#: Seconds a client told "busy" (503) should wait: a classification takes tens of milliseconds, so the
#: queue has moved on by then.
RETRY_AFTER_S = 1
#: The page and its assets may only load what the device itself serves; overlays arrive as data: URLs.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
_SECURITY_HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff",
                     "referrer-policy": "no-referrer", "x-frame-options": "DENY"}

#: log(kind, text): kind "error" for a failed request, None for a plain request line.
Log = Callable[[str | None, str], None]


def _error(status: int, source: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_record(source, message), status_code=status, headers=headers)


def _quiet(path: str) -> bool:
    """Paths whose successful requests are not logged: the page and its assets, and /healthz, which a
    monitor polls."""
    return path in ("/", "/healthz") or path.startswith("/assets/")


class _Edge:
    """Pure ASGI middleware around the app: numbers requests, checks the token on /api/, adds the security
    headers, turns any unexpected exception into a JSON 500 (no traceback), and writes one log line."""

    def __init__(self, app: Any, *, token: str | None, log: Log):
        self.app = app
        self.token = token.encode() if token else None
        self.log = log
        self.numbers = itertools.count(1)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        number = next(self.numbers)
        scope.setdefault("state", {})["number"] = number
        start = time.perf_counter()
        path = scope.get("path", "")
        sent: dict[str, Any] = {"status": 0}

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                headers = MutableHeaders(scope=message)
                for key, value in _SECURITY_HEADERS.items():
                    headers.setdefault(key, value)
                if path.startswith("/api/") or path == "/healthz":
                    headers["cache-control"] = "no-store"  # results describe patients' scans
            await send(message)

        try:
            if path.startswith("/api/") and not self._authorised(scope):
                scope["state"]["note"] = "no or wrong access token"
                response = _error(401, path, f"{path}: this server needs its access token (Authorization: "
                                             "Bearer TOKEN)", headers={"WWW-Authenticate": 'Bearer realm="edge-serve"'})
                await response(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive, send_with_headers)
        except Exception as exc:  # noqa: BLE001 - the request gets a JSON 500 and the server lives on
            scope["state"]["note"] = f"unexpected {type(exc).__name__}: {one_line(exc)}"
            if not sent["status"]:
                await _error(500, path, f"{path}: internal error ({type(exc).__name__})")(scope, receive,
                                                                                          send_with_headers)
        status = sent["status"]
        if status < 400 and _quiet(path):
            return
        millis = (time.perf_counter() - start) * 1000.0
        note = scope["state"].get("note")
        line = f"{status} {scope.get('method', '?')} {path} {millis:.1f} ms #{number}" + (f": {note}" if note else "")
        self.log("error" if status >= 400 else None, line)

    def _authorised(self, scope: dict) -> bool:
        if self.token is None:
            return True
        for key, value in scope.get("headers", ()):
            if key == b"authorization":
                scheme, _, given = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)
        return False


def create_app(pool: WorkerPool, *, model: dict[str, Any], bundled: list[dict[str, Any]], token: str | None,
               max_upload: int, keeper: Keeper | None, log: Log) -> Any:
    """The ASGI app: ``model`` describes the loaded model, ``bundled`` the models this install carries."""

    def fail(request: Request, status: int, source: str, problem: str, note: str | None = None,
             headers: dict[str, str] | None = None) -> Response:
        """An error record naming ``source`` (a file or a path), and the log line's ``note``."""
        request.state.note = note or problem
        return _error(status, source, f"{source}: {problem}", headers)

    async def page(request: Request) -> Response:
        return FileResponse(PAGE_DIR / "index.html", headers={"cache-control": "no-cache"})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": __version__, "model": {"name": model["name"],
                             "sha256": model["sha256"]}, "token_required": token is not None,
                             "max_upload_bytes": max_upload, **pool.stats()})

    async def models(request: Request) -> Response:
        return JSONResponse({"loaded": model, "bundled": bundled, "max_upload_bytes": max_upload})

    async def classify(request: Request) -> Response:
        path = request.url.path
        try:
            top_k = _top_k(request.query_params.get("top_k"), len(model["labels"]))
        except ValueError as exc:
            return fail(request, 400, path, str(exc))
        try:
            slot = pool.admit()
        except Busy as exc:
            return fail(request, 503, path, f"the server is busy ({exc}); try again in {RETRY_AFTER_S} s",
                        note=f"busy ({exc})", headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            upload = await read_upload(request.headers.get("content-type", ""), request.headers.get("content-length"),
                                       request.stream(), max_upload)
            future = slot.submit(partial(classify_upload, upload=upload, top_k=top_k, keeper=keeper))
        except UploadError as exc:
            # An oversized body is refused unread, so the connection cannot carry another request.
            return fail(request, exc.status, "upload", str(exc),
                        headers={"Connection": "close"} if exc.status == 413 else None)
        except ClientDisconnect:
            return fail(request, 400, "upload", "the client went away mid-upload")
        finally:
            slot.release()
        outcome = await asyncio.wrap_future(future)
        request.state.note = f"{outcome.note} ({len(upload.data) / 1000:.0f} kB)"
        return _json(outcome.record, outcome.status)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return fail(request, exc.status_code, request.url.path, str(exc.detail))

    routes = [
        Route("/", page, methods=["GET", "HEAD"]),
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/api/models", models, methods=["GET"]),
        Route("/api/classify", classify, methods=["POST"]),
        Mount("/assets", StaticFiles(directory=PAGE_DIR), name="assets"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    return _Edge(app, token=token, log=log)


def _top_k(text: str | None, n_labels: int) -> int:
    if text is None:
        return 1
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= n_labels:
        raise ValueError(f"top_k must be a whole number from 1 to {n_labels}, got {one_line(text)!r}")
    return value


def _json(record: dict[str, Any], status: int) -> Response:
    """A record as the CLI writes it (non-ASCII kept as is), one JSON object."""
    body = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return Response(body, status_code=status, media_type="application/json")
