"""Set-up as a newcomer meets it (issue 14, item 11): the README's commands work on Debian 12 / Pi OS
Bookworm (a venv first), CI runs exactly those commands, the build is a PEP 517 build that leaves nothing
in the checkout and ships every bundled file, install hints have one quoted spelling, and the Pi notes
say what pip really installs."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
#: Where users read install commands: the README, the device notes, the docs, and every message in code.
DOCS = [README, *sorted((REPO / "firmware_notes").glob("*.md")), *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "edge" / "models").glob("*.md"))]
CODE = sorted(p for package in ("edge", "convert", "benchmarks") for p in (REPO / package).rglob("*.py"))
#: What the package must carry beside its modules (setup.py's package_data).
BUNDLED = ["edge/models/*.tflite", "edge/models/*.md", "edge/samples/*", "edge/serve_page/*",
           "benchmarks/baselines/*"]


def setup_commands() -> list[str]:
    """The commands of the README's set-up block, exactly as .ci/run reads them."""
    section = README.read_text(encoding="utf-8").split("## Set-up", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_readme_starts_with_a_venv_and_tests_the_installed_package():
    first, second = setup_commands()
    assert first.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install . && "), first
    assert first.endswith("edge-classify edge/samples/")
    assert second == 'pip install ".[test]" && (cd tests && python -m pytest -q)', "tests run from tests/"


def test_ci_runs_the_readme_commands_read_from_the_readme():
    script = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "README.md" in script and 'eval "$command"' in script
    own = [line for line in script.splitlines() if re.match(r"\s*(pip|python3? -m (pip|venv|pytest)|pytest)\b", line)]
    assert own == [], f".ci/run installs or tests on its own, apart from the README: {own}"
    # its first part, up to the copy of the tree, then print what it would run (run from .ci/, as $0 is)
    done = subprocess.run(["bash", "-c", script.split("\nwork=", 1)[0] + '\nprintf "%s\\n" "$commands"'],
                          capture_output=True, text=True, cwd=REPO / ".ci", timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == setup_commands()


def test_pyproject_declares_the_setuptools_pep517_build():
    import tomllib

    build = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    assert "setuptools>=61" in build["requires"] and "wheel" in build["requires"]


def test_the_wheel_carries_every_bundled_file_and_the_build_leaves_nothing_behind(tmp_path: Path):
    """`pip wheel` (what `pip install .` runs) on a copy of the source, in pip's isolated build environment."""
    source = tmp_path / "edge-mri"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    for package in ("edge", "convert", "benchmarks"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    before = set(Path(tempfile.gettempdir()).glob("edge-mri-build-*"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", source],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in source.iterdir()) == sorted(["setup.py", "pyproject.toml", "README.md", "edge",
                                                               "convert", "benchmarks"]), "build/ or egg-info left"
    assert set(Path(tempfile.gettempdir()).glob("edge-mri-build-*")) <= before, "scratch folder not removed"
    (wheel,) = (tmp_path / "dist").glob("edge_mri-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(REPO).as_posix() for pattern in BUNDLED for p in REPO.glob(pattern) if p.is_file()}
    assert {"edge/models/custom-cnn.tflite", "edge/models/xception.tflite"} <= expected
    assert sorted(expected - names) == [], "files setup.py's package_data does not ship"


def test_the_installed_package_carries_every_bundled_file():
    """What the tests import is the installed package (tests/conftest.py sees to it), so a file that
    setup.py's package_data leaves out is missing here, not only in someone's wheel."""
    import benchmarks
    import edge

    roots = {"edge": Path(edge.__file__).resolve().parent, "benchmarks": Path(benchmarks.__file__).resolve().parent}
    missing = [rel for pattern in BUNDLED for p in REPO.glob(pattern) if p.is_file()
               for rel in [p.relative_to(REPO).as_posix()]
               if not (roots[rel.split("/", 1)[0]] / rel.split("/", 1)[1]).is_file()]
    assert missing == [], f"not in the package under test ({roots['edge'].parent})"


def test_tests_refuse_to_run_the_checkout_over_an_installed_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import sysconfig

    import conftest

    assert conftest._checkout_shadows_the_install() is None, "this run tests the package it should"
    purelib = tmp_path / "site-packages"
    (purelib / "edge").mkdir(parents=True)
    (purelib / "edge" / "__init__.py").write_text("")
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {"purelib": str(purelib)})
    problem = conftest._checkout_shadows_the_install()
    assert problem and f"installed in {purelib}" in problem and "cd tests && python -m pytest -q" in problem


def test_markers_are_registered_and_name_real_modules():
    import tomllib

    import conftest

    ini = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["pytest"]["ini_options"]
    assert {m.split(":")[0] for m in ini["markers"]} == {"device", "slow"} and "--strict-markers" in ini["addopts"]
    modules = {p.stem for p in (REPO / "tests").glob("test_*.py")}
    assert sorted((conftest.DEVICE_MODULES | conftest.SLOW_MODULES) - modules) == []
    assert not conftest.DEVICE_MODULES & conftest.SLOW_MODULES
    for test in conftest.SLOW_TESTS:
        name, function = test.split("::")
        assert f"def {function}(" in (REPO / "tests" / name).read_text(encoding="utf-8"), test


def _setup_kwargs(monkeypatch: pytest.MonkeyPatch) -> dict:
    import runpy

    setuptools = pytest.importorskip("setuptools")
    captured: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    runpy.run_path(str(REPO / "setup.py"))
    return captured


def _pip_installs(text: str) -> list[str]:
    """Every `pip install ...` command in a text, up to the end of its line, backtick or closing bracket."""
    return [m.group(0) for m in re.finditer(r"pip install [^`\n;)]*", text)]


def test_install_hints_are_quoted_and_name_real_extras(monkeypatch: pytest.MonkeyPatch):
    extras = set(_setup_kwargs(monkeypatch)["extras_require"])
    commands = [(path.relative_to(REPO).as_posix(), command) for path in DOCS + CODE
                for command in _pip_installs(path.read_text(encoding="utf-8"))]
    assert commands, "no install command found at all"
    unquoted = [(where, c) for where, c in commands for token in c.split()[2:]
                if "[" in token and not token.startswith(('"', "'", "{"))]
    assert unquoted == [], "zsh reads unquoted brackets as a file pattern"
    named = {extra for _, c in commands for group in re.findall(r"(?:edge-mri|\.whl|\.)\[([a-z0-9,]+)\]", c)
             for extra in group.split(",")}
    assert named and sorted(named - extras) == []


def test_the_runtime_names_the_extra_in_the_one_spelling(run_cli, bundled_model: Path, tmp_path: Path):
    """A DICOM file where pydicom is missing: the real CLI's message says how to add the extra."""
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    from edge.errors import install_hint

    scan = shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "mr.dcm")
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['pydicom'] = None\n")
    done = run_cli("--model", bundled_model, scan,
                   env={"PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))})
    assert done.returncode == 1
    assert install_hint("dicom") == 'pip install "edge-mri[dicom]"'
    assert f"reading DICOM needs pydicom >= 3; {install_hint('dicom')}" in done.stderr


def test_the_camera_extra_is_for_raspberry_pi_os_only(monkeypatch: pytest.MonkeyPatch):
    (requirement,) = _setup_kwargs(monkeypatch)["extras_require"]["camera"]
    assert requirement.startswith("picamera2") and "platform_system == 'Linux'" in requirement
    assert "aarch64" in requirement and "x86_64" not in requirement


def test_the_pi_notes_say_what_pip_installs_for_numpy():
    """LiteRT's ml_dtypes needs NumPy 2, so a venv gets NumPy 2 whatever apt has; numpy<2 cannot work."""
    needs = [r for r in metadata.requires("ml_dtypes") or [] if r.startswith("numpy") and "extra" not in r]
    assert any(re.fullmatch(r"numpy\s*>=\s*2(\.\d+)*", r.split(";")[0].strip()) for r in needs), needs
    assert "ml_dtypes" in " ".join(metadata.requires("ai-edge-litert") or [])
    notes = (REPO / "firmware_notes" / "raspberry_pi.md").read_text(encoding="utf-8")
    assert [c for c in _pip_installs(notes) if "numpy<2" in c] == [], "advice that ends in a pip conflict"
    assert "NumPy 2" in notes and "ml_dtypes" in notes
