"""Reading shards: ``make_loader`` for training (one per Ray Train rank) and ``load_split_tensors`` for evaluation.

Shard assignment is explicit and static: rank ``r`` of ``W`` owns ``urls[r::W]``, and DataLoader worker ``w`` of
``K`` inside that rank owns ``urls[r::W][w::K]`` (:func:`split_shards`). So ranks never share a shard, in both
modes:

* ``resampled=True`` (training): each worker draws shards *with replacement from its own subset*, forever.
  (webdataset's ``ResampledShards`` draws from the full list before any node splitting, which would make ranks
  overlap; that is why the splitter runs first here.)
* ``resampled=False`` (evaluation): one pass; every sample of the rank's shards is yielded exactly once
  (the last batch may be short).

Pipeline per worker (webdataset ``DataPipeline``): shard list -> rank/worker split -> shard order
(resample / shuffle) -> tar reader -> ``wds.shuffle`` buffer (on encoded bytes) -> PNG decode (L or RGB) ->
``wds.batched`` -> random flip + scale to float32 in [-1, 1]. Batches are assembled in the workers; the main
process only receives ready tensors.

Errors: a damaged shard or sample raises :class:`ShardReadError` naming the shard URL and the sample key
(``on_error="raise"``). With ``on_error="skip"`` the sample is dropped (for a truncated tar: the rest of that
shard), a warning is logged, and ``loader.skipped`` counts it. The counter is a ``multiprocessing.Value`` in
shared memory, created by the loader from the same multiprocessing context as its DataLoader workers (fork,
spawn or forkserver) and handed to each of them, so the training loop reads one number covering all its
workers, at any time, without extra IPC. In resampled mode a damaged shard is counted each time it is drawn,
so the count is "skip events so far" (a monotone counter, the right thing to log as a metric). A truncated
tar costs the sample being read and the rest of that shard; they count as one skip.
"""

from __future__ import annotations

import io
import logging
import multiprocessing as mp
import random
import tarfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from pipelines import storage
from pipelines.data.manifest import read_manifest

log = logging.getLogger(__name__)
IMAGE_KEYS = ("png", "jpg", "jpeg")


class ShardReadError(RuntimeError):
    """A shard or one of its samples cannot be read; the message names the shard URL and the sample key."""

    def __init__(self, message: str, url: str | None = None, key: str | None = None):
        super().__init__(message)
        self.url, self.key = url, key


def check_shard_count(num_shards: int, world_size: int, num_workers: int) -> None:
    """Every (rank, worker) reader needs at least one shard of its own; raise a ValueError naming the counts."""
    readers = world_size * max(1, num_workers)
    if num_shards < readers:
        raise ValueError(
            f"{num_shards} shard(s) cannot feed world_size={world_size} rank(s) x num_workers={num_workers} "
            f"loader worker(s) = {readers} readers; each reader needs at least one shard of its own. "
            "Write more, smaller shards (data.samples_per_shard) or lower train.num_workers / data.loader_workers."
        )


