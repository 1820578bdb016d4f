"""edge-evaluate external validation (--sets / --folder) end to end, with the real bundled int8 model.

The layouts are built here from the real Kaggle training slices the repo ships (tests/data/mri_sample), arranged
the way external collections arrive: a tumour-only folder, a healthy folder, and a folder mapped by sub-folder
prefix. Every rate is checked against an independent pass of edge.Classifier over the same files.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from convert import metrics
from convert.evaluate_cli import main
from convert.external_sets import load_spec, list_set, match_prefix

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "tests" / "data" / "mri_sample"
SHARED = REPO.parent / "shared" / "data"
SPEC = REPO / "data" / "external_sets.json"
MAPPED = {"Astro": "glioma", "Menin": "meningioma", "_NORMAL": "healthy", "Other": "tumour"}
NAMES = {"tumour": "M tumours", "healthy": "M normals", "glioma": "M glioma", "meningioma": "M meningioma"}


def sample(label: str) -> list[Path]:
    return sorted((SAMPLE / label).glob("*.jpg"))


def copy(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, folder / f.name)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/{tumours, healthy, mapped/<prefix> <seq>, oneoff}, Testing/<class>/, a dedup list and a spec."""
    base = tmp_path_factory.mktemp("external")
    root = base / "root"
    copy(sample("glioma")[:2] + sample("meningioma")[:2] + sample("pituitary")[:2], root / "tumours")
    good = sample("glioma")[0].read_bytes()
    (root / "tumours" / "zz_truncated.jpg").write_bytes(good[: len(good) // 3])
    copy(sample("notumor")[:4], root / "healthy")
    copy(sample("glioma")[2:5], root / "mapped" / "Astro T1")
    copy(sample("glioma")[5:8], root / "mapped" / "Astro T2")
    copy(sample("meningioma")[2:5], root / "mapped" / "Menin T1")
    copy(sample("notumor")[4:7], root / "mapped" / "_NORMAL T2")
    copy(sample("pituitary")[2:5], root / "mapped" / "Other T2")
    copy(sample("meningioma")[5:8], base / "oneoff")
    for label in ("glioma", "meningioma", "notumor", "pituitary"):
        copy(sample(label)[6:8], base / "Testing" / label)
    keep = [f"Testing/{label}/{sample(label)[7].name}" for label in ("glioma", "meningioma", "notumor", "pituitary")]
    (base / "dedup.json").write_text(json.dumps({"threshold": 4, "dedup_test": keep}))
    spec = {"root": "root", "sets": [
        {"name": "T only", "source": "Clinic A", "path": "tumours", "expect": "tumour"},
        {"name": "H only", "source": "Clinic A", "path": "healthy", "expect": "healthy"},
        {"name": "M", "source": "Clinic B", "path": "mapped", "expect": MAPPED, "names": NAMES},
    ]}
    (base / "sets.json").write_text(json.dumps(spec))
    return base


@pytest.fixture(scope="module")
def truth(bundled_model: Path, layout: Path) -> dict[str, str]:
    """Predicted label of every image, straight from edge.Classifier (the independent pass)."""
    from edge import Classifier

    clf = Classifier(model=bundled_model, threads=1)
    return {p.name + "@" + p.parent.name: clf.classify(p).label
            for p in sorted(layout.rglob("*.jpg")) if p.name != "zz_truncated.jpg"}


def expected_row(truth: dict[str, str], files: list[tuple[str, str]], hit) -> tuple[int, int]:
    labels = [truth[f"{name}@{folder}"] for name, folder in files]
    return sum(map(hit, labels)), len(labels)


def files_in(layout: Path, *folders: str) -> list[tuple[str, str]]:
    return [(p.name, p.parent.name) for f in folders for p in sorted((layout / f).glob("*.jpg"))
            if p.name != "zz_truncated.jpg"]


def by_name(rows: list[dict], **match) -> dict:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, rows)
    return found[0]


def test_sets_folder_and_test_split_through_the_cli(bundled_model: Path, layout: Path, truth: dict[str, str],
                                                    tmp_path: Path):
    out = tmp_path / "report"
    res = CliRunner().invoke(main, [str(bundled_model), str(layout / "Testing"), "--dedup", str(layout / "dedup.json"),
                                    "--sets", str(layout / "sets.json"), "--folder", f"{layout / 'oneoff'}=meningioma",
                                    "--threads", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "T only" in warnings[0] and "zz_truncated.jpg" in warnings[0]
    for name in ("external.json", "external.md", "external.png", "metrics.json", "confusion_dedup.png"):
        assert (out / name).is_file(), name
    with Image.open(out / "external.png") as png:
        assert png.format == "PNG" and png.size[1] > 300
    result = json.loads((out / "external.json").read_text())
    rows = result["rows"]

    tumour = lambda label: label != "notumor"  # noqa: E731
    cases = [  # (row name, measure, files, hit)
        ("T only", "tumour found", files_in(layout, "root/tumours"), tumour),
        ("H only", "healthy spared", files_in(layout, "root/healthy"), lambda label: label == "notumor"),
        ("M tumours", "tumour found", files_in(layout, *(f"root/mapped/{f}" for f in
                                                         ("Astro T1", "Astro T2", "Menin T1", "Other T2"))), tumour),
        ("M normals", "healthy spared", files_in(layout, "root/mapped/_NORMAL T2"), lambda label: label == "notumor"),
        ("M glioma right class", "right class", files_in(layout, "root/mapped/Astro T1", "root/mapped/Astro T2"),
         lambda label: label == "glioma"),
        ("M meningioma right class", "right class", files_in(layout, "root/mapped/Menin T1"),
         lambda label: label == "meningioma"),
        (f"{layout / 'oneoff'} right class", "right class", files_in(layout, "oneoff"),
         lambda label: label == "meningioma"),
    ]
    for name, measure, files, hit in cases:
        row = by_name(rows, name=name, measure=measure)
        assert (row["k"], row["n"]) == expected_row(truth, files, hit), name
        assert row["ci95"] == pytest.approx(list(metrics.wilson_interval(row["k"], row["n"])), abs=1e-6)
        assert f"| {name} |" in (out / "external.md").read_text()
    assert by_name(rows, name="T only")["n"] == 6  # the truncated file is left out, not counted as a miss
    assert by_name(rows, name=str(layout / "oneoff"), measure="tumour found")["source"] == "command line"

    # Test split: raw accuracy over 8 images, de-duplicated over the 4 listed, same predictions.
    test_files = files_in(layout, *(f"Testing/{c}" for c in ("glioma", "meningioma", "notumor", "pituitary")))
    k = sum(truth[f"{n}@{f}"] == f for n, f in test_files)
    assert (by_name(rows, name="Test split (raw)", measure="accuracy")["k"], len(test_files)) == (k, 8)
    dedup = by_name(rows, name="Test split (de-duplicated)", measure="accuracy")
    assert dedup["n"] == 4 and dedup["k"] == sum(truth[f"{n}@{f}"] == f for n, f in test_files[1::2])

    # Per source: Clinic A pools its two sets; per variant: the mapped set by sequence.
    assert by_name(result["sources"], source="Clinic A", measure="tumour found")["n"] == 6
    assert by_name(result["sources"], source="Clinic A", measure="healthy spared")["n"] == 4
    assert by_name(result["variants"], name="M tumours", variant="T1")["n"] == 6
    assert by_name(result["variants"], name="M tumours", variant="T2")["n"] == 6
    assert result["model"]["sha256"] == hashlib.sha256(bundled_model.read_bytes()).hexdigest()
    assert result["model"]["sha256"] in (out / "external.md").read_text()

    # Threshold-free: every tumour group against every healthy group, the AUC recomputed from the predictions.
    # Groups carry the set's own row names (the mapped set "M" has "M tumours" and "M normals").
    tumour_groups = {"Test split (raw)", "T only", "M tumours", str(layout / "oneoff")}
    healthy_groups = {"Test split (raw)", "H only", "M normals"}
    sep = result["separation"]
    assert {(r["tumours"], r["healthy"]) for r in sep} == {(t, h) for t in tumour_groups for h in healthy_groups}
    row = by_name(sep, tumours="M tumours", healthy="H only")
    pos = [1 - q["probabilities"][2] for q in result["predictions"] if q["set"] == "M" and q["expected"] != "healthy"]
    neg = [1 - q["probabilities"][2] for q in result["predictions"] if q["set"] == "H only"]
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg]
    assert (row["n_tumours"], row["n_healthy"]) == (len(pos), len(neg)) == (12, 4)
    assert row["auc"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)
    assert row["ci95"][0] <= row["auc"] <= row["ci95"][1]
    cuts = sorted(set(pos + neg)) + [2.0]
    assert row["balanced"] == pytest.approx(max(min(sum(p >= c for p in pos) / len(pos), sum(n < c for n in neg) / len(neg))
                                                for c in cuts), abs=1e-6)
    assert "(ROC AUC)" in (out / "external.md").read_text()

    # Within one variant: only the mapped set's T2 has both tumours (Astro T2, Other T2) and normals (_NORMAL T2).
    (within,) = result["separation_by_variant"]
    assert (within["set"], within["variant"], within["tumours"], within["healthy"]) == ("M", "T2", "M tumours", "M normals")
    t2 = [q for q in result["predictions"] if q["set"] == "M" and q["variant"] == "T2"]
    pos = [1 - q["probabilities"][2] for q in t2 if q["expected"] != "healthy"]
    neg = [1 - q["probabilities"][2] for q in t2 if q["expected"] == "healthy"]
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg]
    assert (within["n_tumours"], within["n_healthy"]) == (6, 3)
    assert within["auc"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)
    assert "within one variant" in (out / "external.md").read_text()


def test_json_and_limit(bundled_model: Path, layout: Path):
    res = CliRunner().invoke(main, [str(bundled_model), "--sets", str(layout / "sets.json"), "--limit", "1", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["test"] is None and result["limit"] == 1
    assert {s["name"]: s["images"] for s in result["sets"]} == {"T only": 1, "H only": 1, "M": 5}
    assert by_name(result["rows"], name="M tumours")["n"] == 4  # one per mapped tumour sub-folder


def test_recorded_command_is_the_real_one(bundled_model: Path, layout: Path, tmp_path: Path):
    """The console script records its own command line (the report says how to redo it)."""
    args = [str(bundled_model), "--folder", f"{layout / 'root' / 'healthy'}=healthy", "--threads", "1", "--json"]
    proc = subprocess.run([sys.executable, "-c", "import sys; from convert.evaluate_cli import main; "
                           "sys.argv[0] = 'edge-evaluate'; main()", *args], capture_output=True, text=True,
                          cwd=tmp_path, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["command"] == "edge-evaluate " + " ".join(args) and result["cwd"] == str(tmp_path)
    assert [r["measure"] for r in result["rows"]] == ["healthy spared"]


def test_keras_model_runs_the_same_sets(layout: Path, tmp_path: Path):
    """A Keras model (carrying its metadata) goes through the same preparation; predictions match a hand pass."""
    import keras

    from convert.external import run_external
    from convert.keras_io import save_model
    from edge.preprocess import prepare

    labels = ["glioma", "meningioma", "notumor", "pituitary"]
    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 1))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(6, 3, activation="relu")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))
    path = save_model(model, tmp_path / "t.keras", {"name": "t", "labels": labels, "input_size": 32, "channels": 1,
                                                     "pipeline": "mri-crop-v1", "preprocess": "tf"})
    result = run_external(path, load_spec(layout / "sets.json"))
    assert result["model"]["format"] == "keras"
    loaded = keras.models.load_model(path, compile=False)
    grays = [np.asarray(Image.open(q["path"]).convert("L")) for q in result["predictions"]]
    x = (np.stack([prepare(g, 32, 1, "mri-crop-v1") for g in grays]).astype(np.float32) - 127.5) / 127.5
    by_hand = [labels[k] for k in np.argmax(loaded.predict_on_batch(x), axis=1)]
    assert [q["predicted"] for q in result["predictions"]] == by_hand
    assert by_name(result["rows"], name="M tumours")["n"] == 12


