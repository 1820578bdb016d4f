"""Read one uploaded scan from a multipart/form-data request body into memory, within a size limit.

Why not the framework's form parser: Starlette (like Werkzeug) spools file parts over 1 MB to a temporary
file, and edge-serve promises that nothing a client sends is written to disk unless asked (--keep). The
body is streamed through python-multipart's parser as it arrives; the file part goes into a bytearray that
can never grow past the limit, and the request is refused (413) the moment the body passes it, before the
rest is read. A client that stops sending mid-body is dropped after :data:`READ_TIMEOUT_S`.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from .errors import one_line

#: The form field that carries the scan (`curl -F file=@scan.png`).
FILE_FIELD = "file"
#: Room for the multipart framing and a few small fields on top of the file itself.
OVERHEAD_BYTES = 64 * 1024
#: Longest wait for the next piece of a body before the request is dropped (408).
READ_TIMEOUT_S = 30.0
#: Other form fields are small options; anything bigger is a malformed or hostile request.
MAX_FIELD_BYTES = 1024
MAX_PARTS = 8
#: Longest file name echoed back (the name is the client's, shown to the same client).
MAX_NAME = 120


class UploadError(Exception):
    """The request is not a usable upload; ``status`` is the HTTP code to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Upload:
    """The scan's bytes, the file name the client gave (its last path component, one line) and any other
    small form fields."""

    data: bytes
    filename: str
    fields: dict[str, str] = field(default_factory=dict)


def client_name(raw: str) -> str:
    """The client's file name as it may be echoed: the last path component, one line, at most MAX_NAME."""
    name = one_line(raw.replace("\\", "/").rsplit("/", 1)[-1]) if raw.strip() else ""
    if name in ("", "unknown error", ".", ".."):
        return "upload"
    return name if len(name) <= MAX_NAME else name[:MAX_NAME - 3] + "..."


def boundary_of(content_type: str) -> bytes:
    """The multipart boundary of a Content-Type header, or an UploadError (415) for anything else."""
    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise UploadError(415, f"expected a multipart/form-data body with the scan in a {FILE_FIELD!r} field "
                               f"(curl -F {FILE_FIELD}=@scan.png)")
    return boundary


class _Collector:
    """python-multipart callbacks that keep the file part and small fields, within their limits."""

    def __init__(self, max_file: int):
        self.max_file = max_file
        self.files: list[Upload] = []
        self.fields: dict[str, str] = {}
        self.parts = 0
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._data = bytearray()
        self._name = ""
        self._filename: str | None = None

    def callbacks(self) -> dict:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field_data,
                "on_header_value": self._header_value_data, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end}

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise UploadError(400, f"too many form fields (at most {MAX_PARTS})")
        self._headers, self._data, self._name, self._filename = {}, bytearray(), "", None

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").strip().lower()] = bytes(self._header_value)
        self._header_field, self._header_value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get("content-disposition", b""))
        self._name = _text(params.get(b"name", b""))
        filename = params.get(b"filename")
        self._filename = None if filename is None else _text(filename)
        if self._filename is not None and self._name != FILE_FIELD:
            raise UploadError(400, f"the scan goes in the form field {FILE_FIELD!r}, not {one_line(self._name)!r} "
                                   f"(curl -F {FILE_FIELD}=@scan.png)")
        if self._name == FILE_FIELD and self.files:
            raise UploadError(400, f"one scan per request (the form has more than one {FILE_FIELD!r} field)")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        limit = self.max_file if self._name == FILE_FIELD else MAX_FIELD_BYTES
        if len(self._data) + (end - start) > limit:
            if self._name == FILE_FIELD:
                raise UploadError(413, f"the scan is over the {_mb(self.max_file)} upload limit")
            raise UploadError(400, f"form field {one_line(self._name)!r} is over {MAX_FIELD_BYTES} bytes")
        self._data += data[start:end]

    def _part_end(self) -> None:
        if self._name == FILE_FIELD:
            self.files.append(Upload(bytes(self._data), client_name(self._filename or "")))
        elif self._name:
            self.fields[self._name] = self._data.decode("utf-8", "replace")


def _text(raw: bytes) -> str:
    """A header parameter as text: browsers send UTF-8 file names raw, which the parser read as Latin-1."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _mb(n: int) -> str:
    return f"{n / 1e6:g} MB"


async def read_upload(content_type: str, content_length: str | None, chunks: AsyncIterator[bytes],
                      max_file: int) -> Upload:
    """The one scan of a multipart body streamed as ``chunks``, kept in memory; an UploadError otherwise.

    ``content_length`` (the header, if any) lets an oversized body be refused before any of it is read;
    a body without one (chunked) is refused as soon as it passes the limit.
    """
    boundary = boundary_of(content_type)
    max_body = max_file + OVERHEAD_BYTES
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise UploadError(400, "the Content-Length header is not a number") from None
        if declared > max_body:
            raise UploadError(413, f"the upload is {declared / 1e6:.1f} MB, over the {_mb(max_file)} limit")
    collector = _Collector(max_file)
    parser = MultipartParser(boundary, collector.callbacks())
    received = 0
    iterator = chunks.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(iterator.__anext__(), READ_TIMEOUT_S)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise UploadError(408, f"the upload stalled (nothing received for {READ_TIMEOUT_S:g} s)") from None
        received += len(chunk)
        if received > max_body:
            raise UploadError(413, f"the upload is over the {_mb(max_file)} limit")
        try:
            parser.write(chunk)
        except MultipartParseError as exc:
            raise UploadError(400, f"malformed multipart body ({one_line(exc)})") from None
    try:
        parser.finalize()
    except MultipartParseError as exc:
        raise UploadError(400, f"malformed multipart body ({one_line(exc)})") from None
    if not collector.files:
        raise UploadError(400, f"no {FILE_FIELD!r} field in the form (curl -F {FILE_FIELD}=@scan.png)")
    upload = collector.files[0]
    upload.fields = collector.fields
    return upload