def split_shards(urls: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """The shards read by ``worker`` of ``rank``: ``urls[rank::world_size][worker::num_workers]``.

    Disjoint across all (rank, worker) pairs and covering every url exactly once.
    """
    return list(urls)[rank::world_size][worker::max(1, num_workers)]


def _split_key(name: str) -> tuple[str | None, str]:
    """webdataset convention: key = path up to the first dot of the file name, extension = the rest."""
    head, _, base = name.rpartition("/")
    if "." not in base or base.startswith("__"):
        return None, ""
    stem, ext = base.split(".", 1)
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _record_last_read(tar: tarfile.TarFile) -> dict[str, bytes]:
    """Remember the last block the tar reader pulled from its stream.

    In stream mode tarfile ends iteration *silently* when a header after the first is truncated, empty or
    garbage (only damage inside member data raises 'unexpected end of data'). The last block read when the
    loop ends is the header that stopped it; a well-formed archive stops on a full 512-byte zero block.
    """
    last = {"block": b"\0" * tarfile.BLOCKSIZE}
    read = tar.fileobj.read

    def recording_read(*args: Any, **kwargs: Any) -> bytes:
        data = read(*args, **kwargs)
        last["block"] = data
        return data

    tar.fileobj.read = recording_read  # instance attribute: also used by the stream's forward seek
    return last


def _check_clean_end(last: dict[str, bytes]) -> None:
    block = last["block"]
    if len(block) < tarfile.BLOCKSIZE:
        raise tarfile.ReadError("unexpected end of data (truncated archive: no end-of-archive marker)")
    if block.count(0) != tarfile.BLOCKSIZE:
        raise tarfile.ReadError("invalid tar header (corrupt archive)")


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """Yield the samples of one tar shard as dicts ``{"__key__", "__url__", ext: bytes}``.

    ``s3://`` / ``gs://`` shards stream through :mod:`pipelines.storage`; local paths, ``http(s)://`` and
    ``pipe:`` through ``wds.gopen``. Any failure (unreadable URL, truncated or corrupt tar) raises
    :class:`ShardReadError` naming the shard and the key being read; samples completed before the damage have
    already been yielded.
    """
    key: str | None = None
    current: dict[str, Any] | None = None
    try:
        stream = storage.open_input(url) if storage.is_object_uri(url) else wds.gopen(url, "rb")
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")
            last_read = _record_last_read(tar)
            for info in tar:
                if not info.isreg():
                    continue
                k, ext = _split_key(info.name)
                if k is None:
                    continue
                key = k
                if current is not None and current["__key__"] != k:
                    done, current = current, None
                    yield done
                if current is None:
                    current = {"__key__": k, "__url__": url}
                f = tar.extractfile(info)
                current[ext] = f.read() if f is not None else b""
                tar.members = []  # streaming mode: do not accumulate TarInfo objects
            _check_clean_end(last_read)
            if current is not None:
                done, current = current, None
                yield done
        finally:
            stream.close()
    except ShardReadError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with shard and key
        where = f"sample {key!r}" if key is not None else "before the first sample"
        raise ShardReadError(f"shard {url}: {where}: {type(e).__name__}: {e}", url=url, key=key) from e


def decode_sample(sample: dict[str, Any], channels: int, image_size: int | None = None) -> tuple[np.ndarray, int]:
    """PNG/JPEG bytes -> uint8 array [C, H, W] in mode L (C=1) or RGB (C=3); ``cls`` -> int (-1 if absent)."""
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None:
        have = sorted(k for k in sample if not k.startswith("__"))
        raise KeyError(f"no image entry ({'/'.join(IMAGE_KEYS)}); entries: {have}")
    with Image.open(io.BytesIO(data)) as img:
        mode = "L" if channels == 1 else "RGB"
        img = img.convert(mode) if img.mode != mode else img
        arr = np.asarray(img, dtype=np.uint8)
    if image_size is not None and arr.shape[:2] != (image_size, image_size):
        raise ValueError(f"image is {arr.shape[1]}x{arr.shape[0]}, expected {image_size}x{image_size}")
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    label = int(sample["cls"]) if "cls" in sample else -1
    return np.ascontiguousarray(arr), label


# ------------------------------------------------------------------------------------ pipeline stages
def _count_skip(counter: Any, err: ShardReadError) -> None:
    with counter.get_lock():
        counter.value += 1
    log.warning("skipping bad data (data.on_error=skip): %s", err)


def _shard_order(src: Iterator[dict], rng: random.Random, resampled: bool, shuffle: bool) -> Iterator[dict]:
    urls = [d["url"] for d in src]
    if not urls:
        return
    if resampled:
        while True:
            yield {"url": rng.choice(urls)}
    if shuffle:
        rng.shuffle(urls)
    yield from ({"url": u} for u in urls)


def _read(src: Iterator[dict], on_error: str, counter: Any, resampled: bool) -> Iterator[dict]:
    empty_in_a_row, seen = 0, set()
    for d in src:
        url, n = d["url"], 0
        try:
            for sample in iter_shard(url):
                n += 1
                yield sample
        except ShardReadError as e:
            if on_error == "raise":
                raise
            _count_skip(counter, e)
        seen.add(url)
        empty_in_a_row = 0 if n else empty_in_a_row + 1
        if resampled and empty_in_a_row >= max(16, 4 * len(seen)):  # would otherwise spin forever
            raise ShardReadError(f"no readable sample in {empty_in_a_row} consecutive shard reads (last: {url})", url)


def _decode(src: Iterator[dict], channels: int, image_size: int | None, on_error: str, counter: Any):
    for s in src:
        try:
            yield decode_sample(s, channels, image_size)
        except Exception as e:  # noqa: BLE001
            err = ShardReadError(
                f"shard {s.get('__url__')}: sample {s.get('__key__')!r}: cannot decode: {type(e).__name__}: {e}",
                url=s.get("__url__"), key=s.get("__key__"),
            )
            if on_error == "raise":
                raise err from e
            _count_skip(counter, err)


def _collate(samples: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.stack([a for a, _ in samples]))
    labels = torch.tensor([lab for _, lab in samples], dtype=torch.int64)
    return images, labels


def _finish(src: Iterator, flip: bool, rng: np.random.Generator):
    for images, labels in src:
        x = images.float().div_(127.5).sub_(1.0)  # uint8 0..255 -> [-1, 1] (DDPM, Ho et al. 2020, Sec. 3.3)
        if flip:
            mask = torch.from_numpy(rng.random(len(x)) < 0.5)
            x[mask] = x[mask].flip(-1)
        yield x, labels


class ShardStream(IterableDataset):
    """The per-worker pipeline (built lazily inside each DataLoader worker, so ``epoch`` and the worker id are
    read where the data is produced)."""

    def __init__(self, urls: list[str], *, rank: int, world_size: int, batch_size: int, resampled: bool,
                 shuffle_buffer: int, random_flip: bool, channels: int, image_size: int | None, seed: int,
                 on_error: str, counter: Any, epoch: int = 0):
        super().__init__()
        self.urls, self.rank, self.world_size = list(urls), rank, world_size
        self.batch_size, self.resampled, self.shuffle_buffer = batch_size, resampled, shuffle_buffer
        self.random_flip, self.channels, self.image_size = random_flip, channels, image_size
        self.seed, self.on_error, self.counter, self.epoch = seed, on_error, counter, epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = split_shards(self.urls, self.rank, self.world_size, worker, num_workers)
        tag = f"{self.seed}/{self.rank}/{worker}/{self.epoch}"  # str seeds are hashed deterministically
        stages: list[Any] = [
            wds.SimpleShardList(mine) if mine else [],
            partial(_shard_order, rng=random.Random("order" + tag), resampled=self.resampled,
                    shuffle=self.shuffle_buffer > 0),
            partial(_read, on_error=self.on_error, counter=self.counter, resampled=self.resampled),
        ]
        if self.shuffle_buffer > 0:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100),
                                      rng=random.Random("shuffle" + tag)))
        stages += [
            partial(_decode, channels=self.channels, image_size=self.image_size, on_error=self.on_error,
                    counter=self.counter),
            wds.batched(self.batch_size, collation_fn=_collate, partial=True),
            partial(_finish, flip=self.random_flip,
                    rng=np.random.default_rng(list(map(ord, "flip" + tag)))),
        ]
        return iter(wds.DataPipeline(*stages))


