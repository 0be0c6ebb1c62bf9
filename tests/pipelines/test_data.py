"""pipelines.data: writing shards, reading them per rank, error modes, fingerprints, config errors."""

from __future__ import annotations

import io
import itertools
import json
import os
import pickle
import shutil
import socket
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipelines.config import ConfigError, load_config, validate_config
from pipelines.data import (
    MANIFEST_NAME,
    ShardReadError,
    SourceError,
    expand_shard_spec,
    iter_shard,
    load_split_tensors,
    make_loader,
    prepare_data,
    read_manifest,
    split_shards,
)


def _cfg(ws: Path, *overrides: str):
    return load_config(None, [f"workspace.root={ws}", *overrides])


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _read_all(urls: list[str]) -> list[dict]:
    return [s for u in urls for s in iter_shard(u)]


def _as_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x + 1.0) * 127.5).round().to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The default digits dataset, prepared once for the module (1,797 images, 16x16, L)."""
    ws = tmp_path_factory.mktemp("ws")
    return prepare_data(_cfg(ws), progress=False)


@pytest.fixture(scope="module")
def id_shards(tmp_path_factory) -> list[str]:
    """12 shards x 5 samples; cls = global sample index, so any batch says exactly which samples it holds."""
    d = tmp_path_factory.mktemp("idshards")
    urls = []
    for s in range(12):
        path = str(d / f"ids-{s:06d}.tar")
        with wds.TarWriter(path, encoder=False) as w:
            for j in range(5):
                i = 5 * s + j
                w.write({"__key__": f"s{i:04d}", "png": _png(np.full((4, 4), i, np.uint8)), "cls": str(i).encode()})
        urls.append(path)
    return urls


# ------------------------------------------------------------------------------------------ round trip
def test_digits_round_trip(digits):
    from sklearn.datasets import load_digits

    ref = load_digits()
    m = read_manifest(digits.manifest_path)
    assert m["fingerprint"] == digits.fingerprint and digits.num_classes == 10 and digits.image_size == 16
    assert m["splits"]["train"]["count"] + m["splits"]["test"]["count"] == len(ref.target) == 1797
    assert abs(m["splits"]["test"]["count"] - 180) <= 5  # 90/10 split
    assert all(Path(u).name.startswith("shard-") for u in digits.train_urls + digits.test_urls)

    seen = Counter()
    for split in ("train", "test"):
        samples = _read_all(m["splits"][split]["urls"])
        assert len(samples) == m["splits"][split]["count"]
        assert sum(s["count"] for s in m["splits"][split]["shards"]) == len(samples)
        for s in samples:
            idx = json.loads(s["json"])["index"]
            seen[idx] += 1
            assert int(s["cls"]) == ref.target[idx]
            img = Image.open(io.BytesIO(s["png"]))
            assert img.mode == "L" and img.size == (16, 16)
            # oracle: 0..16 -> 0..255, then PIL bicubic upscale of the 8x8 image
            small = Image.fromarray(np.rint(ref.images[idx] * 255 / 16).astype(np.uint8))
            np.testing.assert_array_equal(np.asarray(img), np.asarray(small.resize((16, 16), Image.BICUBIC)))
    assert sorted(seen) == list(range(1797)) and set(seen.values()) == {1}

    # through the loader (2 workers, shuffled, finite): the same multiset of (label, pixels), exactly once
    loader = make_loader(digits.train_urls, rank=0, world_size=1, batch_size=100, num_workers=2,
                         resampled=False, shuffle_buffer=300, channels=1)
    got = Counter()
    for x, y in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (1, 16, 16)
        assert x.min() >= -1 and x.max() <= 1
        for img, lab in zip(_as_uint8(x), y.tolist(), strict=True):
            got[(lab, img.tobytes())] += 1
    want = Counter()
    for s in _read_all(digits.train_urls):
        want[(int(s["cls"]), np.asarray(Image.open(io.BytesIO(s["png"]))).tobytes())] += 1
    assert got == want

    # manifest statistics agree with the pixels
    x, _ = load_split_tensors(digits, "train")
    np.testing.assert_allclose(m["mean"], [float((x + 1).div(2).mean())], atol=1e-5)
    np.testing.assert_allclose(m["std"], [float((x + 1).div(2).std(unbiased=False))], atol=1e-5)


def test_load_split_tensors_limit_and_manifest_forms(digits):
    x, y = load_split_tensors(digits, "test")
    assert x.shape == (digits.num_test, 1, 16, 16) and y.shape == (digits.num_test,)
    x5, y5 = load_split_tensors(str(digits.manifest_path), "test", limit=5)
    torch.testing.assert_close(x5, x[:5])
    assert torch.equal(y5, y[:5])
    x3, _ = load_split_tensors(read_manifest(digits.data_dir), "test", limit=3)
    torch.testing.assert_close(x3, x[:3])


# -------------------------------------------------------------------------------------------- ranks
def test_split_shards_is_a_partition():
    urls = [f"u{i}" for i in range(23)]
    for world in (1, 2, 3, 4):
        for workers in (1, 2, 3):
            parts = [split_shards(urls, r, world, w, workers) for r in range(world) for w in range(workers)]
            assert sorted(sum(parts, [])) == sorted(urls)


def _assert_pairwise_disjoint(sets: list[set]) -> None:
    for a, b in itertools.combinations(sets, 2):
        assert not a & b


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_finite_disjoint_and_complete(id_shards, world_size):
    per_rank = []
    for rank in range(world_size):
        loader = make_loader(id_shards, rank=rank, world_size=world_size, batch_size=4, num_workers=1 if rank == 0 else 0,
                             resampled=False, shuffle_buffer=10, channels=1, seed=rank)
        ids = [i for _, y in loader for i in y.tolist()]
        assert len(ids) == len(set(ids))  # each sample once
        per_rank.append(set(ids))
    _assert_pairwise_disjoint(per_rank)
    assert set().union(*per_rank) == set(range(60))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_resampled_disjoint_shards(id_shards, world_size):
    shards_seen = []
    for rank in range(world_size):
        loader = make_loader(id_shards, rank=rank, world_size=world_size, batch_size=8, num_workers=2 if rank == 0 else 0,
                             resampled=True, shuffle_buffer=20, channels=1, random_flip=True)
        it = iter(loader)
        shards = {i // 5 for _ in range(25) for i in next(it)[1].tolist()}  # 200 samples: more than the rank owns
        own = {id_shards.index(u) for u in loader.shards}
        assert shards <= own and len(shards) >= len(own) - 1
        shards_seen.append(shards)
    _assert_pairwise_disjoint(shards_seen)


def test_too_few_shards_is_an_error_at_construction(id_shards):
    with pytest.raises(ValueError, match=r"3 shard\(s\).*world_size=2.*num_workers=2.*4 readers"):
        make_loader(id_shards[:3], rank=0, world_size=2, batch_size=4, num_workers=2, channels=1)
    make_loader(id_shards[:4], rank=1, world_size=2, batch_size=4, num_workers=2, channels=1)  # enough
    with pytest.raises(ValueError, match="rank"):
        make_loader(id_shards, rank=2, world_size=2, batch_size=4, channels=1)


def test_random_flip_flips_only_horizontally(tmp_path):
    arr = np.zeros((4, 4), np.uint8)
    arr[:, 0] = 255  # bright left column
    path = str(tmp_path / "flip-000000.tar")
    with wds.TarWriter(path, encoder=False) as w:
        for i in range(64):
            w.write({"__key__": f"k{i:03d}", "png": _png(arr), "cls": b"0"})
    loader = make_loader([path], rank=0, world_size=1, batch_size=64, num_workers=0, resampled=False,
                         shuffle_buffer=0, random_flip=True, channels=1)
    x, _ = next(iter(loader))
    left = (x[:, 0, :, 0] == 1).all(1)
    right = (x[:, 0, :, 3] == 1).all(1)
    assert bool((left ^ right).all()) and 10 < int(left.sum()) < 54
    assert bool(((x[:, 0, :, 1:3]) == -1).all())


# --------------------------------------------------------------------------------------- other sources
def test_image_folder_labelled_rgb(tmp_path):
    root = tmp_path / "imgs"
    for cls, color in (("cat", (200, 10, 10)), ("dog", (10, 200, 10))):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            arr = np.zeros((8, 16, 3), np.uint8)  # 16 wide x 8 high; the centre 8 columns carry the class colour
            arr[:, 4:12] = color
            Image.fromarray(arr).save(root / cls / f"{i}.png")
        Image.fromarray(np.full((20, 20, 3), 99, np.uint8)).save(root / cls / "extra.jpg")
    (root / "notes.txt").write_text("ignored")
    res = prepare_data(_cfg(tmp_path / "ws", "data.source=image_folder", f"data.path={root}", "data.image_size=8",
                            "data.channels=3", "data.test_fraction=0.34", "data.samples_per_shard=4"), progress=False)
    assert res.class_names == ["cat", "dog"] and res.num_classes == 2 and res.channels == 3
    assert res.num_train + res.num_test == 12 and res.num_test == 4  # round(6 * 0.34) = 2 per class
    for split in ("train", "test"):
        for s in _read_all(getattr(res, f"{split}_urls")):
            img = Image.open(io.BytesIO(s["png"]))
            assert img.mode == "RGB" and img.size == (8, 8)
            src = json.loads(s["json"])["file"]
            label = int(s["cls"])
            assert src.split("/")[0] == res.class_names[label]
            if src.endswith(".png"):  # resize shorter side (8 -> 8) + centre crop keeps columns 4..11 only
                want = (200, 10, 10) if label == 0 else (10, 200, 10)
                assert (np.asarray(img) == want).all()
    x, y = load_split_tensors(res, "train")
    assert x.shape == (res.num_train, 3, 8, 8) and set(y.tolist()) == {0, 1}


def test_image_folder_flat_unlabelled_grayscale(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(6):
        Image.fromarray(np.full((10, 6, 3), 40 * i, np.uint8)).save(root / f"im{i}.png")
    res = prepare_data(_cfg(tmp_path / "ws", "data.source=image_folder", f"data.path={root}", "data.image_size=4",
                            "data.channels=1", "data.test_fraction=0"), progress=False)
    assert res.num_classes == 0 and res.class_names == [] and res.num_train == 6 and res.test_urls == []
    samples = _read_all(res.train_urls)
    assert all("cls" not in s for s in samples)
    x, y = load_split_tensors(res, "train")
    assert x.shape == (6, 1, 4, 4) and y.tolist() == [-1] * 6
    assert sorted(_as_uint8(x)[:, 0, 0, 0].tolist()) == [40 * i for i in range(6)]


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no .* images"):
        prepare_data(_cfg(tmp_path / "ws", "data.source=image_folder", f"data.path={tmp_path / 'empty'}"))
    with pytest.raises(SourceError, match="not a directory"):
        prepare_data(_cfg(tmp_path / "ws", "data.source=image_folder", f"data.path={tmp_path / 'nope'}"))


def _cifar_tarball(path: Path, n_train: int = 4, n_test: int = 3, extra: dict | None = None) -> dict:
    """A tiny tarball in the official "python version" layout (protocol-2 pickles, bytes keys)."""
    rng = np.random.default_rng(0)
    batches = {}
    for name, n in [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]:
        batches[name] = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
                         b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"filenames": [f"{name}_{j}.png".encode() for j in range(n)]}
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072, b"num_cases_per_batch": 4}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in [*batches.items(), ("batches.meta", meta), *(extra or {}).items()]:
            blob = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return batches


def test_cifar10_tarball(tmp_path):
    batches = _cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    res = prepare_data(_cfg(tmp_path / "ws", "data.source=cifar10", f"data.path={tmp_path / 'cifar-10-python.tar.gz'}",
                            "data.image_size=32", "data.channels=3", "data.samples_per_shard=7"), progress=False)
    assert (res.num_train, res.num_test, res.num_classes) == (20, 3, 10)
    assert res.class_names == [f"class{i}" for i in range(10)] and len(res.train_urls) == 3
    for split in ("train", "test"):
        samples = _read_all(getattr(res, f"{split}_urls"))
        assert len({json.dumps(json.loads(s["json"]), sort_keys=True) for s in samples}) == len(samples)
        for s in samples:
            sid = json.loads(s["json"])
            assert (sid["batch"] == "test_batch") == (split == "test")
            b = batches[sid["batch"]]
            assert int(s["cls"]) == b[b"labels"][sid["index"]]
            # oracle: R, G, B planes of 1024 bytes each, row-major 32x32
            want = b[b"data"][sid["index"]].reshape(3, 32, 32).transpose(1, 2, 0)
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), want)


def test_cifar10_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    _cifar_tarball(tmp_path / "c.tar.gz", extra={"batches.meta": pickle.dumps(Evil(), protocol=2)})
    with pytest.raises(SourceError, match="refusing to unpickle"):
        prepare_data(_cfg(tmp_path / "ws", "data.source=cifar10", f"data.path={tmp_path / 'c.tar.gz'}"), progress=False)


# -------------------------------------------------------------------------------------- error modes
def _truncated_copy(src: str, dst: Path) -> tuple[str, int]:
    blob = Path(src).read_bytes()
    cut = len(blob) // 2 + 100  # not on a 512-byte boundary: inside a member
    dst.write_bytes(blob[:cut])
    return str(dst), cut


@pytest.mark.parametrize("num_workers", [0, 1])
def test_truncated_shard_raise_names_shard_and_key(digits, tmp_path, num_workers):
    bad, _ = _truncated_copy(digits.train_urls[0], tmp_path / "bad-000000.tar")
    loader = make_loader([bad], rank=0, world_size=1, batch_size=32, num_workers=num_workers, resampled=False,
                         shuffle_buffer=0, channels=1)
    with pytest.raises(ShardReadError) as e:
        for _ in loader:
            pass
    msg = str(e.value)
    assert bad in msg and "sample 'train-" in msg and "unexpected end of data" in msg
    if num_workers == 0:
        assert isinstance(e.value.__cause__, tarfile.ReadError) and e.value.url == bad


def test_truncated_shard_skip_keeps_good_samples_and_counts(digits, tmp_path):
    good = digits.train_urls[1]
    bad, _ = _truncated_copy(digits.train_urls[0], tmp_path / "bad-000000.tar")
    full = _read_all([digits.train_urls[0]])
    loader = make_loader([bad, good], rank=0, world_size=1, batch_size=50, num_workers=2, resampled=False,
                         shuffle_buffer=0, channels=1, on_error="skip")
    labels = [lab for _, y in loader for lab in y.tolist()]
    n_good = len(_read_all([good]))
    kept = len(labels) - n_good
    assert 0 < kept < len(full)  # samples before the damage survive, the rest of the shard is lost
    assert loader.skipped == 1


@pytest.mark.parametrize("context", ["fork", "spawn"])  # spawn/forkserver: macOS, Python >= 3.14 defaults
def test_corrupt_png_skip_counts_every_bad_sample(tmp_path, context):
    path = str(tmp_path / "mixed-000000.tar")
    with wds.TarWriter(path, encoder=False) as w:
        for i in range(10):
            png = b"not a png" if i % 4 == 0 else _png(np.full((4, 4), i, np.uint8))
            w.write({"__key__": f"k{i:03d}", "png": png, "cls": str(i).encode()})
    kw = dict(rank=0, world_size=1, batch_size=4, resampled=False, shuffle_buffer=0, channels=1)
    loader = make_loader([path], num_workers=1, on_error="skip", multiprocessing_context=context, **kw)
    assert sorted(i for _, y in loader for i in y.tolist()) == [1, 2, 3, 5, 6, 7, 9]
    assert loader.skipped == 3  # counted in the worker process, read here
    if context == "spawn":
        return
    with pytest.raises(ShardReadError, match=r"mixed-000000.tar: sample 'k000': cannot decode"):
        list(make_loader([path], num_workers=0, **kw))


def test_resampled_all_bad_does_not_spin_forever(tmp_path):
    path = tmp_path / "zero-000000.tar"
    path.write_bytes(b"\x01" * 700)
    loader = make_loader([str(path)], rank=0, world_size=1, batch_size=4, num_workers=0, channels=1, on_error="skip")
    with pytest.raises(ShardReadError, match="no readable sample"):
        next(iter(loader))
    assert loader.skipped >= 16


# ------------------------------------------------------------------------------ fingerprint / atomicity
def test_fingerprint_idempotent_and_sensitive(digits):
    ws = Path(digits.data_dir).parent.parent
    mtimes = {u: os.stat(u).st_mtime_ns for u in digits.train_urls}
    again = prepare_data(_cfg(ws), progress=False)
    assert again.skipped and again.fingerprint == digits.fingerprint and again.train_urls == digits.train_urls
    assert {u: os.stat(u).st_mtime_ns for u in digits.train_urls} == mtimes
    # loader-only settings do not change the data
    same = prepare_data(_cfg(ws, "data.random_flip=true", "data.loader_workers=3", "data.on_error=skip"), progress=False)
    assert same.skipped and same.fingerprint == digits.fingerprint
    changed = prepare_data(_cfg(ws, "data.image_size=12", "data.samples_per_shard=1000"), progress=False)
    assert not changed.skipped and changed.fingerprint != digits.fingerprint and changed.image_size == 12
    assert len(changed.train_urls) == 2
    assert sorted(p.name for p in (ws / "data").iterdir()) == sorted([digits.fingerprint, changed.fingerprint])


def test_same_input_gives_identical_bytes(digits, tmp_path):
    other = prepare_data(_cfg(tmp_path), progress=False)
    assert other.fingerprint == digits.fingerprint and not other.skipped
    for a, b in zip(digits.train_urls + digits.test_urls, other.train_urls + other.test_urls, strict=True):
        assert Path(a).read_bytes() == Path(b).read_bytes()


def test_crash_mid_write_leaves_no_dataset(tmp_path, monkeypatch):
    import pipelines.data.prepare as prep

    real, calls = prep.png_bytes, {"n": 0}

    def crashing(img):
        calls["n"] += 1
        if calls["n"] == 700:  # a few shards already on disk
            raise RuntimeError("simulated crash")
        return real(img)

    monkeypatch.setattr(prep, "png_bytes", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_data(_cfg(tmp_path), progress=False)
    assert list((tmp_path / "data").iterdir()) == []  # neither a final dir nor the temp dir
    # a hard kill cannot clean up: a temp dir of a dead writer is removed by the next run
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / "data" / f".tmp-0123456789abcdef-{socket.gethostname()}-{dead.pid}-deadbeef"
    (stale / "train").mkdir(parents=True)
    monkeypatch.setattr(prep, "png_bytes", real)
    res = prepare_data(_cfg(tmp_path), progress=False)
    assert not stale.exists() and [p.name for p in (tmp_path / "data").iterdir()] == [res.fingerprint]


# ------------------------------------------------------------------------------------ shards source
def test_shards_source_with_manifest_brace_and_glob(digits):
    ws = Path(digits.data_dir).parent.parent
    n = len(digits.train_urls)
    brace = f"{digits.data_dir}/train/shard-{{000000..{n - 1:06d}}}.tar"
    for spec in (brace, f"{digits.data_dir}/train/*.tar"):
        res = prepare_data(_cfg(ws, "data.source=shards", f"data.path={spec}"), progress=False)
        assert res.skipped and res.train_urls == digits.train_urls and res.test_urls == digits.test_urls
        assert (res.num_train, res.num_test, res.num_classes) == (digits.num_train, digits.num_test, 10)
        assert res.manifest_path == digits.manifest_path and res.mean == digits.mean


def test_shards_source_without_manifest_infers(digits, tmp_path):
    for u in digits.train_urls[:2]:
        shutil.copy(u, tmp_path / Path(u).name)
    res = prepare_data(_cfg(tmp_path / "ws", "data.source=shards", f"data.path={tmp_path}/shard-*.tar"),
                       progress=False)
    assert res.manifest_path is None and res.num_train is None and res.image_size == 16 and res.num_classes == 10
    res = prepare_data(_cfg(tmp_path / "ws", "data.source=shards", f"data.path={tmp_path}/shard-*.tar",
                            "data.num_classes=12"), progress=False)
    assert res.num_classes == 12
    with pytest.raises(ConfigError, match="data.image_size"):
        prepare_data(_cfg(tmp_path / "ws", "data.source=shards", f"data.path={tmp_path}/*.tar", "data.image_size=32"))
    with pytest.raises(ConfigError, match="data.path.*matches no files"):
        prepare_data(_cfg(tmp_path / "ws", "data.source=shards", f"data.path={tmp_path}/nothing-*.tar"))


def test_remote_shard_specs_become_urls():
    # object URIs stay URIs (pipelines.storage streams them; no CLI subprocess)
    assert expand_shard_spec("s3://bucket/d/shard-{000000..000002}.tar") == [
        f"s3://bucket/d/shard-00000{i}.tar" for i in range(3)
    ]
    assert expand_shard_spec("gs://b/x-{0..1}.tar") == ["gs://b/x-0.tar", "gs://b/x-1.tar"]
    assert expand_shard_spec("https://h/x-{00..01}.tar::pipe:cat /a.tar") == [
        "https://h/x-00.tar", "https://h/x-01.tar", "pipe:cat /a.tar"
    ]


# ---------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    ("overrides", "field", "hint"),
    [
        (["data.image_size=-3"], "data.image_size", "greater than 0"),
        (["data.source=mnist"], "data.source", "digits"),
        (["data.channels=2"], "data.channels", "3"),
        (["data.samples_per_shard=0"], "data.samples_per_shard", "greater than 0"),
        (["data.on_error=ignore"], "data.on_error", "skip"),
        (["data.source=image_folder"], "data.path", "required"),
    ],
)
def test_bad_data_config_names_the_field(overrides, field, hint):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert field in str(e.value) and hint in str(e.value)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_config({"data": {k.split(".")[1]: v for k, v in (o.split("=") for o in overrides)}})


def test_manifest_on_disk_is_relative(digits):
    raw = json.loads((Path(digits.data_dir) / MANIFEST_NAME).read_text())
    assert "root" not in raw and all(not s["path"].startswith("/") for s in raw["splits"]["train"]["shards"])
