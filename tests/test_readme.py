"""The README's code is what a newcomer copies first: its Python blocks must run, its CLI flags must exist."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
FENCE = re.compile(r"^```(?P<lang>\w*)\n(?P<body>.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[str]:
    return [m["body"] for m in FENCE.finditer(README.read_text(encoding="utf-8")) if m["lang"] == lang]


def test_readme_has_python_blocks():
    assert blocks("python"), "the README's API section lost its code block"


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_block_runs(index: int, bundled_model: Path, sample_scans: list[Path], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch):
    """Run the block as written, in a folder holding the `scan.png` it names (a real sample scan)."""
    from PIL import Image

    Image.open(sample_scans[0]).save(tmp_path / "scan.png")
    monkeypatch.chdir(tmp_path)
    code = compile(blocks("python")[index], f"README.md python block {index + 1}", "exec")
    exec(code, {"__name__": "__readme__"})  # noqa: S102 - the point is to run the documented code


def test_readme_edge_classify_flags_exist(cli):
    helptext = cli("--help").stdout
    used = {flag for block in blocks("sh") for line in block.splitlines() if line.startswith("edge-classify")
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line.split("#")[0])}
    assert used, "the README's CLI examples lost their edge-classify lines"
    assert sorted(flag for flag in used if flag not in helptext) == []