class ShardLoader:
    """Iterable of ``(images float32 [B, C, H, W] in [-1, 1], labels int64 [B])`` (label -1 = unlabelled).

    ``skipped``: bad samples skipped so far across all workers (``on_error="skip"``); ``shards``: this rank's
    shards; ``set_epoch(e)``: reseed shard order, shuffle and flips for the next ``iter()``.
    """

    def __init__(self, urls: list[str], *, rank: int, world_size: int, batch_size: int, num_workers: int,
                 resampled: bool, shuffle_buffer: int, random_flip: bool, channels: int, image_size: int | None,
                 seed: int, on_error: str, epoch: int, pin_memory: bool, multiprocessing_context: str | None):
        ctx = mp.get_context(multiprocessing_context)  # the counter's lock must come from the workers' context
        self._skipped = ctx.Value("q", 0)
        self.num_workers = num_workers
        self.shards = split_shards(urls, rank, world_size, 0, 1)
        self.dataset = ShardStream(
            urls, rank=rank, world_size=world_size, batch_size=batch_size, resampled=resampled,
            shuffle_buffer=shuffle_buffer, random_flip=random_flip, channels=channels, image_size=image_size,
            seed=seed, on_error=on_error, counter=self._skipped, epoch=epoch,
        )
        self._loader = wds.WebLoader(self.dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                     multiprocessing_context=ctx if num_workers > 0 else None)

    @property
    def skipped(self) -> int:
        return int(self._skipped.value)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self._loader)


