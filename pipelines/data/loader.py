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
(resample / shuffle) -> tar reader -> ``wds.shuffle`` buffer (on encoded bytes) -> PNG decode (L or RGB) and
check -> ``wds.batched`` -> random flip + scale to float32 in [-1, 1]. Batches are assembled in the workers; the
main process only receives ready tensors. All settings are one frozen :class:`LoaderSpec`, validated once.

Validation on read: each decoded sample must match the spec's data format: channels (the image's own mode),
image size, and a label in ``[0, num_classes)`` (none at all when ``num_classes`` is 0). The pipeline takes these
from the manifest or the config, so a label equal to ``num_classes`` (which would silently become the
classifier-free-guidance null label) or an image of the wrong size is a bad sample like an undecodable one.

Errors: a damaged shard or a bad sample raises :class:`ShardReadError` naming the shard URL and the sample key
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
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch.utils.data import IterableDataset, get_worker_info

from pipelines import storage
from pipelines.data.manifest import read_manifest
from pipelines.images import from_uint8

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


# ------------------------------------------------------------------------------------ the spec
class LoaderSpec(BaseModel):
    """Everything a shard reader needs, validated once (a bad field is a ValueError naming it) and then held,
    frozen, by the loader and by every worker's stream.

    Data format (what each sample must be, else it is a bad sample): ``channels`` (1 = L, 3 = RGB; the image's
    own mode must agree, palette images convert to either), ``image_size`` (square side; None: not checked) and
    ``num_classes`` (every label in ``[0, num_classes)``; 0 = unlabelled, so no sample may carry a label; None:
    not checked). The pipeline takes all three from the manifest or the config (:meth:`for_data`), never from
    the shards themselves. Reading: ``rank`` of ``world_size`` owns ``urls[rank::world_size]``; ``resampled``
    streams forever (training), else one pass (evaluation); ``on_error`` raise / skip-and-count.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    urls: tuple[str, ...] = Field(min_length=1)
    rank: int = Field(0, ge=0)
    world_size: int = Field(1, ge=1)
    batch_size: int = Field(ge=1)
    num_workers: int = Field(1, ge=0, description="DataLoader worker processes (0: read in this process).")
    channels: Literal[1, 3]
    image_size: int | None = Field(None, gt=0)
    num_classes: int | None = Field(None, ge=0)
    resampled: bool = True
    shuffle_buffer: int = Field(1000, ge=0, description="Samples in the shuffle buffer; 0: keep shard order.")
    random_flip: bool = False
    seed: int = 0
    on_error: Literal["raise", "skip"] = "raise"
    multiprocessing_context: Literal["fork", "spawn", "forkserver"] | None = None

    @field_validator("urls", mode="before")
    @classmethod
    def _expand(cls, v: Any) -> Any:
        if isinstance(v, str):  # one brace/glob spec, expanded like data.path
            from pipelines.data.urls import expand_shard_spec

            return expand_shard_spec(v, field="urls")
        return v

    @model_validator(mode="after")
    def _placement(self) -> LoaderSpec:
        if self.rank >= self.world_size:
            raise ValueError(f"rank must lie in 0..world_size-1, got rank={self.rank}, world_size={self.world_size}")
        check_shard_count(len(self.urls), self.world_size, self.num_workers)
        return self

    @classmethod
    def for_data(cls, data: Any, split: str = "train", **reading: Any) -> LoaderSpec:
        """The spec for one split of a DataResult or a manifest dict (from :func:`read_manifest`): urls,
        channels, image size and class count come from it; ``reading`` sets the other fields."""
        return cls(**data_format(data, split), **reading)


def data_format(data: Any, split: str) -> dict[str, Any]:
    """``urls`` of ``split`` and the data format (``channels``, ``image_size``, ``num_classes``) of a DataResult
    or a manifest dict loaded with :func:`read_manifest`."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if isinstance(data, dict):
        if "root" not in data:
            raise ValueError("pass a manifest loaded with read_manifest (it resolves the shard paths)")
        urls, fmt = data["splits"].get(split, {}).get("urls", []), data
    else:
        urls, fmt = getattr(data, f"{split}_urls"), vars(data)
    return {"urls": list(urls), **{k: int(fmt[k]) for k in ("channels", "image_size", "num_classes")}}


