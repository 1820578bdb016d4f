"""`edge-serve`: the clinic web page and JSON API on the device (pip install "edge-mri[serve]").

This module is the CLI edge: it checks the options (loopback unless a token is given), loads the model
into one classifier per worker thread, binds the socket, and runs uvicorn on the app of `edge.serve`.
Every problem before serving is one ``edge-serve: error: ...`` line and exit code 2.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import string
import sys
from pathlib import Path
from typing import Any

import click

from .backend import BACKENDS
from .cli_common import (THREADS, NonEmptyPath, OneLineCommand, error, notice, require_extra,
                         route_logs_and_warnings, say, version_option)
from .errors import EdgeError

PROG = "edge-serve"
EXIT_USAGE = 2
#: Shortest access token accepted: guessing 16 random characters over a clinic's Wi-Fi is hopeless.
MIN_TOKEN = 16
DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))
TOKEN_ENV = "EDGE_SERVE_TOKEN"
#: Connections uvicorn holds open beyond the worker slots (idle keep-alive ones, the page's assets); past
#: this it answers 503 itself.
SPARE_CONNECTIONS = 32

HELP = f"""Serve the clinic page and a JSON API: drop or photograph a scan on a phone, see the answer and where
the model looked. Decision support for trained staff, not a diagnosis.

Open http://HOST:PORT/ in a browser. The API, for a clinic's own software:

\b
  curl -F file=@scan.png http://127.0.0.1:8080/api/classify        # one edge-classify --json record
  curl 'http://127.0.0.1:8080/api/classify?top_k=3' -F file=@study.dcm
  curl http://127.0.0.1:8080/api/models
  curl http://127.0.0.1:8080/healthz                                # open, even with a token

POST /api/classify takes one JPEG, PNG, BMP, TIFF or DICOM (its first frame) in the multipart field 'file'
and answers with the record `edge-classify --json` prints for it (docs/RECORDS.md), plus overlay_png: the
overlay (scan, heatmap, verdict, colour scale) as a PNG data URL. Errors are error records with a 4xx
code (413 over --max-upload-mb, 415 not an image, 422 unreadable); 503 with Retry-After when all
--threads + --queue slots are taken; 401 without the token.

