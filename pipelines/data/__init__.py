"""Sharded webdataset images: ``prepare_data`` writes them, ``make_loader`` reads them per Ray Train rank.

See ``prepare.py`` (writing, fingerprint, atomicity), ``loader.py`` (``LoaderSpec``, rank/worker split,
validation on read, error modes, skip counter), ``sources.py`` (digits, image_folder, cifar10), ``urls.py``
(shard specs) and ``manifest.py``.
"""

from pipelines.data.loader import (
    LoaderSpec,
    ShardLoader,
    ShardReadError,
    check_shard_count,
    decode_sample,
    iter_shard,
    load_split_tensors,
    make_loader,
    split_shards,
)
from pipelines.data.manifest import MANIFEST_NAME, ManifestError, read_manifest
from pipelines.data.prepare import DataResult, compute_fingerprint, describe_shards, prepare_data
from pipelines.data.sources import SourceError
from pipelines.data.urls import expand_shard_spec

__all__ = [
    "MANIFEST_NAME",
    "DataResult",
    "LoaderSpec",
    "ManifestError",
    "ShardLoader",
    "ShardReadError",
    "SourceError",
    "check_shard_count",
    "compute_fingerprint",
    "decode_sample",
    "describe_shards",
    "expand_shard_spec",
    "iter_shard",
    "load_split_tensors",
    "make_loader",
    "prepare_data",
    "read_manifest",
    "split_shards",
]
