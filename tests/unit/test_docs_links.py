"""The project's own docs stand alone: every relative link in README.md, BENCHMARKS.md and
docs/*.md resolves to a file inside the repository, and no path in them points outside it
(a user of the repository has no ``../shared``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
CODE_PATH = re.compile(r"`(\.\./[^`\s]+)`")
URL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def _inside(target: Path) -> bool:
    return target.resolve().is_relative_to(ROOT)


def _links(text: str) -> list[str]:
    prose = FENCE.sub("", text)
    return INLINE.findall(prose) + REFERENCE.findall(prose)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist_inside_the_repository(doc: Path) -> None:
    bad = []
    for link in _links(doc.read_text(encoding="utf-8")):
        if URL.match(link) or link.startswith("#"):
            continue  # a web address or an anchor in the same page
        target = doc.parent / link.split("#", 1)[0]
        if link.startswith("/") or not _inside(target) or not target.exists():
            bad.append(link)
    assert not bad, f"{doc.name}: links outside the repository or to missing files: {bad}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_path_points_outside_the_repository(doc: Path) -> None:
    outside = [p for p in CODE_PATH.findall(doc.read_text(encoding="utf-8"))
               if not _inside(doc.parent / p)]
    assert not outside, f"{doc.name} names paths outside the repository: {outside}"


def test_the_docs_are_found() -> None:
    assert ROOT / "docs" / "PROTOCOL.md" in DOCS and len(DOCS) >= 4