Safety: the server listens on loopback only unless --host says otherwise, and then it needs --token (or
{TOKEN_ENV}): clients send 'Authorization: Bearer TOKEN'; the page asks for it once and keeps it in the
browser (a link can carry it as http://HOST:PORT/#token=TOKEN). Plain HTTP: use it on the clinic's own
network. Uploads stay in memory and are never written to disk unless --keep DIR is given; DICOM patient data
is never logged, answered or used in a file name.

\b
Exit codes:
  0  stopped (Ctrl-C or SIGTERM)
  2  usage error, the model or backend could not be loaded, or the address cannot be used
"""


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach: 127.0.0.0/8, ::1 or 'localhost'."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface, so it is not loopback
        return False


def check_access(host: str, token: str | None) -> None:
    """Refuse a non-loopback address without a token, and a token too weak or unsendable to be one."""
    if token is not None:
        if len(token) < MIN_TOKEN:
            raise click.BadParameter(f"the token is {len(token)} characters; give at least {MIN_TOKEN} "
                                     "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(24))')",
                                     param_hint="--token")
        if any(c not in string.printable or c.isspace() for c in token):
            raise click.BadParameter("the token must be printable ASCII without spaces (it travels in an "
                                     "HTTP header)", param_hint="--token")
    elif not is_loopback(host):
        raise click.UsageError(f"--host {host} is not a loopback address: anyone who can reach this machine "
                               f"could upload scans and read the results; give --token TOKEN (or set "
                               f"{TOKEN_ENV}) of at least {MIN_TOKEN} characters, or serve on 127.0.0.1")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one), IPv4 or IPv6."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    address = host.strip("[]")
    if address.lower() == "localhost":
        address = "127.0.0.1"
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if sock.family == socket.AF_INET6 else f"http://{host}:{port}/"


def _backend_version() -> str:
    from .cli import _backend_version as backend_version

    return backend_version()


def _log(kind: str | None, text: str) -> None:
    if kind is None:
        click.echo(f"{PROG}: {text}", err=True)
    else:
        say(PROG, kind, text)


def _model_summary(classifier: Any) -> dict[str, Any]:
    spec = classifier.spec
    return {"name": spec.name, "sha256": spec.sha256, "labels": list(spec.labels), "input_size": spec.input_size,
            "channels": spec.channels, "has_heatmap": classifier.has_heatmap, "gate": classifier.gate is not None,
            "backend": {"name": classifier.backend.name, "version": classifier.backend.version}}


def _bundled() -> list[dict[str, Any]]:
    from .registry import list_models

    return [{key: value for key, value in info.to_dict().items() if key not in ("path", "card")}
            for info in list_models()]


@click.command(PROG, cls=OneLineCommand, help=HELP,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback (e.g. 0.0.0.0, every address) needs --token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="TCP port (0: any free one; the start line names it).")
@click.option("-m", "--model", metavar="NAME|PATH", help="Bundled model name or .tflite path [default: custom-cnn].")
@click.option("--backend", type=click.Choice(list(BACKENDS)), help="Force an interpreter backend.")
@click.option("-t", "--threads", type=THREADS, default=DEFAULT_WORKERS, show_default=True,
              help="Worker threads, each with its own interpreter (of one thread): scans classified at once.")
@click.option("--queue", "queue_size", type=click.IntRange(0, 1024), default=16, show_default=True,
              help="Uploads that may wait for a worker; more at once get 503 + Retry-After. At most "
                   "(threads + queue) x max-upload-mb of uploads is held in memory.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=32.0, show_default=True,
              help="Largest scan accepted, in MB (1e6 bytes); larger uploads get 413.")
@click.option("--token", envvar=TOKEN_ENV, show_envvar=True, metavar="TOKEN",
              help=f"Access token (at least {MIN_TOKEN} characters) every /api/ request must carry as "
                   "'Authorization: Bearer TOKEN'; required with a non-loopback --host.")
@click.option("--keep", "keep_dir", type=NonEmptyPath(file_okay=False, path_type=Path), metavar="DIR",
              help="Keep every upload in DIR (named by time and hash, never by the client's name) and append "
                   "its record to DIR/results.jsonl. Without it nothing is written to disk.")
@version_option(PROG, _backend_version)
def main(host: str, port: int, model: str | None, backend: str | None, threads: int, queue_size: int,
         max_upload_mb: float, token: str | None, keep_dir: Path | None) -> int:
    route_logs_and_warnings(PROG, ("edge", "uvicorn"))
    if model == "":
        raise click.UsageError("--model is an empty string (an unset shell variable?); give a name or a path")
    check_access(host, token or None)
    require_extra(["starlette", "uvicorn", "python_multipart"], "serve", PROG)
    from .errors import OutputError
    from .serve_keep import Keeper

    try:
        keeper = Keeper(keep_dir) if keep_dir is not None else None
    except OutputError as exc:
        raise click.BadParameter(str(exc), param_hint="--keep") from None
    from .classifier import Classifier

    try:
        classifiers = [Classifier(model, threads=1, backend=backend) for _ in range(threads)]
    except EdgeError as exc:
        error(PROG, exc)
        return EXIT_USAGE
    first = classifiers[0]
    if not first.spec.weights_verified:
        notice(PROG, f"{first.path}: the model records no weights checksum (converted before edge-convert "
                     "wrote one), so a corrupted copy cannot be detected")
    if first.gate is None:
        notice(PROG, f"{first.path}: the model carries no input-gate calibration (edge-gate calibrate adds one), "
                     "so scans unlike its training data are not referred; only blank or malformed images are refused")
    try:
        sock = bind(host, port)
    except OSError as exc:
        error(PROG, f"cannot listen on {host}:{port} ({exc.strerror or exc})")
        return EXIT_USAGE
    return _serve(sock, classifiers, queue_size=queue_size, max_upload=int(max_upload_mb * 1e6),
                  token=token or None, keeper=keeper, loopback=is_loopback(host))


def _serve(sock: socket.socket, classifiers: list[Any], *, queue_size: int, max_upload: int, token: str | None,
           keeper: Any, loopback: bool) -> int:
    import uvicorn

    from .serve import create_app
    from .serve_workers import WorkerPool

    pool = WorkerPool(classifiers, queue_size)
    summary = _model_summary(classifiers[0])
    app = create_app(pool, model=summary, bundled=_bundled(), token=token, max_upload=max_upload, keeper=keeper,
                     log=_log)
    config = uvicorn.Config(app, log_config=None, access_log=False, server_header=False, lifespan="off",
                            ws="none", timeout_keep_alive=5, limit_concurrency=pool.capacity + SPARE_CONNECTIONS)
    access = "loopback only" if loopback else "open to the network"
    notice(PROG, f"serving {summary['name']} (sha256 {summary['sha256'][:12]}) at {url_of(sock)} with "
                 f"{pool.workers} worker(s), {pool.capacity - pool.workers} waiting at most, uploads up to "
                 f"{max_upload / 1e6:g} MB; {access}, token {'required' if token else 'off'}; "
                 f"{'keeping uploads in ' + str(keeper.directory) if keeper else 'nothing written to disk'}")
    sys.stderr.flush()
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        pool.close()
        sock.close()
    return 0


if __name__ == "__main__":
    main(prog_name=PROG)
