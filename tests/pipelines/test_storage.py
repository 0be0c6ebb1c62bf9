"""pipelines.storage against the local disk and a real S3 API (moto's server on 127.0.0.1).

The oracle for "it really is on S3, at the configured endpoint" is boto3 talking to the same server: an SDK
that owes nothing to pyarrow.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid

import pytest
import webdataset as wds

from pipelines import storage
from pipelines.data import expand_shard_spec, iter_shard
from tests.moto_s3 import ENDPOINT, s3_bucket_fixture  # noqa: F401 - the s3_bucket fixture


def _prefix(bucket: str) -> str:
    return f"{bucket}/{uuid.uuid4().hex[:8]}"


def _boto():
    import boto3

    return boto3.client("s3", endpoint_url=ENDPOINT)


def _tar(n: int) -> bytes:
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0) as w:
        for i in range(n):
            w.write({"__key__": f"s-{i:03d}", "txt": f"sample {i}".encode(), "cls": str(i % 3).encode()})
    return buf.getvalue()


# --------------------------------------------------------------------------------------- reads and writes
def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "rec.json"
    storage.write_bytes(target, b"one")
    storage.write_bytes(target, b"two")
    assert target.read_bytes() == b"two" and storage.read_bytes(target) == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["rec.json"]
    assert storage.exists(target) and not storage.exists(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(tmp_path / "nope")


def test_s3_round_trip_goes_to_the_endpoint_in_aws_endpoint_url(s3_bucket):
    assert storage.s3_options()["endpoint_override"] == os.environ["AWS_ENDPOINT_URL"] == ENDPOINT
    base = _prefix(s3_bucket)
    storage.write_bytes(f"{base}/a/x.bin", b"\x00\x01payload")
    storage.write_bytes(f"{base}/b.bin", b"b")
    bucket, key = base.removeprefix("s3://").split("/", 1)
    assert _boto().get_object(Bucket=bucket, Key=f"{key}/a/x.bin")["Body"].read() == b"\x00\x01payload"
    assert storage.read_bytes(f"{base}/a/x.bin") == b"\x00\x01payload"
    assert [(n, s) for n, s, _ in storage.list_files(base)] == [("a/x.bin", 9), ("b.bin", 1)]
    assert storage.exists(f"{base}/b.bin") and not storage.exists(f"{base}/c.bin")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{base}/c.bin")
    storage.delete_tree(base)
    assert storage.list_files(base) == []


def test_object_uri_validation():
    assert storage.check_object_uri("s3://b/p/", field="workspace.store") == "s3://b/p"
    for bad in ("b/p", "s3://", "/abs/path", "http://h/x"):
        with pytest.raises(ValueError, match="workspace.store"):
            storage.check_object_uri(bad, field="workspace.store")


def test_config_store_field_is_validated():
    from pipelines.config import ConfigError, load_config

    cfg = load_config(None, ["workspace.store=s3://bkt/run1/"])
    assert cfg.workspace.data_uri == "s3://bkt/run1/data" and cfg.workspace.records_uri == "s3://bkt/run1/pipeline"
    with pytest.raises(ConfigError, match="workspace.store"):
        load_config(None, ["workspace.store=bkt/run1"])


# ---------------------------------------------------------------------------------------- S3 shards
def test_s3_shards_stream_through_the_library_not_a_cli(s3_bucket, tmp_path):
    base = _prefix(s3_bucket)
    for i in range(3):
        storage.write_bytes(f"{base}/shard-{i:06d}.tar", _tar(5 + i))
        (tmp_path / f"shard-{i:06d}.tar").write_bytes(_tar(5 + i))
    urls = expand_shard_spec(f"{base}/shard-{{000000..000002}}.tar")
    assert urls == [f"{base}/shard-{i:06d}.tar" for i in range(3)]
    assert expand_shard_spec(f"{base}/shard-*.tar") == urls  # glob by listing the prefix
    for u in urls:
        local = tmp_path / u.rsplit("/", 1)[1]
        got = [{k: v for k, v in s.items() if k != "__url__"} for s in iter_shard(u)]
        want = [{k: v for k, v in s.items() if k != "__url__"} for s in iter_shard(str(local))]
        assert got == want and len(got) >= 5
    # webdataset's own pipeline opens s3:// through pipelines.storage too (no `aws` binary involved)
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert len(keys) == 5 + 6 + 7


def test_truncated_s3_shard_is_reported_with_its_url(s3_bucket):
    from pipelines.data import ShardReadError

    url = f"{_prefix(s3_bucket)}/bad.tar"
    data = _tar(6)
    storage.write_bytes(url, data[: len(data) // 2])
    with pytest.raises(ShardReadError, match=url.replace("/", ".")):
        list(iter_shard(url))


def test_tar_reader_gets_a_stream(s3_bucket):
    url = f"{_prefix(s3_bucket)}/s.tar"
    storage.write_bytes(url, _tar(2))
    with storage.open_input(url) as f, tarfile.open(fileobj=f, mode="r|") as t:
        assert [m.name for m in t] == ["s-000.cls", "s-000.txt", "s-001.cls", "s-001.txt"]  # TarWriter sorts keys


# ------------------------------------------------------------------------------------------- the lock
def test_local_lock_refuses_a_second_holder_and_is_freed_when_the_holder_dies(tmp_path):
    path = tmp_path / "ws" / ".lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipelines.storage import StoreLock; "
         f"StoreLock({str(path)!r}).acquire(); print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(storage.LockHeld, match=f"held by pid {holder.pid} "):
            storage.StoreLock(path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with storage.StoreLock(path):  # the kernel dropped the dead holder's flock
        with pytest.raises(storage.LockHeld):
            storage.StoreLock(path).acquire()
    storage.StoreLock(path).acquire().release()


def test_object_lock_excludes_and_releases(s3_bucket):
    uri = f"{_prefix(s3_bucket)}/.lock"
    with storage.StoreLock(uri):
        with pytest.raises(storage.LockHeld, match=f"pid {os.getpid()} "):
            storage.StoreLock(uri).acquire()
        assert len(storage.list_files(uri)) == 1  # the refused claimant removed its claim
    assert storage.list_files(uri) == []
    storage.StoreLock(uri).acquire().release()


def test_object_lock_is_mutually_exclusive_under_contention(s3_bucket):
    """8 claimants at once, 5 rounds: never two holders (all refusing is allowed: a clear refusal)."""
    for _ in range(5):
        uri = f"{_prefix(s3_bucket)}/.lock"
        barrier, won, lock = threading.Barrier(8), [], threading.Lock()

        def claim(uri=uri, barrier=barrier, won=won, lock=lock):
            barrier.wait()
            try:
                held = storage.StoreLock(uri).acquire()
            except storage.LockHeld:
                return
            with lock:
                won.append(held)

        threads = [threading.Thread(target=claim) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) <= 1
        for held in won:
            held.release()


def test_object_lock_renewal_keeps_it_and_a_dead_holders_claim_expires(s3_bucket):
    uri = f"{_prefix(s3_bucket)}/.lock"
    # a live holder renews every ttl/4: it still excludes after several ttl periods
    with storage.StoreLock(uri, ttl_s=2):
        time.sleep(5)
        with pytest.raises(storage.LockHeld):
            storage.StoreLock(uri, ttl_s=2).acquire()
    # a dead holder (a claim nobody renews) stops counting once it is older than ttl
    storage.write_bytes(f"{uri}/deadhost-1-0000.json", b'{"host": "deadhost", "pid": 1, "since_unix": 0}')
    with pytest.raises(storage.LockHeld, match="pid 1 on deadhost"):
        storage.StoreLock(uri, ttl_s=2).acquire()
    time.sleep(4)
    with storage.StoreLock(uri, ttl_s=2):
        assert [n for n, _, _ in storage.list_files(uri)] != ["deadhost-1-0000.json"]
    assert storage.list_files(uri) == []
