"""Turn a ``data.path`` shard spec into a list of URLs webdataset can open.

* local: brace pattern (``shards/data-{000000..000127}.tar``) and/or glob (``shards/*.tar``); ``file://`` prefix
  allowed; every pattern must match at least one file.
* ``s3://`` and ``gs://`` stay as they are: :func:`pipelines.data.loader.iter_shard` (and ``wds.gopen``, see
  :func:`pipelines.storage.register_webdataset_schemes`) stream them through :mod:`pipelines.storage`, with no
  CLI. A glob in the key (``s3://bucket/data/*.tar``) is expanded by listing the prefix before its first
  wildcard.
* ``http(s)://`` (webdataset streams them through curl) and ``pipe:`` commands are passed through.
Brace patterns are expanded in every case; several specs may be joined with ``::`` (webdataset's convention).
"""

from __future__ import annotations

import fnmatch
import glob
import os

import braceexpand

from pipelines import storage

REMOTE_PREFIXES = ("http://", "https://", "pipe:")
storage.register_webdataset_schemes()  # wds.gopen("s3://...") streams through pipelines.storage too


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES) or storage.is_object_uri(url)


def _expand_object_glob(url: str, field: str) -> list[str]:
    """``s3://bucket/a/*.tar`` -> the matching object URIs, sorted (listing the prefix before the first wildcard)."""
    cut = min(url.find(c) for c in "*?[" if c in url)
    base = url[: url.rfind("/", 0, cut)]
    matches = sorted(u for u in (storage.join(base, name) for name, _, _ in storage.list_files(base))
                     if fnmatch.fnmatchcase(u, url))
    if not matches:
        raise ValueError(f"{field}: glob {url!r} matches no objects")
    return matches


def expand_shard_spec(spec: str, *, field: str = "data.path") -> list[str]:
    """Expand one shard spec into URLs (order: as written, globs sorted). Raises ValueError naming ``field``."""
    if not spec or not spec.strip():
        raise ValueError(f"{field}: empty shard spec")
    urls: list[str] = []
    for part in spec.split("::"):
        for item in braceexpand.braceexpand(part.strip()):
            if storage.is_object_uri(item):
                urls += _expand_object_glob(item, field) if glob.has_magic(item) else [item]
                continue
            if is_remote(item):
                urls.append(item)
                continue
            local = os.path.expanduser(item.removeprefix("file://"))
            if glob.has_magic(local):
                matches = sorted(p for p in glob.glob(local) if os.path.isfile(p))
                if not matches:
                    raise ValueError(f"{field}: glob {item!r} matches no files")
                urls += [os.path.abspath(p) for p in matches]
            elif os.path.isfile(local):
                urls.append(os.path.abspath(local))
            elif os.path.isdir(local):
                raise ValueError(f"{field}: {item!r} is a directory; give a glob such as {item.rstrip('/')}/*.tar")
            else:
                raise ValueError(f"{field}: shard {item!r} does not exist")
    return urls
