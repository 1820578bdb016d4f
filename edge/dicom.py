"""DICOM scans -> display-ready 2-D float32 images, without ever letting patient data out.

Why this exists rather than `pydicom.dcmread(...).pixel_array`: a raw pixel array is not what a
radiologist (or a model trained on exported JPEGs) sees. The stored values first go through the
Modality LUT (rescale slope/intercept, e.g. to Hounsfield units), then through the VOI LUT (the window a
technologist chose), and MONOCHROME1 images are displayed inverted. Doing the same here makes a DICOM
slice look like the JPEG export the model was trained on.

Output images are float32 in [0, 255] (the range of the 8-bit exports the models were trained on) so
`edge.preprocess.prepare` treats them like any decoded JPEG.

Privacy: nothing that leaves this module (arrays, frame suffixes, exception messages, log records) carries
patient data. Exception messages are written here; the few that quote pydicom have every text value of
the file's identifying elements scrubbed out first, and pydicom's own warnings/log records (which quote
raw element values, e.g. an invalid birth date) are silenced while a file is read. The one identifier
offered is the SOP Instance UID, through `sop_instance_uid`, for callers that opt in.

pydicom (>= 3) is imported lazily so the runtime installs and runs without it; `pip install
"edge-mri[dicom]"` adds it together with pylibjpeg and its libjpeg plugin, which decode what Pillow cannot:
JPEG Lossless, 12-bit JPEG Extended and JPEG-LS.
"""
from __future__ import annotations

import contextlib
import logging
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from . import reduce
from .errors import DicomError, MissingDecoderError, TransientInputError, install_hint

if TYPE_CHECKING:
    from .decode import Frame

SUFFIXES = (".dcm", ".dicom")
_MAGIC_OFFSET = 128
_MAGIC = b"DICM"
#: How the raster formats Pillow reads begin (PNG, JPEG, BMP, GIF, little/big-endian TIFF, WebP). A file
#: without the DICOM preamble starts with a tag's group number instead, e.g. 08 00 for (0008,xxxx).
_RASTER_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"GIF8", b"II*\x00", b"MM\x00*", b"RIFF")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
#: Defined terms that may be echoed in messages; any other value of a coded element is not repeated,
#: since a corrupt file can hold anything (a name) where a code should be.
_PHOTOMETRIC_TERMS = ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "HSV", "ARGB", "CMYK", "YBR_PARTIAL_422",
                      "XYB", *_COLOUR)
#: Text VRs whose values may identify a person, an institution or a study; scrubbed from quoted messages.
_TEXT_VRS = {"PN", "LO", "SH", "DA", "DT", "TM", "AS", "ST", "LT", "UT", "UC", "AE"}
#: Quoted pydicom messages are cut to this length: one readable line, not a dump.
_MAX_QUOTE = 160
#: Element values larger than this are not read with the header (pydicom's ``defer_size``): the pixel data
#: is read frame by frame from the file instead (`_decode`), so a file's frame count never sets the memory.
DEFER_BYTES = 256 * 2**10
_QUIET_LOCK = threading.RLock()


def is_dicom(path: Path) -> bool:
    """True when the content says DICOM: the 'DICM' magic at byte 128, or a DICOM suffix on a file that
    does not start like a raster image.

    The suffix counts because files without the 128-byte preamble (older or hand-made exports) are still
    DICOM and `read_frames` can read most of them; but it is only a name, so a PNG or JPEG saved as
    ``.dcm`` is decoded as what it is. Only regular files are opened (a FIFO would block the read).
    """
    path = Path(path)
    named = path.suffix.lower() in SUFFIXES
    try:
        if not path.is_file():
            return named
        with path.open("rb") as fh:
            head = fh.read(_MAGIC_OFFSET + len(_MAGIC))
    except OSError:
        return named
    if head[_MAGIC_OFFSET:] == _MAGIC:
        return True
    return named and not head.startswith(_RASTER_MAGIC)


def sop_instance_uid(path: Path) -> str | None:
    """The SOP Instance UID (the only identifier the runtime ever reports), or None when absent."""
    pydicom = _pydicom()
    with _quiet(), _no_context():
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPInstanceUID"], force=True)
            uid = ds.get("SOPInstanceUID")
        except FileNotFoundError:
            raise DicomError("file not found") from None
        except PermissionError:
            raise TransientInputError("permission denied") from None
        except Exception as exc:  # pydicom raises many types for corrupt headers
            raise DicomError(f"unreadable DICOM header ({type(exc).__name__})") from None
    return str(uid) if uid else None


