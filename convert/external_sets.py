"""External validation sets: which images to run, and what a model should say about each one.

Scans from other hospitals rarely come sorted into our four class folders: a collection may hold only tumours
of unknown type, only healthy brains, or folders named after tumour types we do not classify. A set therefore
states its expectation, per folder or per sub-folder, instead of relying on folder names matching labels:

- ``tumour``: some tumour, type unknown (scored as tumour found only);
- ``healthy``: no tumour (scored as healthy spared);
- a tumour class of the model (``glioma``): scored as tumour found and as right class;
- a map from sub-folder name prefix to one of the above: ``{"Astrocitoma": "glioma", "_NORMAL": "healthy"}``
  assigns ``Astrocitoma T1C+/``; the rest of the name (``T1C+``, e.g. the MRI sequence) is the image's variant,
  reported as a breakdown.

Sets are listed in a JSON spec (``data/external_sets.json``) or given one-off on the command line
(``--folder PATH=tumour``). Listing happens before any model is loaded, so a mistyped folder fails at once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from convert.dataset import images_under
from edge.decode import IMAGE_SUFFIXES

TUMOUR, HEALTHY = "tumour", "healthy"
#: Keys a set may have in a spec file; anything else is a typo that would silently change the report.
SET_KEYS = {"name", "source", "path", "expect", "names"}
#: Source named for a set given with --folder.
COMMAND_LINE = "command line"


@dataclass(frozen=True)
class SetSpec:
    """One external set: its report name, its source (for per-source pooling), folder and expectation."""

    name: str
    source: str
    path: Path
    expect: str | Mapping[str, str]
    #: Row names per expectation (``{"healthy": "44-class normals"}``); the set name where absent.
    names: Mapping[str, str] = field(default_factory=dict)

    def expectations(self) -> set[str]:
        """Every expectation this set can assign."""
        return {self.expect} if isinstance(self.expect, str) else set(self.expect.values())


@dataclass(frozen=True)
class Item:
    """One image of a set with its expectation and variant ('' for a plain folder)."""

    path: Path
    expect: str
    variant: str = ""


def load_spec(file: str | Path, root: str | Path | None = None) -> list[SetSpec]:
    """Read a set spec; set paths resolve against ``root``, else against the spec's own ``root`` (relative to
    the spec file), so the committed spec finds ``../shared/data`` from any working directory."""
    file = Path(file)
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{file}: cannot read the set spec ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("sets"), list) or not doc["sets"]:
        raise ValueError(f"{file}: not a set spec (needs a non-empty 'sets' list)")
    if root is None:
        root = file.parent / doc.get("root", ".")
    return [_parse_set(entry, Path(root), f"{file}: set {i + 1}") for i, entry in enumerate(doc["sets"])]


def _parse_set(entry: Any, root: Path, where: str) -> SetSpec:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with name, source, path, expect")
    missing = sorted({"name", "source", "path", "expect"} - entry.keys())
    unknown = sorted(entry.keys() - SET_KEYS)
    if missing or unknown:
        problem = f"lacks {', '.join(missing)}" if missing else f"has unknown key(s) {', '.join(unknown)}"
        raise ValueError(f"{where} ({entry.get('name', '?')}) {problem}")
    expect, names = entry["expect"], entry.get("names", {})
    if not (isinstance(expect, str) or (isinstance(expect, dict) and expect
                                        and all(isinstance(v, str) for v in expect.values()))):
        raise ValueError(f"{where} ({entry['name']}): 'expect' must be a string or a non-empty map of strings")
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise ValueError(f"{where} ({entry['name']}): 'names' must map expectations to row names")
    return SetSpec(name=str(entry["name"]), source=str(entry["source"]), path=root / entry["path"],
                   expect=expect, names=names)


def parse_folder(arg: str) -> SetSpec:
    """``PATH=EXPECT`` from the command line (a clinic's own folder); the set is named after PATH."""
    path, sep, expect = arg.rpartition("=")
    if not sep or not path or not expect:
        raise ValueError(f"--folder {arg!r}: expected PATH=EXPECT, e.g. scans/=tumour or scans/=healthy")
    return SetSpec(name=path, source=COMMAND_LINE, path=Path(path), expect=expect)


def check_expectations(specs: list[SetSpec], classes: list[str]) -> None:
    """Refuse expectations the model cannot be scored on (``classes`` are its tumour classes), and set names
    used twice (their rows could not be told apart)."""
    names = [s.name for s in specs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"set name(s) used twice: {', '.join(duplicated)}")
    allowed = [TUMOUR, HEALTHY, *classes]
    for spec in specs:
        for value in sorted(spec.expectations() | set(spec.names)):
            if value not in allowed:
                raise ValueError(f"set {spec.name}: {value!r} is not an expectation ({', '.join(allowed)})")


def list_set(spec: SetSpec, limit: int | None = None) -> list[Item]:
    """Every image of ``spec`` with its expectation; ``limit`` caps each folder (each sub-folder if mapped).

    In a mapped set every visible sub-folder must match a prefix: an unmatched folder means the data and the
    spec disagree, which should stop the evaluation rather than quietly drop or misfile those scans.
    """
    if not spec.path.is_dir():
        raise ValueError(f"set {spec.name}: {spec.path}: not a directory")
    if isinstance(spec.expect, str):
        items = [Item(p, spec.expect) for p in images_under(spec.path)[:limit]]
    else:
        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in spec.path.iterdir() if p.is_file()):
            raise ValueError(f"set {spec.name}: {spec.path} holds images outside sub-folders; a mapped set takes "
                             "its images from sub-folders named by the prefixes of its 'expect' map")
        items = []
        for folder in sorted(p for p in spec.path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            prefix = match_prefix(folder.name, spec.expect)
            if prefix is None:
                raise ValueError(f"set {spec.name}: sub-folder {folder.name!r} matches no prefix of its 'expect' map")
            variant = folder.name[len(prefix):].strip(" _-.")
            items += [Item(p, spec.expect[prefix], variant) for p in images_under(folder)[:limit]]
    if not items:
        raise ValueError(f"set {spec.name}: no images under {spec.path}")
    return items


def match_prefix(folder: str, mapping: Mapping[str, str]) -> str | None:
    """The longest key that ``folder`` equals or starts with at a word boundary ('Meningioma T1' -> 'Meningioma')."""
    hits = [k for k in mapping if folder == k or (folder.startswith(k) and not folder[len(k)].isalnum())]
    return max(hits, key=len) if hits else None
