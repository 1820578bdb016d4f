"""edge.dicom against pydicom's own test files and variants of them written here with pydicom.

Reference values come from pydicom itself (pixel_array, apply_windowing, apply_voi) so the checks compare
our display pipeline with an independent implementation, not with a copy of our own formula.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.pixels import apply_voi, apply_windowing  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import MPEG2MPML  # noqa: E402

from conftest import save_dicom  # noqa: E402
from edge.dicom import is_dicom, iter_frames, read_frames, sop_instance_uid  # noqa: E402
from edge.errors import DicomError, InputError  # noqa: E402

GOOD = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "CT_small.dcm"]
MR_VARIANTS = GOOD[:4]
#: Elements that identify a person; their values must never come out of edge.dicom.
PATIENT_KEYWORDS = [
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "OtherPatientIDs", "OtherPatientNames",
    "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName", "ReferringPhysicianName",
    "InstitutionName", "AccessionNumber", "OperatorsName", "PerformingPhysicianName",
]


def data(name: str) -> Path:
    path = get_testdata_file(name)
    assert path, f"pydicom test file {name} is missing from this pydicom install"
    return Path(path)


def variant(name: str, out: Path, **changes) -> Path:
    """Write a copy of a pydicom test file with some elements changed (None deletes)."""
    return save_dicom(pydicom.dcmread(data(name)), out, **changes)


def multiframe(out: Path, frames: list[np.ndarray], **changes) -> Path:
    """A multi-frame MR built from MR_small's header and the given int16 frames."""
    ds = pydicom.dcmread(data("MR_small.dcm"))
    ds.NumberOfFrames = len(frames)
    ds.PixelData = np.stack(frames).astype("<i2").tobytes()
    return save_dicom(ds, out, **changes)


