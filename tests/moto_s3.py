"""A real S3 API for tests: moto's server mode (``moto_server``) on 127.0.0.1 and a free port.

Importing this module (test modules do, at collection) points the AWS environment at that port, before any
fixture starts Ray: Ray's workers inherit the environment of the process that starts Ray, and read S3 through
``pipelines.storage`` exactly as on a cluster. The server itself starts with the first test that asks for
``s3_bucket`` and stops at the end of the session. A test module enables it with
``from tests.moto_s3 import s3_bucket_fixture  # noqa: F401``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENDPOINT = os.environ.get("TEST_MOTO_ENDPOINT") or f"http://127.0.0.1:{_free_port()}"
os.environ["TEST_MOTO_ENDPOINT"] = ENDPOINT  # one port per session, however many modules import this
os.environ.update(AWS_ENDPOINT_URL=ENDPOINT, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_DEFAULT_REGION="us-east-1")
os.environ.pop("AWS_ENDPOINT_URL_S3", None)
os.environ.pop("AWS_PROFILE", None)
BUCKET = "pipeline-tests"


def _moto_command(port: str) -> list[str]:
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        pytest.skip("moto_server not installed (pip install 'moto[server]'; it is in the dev extra)")
    return [exe, "-H", "127.0.0.1", "-p", port]


@pytest.fixture(scope="session", name="s3_bucket")
def s3_bucket_fixture(tmp_path_factory) -> str:
    """``s3://pipeline-tests`` on a moto server of this session; tests use their own prefixes in it."""
    from pipelines import storage

    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(_moto_command(ENDPOINT.rsplit(":", 1)[1]), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        for _ in range(300):  # readiness, not a timing assertion: up to ~30 s on a loaded machine
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(ENDPOINT, timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"moto_server did not answer at {ENDPOINT}: {log.read_text()[-2000:]}")
        storage.make_bucket(f"s3://{BUCKET}")
        yield f"s3://{BUCKET}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
