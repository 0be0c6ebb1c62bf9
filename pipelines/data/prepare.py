"""``prepare_data``: write a source as webdataset shards + ``manifest.json``, once per content fingerprint.

Output: ``<workspace.data_dir>/<fingerprint>/{train,test}/shard-%06d.tar`` and ``manifest.json``. Each sample
is ``<key>.png`` (lossless, L or RGB), ``<key>.cls`` (decimal label; absent when unlabelled) and
``<key>.json`` (where it came from). Tar members carry mtime 0, so the same input gives byte-identical shards.

The fingerprint hashes the source's identity (content hash of the digits arrays / the CIFAR tarball's sha256 /
the image folder's listing with sizes and mtimes) plus the data settings that change the bytes written
(source, image_size, channels, samples_per_shard, test_fraction, split_seed) and the format version. Loader
settings (workers, shuffle buffer, flip, on_error) do not change it.

Atomicity: everything is written to ``<data_dir>/.tmp-<fingerprint>-<host>-<pid>-<rand>/`` with the manifest
last, then ``os.replace``-d onto the final name, so a directory under its fingerprint is always complete.
A failed run removes its temp dir; temp dirs left by a killed process on this host are removed by the next run.
Two concurrent preparers of the same fingerprint both finish; the loser of the rename discards its copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from pydantic import BaseModel
from tqdm.auto import tqdm

from pipelines.config import ConfigError, DataConfig, PipelineConfig
from pipelines.data.loader import LoaderSpec, decode_sample, iter_shard
from pipelines.data.manifest import FORMAT_VERSION, MANIFEST_NAME, read_manifest, write_manifest
from pipelines.data.sources import Cifar10Source, DigitsSource, ImageFolderSource, Record, fit_image
from pipelines.data.urls import expand_shard_spec, is_remote
from pipelines.images import png_bytes

log = logging.getLogger(__name__)
SPLITS = ("train", "test")


class DataResult(BaseModel):
    """What the prepare stage hands to training and evaluation.

    ``num_train``/``num_test``/``mean``/``std`` are None only for a ``shards`` source without a manifest.
    ``skipped`` is True when nothing was written (already prepared, or a ``shards`` source).
    """

    source: str
    fingerprint: str
    manifest_path: Path | None
    data_dir: Path | None
    train_urls: list[str]
    test_urls: list[str]
    num_train: int | None
    num_test: int | None
    num_classes: int
    class_names: list[str]
    image_size: int
    channels: int
    mean: list[float] | None = None
    std: list[float] | None = None
    skipped: bool = False


def output_settings(d: DataConfig) -> dict[str, Any]:
    """The data fields that change the bytes written (hashed into the fingerprint, recorded in the manifest)."""
    s = {"source": d.source, "image_size": d.image_size, "channels": d.channels,
         "samples_per_shard": d.samples_per_shard, "split_seed": d.split_seed}
    if d.source != "cifar10":  # CIFAR-10 keeps its official split
        s["test_fraction"] = d.test_fraction
    return s


def compute_fingerprint(identity: dict[str, Any], settings: dict[str, Any]) -> str:
    """16 hex chars of sha256 over the format version, the source identity (location excluded) and settings."""
    ident = {k: v for k, v in identity.items() if k != "root"}  # moving a folder keeps its fingerprint
    payload = json.dumps({"format_version": FORMAT_VERSION, "source": ident, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _make_source(d: DataConfig):
    if d.source == "digits":
        return DigitsSource(d.test_fraction, d.split_seed)
    if d.source == "image_folder":
        return ImageFolderSource(str(d.path), d.test_fraction, d.split_seed)
    if d.source == "cifar10":
        return Cifar10Source(str(d.path), d.split_seed)
    raise ConfigError(f"data.source: unknown source {d.source!r} (accepted: digits, image_folder, cifar10, shards)")


def _result(m: dict[str, Any], source: str, skipped: bool) -> DataResult:
    root = Path(m["root"])
    return DataResult(
        source=source, fingerprint=m["fingerprint"], manifest_path=root / MANIFEST_NAME, data_dir=root,
        train_urls=m["splits"].get("train", {}).get("urls", []), test_urls=m["splits"].get("test", {}).get("urls", []),
        num_train=m["splits"].get("train", {}).get("count", 0), num_test=m["splits"].get("test", {}).get("count", 0),
        num_classes=m["num_classes"], class_names=m["class_names"], image_size=m["image_size"],
        channels=m["channels"], mean=m.get("mean"), std=m.get("std"), skipped=skipped,
    )


def prepare_data(cfg: PipelineConfig, *, progress: bool = True) -> DataResult:
    """Write ``cfg.data``'s source as shards under ``cfg.workspace.data_dir/<fingerprint>`` (no-op if present).

    For ``data.source: shards`` nothing is written: the URLs are expanded and described (see
    :func:`describe_shards`).
    """
    d = cfg.data
    if d.source == "shards":
        return describe_shards(cfg)
    source = _make_source(d)
    identity, settings = source.identity(), output_settings(d)
    fp = compute_fingerprint(identity, settings)
    root = cfg.workspace.data_dir
    final = root / fp
    if (final / MANIFEST_NAME).is_file():
        log.info("data already prepared: %s", final)
        return _result(read_manifest(final), d.source, skipped=True)
    if final.exists() and any(final.iterdir()):
        raise FileExistsError(f"{final} exists but has no {MANIFEST_NAME} (not written by prepare_data); remove it")
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(root)
    tmp = root / f".tmp-{fp}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        data = source.load()
        manifest = {
            "format_version": FORMAT_VERSION, "fingerprint": fp, "source": identity, "config": settings,
            "image_size": d.image_size, "channels": d.channels,
            "num_classes": len(data.class_names), "class_names": data.class_names,
        }
        splits, stats = {}, None
        for split in SPLITS:
            splits[split], split_stats = write_split(tmp, split, data.splits.get(split, []), d, progress)
            stats = split_stats if split == "train" else stats
        if not splits["train"]["count"]:
            raise ValueError(f"data.path: the {d.source} source produced no training images")
        manifest.update(stats)
        manifest["splits"] = splits
        manifest.update(created_unix=time.time(), writer="pipelines.data")
        write_manifest(tmp, manifest)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / MANIFEST_NAME).is_file():
                raise
            log.info("another process prepared %s first; keeping its copy", final)
            return _result(read_manifest(final), d.source, skipped=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _result(read_manifest(final), d.source, skipped=False)


def remove_stale_temp_dirs(root: Path) -> None:
    """Delete ``.tmp-*`` dirs whose writer (same host, pid in the name) is no longer running."""
    host = socket.gethostname()
    for p in root.glob(".tmp-*"):
        parts = p.name.split("-")
        if len(parts) < 5 or "-".join(parts[2:-2]) != host or not parts[-2].isdigit():
            continue
        try:
            os.kill(int(parts[-2]), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass


def write_split(directory: Path, split: str, records: list[Record], d: DataConfig, progress: bool):
    """Write ``records`` as ``<split>/shard-%06d.tar``; return (split manifest entry, channel stats)."""
    out = directory / split
    out.mkdir()
    shards: list[dict[str, Any]] = []
    s1 = np.zeros(d.channels)
    s2 = np.zeros(d.channels)
    n_pix = 0
    writer = None
    bar = tqdm(total=len(records), desc=f"{d.source} {split}", unit="img", disable=not progress)
    try:
        for i, rec in enumerate(records):
            if i % d.samples_per_shard == 0:
                if writer is not None:
                    writer.close()
                path = out / f"shard-{len(shards):06d}.tar"
                writer = wds.TarWriter(str(path), encoder=False, mtime=0)  # int: a float mtime adds a pax header
                shards.append({"path": f"{split}/{path.name}", "count": 0})
            img = fit_image(rec.load(), d.image_size, d.channels)
            arr = np.asarray(img, dtype=np.float64).reshape(d.image_size, d.image_size, d.channels) / 255.0
            s1 += arr.sum((0, 1))
            s2 += (arr**2).sum((0, 1))
            n_pix += d.image_size**2
            sample = {"__key__": f"{split}-{i:06d}", "png": png_bytes(img),
                      "json": json.dumps(rec.source_id).encode()}
            if rec.label >= 0:
                sample["cls"] = str(rec.label).encode()
            writer.write(sample)
            shards[-1]["count"] += 1
            bar.update(1)
    finally:
        if writer is not None:
            writer.close()
        bar.close()
    for s in shards:
        s["bytes"] = (directory / s["path"]).stat().st_size
    mean = s1 / max(n_pix, 1)
    std = np.sqrt(np.maximum(s2 / max(n_pix, 1) - mean**2, 0.0))  # Var = E[x^2] - E[x]^2
    return {"count": len(records), "shards": shards}, {"mean": mean.tolist(), "std": std.tolist()}


# ------------------------------------------------------------------------------------------ shards source
def _find_manifest(urls: list[str]) -> Path | None:
    """A manifest beside the first local shard or one level up (our ``<fp>/train/shard-*.tar`` layout)."""
    if not urls or is_remote(urls[0]):
        return None
    first = Path(urls[0])
    for cand in (first.parent / MANIFEST_NAME, first.parent.parent / MANIFEST_NAME):
        if cand.is_file():
            return cand
    return None


def _check_first_sample(url: str, d: DataConfig) -> None:
    """Fail fast (before training starts) when the first sample of ``url`` breaks ``data.image_size`` /
    ``data.channels`` / ``data.num_classes``; the loader checks every sample again as it reads."""
    spec = LoaderSpec(urls=[url], batch_size=1, num_workers=0, channels=d.channels, image_size=d.image_size,
                      num_classes=d.num_classes)
    for sample in iter_shard(url):
        try:
            decode_sample(sample, spec)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"data.path: shard {url}: sample {sample['__key__']!r} does not match the config "
                              f"(data.image_size={d.image_size}, data.channels={d.channels}, "
                              f"data.num_classes={d.num_classes}): {e}") from None
        return
    raise ConfigError(f"data.path: shard {url} holds no samples")


def _from_manifest(m: dict[str, Any], path: Path, d: DataConfig) -> tuple[int, list[str]]:
    """(num_classes, class_names) of a manifest, after checking it agrees with the config."""
    for field, have in (("image_size", d.image_size), ("channels", d.channels)):
        if m[field] != have:
            raise ConfigError(f"data.{field}: is {have} but the shards' manifest {path} says {m[field]}")
    if d.num_classes is not None and d.num_classes != m["num_classes"]:
        raise ConfigError(f"data.num_classes: is {d.num_classes} but the shards' manifest {path} says "
                          f"{m['num_classes']} (leave it unset to use the manifest's)")
    return m["num_classes"], m["class_names"]


def describe_shards(cfg: PipelineConfig) -> DataResult:
    """``data.source: shards``: expand ``data.path`` / ``data.test_path`` into URLs, nothing written.

    The data format comes from a ``manifest.json`` beside the first local shard (or its parent) when present
    (its test split is used when ``data.test_path`` is unset; ``data.image_size`` / ``data.channels`` /
    ``data.num_classes`` must agree with it). Otherwise (e.g. remote shards) it is the config's:
    ``data.num_classes`` must then be set (0 for unlabelled shards), since a class count read off the shards
    would only be a guess; the first sample is checked against the config, and counts and mean/std stay None.
    The loader validates every sample against the same format as it reads.
    """
    d = cfg.data
    try:
        train_urls = expand_shard_spec(str(d.path), field="data.path")
        test_urls = expand_shard_spec(d.test_path, field="data.test_path") if d.test_path else []
    except ValueError as e:
        raise ConfigError(str(e)) from None
    mpath = _find_manifest(train_urls)
    num_train = num_test = None
    mean = std = None
    if mpath is not None:
        m = read_manifest(mpath)
        num_classes, class_names = _from_manifest(m, mpath, d)
        mean, std = m.get("mean"), m.get("std")
        split_urls = {s: sorted(v["urls"]) for s, v in m["splits"].items()}
        if sorted(train_urls) == split_urls.get("train"):
            num_train = m["splits"]["train"]["count"]
            if not test_urls:
                test_urls = m["splits"].get("test", {}).get("urls", [])
        if test_urls and sorted(test_urls) == split_urls.get("test"):
            num_test = m["splits"]["test"]["count"]
    else:
        if d.num_classes is None:
            raise ConfigError(f"data.num_classes: the shards at data.path have no {MANIFEST_NAME}, so the class "
                              "count must be set (0 for unlabelled shards); it is not guessed from the data")
        _check_first_sample(train_urls[0], d)
        num_classes, class_names = d.num_classes, [str(i) for i in range(d.num_classes)]
    size = d.image_size
    h = hashlib.sha256()
    for split, urls in (("train", train_urls), ("test", test_urls)):
        for u in urls:  # identity of the shard set: URLs, plus size and mtime for local files
            st = None if is_remote(u) else os.stat(u)
            h.update(f"{split}\0{u}\0{st.st_size if st else ''}\0{st.st_mtime_ns if st else ''}\n".encode())
    data_dir = mpath.parent if mpath else (None if is_remote(train_urls[0]) else Path(train_urls[0]).parent)
    return DataResult(
        source="shards", fingerprint=h.hexdigest()[:16], manifest_path=mpath, data_dir=data_dir,
        train_urls=train_urls, test_urls=test_urls, num_train=num_train, num_test=num_test,
        num_classes=num_classes, class_names=class_names, image_size=size, channels=d.channels,
        mean=mean, std=std, skipped=True,
    )
