"""``prepare_data``: write a source as webdataset shards + ``manifest.json``, once per content fingerprint.

Output: ``<workspace.data_uri>/<fingerprint>/{train,test}/shard-%06d.tar`` and ``manifest.json``, where
``data_uri`` is ``workspace.root/data`` or, with ``workspace.store``, ``<store>/data`` on S3/GCS. Each sample
is ``<key>.png`` (lossless, L or RGB), ``<key>.cls`` (decimal label; absent when unlabelled) and
``<key>.json`` (where it came from). Tar members carry mtime 0, so the same input gives byte-identical shards.

The fingerprint hashes the source's identity (content hash of the digits arrays / the CIFAR tarball's sha256 /
the image folder's listing with sizes and mtimes) plus the data settings that change the bytes written
(source, image_size, channels, samples_per_shard, test_fraction, split_seed) and the format version. Loader
settings (workers, shuffle buffer, flip, on_error) and ``prepare_tasks`` do not change it.

Scale-out: the splits are cut into shards (:func:`shard_jobs`), and at most ``data.prepare_tasks`` Ray tasks at a
time each write a contiguous range of them (a few ranges per task, handed out as tasks finish). A shard's bytes depend only on its records and their offset, and the channel
statistics are combined from exact integer sums, so the output is byte-identical for any number of tasks.

Atomicity (nothing looks finished until everything is):

* local: everything is written to ``<data_dir>/.tmp-<fingerprint>-<host>-<pid>-<rand>/`` with the manifest
  last, then ``os.replace``-d onto the final name, so a directory under its fingerprint is always complete. A
  failed run removes its temp dir; temp dirs left by a killed process on this host are removed by the next run.
  Two concurrent preparers of the same fingerprint both finish; the loser of the rename discards its copy.
* object store: each shard is one PUT under the final prefix and the manifest is PUT last; only a prefix with a
  manifest counts as prepared (see :func:`_write_object`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from pydantic import BaseModel
from tqdm.auto import tqdm

from pipelines import storage
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
    manifest_path: Path | str | None  # str: an object-store URI
    data_dir: Path | str | None
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


def _location(uri: str) -> Path | str:
    return uri if storage.is_object_uri(uri) else Path(uri)


def _result(m: dict[str, Any], source: str, skipped: bool) -> DataResult:
    root = m["root"]
    return DataResult(
        source=source, fingerprint=m["fingerprint"], manifest_path=_location(storage.join(root, MANIFEST_NAME)),
        data_dir=_location(root),
        train_urls=m["splits"].get("train", {}).get("urls", []), test_urls=m["splits"].get("test", {}).get("urls", []),
        num_train=m["splits"].get("train", {}).get("count", 0), num_test=m["splits"].get("test", {}).get("count", 0),
        num_classes=m["num_classes"], class_names=m["class_names"], image_size=m["image_size"],
        channels=m["channels"], mean=m.get("mean"), std=m.get("std"), skipped=skipped,
    )


def prepare_data(cfg: PipelineConfig, *, progress: bool = True) -> DataResult:
    """Write ``cfg.data``'s source as shards under ``<workspace.data_uri>/<fingerprint>`` (no-op if present).

    ``data_uri`` is local (``workspace.root/data``) or, with ``workspace.store``, an object-store prefix. The
    shards are written by ``data.prepare_tasks`` parallel Ray tasks (:func:`write_shards`); the result is
    byte-identical whatever their number. For ``data.source: shards`` nothing is written: the URLs are expanded
    and described (see :func:`describe_shards`).
    """
    d = cfg.data
    if d.source == "shards":
        return describe_shards(cfg)
    source = _make_source(d)
    identity, settings = source.identity(), output_settings(d)
    fp = compute_fingerprint(identity, settings)
    final = storage.join(cfg.workspace.data_uri, fp)
    if storage.exists(storage.join(final, MANIFEST_NAME)):
        log.info("data already prepared: %s", final)
        return _result(read_manifest(final), d.source, skipped=True)
    data = source.load()
    manifest = {
        "format_version": FORMAT_VERSION, "fingerprint": fp, "source": identity, "config": settings,
        "image_size": d.image_size, "channels": d.channels,
        "num_classes": len(data.class_names), "class_names": data.class_names,
    }
    if not data.splits.get("train"):
        raise ValueError(f"data.path: the {d.source} source produced no training images")
    write = _write_local if not storage.is_object_uri(final) else _write_object
    tasks = _num_tasks(d, sum(len(r) for r in data.splits.values()))
    skipped = write(final, manifest, data.splits, d, tasks, progress)
    return _result(read_manifest(final), d.source, skipped=skipped)


def _write_local(final: str, manifest: dict, splits: dict[str, list[Record]], d: DataConfig, tasks: int,
                 progress: bool) -> bool:
    """Local: everything goes to ``<data_dir>/.tmp-<fp>-<host>-<pid>-<rand>/`` (manifest last), then one
    ``os.replace`` onto ``<fp>``. Returns True when a concurrent preparer renamed its copy first (ours is dropped)."""
    final_p = Path(final)
    if final_p.exists() and any(final_p.iterdir()):
        raise FileExistsError(f"{final_p} exists but has no {MANIFEST_NAME} (not written by prepare_data); remove it")
    final_p.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(final_p.parent)
    tmp = final_p.parent / f".tmp-{final_p.name}-{storage.unique_suffix()}"
    try:
        tmp.mkdir()
        write_manifest(tmp, _complete(manifest, write_shards(str(tmp), splits, d, tasks, progress, local=True)))
        try:
            os.replace(tmp, final_p)
        except OSError:
            if not (final_p / MANIFEST_NAME).is_file():
                raise
            log.info("another process prepared %s first; keeping its copy", final_p)
            return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return False


def _write_object(final: str, manifest: dict, splits: dict[str, list[Record]], d: DataConfig, tasks: int,
                  progress: bool) -> bool:
    """Object store: shards are PUT under ``<fp>/`` directly and the manifest last. A prefix has no rename, and
    none is needed: readers trust only a prefix with a manifest, and shard bytes are a function of the fingerprint,
    so a killed or concurrent writer can leave only missing or identical objects behind, never different ones."""
    write_manifest(final, _complete(manifest, write_shards(final, splits, d, tasks, progress, local=False)))
    return False


def _complete(manifest: dict, written: tuple[dict, dict]) -> dict:
    split_entries, stats = written
    return {**manifest, **stats, "splits": split_entries, "created_unix": time.time(), "writer": "pipelines.data"}


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


# ------------------------------------------------------------------------------------- writing shards
@dataclass(frozen=True)
class ShardJob:
    """One shard to write: ``<split>/shard-<index>.tar`` holding ``records``, whose first has ``offset`` in
    the split (sample keys are ``<split>-<offset + i>``, so a shard's bytes do not depend on who writes it)."""

    split: str
    index: int
    offset: int
    records: list[Record]

    @property
    def path(self) -> str:
        return f"{self.split}/shard-{self.index:06d}.tar"


def shard_jobs(splits: dict[str, list[Record]], samples_per_shard: int) -> list[ShardJob]:
    """Cut every split into shards of ``samples_per_shard`` records (the last may be short), in order."""
    jobs = []
    for split in SPLITS:
        records = splits.get(split, [])
        jobs += [ShardJob(split, j, i, records[i : i + samples_per_shard])
                 for j, i in enumerate(range(0, len(records), samples_per_shard))]
    return jobs


def write_shard(out: str, job: ShardJob, d: DataConfig) -> dict[str, Any]:
    """Write one shard under ``out`` (local dir or object prefix) with ONE atomic write; return its manifest
    entry plus exact integer pixel sums ``s1``/``s2`` (per channel, 0..255 scale) and the pixel count ``n``."""
    buf = io.BytesIO()
    s1, s2 = np.zeros(d.channels, dtype=np.int64), np.zeros(d.channels, dtype=np.int64)
    with wds.TarWriter(buf, encoder=False, mtime=0) as writer:  # int mtime: a float one adds a pax header
        for i, rec in enumerate(job.records):
            img = fit_image(rec.load(), d.image_size, d.channels)
            arr = np.asarray(img, dtype=np.int64).reshape(d.image_size, d.image_size, d.channels)
            s1 += arr.sum((0, 1))
            s2 += (arr**2).sum((0, 1))
            sample = {"__key__": f"{job.split}-{job.offset + i:06d}", "png": png_bytes(img),
                      "json": json.dumps(rec.source_id).encode()}
            if rec.label >= 0:
                sample["cls"] = str(rec.label).encode()
            writer.write(sample)
    data = buf.getvalue()
    storage.write_bytes(storage.join(out, job.path), data)
    return {"path": job.path, "count": len(job.records), "bytes": len(data), "s1": s1.tolist(), "s2": s2.tolist(),
            "n": len(job.records) * d.image_size**2}


def _write_batch(out: str, jobs: list[ShardJob], d: DataConfig) -> list[dict[str, Any]]:
    return [write_shard(out, job, d) for job in jobs]


def write_shards(out: str, splits: dict[str, list[Record]], d: DataConfig, tasks: int, progress: bool, *,
                 local: bool) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Write every split's shards under ``out``, serially (``tasks == 1``) or as ``tasks`` Ray tasks over
    contiguous shard ranges; return (manifest ``splits``, train ``mean``/``std``).

    The statistics are combined from exact integer sums, so they too are the same for any ``tasks``:
    mean = S1 / (255 N), std = sqrt(S2 / (255^2 N) - mean^2) (Var = E[x^2] - E[x]^2). ``local``: the output is a
    local directory, so the tasks are pinned to this node (as they are for ``image_folder``, whose inputs are
    local files).
    """
    jobs = shard_jobs(splits, d.samples_per_shard)
    bar = tqdm(total=sum(len(j.records) for j in jobs), desc=f"{d.source} shards", unit="img", disable=not progress)
    entries: list[dict[str, Any]] = []
    try:
        if tasks <= 1 or len(jobs) <= 1:
            for job in jobs:
                entries.append(write_shard(out, job, d))
                bar.update(len(job.records))
        else:
            for batch in _run_parallel(out, jobs, d, tasks, pin=local or d.source == "image_folder"):
                entries += batch
                bar.update(sum(e["count"] for e in batch))
    finally:
        bar.close()
    entries.sort(key=lambda e: e["path"])
    result = {}
    for split in SPLITS:
        mine = [e for e in entries if e["path"].startswith(split + "/")]
        result[split] = {"count": sum(e["count"] for e in mine),
                         "shards": [{k: e[k] for k in ("path", "count", "bytes")} for e in mine]}
    train = [e for e in entries if e["path"].startswith("train/")]
    n = max(sum(e["n"] for e in train), 1)
    s1 = np.sum([e["s1"] for e in train], axis=0, dtype=np.int64)
    s2 = np.sum([e["s2"] for e in train], axis=0, dtype=np.int64)
    mean = s1 / (255.0 * n)
    std = np.sqrt(np.maximum(s2 / (255.0**2 * n) - mean**2, 0.0))  # Var = E[x^2] - E[x]^2
    return result, {"mean": mean.tolist(), "std": std.tolist()}


# Below this many images a serial write beats starting Ray worker processes (digits: ~2 s serial).
PARALLEL_MIN_IMAGES = 10_000


def _num_tasks(d: DataConfig, n_images: int) -> int:
    """``data.prepare_tasks``; unset: one per CPU of the running Ray cluster for a source of at least
    :data:`PARALLEL_MIN_IMAGES` images, else 1 (serial, in this process)."""
    if d.prepare_tasks is not None:
        return d.prepare_tasks
    import ray

    if n_images < PARALLEL_MIN_IMAGES or not ray.is_initialized():
        return 1
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


# Work units per parallel task: small ranges handed out as workers free up balance uneven workers (measured: two
# contiguous halves of 20k JPEGs finished 8.0 s vs 11.4 s apart on 2 cores), at ~ms of Ray overhead per unit.
# The last unit leaves the other worker idle for half a unit on average; for the 20k-image benchmark 10 per task
# make a unit 0.76 s instead of 1.9 s, so that tail is ~2% of the run instead of ~5% (computed, not measured).
UNITS_PER_TASK = 10


def _run_parallel(out: str, jobs: list[ShardJob], d: DataConfig, tasks: int, *, pin: bool):
    """Yield the entries of contiguous ranges of shards (``UNITS_PER_TASK`` per task) written as Ray tasks, at
    most ``tasks`` at a time, each handed out when a running one finishes, as they finish."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        raise RuntimeError(f"data.prepare_tasks={tasks} needs a running Ray (it starts with the pipeline)")
    opts: dict[str, Any] = {"num_cpus": 1, "name": "prepare:write_shards"}
    if pin:
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    remote = ray.remote(_write_batch).options(**opts)
    bounds = np.linspace(0, len(jobs), min(tasks * UNITS_PER_TASK, len(jobs)) + 1).round().astype(int)
    todo = [jobs[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)][::-1]
    pending: list = []
    try:
        while todo or pending:
            while todo and len(pending) < tasks:
                pending.append(remote.remote(out, todo.pop(), d))
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:  # on failure: stop the other writers and wait for them, so none writes after the cleanup
        for ref in pending:
            ray.cancel(ref)
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=60)


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