def reference_window(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """pydicom's windowing, rescaled from its output range to [0, 255]."""
    out = apply_windowing(raw.astype(np.float64), ds)
    lo, hi = (-(2 ** (ds.BitsStored - 1)), 2 ** (ds.BitsStored - 1) - 1) if ds.PixelRepresentation else (
        0, 2**ds.BitsStored - 1)
    return (out - lo) / (hi - lo) * 255.0


def patient_strings(path: Path) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        values = [ds.get(keyword) for keyword in PATIENT_KEYWORDS]
    found = []
    for value in values:
        if value in (None, ""):
            continue
        for item in value if isinstance(value, pydicom.multival.MultiValue) else [value]:
            found.append(str(item))
            found.extend(part for part in str(item).split("^") if part)
    return [s for s in found if len(s) >= 3]


@pytest.mark.parametrize("name", GOOD)
def test_good_files_read_cleanly(name):
    frames = read_frames(data(name))
    assert len(frames) == 1
    suffix, image, *_ = frames[0]
    assert suffix == ""
    assert image.dtype == np.float32 and image.ndim == 2
    assert np.isfinite(image).all()
    assert image.min() >= 0 and image.max() <= 255
    assert image.std() > 10, "a display-ready image has contrast"


def test_every_encoding_of_the_same_mr_gives_the_same_image():
    first = read_frames(data(MR_VARIANTS[0]))[0][1]
    for name in MR_VARIANTS[1:]:
        np.testing.assert_array_equal(read_frames(data(name))[0][1], first, err_msg=name)


def test_file_window_matches_pydicom_windowing():
    ds = pydicom.dcmread(data("MR_small.dcm"))
    assert float(ds.WindowCenter) == 600 and float(ds.WindowWidth) == 1600
    expected = reference_window(ds.pixel_array, ds)
    np.testing.assert_allclose(read_frames(data("MR_small.dcm"))[0][1], expected, atol=1e-3)


def test_rescale_is_applied_before_the_window(tmp_path):
    """CT_small stores raw values with intercept -1024: a brain window in Hounsfield units must see HU."""
    ds = pydicom.dcmread(data("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.clip((hu - 39.5) / 79.0 + 0.5, 0, 1) * 255.0
    np.testing.assert_allclose(read_frames(data("CT_small.dcm"), window=(40, 80))[0][1], expected, atol=1e-3)
    shifted = variant("CT_small.dcm", tmp_path / "ct0.dcm", RescaleIntercept=0)
    assert not np.allclose(read_frames(shifted, window=(40, 80))[0][1], expected)


def test_without_a_window_the_full_range_is_shown():
    image = read_frames(data("CT_small.dcm"))[0][1]
    assert image.min() == 0 and image.max() == 255


def test_window_override_changes_the_output():
    default = read_frames(data("MR_small.dcm"))[0][1]
    narrow = read_frames(data("MR_small.dcm"), window=(600, 200))[0][1]
    assert not np.allclose(default, narrow)
    assert (narrow == 0).mean() > (default == 0).mean(), "a narrow window clips more pixels to black"
    same = read_frames(data("MR_small.dcm"), window=(600, 1600))[0][1]
    np.testing.assert_allclose(same, default, atol=1e-4)


@pytest.mark.parametrize("width", [0, -5])
def test_non_positive_window_width_is_rejected(width):
    with pytest.raises(DicomError, match="window width"):
        read_frames(data("MR_small.dcm"), window=(600, width))


def test_voi_lut_function_sigmoid_from_the_file(tmp_path):
    path = variant("MR_small.dcm", tmp_path / "sig.dcm", VOILUTFunction="SIGMOID")
    ds = pydicom.dcmread(path)
    expected = reference_window(ds.pixel_array, ds)
    np.testing.assert_allclose(read_frames(path)[0][1], expected, atol=1e-2)


def test_voi_lut_table_is_applied_when_there_is_no_window(tmp_path):
    ds = pydicom.dcmread(data("MR_small.dcm"))
    del ds.WindowCenter, ds.WindowWidth
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [256, 0, 8])
    item.add_new("LUTData", "US", list(range(255, -1, -1)))
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(tmp_path / "lut.dcm", enforce_file_format=True)
    expected = apply_voi(ds.pixel_array, pydicom.dcmread(tmp_path / "lut.dcm"), 0).astype(np.float64)
    image = read_frames(tmp_path / "lut.dcm")[0][1]
    np.testing.assert_allclose(image, expected, atol=1e-4)
    assert image.min() == 0, "bright MR values fall off the end of the inverting table"


def test_monochrome1_is_inverted(tmp_path):
    mono2 = read_frames(data("MR_small.dcm"))[0][1]
    mono1 = read_frames(variant("MR_small.dcm", tmp_path / "m1.dcm", PhotometricInterpretation="MONOCHROME1"))[0][1]
    np.testing.assert_allclose(mono1, 255.0 - mono2, atol=1e-4)


def test_rgb_dicom_becomes_gray():
    ds = pydicom.dcmread(data("SC_rgb_rle.dcm"))
    rgb = ds.pixel_array.astype(np.float64)
    expected = rgb @ np.array([0.299, 0.587, 0.114])
    (suffix, image, *_), = read_frames(data("SC_rgb_rle.dcm"))
    assert image.shape == rgb.shape[:2]
    np.testing.assert_allclose(image, expected, atol=1e-3)
    with pytest.raises(DicomError, match="grayscale"):
        read_frames(data("SC_rgb_rle.dcm"), window=(128, 256))


def test_ybr_jpeg_dicom_is_decoded_to_gray():
    (suffix, image, *_), = read_frames(data("SC_rgb_jpeg_dcmtk.dcm"))
    assert image.ndim == 2 and image.std() > 10


def test_multiframe_yields_every_frame_with_frame_none(tmp_path):
    base = pydicom.dcmread(data("MR_small.dcm")).pixel_array
    frames = [base, base // 2, base.T.copy()]
    path = multiframe(tmp_path / "multi.dcm", frames)
    out = read_frames(path, frame=None)
    assert [f.suffix for f in out] == ["[frame 0]", "[frame 1]", "[frame 2]"]
    for (suffix, image, *_), raw in zip(out, frames):
        single = variant("MR_small.dcm", tmp_path / "single.dcm", PixelData=raw.astype("<i2").tobytes())
        np.testing.assert_array_equal(image, read_frames(single)[0][1], err_msg=suffix)
    (suffix, image, *_), = read_frames(path, frame=2)
    assert suffix == "[frame 2]"
    np.testing.assert_array_equal(image, out[2][1])
    with pytest.raises(DicomError, match="out of range"):
        read_frames(path, frame=3)


def test_default_reads_only_the_first_frame_of_a_multiframe_file():
    out = read_frames(data("rtdose.dcm"))
    assert [f.suffix for f in out] == ["[frame 0]"]
    everything = read_frames(data("rtdose.dcm"), frame=None)
    assert len(everything) == int(pydicom.dcmread(data("rtdose.dcm")).NumberOfFrames) == 15
    assert len({f.image.tobytes() for f in everything}) > 1, "frames differ"


def test_multiframe_colour_file():
    out = read_frames(data("SC_rgb_rle_2frame.dcm"), frame=None)
    assert [f.suffix for f in out] == ["[frame 0]", "[frame 1]"]
    assert all(f.image.ndim == 2 for f in out)


def test_enhanced_multiframe_uses_per_frame_rescale_and_shared_window(tmp_path):
    """Enhanced MR keeps rescale and window in functional groups, not at the top level."""
    base = pydicom.dcmread(data("MR_small.dcm")).pixel_array

    def group(**values):
        item = Dataset()
        for keyword, value in values.items():
            setattr(item, keyword, value)
        return item

    shared = group(FrameVOILUTSequence=Sequence([group(WindowCenter=700, WindowWidth=900)]))
    per_frame = [group(PixelValueTransformationSequence=Sequence([group(RescaleSlope=1, RescaleIntercept=b)]))
                 for b in (0, 300)]
    path = multiframe(tmp_path / "enh.dcm", [base, base], SharedFunctionalGroupsSequence=Sequence([shared]),
                      PerFrameFunctionalGroupsSequence=Sequence(per_frame))
    out = read_frames(path, frame=None)
    for (_, image, *_), intercept in zip(out, (0, 300)):
        classic = variant("MR_small.dcm", tmp_path / "classic.dcm", RescaleSlope=1, RescaleIntercept=intercept,
                          WindowCenter=700, WindowWidth=900)
        np.testing.assert_allclose(image, read_frames(classic)[0][1], atol=1e-4)
    assert not np.allclose(out[0][1], out[1][1])


def test_truncated_file_fails_with_dicom_error():
    with pytest.raises(DicomError, match="truncated") as info:
        read_frames(data("MR_truncated.dcm"))
    assert isinstance(info.value, InputError)
    assert "\n" not in str(info.value)


def test_unsupported_transfer_syntax_is_named(tmp_path):
    ds = pydicom.dcmread(data("MR_small.dcm"))
    ds.PixelData = encapsulate([ds.PixelData])
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.save_as(tmp_path / "mpeg2.dcm", enforce_file_format=True)
    with pytest.raises(DicomError) as info:
        read_frames(tmp_path / "mpeg2.dcm")
    assert MPEG2MPML.name in str(info.value) and str(MPEG2MPML) in str(info.value)


#: Compressed files `.[dicom]` must decode (its pylibjpeg-libjpeg plugin), each with its uncompressed twin.
COMPRESSED = {"SC_rgb_jpeg_gdcm.dcm": "SC_rgb_rle.dcm",            # JPEG Lossless (process 14)
              "MR_small_jpeg_ls_lossless.dcm": "MR_small.dcm",     # JPEG-LS Lossless
              "JPGExtended.dcm": None}                             # 12-bit JPEG Extended (lossy: no twin)


def test_the_dicom_extra_declares_the_jpeg_plugin():
    from importlib.metadata import requires

    declared = [r for r in requires("edge-mri") or [] if 'extra == "dicom"' in r]
    assert any(r.startswith("pylibjpeg-libjpeg") for r in declared), declared


@pytest.mark.parametrize("name", COMPRESSED)
def test_jpeg_lossless_jpeg_ls_and_12_bit_jpeg_are_decoded(name):
    (suffix, image, *_), = read_frames(data(name))
    assert image.ndim == 2 and image.std() > 5
    if COMPRESSED[name] is not None:  # lossless: exactly the uncompressed file's display image
        np.testing.assert_allclose(image, read_frames(data(COMPRESSED[name]))[0][1], atol=1e-3)


def test_edge_classify_reads_the_compressed_files(run_cli, tiny_model_path):
    files = [data(name) for name in COMPRESSED]
    done = run_cli("--json", "--model", tiny_model_path, *files)
    assert done.returncode == 3, done.stderr  # 3: decoded, but JPGExtended is a 1024x256 nuclear medicine scan
    statuses = [(json.loads(line)["status"], json.loads(line)["reason"]) for line in done.stdout.splitlines()]
    assert statuses == [("ok", None), ("ok", None), ("refused", "other_modality")]
    assert done.stderr == ""


def test_a_missing_decoder_names_the_syntax_and_the_plugin(tmp_path):
    """HTJ2K needs pylibjpeg-openjpeg, which the extra does not install: the error says so, and is a
    MissingDecoderError, which a watch folder retries rather than records."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import HTJ2KLossless

    from edge.errors import MissingDecoderError, TransientInputError

    if get_decoder(HTJ2KLossless).is_available:
        pytest.skip("an HTJ2K decoder is installed here")
    ds = pydicom.dcmread(data("MR_small.dcm"))
    ds.PixelData = encapsulate([b"\xff\x4f" + bytes(64)])
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.save_as(tmp_path / "htj2k.dcm", enforce_file_format=True)
    with pytest.raises(MissingDecoderError, match=r"High-Throughput JPEG 2000.*needs a decoder that is not installed "
                                                  r"\(install pylibjpeg>=2\.0 and pylibjpeg-openjpeg") as info:
        read_frames(tmp_path / "htj2k.dcm")
    assert isinstance(info.value, TransientInputError) and isinstance(info.value, DicomError)


@pytest.mark.parametrize("name", ["rtplan.dcm", "no_meta.dcm"])
def test_files_without_pixel_data_are_refused(name):
    with pytest.raises(DicomError, match="no pixel data"):
        read_frames(data(name))


def test_garbage_and_missing_files(tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 128 + b"DICM" + os.urandom(64))
    with pytest.raises(DicomError):
        read_frames(junk)
    with pytest.raises(DicomError, match="not found"):
        read_frames(tmp_path / "absent.dcm")


def test_is_dicom(tmp_path):
    renamed = tmp_path / "scan.bin"
    renamed.write_bytes(data("MR_small.dcm").read_bytes())
    assert is_dicom(renamed)
    assert is_dicom(tmp_path / "named.DCM")
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)
    assert not is_dicom(png)
    assert not is_dicom(tmp_path / "absent.png")


def test_sop_instance_uid(tmp_path):
    expected = str(pydicom.dcmread(data("MR_small.dcm")).SOPInstanceUID)
    assert sop_instance_uid(data("MR_small.dcm")) == expected
    assert sop_instance_uid(variant("MR_small.dcm", tmp_path / "nouid.dcm", SOPInstanceUID=None)) is None


def leaky_file(kind: str, tmp_path: Path) -> Path:
    """MR_small carrying planted patient data where pydicom or an error message would repeat it.

    - 'truncated': an invalid birth date and short pixel data (an error raised with the header at hand);
    - 'frames': the patient ID stored in Number of Frames (pydicom warns quoting the bad value);
    - 'syntax': the patient's name where the transfer syntax UID belongs (the error names the syntax);
    - 'photometric': the patient ID as Photometric Interpretation (the error names the interpretation).
    Values are planted by patching the written bytes, as a corrupt file would hold them.
    """
    ds = pydicom.dcmread(data("MR_small.dcm"))
    ds.PatientName = "Secretname^Jane"
    ds.PatientID = "XQ-77"
    ds.PatientBirthDate = "19991231"
    ds.OtherPatientIDs = "OTHER-777"
    if kind == "truncated":
        ds.PixelData = ds.PixelData[:-64]
    if kind == "frames":
        ds.NumberOfFrames = "98765"
    if kind == "photometric":
        ds.PhotometricInterpretation = "MONOCHROME3"
    path = tmp_path / f"{kind}.dcm"
    ds.save_as(path, enforce_file_format=True)
    patch = {
        "truncated": (b"19991231", b"1999x231"),
        "frames": (b"98765", b"XQ-77"),
        "syntax": (b"1.2.840.10008.1.2.1\0", b"Secretname.Jane.1234"),
        "photometric": (b"MONOCHROME3", b"XQ-77XQ-77X"),
    }[kind]
    raw = path.read_bytes()
    assert raw.count(patch[0]) == 1
    path.write_bytes(raw.replace(*patch))
    return path


LEAKY = ["truncated", "frames", "syntax", "photometric"]
PRIVACY_FILES = GOOD + ["MR_truncated.dcm", "rtdose.dcm", "SC_rgb_rle_2frame.dcm", "MR_small_jpeg_ls_lossless.dcm"]


@pytest.mark.parametrize("name", PRIVACY_FILES + [f"leaky-{kind}" for kind in LEAKY])
def test_no_patient_data_comes_out(name, tmp_path, caplog, capfd):
    path = leaky_file(name[6:], tmp_path) if name.startswith("leaky-") else data(name)
    secrets = patient_strings(path)
    assert secrets, f"{name} should carry patient data for this test to mean anything"
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    capfd.readouterr()
    said = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for kwargs in ({"frame": None}, {"frame": 0, "window": (100, 200)}):
            try:
                said += [f.suffix for f in read_frames(path, **kwargs)]
            except DicomError as exc:
                said += [str(exc), repr(exc), repr(exc.__cause__), repr(exc.__context__)]
        said.append(sop_instance_uid(path) or "")
    said += [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    out, err = capfd.readouterr()
    said += [out, err]
    text = "\n".join(said)
    for secret in secrets:
        assert secret not in text, f"patient data {secret!r} leaked"


@pytest.mark.parametrize("kind, problem", [("truncated", "truncated"), ("frames", "Number of Frames"),
                                           ("syntax", "not supported"), ("photometric", "Photometric")])
def test_leaky_files_still_get_an_informative_error(kind, problem, tmp_path):
    with pytest.raises(DicomError, match=problem):
        read_frames(leaky_file(kind, tmp_path))


def test_missing_pydicom_is_a_clear_dicom_error():
    code = (
        "import sys; sys.modules['pydicom'] = None\n"
        "from pathlib import Path\n"
        "from edge.dicom import read_frames\n"
        "from edge.errors import DicomError\n"
        "try:\n"
        "    read_frames(Path('x.dcm'))\n"
        "except DicomError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 'pip install "edge-mri[dicom]"' in done.stdout


# --- through the real `edge-classify` command (a fresh interpreter, a real int8 model) ---------------------


def assert_no_patient_data(paths: list[Path], *texts: str) -> None:
    text = "\n".join(texts)
    for path in paths:
        for secret in patient_strings(path):
            assert secret not in text, f"patient data {secret!r} of {path.name} leaked"


def test_edge_classify_reads_good_dicom_files(run_cli, tiny_model_path, tmp_path):
    files = [data(name) for name in GOOD]
    overlays = tmp_path / "overlays"
    done = run_cli("--json", "--model", tiny_model_path, "--heatmap", overlays, *files)
    assert done.returncode == 3, "read, but the CT gets no verdict: " + done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["source"] for r in records] == [str(f) for f in files]
    *mr, ct = records
    assert all(r["status"] == "ok" and r["label"] in ("glioma", "meningioma", "notumor", "pituitary") for r in mr)
    assert (ct["status"], ct["reason"], ct["label"]) == ("refused", "other_modality", None), "CT_small.dcm"
    assert all("sop_instance_uid" not in r for r in records), "UIDs only with --keep-uids"
    names = sorted(p.name for p in overlays.iterdir())
    assert len(names) == len(files)
    assert_no_patient_data(files, done.stdout, done.stderr, "\n".join(names))


def test_edge_classify_reports_a_truncated_dicom_in_one_line(run_cli, tiny_model_path, tmp_path):
    bad, good = data("MR_truncated.dcm"), data("MR_small.dcm")
    leaky = [leaky_file(kind, tmp_path) for kind in LEAKY]
    done = run_cli("--json", "--model", tiny_model_path, bad, *leaky, good)
    assert done.returncode == 1
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 1 + len(leaky), done.stderr
    assert str(bad) in errors[0] and "truncated" in errors[0]
    assert "Traceback" not in done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    (record,) = [r for r in records if r["status"] == "ok"]
    assert record["source"] == str(good), "the rest of the batch is still classified"
    assert [r["source"] for r in records if r["status"] == "error"] == [str(bad), *map(str, leaky)]
    assert_no_patient_data([bad, good, *leaky], done.stdout, done.stderr)


def test_edge_classify_all_frames_with_uids_on_request(run_cli, tiny_model_path, tmp_path):
    base = pydicom.dcmread(data("MR_small.dcm")).pixel_array
    path = multiframe(tmp_path / "multi.dcm", [base, base // 2, base.T.copy()])
    uid = str(pydicom.dcmread(path).SOPInstanceUID)
    overlays = tmp_path / "overlays"
    done = run_cli("--json", "--model", tiny_model_path, "--frame", "all", "--keep-uids", "--heatmap", overlays,
                   "--window", "600,1200", path)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["frame"] for r in records] == ["[frame 0]", "[frame 1]", "[frame 2]"]
    assert {r["sop_instance_uid"] for r in records} == {uid}
    assert len(list(overlays.iterdir())) == 3
    without = run_cli("--json", "--model", tiny_model_path, "--frame", "all", path)
    assert without.returncode == 0 and uid not in without.stdout
    assert_no_patient_data([path], done.stdout, done.stderr, without.stdout,
                           "\n".join(p.name for p in overlays.iterdir()))


def test_concurrent_reads_stay_silent(tmp_path, capfd):
    """Reads from several threads (one classifier per thread) must not let each other's warnings out."""
    import threading

    path = leaky_file("frames", tmp_path)
    capfd.readouterr()
    errors = []

    def work():
        for _ in range(20):
            try:
                read_frames(path)
            except DicomError as exc:
                errors.append(str(exc))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    out, err = capfd.readouterr()
    assert len(errors) == 80
    assert not caught and "XQ-77" not in out + err


def test_frames_are_decoded_one_at_a_time_as_they_are_asked_for(tmp_path, monkeypatch):
    """`--frame all` on a file of many frames must hold one frame, not all of them."""
    import edge.dicom

    base = pydicom.dcmread(data("MR_small.dcm")).pixel_array
    path = multiframe(tmp_path / "multi.dcm", [base, base // 2, base.T.copy()])
    decoded: list[int] = []
    real = edge.dicom._decode
    monkeypatch.setattr(edge.dicom, "_decode",
                        lambda ds, src, index, limit: decoded.append(index) or real(ds, src, index, limit))
    frames = iter_frames(path, frame=None)
    assert decoded == []
    assert next(frames)[0] == "[frame 0]" and decoded == [0]
    assert next(frames)[0] == "[frame 1]" and decoded == [0, 1]


def test_one_frame_of_a_large_file_reads_that_frame_only(tmp_path):
    """A 64-frame 512x512 16-bit file holds 32 MiB of pixel data; the first frame is 0.5 MiB. Reading it, or
    every frame one after the other, must never hold the file's pixel data: Python's allocations (numpy's
    included, which tracemalloc sees) peak at a few frames' worth, not the whole element."""
    import tracemalloc

    frame = (np.arange(512 * 512, dtype=np.uint16).reshape(512, 512) % 4000)
    path = multiframe(tmp_path / "big.dcm", [frame] * 64, Rows=512, Columns=512)
    whole = 64 * frame.nbytes
    for request in (0, None):
        tracemalloc.start()
        try:
            for _, image, *_ in iter_frames(path, frame=request):
                assert image.shape == (512, 512)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < whole / 4, f"frame={request}: peak {peak / 2**20:.1f} MiB for a {whole / 2**20:.0f} MiB file"


def test_uncompressed_pixel_data_shorter_than_its_header_is_refused(tmp_path):
    ds = pydicom.dcmread(data("MR_small.dcm"))
    ds.PixelData = ds.PixelData[:-64]
    ds.save_as(tmp_path / "short.dcm", enforce_file_format=True)
    with pytest.raises(DicomError, match="truncated or corrupt: 8,128 of the 8,192 bytes"):
        read_frames(tmp_path / "short.dcm")


def bad_second_frame(out: Path) -> Path:
    """pydicom's two-frame RLE file with its second frame cut to 40 bytes: the first frame still decodes."""
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(data("SC_rgb_rle_2frame.dcm"))
    first, second = generate_frames(ds.PixelData, number_of_frames=2)
    ds.PixelData = encapsulate([first, second[:40]])
    ds.save_as(out, enforce_file_format=True)
    return out


def test_a_bad_later_frame_names_itself_after_the_good_ones(tmp_path):
    frames = iter_frames(bad_second_frame(tmp_path / "bad.dcm"), frame=None)
    suffix, image, *_ = next(frames)
    assert suffix == "[frame 0]" and image.shape == (100, 100)
    with pytest.raises(DicomError, match=r"^frame 1: cannot decode transfer syntax RLE Lossless"):
        next(frames)


def test_the_cli_keeps_the_good_frames_of_a_file_with_a_bad_one(tmp_path, bundled_model):
    """Records stream out frame by frame; the bad frame adds one error record and exit code 1."""
    path = bad_second_frame(tmp_path / "bad.dcm")
    done = subprocess.run([sys.executable, "-m", "edge.cli", "--json", "--frame", "all", "--model", str(bundled_model),
                           str(path)], capture_output=True, text=True, timeout=300)
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r.get("frame") for r in records[:1]] == ["[frame 0]"] and records[0]["status"] in ("ok", "refer", "refused")
    assert records[1]["status"] == "error" and f"{path}: frame 1: cannot decode" in records[1]["error"]
    assert len(records) == 2 and done.returncode == 1
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