def _image_channels(img: Image.Image) -> int | None:
    """1 for grayscale modes, 3 for colour ones, None for palette images (they convert to either)."""
    if img.mode in ("P", "PA"):
        return None
    bands = [b for b in img.getbands() if b != "A"]
    return 1 if len(bands) == 1 else 3


def decode_sample(sample: dict[str, Any], spec: LoaderSpec) -> tuple[np.ndarray, int]:
    """PNG/JPEG bytes -> uint8 array [C, H, W] in mode L (C=1) or RGB (C=3); ``cls`` -> int (-1 if absent).

    ValueError/KeyError when the sample breaks the spec's data format (channels, size, label range).
    """
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None:
        have = sorted(k for k in sample if not k.startswith("__"))
        raise KeyError(f"no image entry ({'/'.join(IMAGE_KEYS)}); entries: {have}")
    with Image.open(io.BytesIO(data)) as img:
        found = _image_channels(img)
        if found is not None and found != spec.channels:
            raise ValueError(f"image has {found} channel(s) (mode {img.mode}), expected {spec.channels}")
        mode = "L" if spec.channels == 1 else "RGB"
        img = img.convert(mode) if img.mode != mode else img
        arr = np.asarray(img, dtype=np.uint8)
    size = spec.image_size
    if size is not None and arr.shape[:2] != (size, size):
        raise ValueError(f"image is {arr.shape[1]}x{arr.shape[0]}, expected {size}x{size}")
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    label = int(sample["cls"]) if "cls" in sample else None
    _check_label(label, spec.num_classes)
    return np.ascontiguousarray(arr), -1 if label is None else label


def _check_label(label: int | None, num_classes: int | None) -> None:
    """A label must lie in [0, num_classes); an unlabelled dataset (0 classes) has none (None: not checked)."""
    if num_classes is None:
        return
    if num_classes == 0 and label is not None:
        raise ValueError(f"label {label} in an unlabelled dataset (num_classes=0); set the class count "
                         "(data.num_classes) to train on labels")
    if num_classes > 0 and (label is None or not 0 <= label < num_classes):
        got = "no label (.cls)" if label is None else f"label {label}"
        raise ValueError(f"{got}: labels must lie in [0, {num_classes}) (num_classes={num_classes})")


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


def _decode(src: Iterator[dict], spec: LoaderSpec, counter: Any):
    for s in src:
        try:
            yield decode_sample(s, spec)
        except Exception as e:  # noqa: BLE001
            err = ShardReadError(
                f"shard {s.get('__url__')}: sample {s.get('__key__')!r}: bad sample: {type(e).__name__}: {e}",
                url=s.get("__url__"), key=s.get("__key__"),
            )
            if spec.on_error == "raise":
                raise err from e
            _count_skip(counter, err)


def _collate(samples: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.stack([a for a, _ in samples]))
    labels = torch.tensor([lab for _, lab in samples], dtype=torch.int64)
    return images, labels


def _finish(src: Iterator, flip: bool, rng: np.random.Generator):
    for images, labels in src:
        x = from_uint8(images)
        if flip:
            mask = torch.from_numpy(rng.random(len(x)) < 0.5)
            x[mask] = x[mask].flip(-1)
        yield x, labels