def make_loader(
    urls: list[str] | str,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int = 1,
    resampled: bool = True,
    shuffle_buffer: int = 1000,
    random_flip: bool = False,
    channels: int,
    image_size: int | None = None,
    seed: int = 0,
    on_error: str = "raise",
    epoch: int = 0,
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
) -> ShardLoader:
    """Batches from this rank's disjoint shard subset (see module docstring for the contract).

    ``urls``: list of shard URLs (or one brace/glob spec, expanded like ``data.path``). ``rank``/``world_size``:
    the Ray Train world rank and size. ``image_size``: when given, an image of another size is a bad sample.
    ``multiprocessing_context``: "fork" / "spawn" / "forkserver" for the workers (None: Python's default).
    Raises ValueError up front for bad arguments and for fewer shards than ``world_size * max(1, num_workers)``.
    """
    if isinstance(urls, str):
        from pipelines.data.urls import expand_shard_spec

        urls = expand_shard_spec(urls, field="urls")
    urls = list(urls)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in 0..world_size-1, got rank={rank}, world_size={world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if not urls:
        raise ValueError("no shard URLs given")
    check_shard_count(len(urls), world_size, num_workers)
    return ShardLoader(
        urls, rank=rank, world_size=world_size, batch_size=batch_size, num_workers=num_workers,
        resampled=resampled, shuffle_buffer=shuffle_buffer, random_flip=random_flip, channels=channels,
        image_size=image_size, seed=seed, on_error=on_error, epoch=epoch, pin_memory=pin_memory,
        multiprocessing_context=multiprocessing_context,
    )


def load_split_tensors(
    result_or_manifest: Any, split: str, limit: int | None = None, *, on_error: str = "raise"
) -> tuple[torch.Tensor, torch.Tensor]:
    """All (or the first ``limit``) images of a split, in shard order, single process.

    ``result_or_manifest``: a DataResult, a manifest dict (from :func:`read_manifest`), or a path to
    ``manifest.json`` / its directory. Returns (images float32 [N, C, H, W] in [-1, 1], labels int64 [N]).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    src = result_or_manifest
    if isinstance(src, (str, Path)):
        src = read_manifest(src)
    if isinstance(src, dict):
        if "root" not in src:
            raise ValueError("pass a manifest loaded with read_manifest (it resolves the shard paths)")
        urls = src["splits"].get(split, {}).get("urls", [])
        channels, size = int(src["channels"]), int(src["image_size"])
    else:
        urls = list(getattr(src, f"{split}_urls"))
        channels, size = int(src.channels), int(src.image_size)
    images, labels, n = [], [], 0
    if urls and limit != 0:
        loader = make_loader(urls, rank=0, world_size=1, batch_size=256, num_workers=0, resampled=False,
                             shuffle_buffer=0, channels=channels, image_size=size, on_error=on_error)
        for x, y in loader:
            images.append(x)
            labels.append(y)
            n += len(x)
            if limit is not None and n >= limit:
                break
    if not images:
        return torch.zeros(0, channels, size, size), torch.zeros(0, dtype=torch.int64)
    x, y = torch.cat(images), torch.cat(labels)
    return (x[:limit], y[:limit]) if limit is not None else (x, y)