@pytest.mark.parametrize("case", ["unmatched-subfolder", "bad-expectation", "missing-key", "not-json",
                                  "folder-syntax", "no-folder", "dedup-without-dir"])
def test_unusable_inputs_are_one_line_errors(case: str, bundled_model: Path, layout: Path, tmp_path: Path):
    spec = json.loads((layout / "sets.json").read_text())
    spec["root"] = str(layout / "root")
    args: list[str] = []
    if case == "unmatched-subfolder":
        shutil.copytree(layout / "root" / "mapped", tmp_path / "mapped")
        (tmp_path / "mapped" / "Glioma T1").mkdir()
        spec["sets"][2]["path"] = str(tmp_path / "mapped")
        expected = "sub-folder 'Glioma T1' matches no prefix"
    elif case == "bad-expectation":
        spec["sets"][0]["expect"] = "astrocytoma"
        expected = "'astrocytoma' is not an expectation (tumour, healthy, glioma, meningioma, pituitary)"
    elif case == "missing-key":
        del spec["sets"][1]["source"]
        expected = "set 2 (H only) lacks source"
    elif case == "folder-syntax":
        args = ["--folder", str(layout / "oneoff")]
        expected = "expected PATH=EXPECT"
    elif case == "no-folder":
        args = ["--folder", f"{tmp_path / 'absent'}=tumour"]
        expected = "absent: not a directory"
    elif case == "dedup-without-dir":
        args = ["--dedup", str(layout / "dedup.json")]
        expected = "--dedup needs the test split folder DIR"
    file = tmp_path / "sets.json"
    file.write_text("{not json" if case == "not-json" else json.dumps(spec))
    expected = "cannot read the set spec" if case == "not-json" else expected
    if not args or case == "dedup-without-dir":
        args += ["--sets", str(file)]
    res = CliRunner().invoke(main, [str(bundled_model), *args])
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-evaluate: error: ") and expected in lines[0], res.stderr


