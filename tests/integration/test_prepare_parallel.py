"""prepare_data as parallel Ray tasks: the same bytes as a serial run, locally and on S3 (moto), and atomic.

The oracle is the serial, in-process writer (``data.prepare_tasks=1``): every shard of a parallel run must equal
its bytes, and the manifest must equal its manifest except for the creation time.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipelines import storage
from pipelines.config import load_config
from pipelines.data import MANIFEST_NAME, load_split_tensors, prepare_data
from pipelines.data.sources import SourceError
from tests.moto_s3 import s3_bucket_fixture  # noqa: F401 - the s3_bucket fixture

pytestmark = pytest.mark.integration
SMALL = ["data.samples_per_shard=100", "data.image_size=8"]  # digits: 17 train + 2 test shards


def _files(root: str) -> dict[str, bytes]:
    return {name: storage.read_bytes(storage.join(root, name)) for name, _, _ in storage.list_files(root)}


def _same_output(a, b) -> None:
    """Two DataResults hold identical shards and manifests (creation time and location aside)."""
    assert a.fingerprint == b.fingerprint and not a.skipped and not b.skipped
    fa, fb = _files(str(a.data_dir)), _files(str(b.data_dir))
    assert sorted(fa) == sorted(fb) and len(fa) == 1 + len(a.train_urls) + len(a.test_urls)
    for name in fa:
        if name != MANIFEST_NAME:
            assert fa[name] == fb[name], name
    ma, mb = (json.loads(f[MANIFEST_NAME]) for f in (fa, fb))
    ma.pop("created_unix"), mb.pop("created_unix")
    assert ma == mb


def test_parallel_local_prepare_is_byte_identical_to_serial(ray_session, tmp_path):
    serial = prepare_data(load_config(None, [*SMALL, f"workspace.root={tmp_path}/a", "data.prepare_tasks=1"]),
                          progress=False)
    parallel = prepare_data(load_config(None, [*SMALL, f"workspace.root={tmp_path}/b", "data.prepare_tasks=3"]),
                            progress=False)
    assert len(serial.train_urls) == 17
    _same_output(serial, parallel)
    assert [p.name for p in (tmp_path / "b" / "data").iterdir()] == [parallel.fingerprint]  # no temp dir left
    # the statistics are exact: compare with numpy over the decoded train split
    x, _ = load_split_tensors(parallel, "train")
    pix = (x.numpy().astype(np.float64) + 1) / 2  # [-1, 1] -> [0, 1]
    assert np.allclose(parallel.mean, pix.mean(axis=(0, 2, 3)), atol=1e-6)
    assert np.allclose(parallel.std, pix.std(axis=(0, 2, 3)), atol=1e-6)


def test_prepare_to_s3_is_byte_identical_and_readable(ray_session, tmp_path, s3_bucket):
    local = prepare_data(load_config(None, [*SMALL, f"workspace.root={tmp_path}/l", "data.prepare_tasks=1"]),
                         progress=False)
    runs = {}
    for tasks in (1, 3):
        store = f"{s3_bucket}/prep-{tmp_path.name}-{tasks}"
        cfg = load_config(None, [*SMALL, f"workspace.root={tmp_path}/s{tasks}", f"workspace.store={store}",
                                 f"data.prepare_tasks={tasks}"])
        runs[tasks] = prepare_data(cfg, progress=False)
        assert runs[tasks].train_urls[0].startswith(f"{store}/data/{local.fingerprint}/train/")
        assert not (tmp_path / f"s{tasks}" / "data").exists()  # nothing written locally
        again = prepare_data(cfg, progress=False)
        assert again.skipped and again.train_urls == runs[tasks].train_urls
    _same_output(runs[1], runs[3])
    _same_output(local, runs[3])
    # the loader reads the S3 shards through pipelines.storage: same tensors as from the local copy
    xs, ys = load_split_tensors(runs[3], "test")
    xl, yl = load_split_tensors(local, "test")
    assert xs.shape[0] == local.num_test and (xs == xl).all() and (ys == yl).all()


def _image_folder(root, n: int, bad: int | None = None):
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        if i == bad:
            (d / f"{i:04d}.png").write_bytes(b"not a png")
        else:
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_failed_parallel_prepare_leaves_nothing_that_looks_finished(ray_session, tmp_path, s3_bucket, where):
    src = tmp_path / "images"
    _image_folder(src, 60, bad=57)  # the last shard fails inside its Ray task
    store = [f"workspace.store={s3_bucket}/fail-{tmp_path.name}"] if where == "s3" else []
    cfg = load_config(None, ["data.source=image_folder", f"data.path={src}", "data.image_size=8", "data.channels=3",
                             "data.samples_per_shard=10", "data.prepare_tasks=3", f"workspace.root={tmp_path}/ws",
                             *store])
    with pytest.raises(Exception, match="cannot read image") as err:
        prepare_data(cfg, progress=False)
    assert isinstance(err.value, SourceError) or "SourceError" in str(err.value)
    manifests = [n for n, _, _ in storage.list_files(cfg.workspace.data_uri) if n.endswith(MANIFEST_NAME)]
    assert manifests == []
    if where == "local":
        assert list((tmp_path / "ws" / "data").iterdir()) == []  # the temp dir is gone too
