"""The repository's documents stand alone: every relative link resolves inside the repository, and no file points
at a path outside it (a clone has nothing there)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", "workspace", "node_modules", "__pycache__", ".pytest_cache", ".ruff_cache"}
TEXT_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".sh", ""}


def _files() -> list[Path]:
    out = []
    for p in ROOT.rglob("*"):
        rel = p.relative_to(ROOT)
        if p.is_file() and not SKIP_DIRS & set(rel.parts) and not any(s.endswith(".egg-info") for s in rel.parts) and p.suffix in TEXT_SUFFIXES and p.stat().st_size < 10**6:
            out.append(p)
    return out


def test_markdown_links_resolve_inside_the_repository():
    docs = [p for p in _files() if p.suffix == ".md"]
    assert ROOT / "docs" / "ARCHITECTURE.md" in docs
    assert "](docs/ARCHITECTURE.md)" in (ROOT / "README.md").read_text()
    for doc in docs:
        for target in re.findall(r"\]\(([^)#\s]+)", doc.read_text(errors="replace")):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            resolved = (doc.parent / target).resolve()
            assert resolved.is_relative_to(ROOT), f"{doc.relative_to(ROOT)} links outside the repository: {target}"
            assert resolved.exists(), f"{doc.relative_to(ROOT)} links to a missing file: {target}"


def test_no_file_refers_to_the_workspace_outside_the_repository():
    pattern = re.compile(r"\.\./shared/|/work/shared/")  # where the development notes lived, next to the clone
    me = Path(__file__).resolve()
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in _files() if p != me
            for m in pattern.finditer(p.read_text(errors="replace"))]
    assert hits == []
