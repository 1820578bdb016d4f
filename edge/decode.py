"""Anything a caller may hold (path, bytes, PIL image, numpy array) -> a numpy image `edge.preprocess` accepts.

Scans arrive in many shapes: 8- and 16-bit grayscale PNG/TIFF exports, RGB JPEGs, palette and CMYK files,
images with an alpha channel, phone photos of a screen with an EXIF rotation, and DICOM. Every one of them
becomes a 2-D (grayscale, full bit depth kept) or H x W x 3 (RGB) array here, so preprocessing has one job.

Every failure is an :class:`InputError` whose message starts with the item ("scan.png: file is empty"), so
a batch can report it in one line and go on. Pillow's decoders raise many exception types on malformed
files; they are all caught at this one boundary and named as corrupt data.
"""
from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError, TransientInputError
from .quiet import warnings_ignored

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

#: Largest image accepted, in pixels. Real MRI slices are under 1 Mpx; a 50 Mpx 16-bit image already needs
#: ~600 MB once converted to float, most of a small board's memory. Guards against decompression bombs.
MAX_PIXELS = 50_000_000
#: Smallest side accepted: below this there is no anatomy to classify, only a thumbnail or a mistake.
MIN_SIDE = 16
#: File suffixes a directory walk picks up (DICOM files without a suffix are found by their magic).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")

_DICOM_MAGIC_OFFSET = 128


def describe(source: object) -> str:
    """How an item is named in messages and results: its path, or a placeholder for in-memory data."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(source, Image.Image):
        return "<PIL image>"
    return "<array>"


def decode(source: Source, *, frame: int = 0, window: tuple[float, float] | None = None,
           max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode one image (for DICOM, frame ``frame``) into a 2-D or H x W x 3 numpy array."""
    return decode_frames(source, frame=frame, window=window, max_pixels=max_pixels)[0][1]


def decode_frames(source: Source, *, frame: int | None = 0, window: tuple[float, float] | None = None,
                  max_pixels: int = MAX_PIXELS) -> list[tuple[str, np.ndarray]]:
    """Decode ``source`` into ``(suffix, image)`` pairs: one pair, or one per DICOM frame when ``frame`` is None.

    ``suffix`` is '' except for frames of a multi-frame DICOM ('[frame 3]'). ``frame`` and ``window``
    (centre, width) only matter for DICOM; other formats have a single image and no window.
    """
    name = describe(source)
    if name == "" and isinstance(source, (str, os.PathLike)):
        # Path("") is the current directory; an empty name is a caller's mistake, not a folder to read.
        raise InputError("'': empty path (no file named)")
    try:
        if isinstance(source, np.ndarray):
            return [("", _check_array(_from_array(source)))]
        if isinstance(source, Image.Image):
            return [("", _check_array(_from_pil(_load(source, max_pixels))))]
        if isinstance(source, (bytes, bytearray, memoryview)):
            return _decode_bytes(bytes(source), frame, window, max_pixels)
        if isinstance(source, (str, os.PathLike)):
            return _decode_path(Path(source), frame, window, max_pixels)
    except InputError as exc:
        message = str(exc)
        raise type(exc)(message if message.startswith(name + ":") else f"{name}: {message}") from None
    raise InputError(f"{name}: cannot classify a {type(source).__name__}; give a path, bytes, PIL image or array")


