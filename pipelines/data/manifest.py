"""``manifest.json``: what a prepared shard directory holds.

Layout (format_version 1)::

    {"format_version": 1, "fingerprint": "...", "source": {...identity...}, "config": {...data fields...},
     "image_size": 16, "channels": 1, "num_classes": 10, "class_names": ["0", ...],
     "mean": [...], "std": [...],              # per channel, pixel/255 scale, over the train split
     "splits": {"train": {"count": 1617, "shards": [{"path": "train/shard-000000.tar", "count": 256,
                                                    "bytes": 123456}, ...]},
                "test": {...}},
     "created_unix": 1700000000.0, "writer": "pipelines.data"}

Shard paths are relative to the manifest's directory, so a prepared directory can be moved or synced to
object storage as a whole. :func:`read_manifest` adds ``root`` and absolute ``urls`` per split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_REQUIRED = ("format_version", "fingerprint", "image_size", "channels", "num_classes", "class_names", "splits")


class ManifestError(ValueError):
    """A manifest is missing, unreadable or of an unknown format; the message names the file."""


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Load ``manifest.json`` (or the directory holding it), check its format, and add ``root`` (the directory)
    and ``splits[s]["urls"]`` (absolute shard paths) for convenience."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {p}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"cannot read manifest {p}: {e}") from None
    if not isinstance(m, dict) or any(k not in m for k in _REQUIRED):
        missing = [k for k in _REQUIRED if not isinstance(m, dict) or k not in m]
        raise ManifestError(f"{p}: not a pipelines.data manifest (missing {', '.join(missing)})")
    if m["format_version"] != FORMAT_VERSION:
        raise ManifestError(f"{p}: format_version {m['format_version']} is not supported (expected {FORMAT_VERSION})")
    root = p.parent.resolve()
    m["root"] = str(root)
    for split in m["splits"].values():
        split["urls"] = [str(root / s["path"]) for s in split["shards"]]
    return m


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` into ``directory`` (the last file written when preparing a dataset)."""
    path = directory / MANIFEST_NAME
    tmp = directory / (MANIFEST_NAME + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path