def read_frames(
    path: Path | BinaryIO, frame: int | None = 0, window: tuple[float, float] | None = None,
    max_pixels: int | None = None,
) -> list[Frame]:
    """Every frame `iter_frames` yields, as a list: for one frame, or for callers that need them all at once."""
    return list(iter_frames(path, frame, window, max_pixels))


def iter_frames(
    path: Path | BinaryIO, frame: int | None = 0, window: tuple[float, float] | None = None,
    max_pixels: int | None = None,
) -> Iterator[Frame]:
    """Decode one frame (default the first) or every frame (`frame=None`) of a DICOM file, or of a seekable
    binary file object holding one (an upload kept in memory, so that nothing is written to disk).

    Yields `edge.decode.Frame` tuples: suffix is '' for a single-frame file and '[frame N]' (N from 0, the
    same numbering as `frame`) for a multi-frame one; image is 2-D float32 in [0, 255], display-ready;
    modality and body part as the header gives them (upper case, None when absent or empty).
    `window=(centre, width)` overrides the file's window (linear VOI function, in rescaled units such as
    Hounsfield units); it applies to grayscale images only.

    Memory: a frame over ``max_pixels`` (default `edge.decode.MAX_PIXELS`) is refused from the header; the
    pixel data is never read whole, only each frame's bytes (pydicom reads them from the file, or from the
    file object, by the offsets the header gives); a frame over `edge.reduce.WORK_PIXELS`
    is reduced in its stored type, band by band, before it is converted to float; a compressed frame must
    decode within `edge.decode.MAX_DECODED_BYTES`. Frames are decoded one at a time and yielded as they are,
    so a consumer that lets each go before the next holds one frame whatever the file's frame count. An
    error in a later frame is raised when that frame is reached, after the earlier ones were yielded.
    """
    # pydicom converts element values lazily and warns with the raw value on bad ones, so every access to
    # the dataset, not only the read, happens with its warnings and log records silenced; never across a
    # yield, which would silence the consumer's code too.
    from .decode import Frame

    source = path if hasattr(path, "read") else Path(path)
    with _quiet(), _no_context():
        ds, indices, single = _open_frames(source, frame, window)
        modality, body_part = _coded(ds, "Modality"), _coded(ds, "BodyPartExamined")
    for index in indices:
        with _quiet(), _no_context():
            try:
                raw = _reduced(_decode(ds, source, index, max_pixels), ds)
            except DicomError as exc:  # after frames that were fine: say which one is not
                if index == indices[0]:
                    raise
                raise type(exc)(f"frame {index}: {exc}") from None
            image = _display(raw, ds, index, window)
        del raw
        yield Frame("" if single else f"[frame {index}]", image, modality, body_part)


def _open_frames(path: Path | BinaryIO, frame: int | None,
                 window: tuple[float, float] | None) -> tuple[Any, Sequence[int], bool]:
    """(dataset, frame indices to decode, whether the file has one frame), checking the request first."""
    ds = _read_dataset(path)
    count = _frame_count(ds)
    if frame is not None and not 0 <= frame < count:
        raise DicomError(f"frame {frame} out of range (the file has {count} frame{'s' if count != 1 else ''})")
    if window is not None and window[1] <= 0:
        raise DicomError(f"window width must be positive, got {window[1]:g}")
    return ds, (range(count) if frame is None else [frame]), count == 1