def _decode_path(path: Path, frame: int | None, window: tuple[float, float] | None,
                 max_pixels: int) -> list[tuple[str, np.ndarray]]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError("no such file") from None
    except PermissionError:
        raise TransientInputError("permission denied") from None
    except OSError as exc:
        raise TransientInputError(f"cannot access the file ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError("is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError("not a regular file (a pipe, socket or device)")
    if st.st_size == 0:
        raise InputError("file is empty (0 bytes)")
    from . import dicom

    if dicom.is_dicom(path):
        return [(suffix, _check_array(image)) for suffix, image in dicom.read_frames(path, frame, window)]
    try:
        fh = path.open("rb")
    except PermissionError:
        raise TransientInputError("permission denied") from None
    except OSError as exc:
        raise TransientInputError(f"cannot read the file ({exc.strerror or exc})") from None
    with fh:
        try:
            return [("", _check_array(_from_pil(_open(fh, max_pixels))))]
        except OSError as exc:
            if exc.errno is not None:  # the system failed to read (a failing disk, a share gone): may pass
                raise TransientInputError(f"cannot read the file ({exc.strerror or exc})") from None
            # Pillow's own OSErrors (no errno) are about the data: the file's fault
            raise InputError(f"truncated or corrupt image data ({_first_line(exc)})") from None


def _decode_bytes(data: bytes, frame: int | None, window: tuple[float, float] | None,
                  max_pixels: int) -> list[tuple[str, np.ndarray]]:
    if not data:
        raise InputError("no data (0 bytes)")
    if data[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM":
        # Read from memory (pydicom seeks in a file object as in a file): in-memory data never touches disk.
        from . import dicom

        frames = dicom.read_frames(io.BytesIO(data), frame, window)
        return [(suffix, _check_array(image)) for suffix, image in frames]
    return [("", _check_array(_from_pil(_open(io.BytesIO(data), max_pixels))))]


def _open(fh: BinaryIO, max_pixels: int) -> Image.Image:
    """Open and fully decode an image file object, refusing oversized and malformed images."""
    # Pillow's warnings (a decompression-bomb size between its limit and twice that, for which the size check
    # below is the real guard; a malformed EXIF or MPO block) are noise to a user and would print two lines.
    with warnings_ignored():
        try:
            img = Image.open(fh)
        except Image.DecompressionBombError as exc:
            raise InputError(f"refused as a possible decompression bomb ({exc})") from None
        except UnidentifiedImageError:
            raise InputError("not a recognised image (expected JPEG, PNG, BMP, TIFF or DICOM)") from None
    return _load(img, max_pixels)


def _load(img: Image.Image, max_pixels: int) -> Image.Image:
    """Check the size from the header, decode the pixels, and apply the EXIF orientation."""
    width, height = img.size
    if width * height > max_pixels:
        raise InputError(f"image is {width}x{height} = {width * height / 1e6:.0f} Mpx, over the "
                         f"{max_pixels / 1e6:.0f} Mpx limit (refused as a possible decompression bomb)")
    if min(width, height) < MIN_SIDE:
        raise InputError(f"image is {width}x{height} px; at least {MIN_SIDE}x{MIN_SIDE} is needed")
    try:
        with warnings_ignored():
            img.load()
    except OSError as exc:
        raise InputError(f"truncated or corrupt image data ({_first_line(exc)})") from None
    except Exception as exc:  # Pillow's decoders raise SyntaxError, ValueError, struct.error, ... on bad data
        raise InputError(f"corrupt image data ({type(exc).__name__}: {_first_line(exc)})") from None
    try:
        with warnings_ignored():  # "Corrupt EXIF data": only the orientation hint is lost
            return ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block only loses the orientation hint, not the scan
        return img


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _from_pil(img: Image.Image) -> np.ndarray:
    """Convert by mode, keeping the full depth of 16-bit and float grayscale for the contrast stretch."""
    mode = img.mode
    if mode in ("1", "L"):
        return np.asarray(img.convert("L"))
    if mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)
    if mode == "I":
        return np.asarray(img, dtype=np.int32)
    if mode == "F":
        return np.asarray(img, dtype=np.float32)
    if mode in ("LA", "La"):
        return _over_black(np.asarray(img.convert("LA")))
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        return _over_black(np.asarray(img.convert("RGBA")))
    if mode == "RGB":
        return np.asarray(img)
    try:
        return np.asarray(img.convert("RGB"))  # P, CMYK, YCbCr, LAB, HSV, RGBX
    except (ValueError, OSError) as exc:
        raise InputError(f"unsupported image mode {mode!r} ({_first_line(exc)})") from None


def _over_black(a: np.ndarray) -> np.ndarray:
    """Composite colour+alpha over black: transparent areas are outside the scan, and scans are black there."""
    colour, alpha = a[..., :-1], a[..., -1:]
    if np.issubdtype(a.dtype, np.integer):
        top = float(np.iinfo(a.dtype).max)
        out = colour.astype(np.float32) * (alpha.astype(np.float32) / top)
        out = np.clip(out + 0.5, 0, top).astype(a.dtype)
    else:
        out = colour * np.clip(alpha, 0.0, 1.0)
    return out[..., 0] if out.shape[-1] == 1 else out


def _from_array(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    if a.dtype.kind not in "uif":
        raise InputError(f"array of dtype {a.dtype} is not an image")
    if a.ndim == 3 and a.shape[2] in (2, 4):
        a = _over_black(a)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise InputError(f"array of shape {a.shape} is not an image (expected H x W or H x W x 1/2/3/4)")
    return a


def _check_array(a: np.ndarray) -> np.ndarray:
    height, width = a.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise InputError(f"image is {width}x{height} px; at least {MIN_SIDE}x{MIN_SIDE} is needed")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise InputError("image has non-finite (NaN or infinite) pixel values")
    return a
