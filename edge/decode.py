"""Anything a caller may hold (path, bytes, PIL image, numpy array) -> a numpy image `edge.preprocess` accepts.

Scans arrive in many shapes: 8- and 16-bit grayscale PNG/TIFF exports, RGB JPEGs, palette and CMYK files,
images with an alpha channel, phone photos of a screen with an EXIF rotation, and DICOM. Every one of them
becomes a 2-D (grayscale, full bit depth kept) or H x W x 3 (RGB) array here, so preprocessing has one job.

Every failure is an :class:`InputError` whose message starts with the item ("scan.png: file is empty"), so
a batch can report it in one line and go on. Pillow's decoders raise many exception types on malformed
files; they are all caught at this one boundary and named as corrupt data.

Memory is bounded whatever the file: an image over `edge.reduce.WORK_PIXELS` is reduced by a whole factor
while it is decoded, before any float conversion. JPEG is decoded reduced by libjpeg itself (Pillow's
``draft``); uncompressed TIFF and BMP are read from the file a band of rows at a time; every other format
(PNG, compressed TIFF, GIF, WebP) is decoded whole in Pillow's own pixel format, within ``MAX_DECODED_BYTES``,
and reduced band by band; numpy arrays are reduced band by band. The EXIF orientation is applied to the
result, so it never costs a full-size copy.
"""
from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import reduce
from .errors import InputError, TransientInputError
from .quiet import warnings_ignored

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]


class Frame(NamedTuple):
    """One decoded image, with what its file says it shows.

    ``modality`` and ``body_part`` are the DICOM header's Modality and Body Part Examined (None when the
    file is not DICOM or leaves them empty): a header that says CT, or ABDOMEN, tells the input gate
    (`edge.gate.check_header`) more surely than any pixel statistic that the scan is not a brain MRI.
    """

    suffix: str  # '' except for frames of a multi-frame DICOM: '[frame 3]'
    image: np.ndarray
    modality: str | None = None
    body_part: str | None = None


#: Largest image accepted, in pixels. Real MRI slices are under 1 Mpx; a 50 Mpx 16-bit image already needs
#: ~600 MB once converted to float, most of a small board's memory. Guards against decompression bombs.
MAX_PIXELS = 50_000_000
#: Smallest side accepted: below this there is no anatomy to classify, only a thumbnail or a mistake.
MIN_SIDE = 16
#: Largest buffer an image over `edge.reduce.WORK_PIXELS` may need to be decoded whole, in bytes as Pillow
#: stores pixels (1 a pixel for 8-bit grayscale or palette, 2 for 16-bit grayscale, 4 for anything else).
#: Formats that cannot be decoded reduced (PNG, compressed TIFF, GIF, WebP) must fit in it, so that a run
#: stays within 250 MB and 3 s: a 7070 x 7070 16-bit PNG (95 MiB) is accepted, a 7070 x 7070 RGB PNG
#: (191 MiB) is refused, RGB up to 5120 x 5120. JPEG, uncompressed TIFF and BMP never need the buffer and
#: are limited by MAX_PIXELS only.
MAX_DECODED_BYTES = 100 * 2**20
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
                  max_pixels: int = MAX_PIXELS) -> list[Frame]:
    """Every frame `iter_decoded` yields, as a list."""
    return list(iter_decoded(source, frame=frame, window=window, max_pixels=max_pixels))


def iter_decoded(source: Source, *, frame: int | None = 0, window: tuple[float, float] | None = None,
                 max_pixels: int = MAX_PIXELS) -> Iterator[Frame]:
    """Decode ``source`` into frames (:class:`Frame`): one, or one per DICOM frame when ``frame`` is None.

    ``frame`` and ``window``
    (centre, width) only matter for DICOM; other formats have a single image and no window. Frames come one
    at a time (`edge.dicom.iter_frames`), so memory does not grow with a file's frame count.
    """
    name = describe(source)
    if name == "" and isinstance(source, (str, os.PathLike)):
        # Path("") is the current directory; an empty name is a caller's mistake, not a folder to read.
        raise InputError("'': empty path (no file named)")
    try:
        if isinstance(source, np.ndarray):
            yield Frame("", _from_ndarray(source))
        elif isinstance(source, Image.Image):
            yield Frame("", _from_image(source, max_pixels, own=False))
        elif isinstance(source, (bytes, bytearray, memoryview)):
            yield from _decode_bytes(bytes(source), frame, window, max_pixels)
        elif isinstance(source, (str, os.PathLike)):
            yield from _decode_path(Path(source), frame, window, max_pixels)
        else:
            raise InputError(f"cannot classify a {type(source).__name__}; give a path, bytes, PIL image or array")
    except InputError as exc:
        message = str(exc)
        raise type(exc)(message if message.startswith(name + ":") else f"{name}: {message}") from None