def _pydicom() -> Any:
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401  (pydicom >= 3)
    except ImportError:
        raise MissingDecoderError(f"reading DICOM needs pydicom >= 3; {install_hint('dicom')}") from None
    return pydicom


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence pydicom's warnings and log records: they quote raw element values (patient data).

    `warnings.catch_warnings` swaps process-wide state, so two threads overlapping here could restore
    each other's filters and let a warning through mid-read; the lock serialises DICOM reads instead.
    """
    log = logging.getLogger("pydicom")
    drop = _DropAll()
    with _QUIET_LOCK:
        log.addFilter(drop)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            log.removeFilter(drop)


@contextlib.contextmanager
def _no_context() -> Iterator[None]:
    """Detach the pydicom exception a DicomError was raised from: its message may quote patient data,
    and `raise ... from None` only hides it from tracebacks while keeping it on `__context__`."""
    try:
        yield
    except DicomError as exc:
        exc.__context__ = None
        raise


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _read_dataset(path: Path | BinaryIO) -> Any:
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    source = str(path) if isinstance(path, Path) else path
    try:
        try:
            ds = pydicom.dcmread(source, defer_size=DEFER_BYTES)
        except InvalidDicomError:
            # No preamble/'DICM' (older exports): parse anyway, then insist on pixel data below.
            if not isinstance(source, str):
                source.seek(0)
            ds = pydicom.dcmread(source, defer_size=DEFER_BYTES, force=True)
    except FileNotFoundError:
        raise DicomError("file not found") from None
    except IsADirectoryError:
        raise DicomError("is a directory, not a DICOM file") from None
    except PermissionError:
        raise TransientInputError("permission denied") from None
    except Exception as exc:  # truncated/corrupt headers surface as EOFError, ValueError, struct.error...
        raise DicomError(f"unreadable DICOM header, truncated or corrupt ({type(exc).__name__})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DicomError("no pixel data: not a DICOM image (e.g. a report, RT plan or directory file)")
    if "TransferSyntaxUID" not in ds.file_meta:
        # Meta-less files: pydicom knows the encoding it actually parsed, which is the transfer syntax.
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return ds


def _coded(ds: Any, keyword: str) -> str | None:
    """A coded string element (Modality, Body Part Examined) in upper case, or None when absent or empty.
    These carry defined terms, not patient data; a value that is not a short code is dropped, since a
    corrupt file can hold anything there."""
    value = str(ds.get(keyword) or "").strip().upper()
    return value if value and len(value) <= 16 and re.fullmatch(r"[A-Z0-9 _]+", value) else None


def _frame_count(ds: Any) -> int:
    try:
        count = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise DicomError("invalid (0028,0008) Number of Frames") from None
    if count < 1:
        raise DicomError(f"invalid (0028,0008) Number of Frames ({count})")
    return count


def _decode(ds: Any, source: Path | BinaryIO, frame: int, max_pixels: int | None) -> np.ndarray:
    """Decode one frame of the pixel data, reading only that frame's bytes from ``source`` (the file ``ds`` was
    read from), turning every failure into a DicomError; refuse a frame too large by its header first.

    The frame comes from the file, not from ``ds``, because a dataset decodes from its whole pixel data
    element, which it would first read into memory: all frames, for one. The transfer syntax is passed in,
    since a file without a meta header (older exports) only has the one `_read_dataset` worked out. Files
    pydicom cannot read frame by frame (`_frames_readable_from_file`), or whose frame its reader refuses,
    are decoded from the dataset, which reads their whole pixel data: the exception, not the rule."""
    from pydicom.pixels import get_decoder, pixel_array

    uid = ds.file_meta.TransferSyntaxUID
    # A corrupt file meta may hold any text where the UID belongs, so even the UID is scrubbed.
    syntax = _scrub(f"{uid.name} ({uid})" if uid.name != str(uid) else f"({uid})", ds)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise DicomError(f"transfer syntax {syntax} is not supported") from None
    if not decoder.is_available:
        raise MissingDecoderError(f"transfer syntax {syntax} needs a decoder that is not installed "
                                  f"({_install_hint(decoder)})")
    big = _check_frame_size(ds, decoder.is_encapsulated, max_pixels)
    from_file = _frames_readable_from_file(ds, uid)
    if from_file and not decoder.is_encapsulated:
        _check_native_length(ds, source)
    # Uncompressed: a read-only view on the frame's bytes (pydicom otherwise copies them to make the array
    # writeable), unless pydicom must clear the bits above Bits Stored, which it does on a full-size copy; a
    # frame that will be reduced gets them cleared band by band in `_reduced` instead.
    options = {} if decoder.is_encapsulated else {"view_only": True, "correct_unused_bits": not big}
    try:
        if from_file:
            try:
                return pixel_array(str(source) if isinstance(source, Path) else source, index=frame,
                                   transfer_syntax_uid=uid, **options)
            except Exception:  # noqa: BLE001 - the frame reader is stricter than dcmread on some exports
                pass  # (pydicom's own SC_rgb_jpeg.dcm); the dataset decodes them, or says what is wrong
        return pixel_array(ds, index=frame, **options)
    except ValueError as exc:
        raise DicomError(f"pixel data is truncated or corrupt: {_quote(exc, ds)}") from None
    except Exception as exc:
        if decoder.is_encapsulated:
            hint = _install_hint(decoder)
            raise DicomError(f"cannot decode transfer syntax {syntax}: {_quote(exc, ds)}"
                             + (f" (another decoder may: {hint})" if decoder.missing_dependencies else "")) from None
        raise DicomError(f"pixel data is unreadable: {_quote(exc, ds)}") from None


def _frames_readable_from_file(ds: Any, uid: Any) -> bool:
    """Whether pydicom can read one frame straight from the file: not when the whole dataset is deflated
    (zlib over every element, nothing to seek to), nor when the elements are encoded otherwise than the
    transfer syntax says (an export that writes implicit VR under an explicit-VR syntax: `dcmread` notices
    and adapts, the frame reader parses by the syntax and fails)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    if uid == DeflatedExplicitVRLittleEndian:
        return False
    return tuple(ds.original_encoding) == (uid.is_implicit_VR, uid.is_little_endian)


