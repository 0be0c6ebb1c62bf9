"""The local cluster of infra/local/cluster.py, started once for tests/cluster and stopped at the end.

It runs in its own state dir (DP_CLUSTER_DIR), on free ports and its own Ray temp dirs, so it neither collides
with a `make cluster-up` cluster nor with the suite's session Ray; this process never ``ray.init``s into it:
it talks to the cluster only through `ray job submit`, HTTP (Ray state API, MLflow REST API, Serve) and S3.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "infra" / "local" / "cluster.py"
_spec = importlib.util.spec_from_file_location("local_cluster", SCRIPT)
local_cluster = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local_cluster)
session_pids = local_cluster.session_pids  # every live process of a component's session

# configs/cluster_local.yaml shrunk to seconds: 8x8 digits, a tiny UNet, 40 steps, 20 evaluation samples
TINY = [
    "data.image_size=8", "data.samples_per_shard=128", "model.preset=custom", "model.model_channels=32",
    "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attention_resolutions=[4]",
    "diffusion.diffusion_steps=100", "train.run_name=tiny", "train.max_steps=40", "train.warmup_steps=5",
    "train.log_every=10", "train.checkpoint_every=20", "train.sample_every=40", "train.ema_decays=[0.9]",
    "train.lr=2e-3", "evaluate.num_samples=20", "evaluate.classifier_steps=50",
    "evaluate.sampler={sampler: ddim, steps: 5}", "evaluate.sampler_table=[{sampler: ddim, steps: 5}]",
    "registry.model_name=tiny-cluster",
]


def _postgres_available() -> bool:
    return bool(list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))) or shutil.which("initdb") is not None


@dataclass
class Cluster:
    """A running local cluster seen from outside: endpoints, a client environment, S3 and REST helpers."""

    state_dir: Path
    env: dict[str, str]
    ep: dict = field(default_factory=dict)

    def cli(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, str(SCRIPT), *args], env=self.env, cwd=ROOT, text=True,
                              capture_output=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        return proc

    def submit(self, *overrides: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir .` of the DAG on configs/cluster_local.yaml + TINY + ``overrides``."""
        sets = [a for o in [*TINY, *overrides] for a in ("--set", o)]
        return self.cli("submit", "--config", "configs/cluster_local.yaml", *sets, timeout=timeout, check=False)

    def job_logs(self, submit_output: str) -> str:
        """The job's whole log (`ray job logs`): the output `ray job submit` streamed can miss its last lines."""
        ids = re.findall(r"raysubmit_[A-Za-z0-9]+", submit_output)
        assert ids, submit_output[-3000:]
        argv = [str(Path(sys.executable).parent / "ray"), "job", "logs", "--address", self.ep["ray_address"], ids[-1]]
        env = {**self.env, **self.ep["client_env"]}
        return subprocess.run(argv, env=env, text=True, capture_output=True, timeout=120).stdout

    def state(self) -> dict:
        return json.loads((self.state_dir / "state.json").read_text())

    @property
    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.ep["s3_endpoint"], region_name="us-east-1",
                            aws_access_key_id=self.ep["aws_access_key_id"],
                            aws_secret_access_key=self.ep["aws_secret_access_key"])

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.ep["bucket"], Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def mlflow(self, path: str, body: dict | None = None, **params) -> dict:
        """One MLflow REST API call (GET with query parameters, or POST with a JSON body)."""
        url = f"{self.ep['mlflow_url']}/api/2.0/mlflow/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def ray_nodes(self) -> list[dict]:
        token = Path(self.ep["client_env"]["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        req = urllib.request.Request(f"{self.ep['ray_address']}/api/v0/nodes?limit=100",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)["data"]["result"]["result"]


@pytest.fixture(scope="session")
def cluster():
    if not _postgres_available():
        pytest.skip("PostgreSQL server binaries not installed (make cluster-deps installs them)")
    state_dir = Path(tempfile.mkdtemp(prefix="dpc-", dir="/tmp"))
    os.chmod(state_dir, 0o755)  # the PostgreSQL system user enters it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["DP_CLUSTER_DIR"] = str(state_dir)
    c = Cluster(state_dir=state_dir, env=env)
    try:
        c.cli("up", timeout=400)
        c.ep = json.loads((state_dir / "endpoints.json").read_text())
        yield c
    finally:
        if (state_dir / "state.json").is_file():
            c.cli("down", timeout=300, check=False)
        shutil.rmtree(state_dir, ignore_errors=True)