class ShardStream(IterableDataset):
    """The per-worker pipeline, built lazily inside each DataLoader worker (the worker id is read where the data
    is produced). Holds the spec and the shared skip counter, nothing else."""

    def __init__(self, spec: LoaderSpec, counter: Any):
        super().__init__()
        self.spec, self.counter = spec, counter

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sp = self.spec
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = split_shards(list(sp.urls), sp.rank, sp.world_size, worker, num_workers)
        tag = f"{sp.seed}/{sp.rank}/{worker}"  # str seeds are hashed deterministically
        stages: list[Any] = [
            wds.SimpleShardList(mine) if mine else [],
            partial(_shard_order, rng=random.Random("order" + tag), resampled=sp.resampled,
                    shuffle=sp.shuffle_buffer > 0),
            partial(_read, on_error=sp.on_error, counter=self.counter, resampled=sp.resampled),
        ]
        if sp.shuffle_buffer > 0:
            stages.append(wds.shuffle(sp.shuffle_buffer, initial=min(sp.shuffle_buffer, 100),
                                      rng=random.Random("shuffle" + tag)))
        stages += [
            partial(_decode, spec=sp, counter=self.counter),
            wds.batched(sp.batch_size, collation_fn=_collate, partial=True),
            partial(_finish, flip=sp.random_flip, rng=np.random.default_rng(list(map(ord, "flip" + tag)))),
        ]
        return iter(wds.DataPipeline(*stages))


class ShardLoader:
    """Iterable of ``(images float32 [B, C, H, W] in [-1, 1], labels int64 [B])`` (label -1 = unlabelled).

    ``spec``: the :class:`LoaderSpec`; ``skipped``: bad samples skipped so far across all workers
    (``on_error="skip"``); ``shards``: this rank's shards.
    """

    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        ctx = mp.get_context(spec.multiprocessing_context)  # the counter's lock must come from the workers' context
        self._skipped = ctx.Value("q", 0)
        self.shards = split_shards(list(spec.urls), spec.rank, spec.world_size, 0, 1)
        self.dataset = ShardStream(spec, self._skipped)
        self._loader = wds.WebLoader(self.dataset, batch_size=None, num_workers=spec.num_workers,
                                     multiprocessing_context=ctx if spec.num_workers > 0 else None)

    @property
    def num_workers(self) -> int:
        return self.spec.num_workers

    @property
    def skipped(self) -> int:
        return int(self._skipped.value)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self._loader)


def make_loader(spec_or_urls: LoaderSpec | list[str] | str, **fields: Any) -> ShardLoader:
    """Batches from this rank's disjoint shard subset (see the module docstring for the contract).

    Either a ready :class:`LoaderSpec`, or shard URLs (a list, or one brace/glob spec expanded like
    ``data.path``) plus the spec's other fields as keywords (``rank``, ``world_size``, ``batch_size``,
    ``channels``, ``image_size``, ``num_classes``, ...). Raises ValueError naming the field for bad arguments and
    for fewer shards than ``world_size * max(1, num_workers)``.
    """
    if isinstance(spec_or_urls, LoaderSpec):
        spec = LoaderSpec.model_validate({**spec_or_urls.model_dump(), **fields}) if fields else spec_or_urls
    else:
        spec = LoaderSpec(urls=spec_or_urls, **fields)
    return ShardLoader(spec)


def load_split_tensors(
    result_or_manifest: Any, split: str, limit: int | None = None, *, on_error: str = "raise"
) -> tuple[torch.Tensor, torch.Tensor]:
    """All (or the first ``limit``) images of a split, in shard order, single process, validated against the
    data's channels, image size and class count (:meth:`LoaderSpec.for_data`).

    ``result_or_manifest``: a DataResult, a manifest dict (from :func:`read_manifest`), or a path to
    ``manifest.json`` / its directory. Returns (images float32 [N, C, H, W] in [-1, 1], labels int64 [N]).
    """
    src = read_manifest(result_or_manifest) if isinstance(result_or_manifest, (str, Path)) else result_or_manifest
    fmt = data_format(src, split)
    images, labels, n = [], [], 0
    if fmt["urls"] and limit != 0:
        spec = LoaderSpec(**fmt, batch_size=256, num_workers=0, resampled=False, shuffle_buffer=0, on_error=on_error)
        for x, y in ShardLoader(spec):
            images.append(x)
            labels.append(y)
            n += len(x)
            if limit is not None and n >= limit:
                break
    if not images:
        c, size = fmt["channels"], fmt["image_size"]
        return torch.zeros(0, c, size, size), torch.zeros(0, dtype=torch.int64)
    x, y = torch.cat(images), torch.cat(labels)
    return (x[:limit], y[:limit]) if limit is not None else (x, y)
