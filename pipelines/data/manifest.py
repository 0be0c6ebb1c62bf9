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
object storage as a whole. :func:`read_manifest` adds ``root`` and absolute ``urls`` per split; it reads local
directories and ``s3://`` / ``gs://`` prefixes alike (through :mod:`pipelines.storage`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines import storage

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_REQUIRED = ("format_version", "fingerprint", "image_size", "channels", "num_classes", "class_names", "splits")


class ManifestError(ValueError):
    """A manifest is missing, unreadable or of an unknown format; the message names the file."""


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Load ``manifest.json`` (or the directory / object prefix holding it), check its format, and add ``root``
    (the directory or prefix) and ``splits[s]["urls"]`` (absolute shard paths or URIs) for convenience."""
    p = str(path)
    if storage.is_object_uri(p):
        p = p if p.endswith("/" + MANIFEST_NAME) else storage.join(p, MANIFEST_NAME)
    elif Path(p).is_dir():
        p = str(Path(p) / MANIFEST_NAME)
    try:
        m = storage.read_json(p)
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {p}") from None
    except (OSError, ValueError) as e:
        raise ManifestError(f"cannot read manifest {p}: {e}") from None
    if not isinstance(m, dict) or any(k not in m for k in _REQUIRED):
        missing = [k for k in _REQUIRED if not isinstance(m, dict) or k not in m]
        raise ManifestError(f"{p}: not a pipelines.data manifest (missing {', '.join(missing)})")
    if m["format_version"] != FORMAT_VERSION:
        raise ManifestError(f"{p}: format_version {m['format_version']} is not supported (expected {FORMAT_VERSION})")
    root = p.rsplit("/", 1)[0] if storage.is_object_uri(p) else str(Path(p).parent.resolve())
    m["root"] = root
    for split in m["splits"].values():
        split["urls"] = [storage.join(root, s["path"]) for s in split["shards"]]
    return m


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> str:
    """Write ``manifest.json`` into ``directory`` (a local path or an object prefix) atomically; it is the last
    file written when preparing a dataset, so its presence means the shards are complete."""
    path = storage.join(directory, MANIFEST_NAME)
    storage.write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())
    return path