@pytest.mark.parametrize("args, expected", [([], "give DIR"), (["--root", "."], "--root needs --sets")])
def test_usage_errors(bundled_model: Path, args: list[str], expected: str):
    res = CliRunner().invoke(main, [str(bundled_model), *args])
    assert res.exit_code == 2 and expected in res.stderr


def test_prefixes_match_whole_words_longest_first():
    mapping = {"Glio": "glioma", "Glioblastoma": "glioma", "_NORMAL": "healthy"}
    assert match_prefix("Glioblastoma T1C+", mapping) == "Glioblastoma"
    assert match_prefix("Glio T2", mapping) == "Glio"
    assert match_prefix("_NORMAL", mapping) == "_NORMAL"
    assert match_prefix("Gliosis T1", mapping) is None


@pytest.fixture(scope="module")
def shared_sets() -> Path:
    if not (SHARED / "external-dev").is_dir() or not (SHARED / "ixi-healthy" / "dev").is_dir():
        pytest.skip(f"external validation data not present at {SHARED}")
    return SHARED


def test_committed_spec_lists_the_shared_sets(shared_sets: Path):
    """data/external_sets.json finds ../shared/data by itself and maps every 44-class folder as documented."""
    counts = {}
    for spec in load_spec(SPEC):
        items = list_set(spec)
        counts[spec.name] = {e: sum(it.expect == e for it in items) for e in {it.expect for it in items}}
    assert counts == {"Br35H tumours": {"tumour": 217}, "LGG FLAIR": {"glioma": 407},
                      "LGG post-contrast": {"glioma": 407}, "IXI dev healthy": {"healthy": 561},
                      "44-class": {"glioma": 420, "meningioma": 285, "tumour": 598, "healthy": 155}}


def test_committed_spec_row_names_on_shared_data(bundled_model: Path, shared_sets: Path):
    res = CliRunner().invoke(main, [str(bundled_model), "--sets", str(SPEC), "--limit", "1", "--json"])
    assert res.exit_code == 0, res.output
    names = [r["name"] for r in json.loads(res.stdout)["rows"]]
    for name in ("Br35H tumours", "LGG FLAIR", "LGG post-contrast", "44-class tumours (all 14 types)",
                 "44-class normals", "IXI dev healthy", "44-class glioma family right class",
                 "44-class meningioma right class", "LGG post-contrast right class"):
        assert name in names