def _decode_path(path: Path, frame: int | None, window: tuple[float, float] | None,
                 max_pixels: int) -> Iterator[Frame]:
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
        for decoded in dicom.iter_frames(path, frame, window, max_pixels):
            yield decoded._replace(image=_check_decoded(decoded.image))
        return
    try:
        fh = path.open("rb")
    except PermissionError:
        raise TransientInputError("permission denied") from None
    except OSError as exc:
        raise TransientInputError(f"cannot read the file ({exc.strerror or exc})") from None
    with fh:
        try:
            image = _open(fh, max_pixels)
        except OSError as exc:
            if exc.errno is not None:  # the system failed to read (a failing disk, a share gone): may pass
                raise TransientInputError(f"cannot read the file ({exc.strerror or exc})") from None
            # Pillow's own OSErrors (no errno) are about the data: the file's fault
            raise InputError(f"truncated or corrupt image data ({_first_line(exc)})") from None
    yield Frame("", image)


def _decode_bytes(data: bytes, frame: int | None, window: tuple[float, float] | None,
                  max_pixels: int) -> Iterator[Frame]:
    if not data:
        raise InputError("no data (0 bytes)")
    if data[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM":
        # Read from memory (pydicom seeks in a file object as in a file): in-memory data never touches disk.
        from . import dicom

        for decoded in dicom.iter_frames(io.BytesIO(data), frame, window, max_pixels):
            yield decoded._replace(image=_check_decoded(decoded.image))
        return
    yield Frame("", _open(io.BytesIO(data), max_pixels))


def _open(fh: BinaryIO, max_pixels: int) -> np.ndarray:
    """Open and decode an image file object, refusing oversized and malformed images."""
    # Pillow's warnings (a decompression-bomb size between its limit and twice that, for which the size check
    # below is the real guard; a malformed EXIF or MPO block) are noise to a user and would print two lines.
    with warnings_ignored():
        try:
            img = Image.open(fh)
        except Image.DecompressionBombError as exc:
            raise InputError(f"refused as a possible decompression bomb ({exc})") from None
        except UnidentifiedImageError:
            raise InputError("not a recognised image (expected JPEG, PNG, BMP, TIFF or DICOM)") from None
    return _from_image(img, max_pixels, own=True)


def check_size(width: int, height: int, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> None:
    """Refuse an image by its header size: over ``max_pixels`` (a possible decompression bomb) or too small."""
    if width * height > max_pixels:
        raise InputError(f"image is {width}x{height} = {width * height / 1e6:.0f} Mpx, over the "
                         f"{max_pixels / 1e6:.0f} Mpx limit (refused as a possible decompression bomb)")
    if min(width, height) < min_side:
        raise InputError(f"image is {width}x{height} px; at least {MIN_SIDE}x{MIN_SIDE} is needed")


def _from_image(img: Image.Image, max_pixels: int, own: bool) -> np.ndarray:
    """Check the size from the header, decode the pixels (reduced when very large), apply the EXIF orientation.

    ``own``: the image was opened here from a file, so it may be decoded reduced (JPEG) or read from its file
    in bands; a caller's image is never changed or read behind its back, only reduced once decoded.
    """
    width, height = img.size
    check_size(width, height, max_pixels)
    k = reduce.factor(width, height)
    try:
        with warnings_ignored():
            if k > 1 and own and img.format in ("JPEG", "MPO"):
                # libjpeg scales by 1/2, 1/4 or 1/8 while it decodes: the full-size image never exists
                img.draft(None, (max(1, width // k), max(1, height // k)))
                k = reduce.factor(*img.size)
            strips = _raw_strips(img) if k > 1 and own else None
            if strips is not None:
                pixels = reduce.reduce_bands(_strip_bands(img, strips, reduce.band_rows(width, k)), k)
            else:
                if k > 1 and getattr(img, "tile", None):  # not decoded yet, and it will be decoded whole
                    _check_decoded_bytes(img)
                img.load()
                pixels = _from_pil(img) if k == 1 else _reduce_image(img, k)
    except InputError:
        raise
    except OSError as exc:
        raise InputError(f"truncated or corrupt image data ({_first_line(exc)})") from None
    except Exception as exc:  # Pillow's decoders raise SyntaxError, ValueError, struct.error, ... on bad data
        raise InputError(f"corrupt image data ({type(exc).__name__}: {_first_line(exc)})") from None
    return _check_finite(_orient(pixels, _orientation(img)))


def _check_decoded_bytes(img: Image.Image) -> None:
    width, height = img.size
    mode = img.mode
    need = width * height * (1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4)
    if need > MAX_DECODED_BYTES:
        raise InputError(f"image is {width}x{height} px ({mode} {img.format or 'image'}), which is decoded whole: "
                         f"{need / 2**20:.1f} MiB, over the {MAX_DECODED_BYTES / 2**20:.0f} MiB limit for formats "
                         "that cannot be decoded reduced (JPEG, uncompressed TIFF and BMP can)")


#: One strip of an uncompressed image: first row, end row, file offset, Pillow raw mode, bytes a row, row order.
_Strip = tuple[int, int, int, str, int, int]


def _raw_strips(img: Image.Image) -> list[_Strip] | None:
    """The strips of an image stored uncompressed in full-width strips from the top (TIFF, BMP), which can be
    read from its file a band of rows at a time; None for any other layout (compressed, tiled, palette)."""
    if img.mode in ("P", "PA") or getattr(img, "fp", None) is None:
        return None
    strips: list[_Strip] = []
    for name, (x0, y0, x1, y1), offset, args in getattr(img, "tile", None) or ():
        if name != "raw" or x0 != 0 or x1 != img.size[0] or y0 != (strips[-1][1] if strips else 0):
            return None
        rawmode, stride, order = (args, 0, 1) if isinstance(args, str) else (tuple(args) + (0, 1))[:3]
        stride = stride or _tiff_row_bytes(img)
        if not stride or order not in (1, -1):
            return None
        strips.append((y0, y1, offset, rawmode, stride, order))
    return strips if strips and strips[-1][1] == img.size[1] else None


def _tiff_row_bytes(img: Image.Image) -> int:
    """Bytes a row of an uncompressed, interleaved TIFF (rows end on a whole byte); 0 for anything else."""
    tags = getattr(img, "tag_v2", None)
    if img.format != "TIFF" or tags is None or tags.get(284, 1) != 1:  # 284: PlanarConfiguration
        return 0
    bits = tuple(tags.get(258, (1,)))  # BitsPerSample, one value or one per sample
    samples = int(tags.get(277, len(bits)))  # SamplesPerPixel
    return (img.size[0] * sum(bits * samples if len(bits) == 1 else bits) + 7) // 8


def _strip_bands(img: Image.Image, strips: list[_Strip], rows: int) -> Iterator[np.ndarray]:
    """The image as arrays of at most ``rows`` rows, top to bottom, each read from the file and unpacked by
    Pillow's raw decoder on its own."""
    fp, width = img.fp, img.size[0]
    for y0, y1, offset, rawmode, stride, order in strips:
        for y in range(y0, y1, rows):
            n = min(rows, y1 - y)
            fp.seek(offset + (y - y0 if order == 1 else y1 - y - n) * stride)  # bottom-up: the last row first
            data = fp.read(n * stride)
            try:
                band = Image.frombytes(img.mode, (width, n), data, "raw", rawmode, stride, order)
            except ValueError as exc:
                raise InputError(f"truncated or corrupt image data ({_first_line(exc)})") from None
            yield _from_pil(band)


def _reduce_image(img: Image.Image, k: int) -> np.ndarray:
    """A decoded Pillow image averaged over k x k blocks without a full-size copy: by Pillow's own reduce (C,
    three times faster than numpy) for the modes it averages correctly, else a band of rows at a time."""
    if img.mode in ("L", "RGB", "I", "F"):
        return _from_pil(img.reduce(k))
    width, height = img.size
    rows = reduce.band_rows(width, k)
    crops = (img.crop((0, y, width, min(height, y + rows))) for y in range(0, height, rows))
    if img.mode.startswith("I;16"):  # Pillow reduces 16-bit grayscale once widened to 32 bits, a band at a time
        return np.concatenate([np.asarray(band.convert("I").reduce(k), np.int32) for band in crops]).astype(np.uint16)
    return reduce.reduce_bands((_from_pil(band) for band in crops), k)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) the image should be shown with, 1 when it has none."""
    try:
        with warnings_ignored():  # "Corrupt EXIF data": only the orientation hint is lost
            return int(img.getexif().get(0x0112, 1))
    except Exception:  # a malformed EXIF block only loses the orientation hint, not the scan
        return 1


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """``a`` turned as Pillow's ImageOps.exif_transpose turns an image with this EXIF orientation."""
    turn = {2: lambda x: x[:, ::-1], 3: lambda x: x[::-1, ::-1], 4: lambda x: x[::-1],
            5: lambda x: x.swapaxes(0, 1), 6: lambda x: np.rot90(x, -1),
            7: lambda x: x[::-1, ::-1].swapaxes(0, 1), 8: lambda x: np.rot90(x, 1)}.get(orientation)
    return a if turn is None else np.ascontiguousarray(turn(a))


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


def _from_ndarray(a: np.ndarray) -> np.ndarray:
    """A caller's array as an image, reduced band by band when it is over `edge.reduce.WORK_PIXELS`."""
    height, width = a.shape[:2] if a.ndim in (2, 3) else (0, 0)
    k = reduce.factor(width, height)
    if k == 1:
        return _check_decoded(_from_array(a))
    check_size(width, height, max_pixels=width * height)
    rows = reduce.band_rows(width, k)
    return _check_finite(reduce.reduce_bands((_from_array(a[y:y + rows]) for y in range(0, height, rows)), k))


def _check_decoded(a: np.ndarray) -> np.ndarray:
    """An image decoded elsewhere (an array, a DICOM frame: no pixel limit here) checked for size and values."""
    height, width = a.shape[:2]
    check_size(width, height, max_pixels=width * height)
    return _check_finite(a)


def _check_finite(a: np.ndarray) -> np.ndarray:
    """Refuse NaN or infinite pixels (a reduced image keeps them: a block with one is NaN or infinite)."""
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise InputError("image has non-finite (NaN or infinite) pixel values")
    return a
