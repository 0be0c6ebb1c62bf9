"""Turn a ``data.path`` shard spec into a list of URLs webdataset can open.

* local: brace pattern (``shards/data-{000000..000127}.tar``) and/or glob (``shards/*.tar``); ``file://`` prefix
  allowed; every pattern must match at least one file.
* ``s3://`` -> ``pipe:aws s3 cp <url> -`` and ``gs://`` -> ``pipe:gsutil cat <url>`` (the streaming commands the
  webdataset docs recommend; the CLI must be installed and authenticated where the loader runs).
* ``http(s)://`` (webdataset streams them through curl) and ``pipe:`` commands are passed through.
Brace patterns are expanded in every case; several specs may be joined with ``::`` (webdataset's convention).
"""

from __future__ import annotations

import glob
import os
import shlex

import braceexpand

REMOTE_PREFIXES = ("http://", "https://", "pipe:")


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES) or url.startswith(("s3://", "gs://"))


def _to_url(url: str) -> str:
    if url.startswith("s3://"):
        return f"pipe:aws s3 cp {shlex.quote(url)} -"
    if url.startswith("gs://"):
        return f"pipe:gsutil cat {shlex.quote(url)}"
    return url


def expand_shard_spec(spec: str, *, field: str = "data.path") -> list[str]:
    """Expand one shard spec into URLs (order: as written, globs sorted). Raises ValueError naming ``field``."""
    if not spec or not spec.strip():
        raise ValueError(f"{field}: empty shard spec")
    urls: list[str] = []
    for part in spec.split("::"):
        for item in braceexpand.braceexpand(part.strip()):
            if is_remote(item):
                urls.append(_to_url(item))
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