#: The pixel data elements, in the order pydicom looks for them.
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


def _check_native_length(ds: Any, source: Path | BinaryIO) -> None:
    """Refuse uncompressed pixel data shorter than its header says (a cut copy, a broken export).

    pydicom checks this when it decodes from a dataset, but not when it reads one frame from the file, where
    it returns whatever bytes follow; so the element's length, and the bytes the file really has after the
    element's start, are compared with what Rows, Columns, Samples, Bits Allocated and the frame count need.
    """
    raw = next((ds.get_item(tag, keep_deferred=True) for tag in _PIXEL_TAGS if tag in ds), None)
    geometry = _geometry(ds)
    if geometry is None or raw is None or getattr(raw, "value_tell", None) is None:
        return
    rows, cols, samples, bits = geometry
    pixels = rows * cols * samples * _frame_count(ds)
    need = -(-pixels // 8) if bits == 1 else pixels * -(-bits // 8)
    if isinstance(source, Path):
        size = source.stat().st_size
    else:
        at = source.tell()
        size = source.seek(0, 2)
        source.seek(at)
    have = min(int(raw.length), size - int(raw.value_tell))
    if have < need:
        raise DicomError(f"pixel data is truncated or corrupt: {max(have, 0):,} of the {need:,} bytes its "
                         "header describes")


def _geometry(ds: Any) -> tuple[int, int, int, int] | None:
    """(Rows, Columns, Samples per Pixel, Bits Allocated) from the header, or None when one is missing or
    invalid: the checks before decoding then stand aside, and pydicom names the element when it decodes."""
    try:
        return (int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel") or 1), int(ds.BitsAllocated))
    except (AttributeError, TypeError, ValueError):
        return None


def _check_frame_size(ds: Any, compressed: bool, max_pixels: int | None) -> bool:
    """The pixel limits of every other format, from the header; a compressed frame is decoded whole, so it must
    also fit `edge.decode.MAX_DECODED_BYTES`. True when the frame will be reduced."""
    from .decode import MAX_DECODED_BYTES, MAX_PIXELS, check_size

    geometry = _geometry(ds)
    if geometry is None:
        return False
    rows, cols, samples, bits = geometry
    check_size(cols, rows, MAX_PIXELS if max_pixels is None else max_pixels, min_side=1)
    need = rows * cols * samples * -(-bits // 8)
    if compressed and rows * cols > reduce.WORK_PIXELS and need > MAX_DECODED_BYTES:
        raise DicomError(f"a compressed {cols}x{rows} frame is decoded whole: {need / 2**20:.1f} MiB, over the "
                         f"{MAX_DECODED_BYTES / 2**20:.0f} MiB limit")
    return reduce.factor(cols, rows) > 1


def _reduced(raw: np.ndarray, ds: Any) -> np.ndarray:
    """A frame over `edge.reduce.WORK_PIXELS` averaged down in its stored type before anything makes it float;
    palette indices are sampled instead, since the mean of two indices is a third colour."""
    rows, cols = raw.shape[:2]
    k = reduce.factor(cols, rows)
    if k == 1:
        return raw
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "PALETTE COLOR":
        return np.ascontiguousarray(raw[::k, ::k])
    step = reduce.band_rows(cols, k)
    return reduce.reduce_bands((_used_bits(raw[y:y + step], ds) for y in range(0, rows, step)), k)


def _used_bits(band: np.ndarray, ds: Any) -> np.ndarray:
    """Stored integer values with the bits above (0028,0101) Bits Stored cleared, or sign-extended when signed
    (what pydicom does to a whole frame, here a band at a time); values already so are unchanged."""
    try:
        stored = int(ds.BitsStored)
    except (AttributeError, TypeError, ValueError):
        return band
    container = band.dtype.itemsize * 8
    if band.dtype.kind not in "iu" or not 0 < stored < container:
        return band
    if band.dtype.kind == "i":
        shift = container - stored
        return (band << shift) >> shift
    return band & np.array((1 << stored) - 1, band.dtype)


def _install_hint(decoder: Any) -> str:
    """What to pip-install for this syntax, from pydicom's own list, preferring pylibjpeg (plain wheels)."""
    missing = list(decoder.missing_dependencies)
    chosen = next((m for m in missing if m.startswith("pylibjpeg")), missing[0] if missing else "")
    return "install " + chosen.partition("requires ")[2] if "requires " in chosen else "no decoder is known"


def _quote(exc: Exception, ds: Any) -> str:
    """First line of a pydicom message with every identifying text value of the file scrubbed out."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) or type(exc).__name__
    # pydicom appends guesses after " - " ("... - the dataset may be corrupted, ..."); the fact comes first.
    head = text.split(" - ", 1)[0]
    text = _scrub(head if len(head) >= 20 else text, ds)
    return text if len(text) <= _MAX_QUOTE else text[: _MAX_QUOTE - 3] + "..."


def _scrub(text: str, ds: Any) -> str:
    for value in _text_values(ds):
        text = text.replace(value, "<redacted>")
    return text


def _text_values(ds: Any) -> list[str]:
    """Every text value in the dataset (nested too, and each name component), longest first so that a
    substring cannot leave part of a longer value behind. Values under 3 characters are left out: they
    would blank out ordinary numbers in a message and identify no one on their own."""
    values: set[str] = set()

    from pydicom.datadict import dictionary_VR

    def vr_of(raw: Any) -> str:
        if raw.VR:
            return str(raw.VR)
        try:
            return dictionary_VR(raw.tag)
        except KeyError:  # a private or unknown tag of an implicit-VR file: pydicom reads it as UN too
            return "UN"

    def visit(d: Any) -> None:
        # get_item(keep_deferred=True) leaves a raw element unconverted and a deferred value (the pixel data)
        # unread; only text and sequence elements are then converted
        for tag in list(d.keys()):
            raw = d.get_item(tag, keep_deferred=True)
            vr = vr_of(raw)
            if vr != "SQ" and vr not in _TEXT_VRS:
                continue
            elem = d[raw.tag]
            if elem.VR == "SQ":
                for item in elem.value or ():
                    visit(item)
            elif elem.VR in _TEXT_VRS and elem.tag.group not in (0x0002, 0x0028) and elem.value not in (None, ""):
                items = elem.value if elem.VM > 1 else [elem.value]
                for item in items:
                    for text in {str(item), *re.split(r"[\^=]", str(item))}:
                        if len(text.strip()) >= 3:
                            values.add(text.strip())

    visit(ds)
    return sorted(values, key=len, reverse=True)


def _display(raw: np.ndarray, ds: Any, index: int, window: tuple[float, float] | None) -> np.ndarray:
    """Stored values of one frame -> what a viewer shows, as float32 in [0, 255]."""
    from pydicom.pixels import apply_color_lut

    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        values = _modality(raw, ds, index)
        image = _voi(values, ds, index, window)
        if photometric == "MONOCHROME1":
            image = 255.0 - image
        return image.astype(np.float32)
    named = photometric if photometric in _PHOTOMETRIC_TERMS else "not a defined term"
    if window is not None:
        raise DicomError(f"a window applies to grayscale images only; this one is {named}")
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(raw, ds)
        except Exception as exc:
            raise DicomError(f"unreadable palette colour lookup table: {_quote(exc, ds)}") from None
        depth = 8 if rgb.dtype == np.uint8 else 16
        return _luma(rgb, depth)
    if photometric in _COLOUR and raw.ndim == 3 and raw.shape[-1] == 3:
        # pydicom has already converted YBR to RGB (its default), so only the bit depth is left.
        return _luma(raw, int(ds.get("BitsStored") or ds.BitsAllocated))
    raise DicomError(f"unsupported (0028,0004) Photometric Interpretation ({named if photometric else 'missing'})")


def _luma(rgb: np.ndarray, bits: int) -> np.ndarray:
    gray = rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(gray * (255.0 / (2**bits - 1)), 0.0, 255.0).astype(np.float32)


def _frame_item(ds: Any, index: int, sequence: str) -> Any | None:
    """An enhanced multi-frame functional group item for this frame (per-frame beats shared), if any."""
    for groups, position in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq and len(seq) > position and seq[position].get(sequence):
            return seq[position][sequence][0]
    return None


def _modality(raw: np.ndarray, ds: Any, index: int) -> np.ndarray:
    """Modality LUT / rescale: stored values -> physical units (Hounsfield units for CT)."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_modality_lut

    source = ds
    item = _frame_item(ds, index, "PixelValueTransformationSequence")
    if item is not None and "RescaleSlope" in item and "RescaleIntercept" in item:
        source = Dataset()
        source.RescaleSlope = item.RescaleSlope
        source.RescaleIntercept = item.RescaleIntercept
    try:
        values = apply_modality_lut(raw, source)
    except Exception as exc:
        raise DicomError(f"invalid modality LUT or rescale values: {_quote(exc, ds)}") from None
    return np.asarray(values, dtype=np.float64)


def _voi(values: np.ndarray, ds: Any, index: int, window: tuple[float, float] | None) -> np.ndarray:
    """VOI LUT: the override window, else the file's first window, else its VOI LUT table, else min-max."""
    if window is not None:
        return _window(values, float(window[0]), float(window[1]), "LINEAR")
    item = _frame_item(ds, index, "FrameVOILUTSequence") or ds
    if item.get("WindowCenter") is not None and item.get("WindowWidth") is not None:
        try:
            centre, width = (float(_first(item.WindowCenter)), float(_first(item.WindowWidth)))
        except (TypeError, ValueError):
            raise DicomError("invalid (0028,1050) Window Center or (0028,1051) Window Width") from None
        function = str(item.get("VOILUTFunction") or ds.get("VOILUTFunction") or "LINEAR").strip().upper()
        return _window(values, centre, width, function)
    if ds.get("VOILUTSequence"):
        return _voi_table(values, ds)
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 0:
        return np.zeros(values.shape, np.float64)
    return (values - lo) * (255.0 / (hi - lo))


def _first(value: Any) -> Any:
    """The first of a multi-valued element (DICOM allows several alternative windows)."""
    return value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value


def _window(x: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing onto [0, 255] (LINEAR, LINEAR_EXACT and SIGMOID)."""
    if function == "LINEAR":
        if width < 1:
            raise DicomError(f"window width must be >= 1 for a LINEAR window, got {width:g}")
        c, w = centre - 0.5, width - 1.0
        if w == 0:
            return np.where(x > c, 255.0, 0.0)
        return np.clip((x - c) / w + 0.5, 0.0, 1.0) * 255.0
    if width <= 0:
        raise DicomError(f"window width must be > 0, got {width:g}")
    if function == "LINEAR_EXACT":
        return np.clip((x - centre) / width + 0.5, 0.0, 1.0) * 255.0
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(np.clip(-4.0 * (x - centre) / width, -700, 700)))
    raise DicomError("unsupported (0028,1056) VOI LUT Function (not LINEAR, LINEAR_EXACT or SIGMOID)")


def _voi_table(values: np.ndarray, ds: Any) -> np.ndarray:
    """Apply the file's first VOI LUT table, scaled from its output bit depth to [0, 255]."""
    from pydicom.pixels import apply_voi

    try:
        out = apply_voi(values.round().astype(np.int64), ds, 0)
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    except Exception as exc:
        raise DicomError(f"invalid VOI LUT table: {_quote(exc, ds)}") from None
    return np.asarray(out, np.float64) * (255.0 / (2**bits - 1))
