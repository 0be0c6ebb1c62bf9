"""Stage records and the workspace lock with real drivers: concurrent writers, a corrupt record, a second
``diffusion-pipeline run`` on a workspace in use (local disk and S3 via moto)."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pipelines import storage
from pipelines.dag import StageRecord, read_record, run_pipeline, workspace_lock, write_record
from tests.moto_s3 import s3_bucket_fixture  # noqa: F401 - the s3_bucket fixture

from .conftest import tiny_config

pytestmark = pytest.mark.integration


def _hammer(cfg_dict: dict, worker: int, n: int) -> None:
    from pipelines.config import PipelineConfig

    cfg = PipelineConfig.model_validate(cfg_dict)
    for i in range(n):
        write_record(cfg, StageRecord(stage="prepare_data", fingerprint=f"w{worker}-{i}", result={"i": i},
                                      finished_at=time.time(), duration_s=0.0))
        rec = read_record(cfg, "prepare_data")
        assert rec is not None and rec.fingerprint.startswith("w")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_record_writers_never_collide(tmp_path, where, s3_bucket):
    """Two processes rewriting one stage's record: every write and read succeeds, nothing is left behind."""
    store = [f"workspace.store={s3_bucket}/rec-{tmp_path.name}"] if where == "s3" else []
    cfg = tiny_config(tmp_path, *store)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(cfg.to_dict(), w, 150 if where == "local" else 30)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert read_record(cfg, "prepare_data").fingerprint.startswith("w")
    assert [n for n, _, _ in storage.list_files(cfg.workspace.records_uri)] == ["prepare_data.json"]


def test_corrupt_record_is_reported_and_the_stage_reruns(ray_session, tmp_path, caplog):
    cfg = tiny_config(tmp_path)
    first = run_pipeline(cfg, until="prepare_data", log=lambda _: None)
    assert first.ran == ["prepare_data"]
    path = tmp_path / "pipeline" / "prepare_data.json"
    path.write_text(path.read_text()[:40])  # a torn write by some other tool / a full disk
    with caplog.at_level(logging.WARNING, logger="pipelines.dag"):
        again = run_pipeline(cfg, until="prepare_data", log=lambda _: None)
    assert again.ran == ["prepare_data"]  # not done -> re-run (the shards themselves are reused)
    assert any(str(path) in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    assert read_record(cfg, "prepare_data").result["fingerprint"] == first.results["prepare_data"]["fingerprint"]
    assert run_pipeline(cfg, until="prepare_data", log=lambda _: None).skipped == ["prepare_data"]


# ------------------------------------------------------------------------------- two drivers, one workspace
def _driver(tmp_path, tracking_uri: str, *extra: str) -> list[str]:
    sets = [f"workspace.root={tmp_path}/ws", f"registry.tracking_uri={tracking_uri}", "data.image_size=8", *extra]
    return [sys.executable, "-m", "pipelines", "run", "--until", "prepare_data", *sum((["--set", s] for s in sets), [])]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_driver_on_a_workspace_in_use_is_refused(tmp_path, where, s3_bucket):
    """Driver A takes the workspace and then blocks on its tracking server (a socket that never answers), so it
    holds the lock for as long as the test wants, with no hook in the code; driver B must refuse at once."""
    store = [f"workspace.store={s3_bucket}/lock-{tmp_path.name}"] if where == "s3" else []
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    with socket.socket() as stall:
        stall.bind(("127.0.0.1", 0))
        stall.listen(8)
        stall.settimeout(300)  # a guard against a hang, not a timing assertion
        uri = f"http://127.0.0.1:{stall.getsockname()[1]}"
        a = subprocess.Popen(_driver(tmp_path, uri, *store), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            conn, _ = stall.accept()  # A reached MLflow: it holds the lock (taken before anything else)
            b = subprocess.run(_driver(tmp_path, uri, *store), env=env, capture_output=True, text=True, timeout=300)
            conn.close()
        finally:
            os.killpg(a.pid, signal.SIGKILL)
            a.wait()
    assert b.returncode == 1, b.stdout + b.stderr
    assert "pipeline workspace lock" in b.stderr and f"held by pid {a.pid} " in b.stderr, b.stderr
    cfg = tiny_config(tmp_path / "ws", "data.image_size=8", *store)
    assert read_record(cfg, "prepare_data") is None  # B did nothing
    if where == "local":
        workspace_lock(cfg).acquire().release()  # the kernel freed the killed driver's lock
    else:  # the killed driver's claim stays live until it expires (ttl); clear it as an operator would
        with pytest.raises(storage.LockHeld, match=f"pid {a.pid} "):
            workspace_lock(cfg).acquire()
        storage.delete_tree(storage.join(cfg.workspace.records_uri, ".lock"))
        workspace_lock(cfg).acquire().release()
