"""One small error hierarchy for the whole runtime.

Library code raises these; only the CLI edge turns them into one-line messages and exit codes, so that
callers of the Python API can still tell a bad scan from a bad model from a missing backend.
"""
from __future__ import annotations


class EdgeError(Exception):
    """Base class of every error the runtime raises on purpose."""


class InputError(EdgeError):
    """A scan could not be read or decoded (missing, empty, truncated, not an image, too large, too small)."""


class ModelError(EdgeError):
    """A model file is missing, corrupt, or lacks the metadata the runtime needs."""


class BackendError(EdgeError):
    """No usable TFLite interpreter backend is installed, or the one asked for is missing."""


class DicomError(InputError):
    """A DICOM file is unsupported (transfer syntax, photometric interpretation, frame) or unreadable."""


class TransientInputError(InputError):
    """A file that may be fine could not be read here and now: permission denied, an I/O error, or a decoder
    (pydicom, a JPEG plugin) that is not installed. Unlike other input errors it is not the file's own
    fault, so a watch folder tries the file again instead of recording it as failed."""


class MissingDecoderError(DicomError, TransientInputError):
    """A DICOM file needs a library that is not installed (pydicom, or a plugin for its transfer syntax)."""


class CameraError(EdgeError):
    """A camera source is unavailable (library missing, device busy or absent)."""


class OutputError(EdgeError):
    """A results file cannot be used: not a regular file, its folder cannot be made, or writing it fails
    (disk full, read-only). Not any input's fault, so a run stops on it instead of going on unrecorded."""


def install_hint(extra: str) -> str:
    """How every message says to add an optional extra: ``pip install "edge-mri[dicom]"``.

    One spelling everywhere: quoted, because zsh (macOS's shell) reads unquoted brackets as a glob and
    fails with "no matches found"; and by the package's name, which adds the extra's libraries to the
    edge-mri already installed, whether it came from a wheel or a checkout.
    """
    return f'pip install "edge-mri[{extra}]"'


_ESCAPES = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}


def one_line(text: object) -> str:
    """A message as exactly one line, for stderr, a log or a JSONL field.

    Control characters (a newline inside a file name, a library's multi-line message) are written as
    escapes rather than dropped, so the line still names the file exactly.
    """
    out = []
    for char in str(text).strip():
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif not char.isprintable():  # other controls, and Unicode line separators that split lines too
            out.append(f"\\x{ord(char):02x}" if ord(char) < 256 else f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return "".join(out) or "unknown error"
