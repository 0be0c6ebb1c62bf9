"""A local stand-in for a cluster, on 127.0.0.1: multi-node Ray, PostgreSQL, an S3 API, an MLflow server.

    python infra/local/cluster.py up      # start everything, write workspace/cluster/endpoints.json
    python infra/local/cluster.py down    # stop everything up started (by pid), leave nothing running
    python infra/local/cluster.py status  # what runs, where

Every process listens on 127.0.0.1 on a free port and is started from here in its own session, so ``down`` ends
exactly the processes of one component (its session) and nothing else on the machine. All state lives under
``workspace/cluster/`` except Ray's temp dirs, which sit on a short path under /tmp (Unix socket paths are
limited to 107 bytes). Secrets (Ray token, PostgreSQL password, S3 keys) are generated once per cluster into
``workspace/cluster/secrets/`` with 0600 permissions; nothing uses a default password.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Container
from pathlib import Path

import typer
from pydantic import BaseModel, Field

ROOT = Path(__file__).resolve().parents[2]
# DP_CLUSTER_DIR moves the state (tests use a temporary one); the PostgreSQL user must be able to enter it.
STATE_DIR = Path(os.environ.get("DP_CLUSTER_DIR") or ROOT / "workspace" / "cluster").resolve()
BIN = Path(sys.executable).parent
BUCKET = "diffusion-pipeline"  # configs/cluster_local.yaml names it
PG_USER = "dp-postgres"  # the system user PostgreSQL runs as when we are root (initdb refuses root)
PG_DB = "mlflow"
NODE_CPUS = 2  # logical CPUs per Ray node: one 1.5-CPU Train worker + a 0.5-CPU Serve replica fit on each
OBJECT_STORE_BYTES = 150 * 1024 * 1024

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=__doc__.split("\n\n")[0])


class Endpoints(BaseModel):
    """``workspace/cluster/endpoints.json``: what a client needs to use the cluster."""

    ray_address: str = Field(description="Dashboard / job API (ray job submit --address).")
    gcs_address: str = Field(description="Ray GCS (ray.init(address=...)), for drivers on this machine.")
    client_env: dict[str, str] = Field(description="Environment a Ray client needs (token auth).")
    mlflow_url: str
    s3_endpoint: str
    bucket: str
    aws_access_key_id: str
    aws_secret_access_key: str
    serve_url: str = Field(description="Ray Serve HTTP proxy; serve_url + /v1/generate answers once deployed.")
    serve_port: int


class Component(BaseModel):
    """One started process: its pid is also its session id (started with start_new_session)."""

    name: str
    pid: int
    log: str


class State(BaseModel):
    """``workspace/cluster/state.json``: ports, temp dirs and pids of a running cluster."""

    cluster_id: str
    ports: dict[str, int]
    temp_dirs: dict[str, str]
    components: dict[str, Component] = {}
    pg_bin: str
    pg_as_user: str | None


# ------------------------------------------------------------------------------------------------ helpers
def _free_ports(n: int, avoid: Container[int]) -> list[int]:
    """``n`` distinct ports the kernel calls free on 127.0.0.1, none in ``avoid`` (worker ranges, ports in use).

    Each probe socket is closed before the next, so the kernel may offer a port twice: repeats are skipped.
    """
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid and port not in ports:
            ports.append(port)
    return ports


def _ephemeral_low() -> int:
    """The kernel's lowest ephemeral port: where ``_free_ports`` draws from (Linux default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _secret(path: Path, make: Callable[[], str]) -> str:
    """Read a secret file, creating it (0600) with ``make()`` the first time."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_private(path, make())
    return path.read_text().strip()


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read (0600)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _state_path() -> Path:
    return STATE_DIR / "state.json"


def load_state() -> State | None:
    p = _state_path()
    return State.model_validate_json(p.read_text()) if p.is_file() else None


def save_state(state: State) -> None:
    tmp = _state_path().with_suffix(".tmp")
    tmp.write_text(state.model_dump_json(indent=2))
    tmp.replace(_state_path())


def load_endpoints() -> Endpoints:
    return Endpoints.model_validate_json((STATE_DIR / "endpoints.json").read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; only its parent's wait() is missing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def session_pids(sid: int) -> list[int]:
    """Every live process whose session id is ``sid`` (a component and everything it spawned)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def pids_named(sid: int, name: str) -> list[int]:
    """Processes of session ``sid`` whose executable name is ``name`` (e.g. the raylet of one Ray node)."""
    out = []
    for pid in session_pids(sid):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                out.append(pid)
        except OSError:
            pass
    return out


def _spawn(name: str, argv: list[str], env: dict[str, str], log: Path) -> Component:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=ROOT)
    return Component(name=name, pid=proc.pid, log=str(log))


def _wait(what: str, ok: Callable[[], bool], comp: Component | None, timeout_s: float = 120.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if ok():
            return
        if comp is not None and not _alive(comp.pid):
            raise RuntimeError(f"{what} exited during start-up; see {comp.log}:\n{_tail(comp.log)}")
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not come up within {timeout_s:.0f} s; see {comp.log if comp else ''}")


def _tail(path: str, n: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError):
        return False


def stop_session(comp: Component, grace_s: float = 30.0, first: signal.Signals = signal.SIGTERM) -> None:
    """Send ``first`` to the component (see :func:`stop_sessions`), then SIGKILL what is left of its session after
    ``grace_s``."""
    stop_sessions([comp], grace_s, first)


def stop_sessions(comps: list[Component], grace_s: float = 30.0, first: signal.Signals = signal.SIGTERM) -> None:
    """:func:`stop_session` of several components at once: all get ``first`` (SIGTERM), then one shared grace
    period. A Ray node gets it in every process, as ``ray stop`` does; the others in their leader."""
    for comp in comps:
        whole = comp.name.startswith("ray")
        for pid in (session_pids(comp.pid) if whole else [comp.pid] if _alive(comp.pid) else []):
            try:
                os.kill(pid, first)
            except ProcessLookupError:
                pass

    def left() -> list[int]:
        return [pid for comp in comps for pid in session_pids(comp.pid)]

    deadline = time.time() + grace_s
    while time.time() < deadline and left():
        time.sleep(0.3)
    for pid in left():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    while time.time() < deadline and left():
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------------ environment
def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin or initdb on PATH); "
                       "install them: apt-get install postgresql")


def _ensure_pg_user() -> str | None:
    """The user PostgreSQL runs as: a dedicated system user when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    if subprocess.run(["id", "-u", PG_USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                       check=True)
    return PG_USER


def _as_pg(state: State, argv: list[str]) -> list[str]:
    return ["runuser", "-u", state.pg_as_user, "--", *argv] if state.pg_as_user else argv


def client_env(secrets_dir: Path) -> dict[str, str]:
    """What a Ray client (ray job submit, ray.init) needs: token auth with the cluster's token file."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(secrets_dir / "ray_token")}


def node_env(state: State, ep: dict[str, str]) -> dict[str, str]:
    """Environment of the Ray nodes (inherited by every job driver, task, Train worker and Serve replica): token
    auth, the S3 endpoint and keys, and the MLflow server. Nothing here is a file path shared between nodes."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_", "AWS_")) and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(client_env(STATE_DIR / "secrets"))
    env.update({
        "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_V2_ENABLED": "1",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_TRACKING_URI": ep["mlflow_url"],
        # a bare ray.init() inside the cluster (Train's placement-group cleaner does one) joins this cluster
        # even when other Ray clusters run on the machine
        "RAY_ADDRESS": ep["gcs_address"],
        "AWS_ENDPOINT_URL": ep["s3_endpoint"],
        "AWS_ACCESS_KEY_ID": ep["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": ep["aws_secret_access_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "TQDM_DISABLE": "1",
    })
    return env


# ------------------------------------------------------------------------------------------------ components
def start_postgres(state: State) -> Component:
    """A fresh database cluster in workspace/cluster/pg (the S3 API keeps no state across restarts, so neither
    does the registry that points into it), password auth with a generated password."""
    pg = Path(state.pg_bin)
    data, logs, sec = STATE_DIR / "pg", STATE_DIR / "logs", STATE_DIR / "secrets"
    owner = state.pg_as_user
    password = _secret(sec / "pg_password", lambda: secrets.token_urlsafe(24))
    pgpass = sec / "pgpass"  # libpq's password file: MLflow's database URI carries no password
    _write_private(pgpass, f"127.0.0.1:{state.ports['postgres']}:*:mlflow:{password}\n")
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True, mode=0o700)
    pwfile = data.parent / ".pg_pwfile"  # initdb reads it as the pg user; removed right after
    _write_private(pwfile, password + "\n")
    if owner:
        shutil.chown(data, owner)
        shutil.chown(pwfile, owner)
    try:
        subprocess.run(_as_pg(state, [str(pg / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=scram-sha-256",
                                      f"--pwfile={pwfile}", "--encoding=UTF8", "--no-instructions"]),
                       check=True, capture_output=True)
    finally:
        pwfile.unlink(missing_ok=True)
    log = logs / "postgres.log"
    logs.mkdir(parents=True, exist_ok=True)
    log.touch()
    if owner:
        shutil.chown(log, owner)
    comp = _spawn("postgres", _as_pg(state, [
        str(pg / "postgres"), "-D", str(data), "-c", "listen_addresses=127.0.0.1",
        "-c", f"port={state.ports['postgres']}", "-c", "unix_socket_directories=", "-c", "max_connections=50"]),
        {**os.environ}, log)
    ready = [str(pg / "pg_isready"), "-h", "127.0.0.1", "-p", str(state.ports["postgres"]), "-q"]
    _wait("PostgreSQL", lambda: subprocess.run(ready).returncode == 0, comp, 60)
    subprocess.run([str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(state.ports["postgres"]), "-U", "mlflow",
                    PG_DB], env={**os.environ, "PGPASSFILE": str(pgpass)}, check=True)
    return comp


def start_moto(state: State, keys: tuple[str, str]) -> Component:
    port = state.ports["s3"]
    comp = _spawn("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], {**os.environ},
                  STATE_DIR / "logs" / "s3.log")
    url = f"http://127.0.0.1:{port}"
    _wait("moto_server (S3 API)", lambda: _http_ok(f"{url}/moto-api/"), comp, 60)
    import boto3

    s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=keys[0], aws_secret_access_key=keys[1],
                      region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    return comp


def start_mlflow(state: State, keys: tuple[str, str]) -> Component:
    port, s3 = state.ports["mlflow"], f"http://127.0.0.1:{state.ports['s3']}"
    env = {**os.environ, "PGPASSFILE": str(STATE_DIR / "secrets" / "pgpass"), "MLFLOW_S3_ENDPOINT_URL": s3,
           "AWS_ACCESS_KEY_ID": keys[0], "AWS_SECRET_ACCESS_KEY": keys[1], "AWS_DEFAULT_REGION": "us-east-1",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    argv = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"postgresql+psycopg2://mlflow@127.0.0.1:{state.ports['postgres']}/{PG_DB}",
            "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--serve-artifacts"]
    comp = _spawn("mlflow", argv, env, STATE_DIR / "logs" / "mlflow.log")
    _wait("MLflow server", lambda: _http_ok(f"http://127.0.0.1:{port}/health"), comp, 180)
    return comp


def _node_ports(state: State, node: str) -> list[str]:
    p = state.ports
    lo = p[f"{node}_min_worker"]
    return [f"--node-manager-port={p[f'{node}_node_manager']}", f"--object-manager-port={p[f'{node}_object_manager']}",
            f"--dashboard-agent-listen-port={p[f'{node}_agent']}", f"--dashboard-agent-grpc-port={p[f'{node}_agent_grpc']}",
            f"--runtime-env-agent-port={p[f'{node}_runtime_env']}", f"--metrics-export-port={p[f'{node}_metrics']}",
            f"--min-worker-port={lo}", f"--max-worker-port={lo + 199}"]


def _node_common(state: State, node: str) -> list[str]:
    return ["--block", "--node-ip-address=127.0.0.1", f"--num-cpus={NODE_CPUS}", "--num-gpus=0",
            f"--temp-dir={state.temp_dirs[node]}", f"--object-store-memory={OBJECT_STORE_BYTES}",
            "--disable-usage-stats", *_node_ports(state, node)]


# Ray 2.60's gRPC servers (GCS, raylets) listen on all interfaces (0.0.0.0 is fixed in its gRPC server; no setting
# changes it), and `ray start` advertises the machine's address for 127.0.0.1
# (ray._private.services.resolve_ip_for_localhost), so they cannot be kept on loopback; token auth guards them. The dashboard / job API and the Serve proxy listen on 127.0.0.1 only.
RAY_START = [str(BIN / "ray")]


def start_ray_head(state: State, env: dict[str, str]) -> Component:
    p = state.ports
    argv = [*RAY_START, "start", "--head", f"--port={p['gcs']}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={p['dashboard']}", f"--ray-client-server-port={p['ray_client']}",
            *_node_common(state, "head")]
    comp = _spawn("ray_head", argv, env, STATE_DIR / "logs" / "ray-head.log")
    _wait("Ray head", lambda: alive_nodes(state) >= 1, comp, 120)
    return comp


def start_ray_worker(state: State, env: dict[str, str] | None = None) -> Component:
    """The second Ray node (also used to bring a lost worker node back). It is up once a node id that the GCS did
    not list before is ALIVE: a node killed a moment ago stays ALIVE in that list until its health checks fail
    (~15 s), so counting ALIVE nodes would pass before the new one has joined, or when it never does."""
    if env is None:
        env = node_env(state, json.loads((STATE_DIR / "endpoints.json").read_text()))
    for _ in range(20):  # the node list as it is before this node starts (it always lists the head)
        if known := {n.get("node_id") for n in nodes(state)}:
            break
        time.sleep(0.5)
    argv = [*RAY_START, "start", f"--address=127.0.0.1:{state.ports['gcs']}", *_node_common(state, "worker")]
    comp = _spawn("ray_worker", argv, env, STATE_DIR / "logs" / "ray-worker.log")

    def joined() -> bool:
        return any(n.get("state") == "ALIVE" and not n.get("is_head_node") and n.get("node_id") not in known
                   for n in nodes(state))

    _wait("Ray worker node", joined, comp, 120)
    return comp


def _auth_header() -> dict[str, str]:
    return {"Authorization": f"Bearer {(STATE_DIR / 'secrets' / 'ray_token').read_text().strip()}"}


def nodes(state: State) -> list[dict]:
    """The Ray state API's node list (through the dashboard, with the token)."""
    url = f"http://127.0.0.1:{state.ports['dashboard']}/api/v0/nodes?limit=100"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=_auth_header()), timeout=10) as r:
            return json.load(r)["data"]["result"]["result"]
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        return []


def alive_nodes(state: State) -> int:
    return sum(n.get("state") == "ALIVE" for n in nodes(state))


def start_serve(state: State, env: dict[str, str]) -> None:
    """Start Ray Serve's controller and one HTTP proxy on the head only (two proxies on one 127.0.0.1 port would
    collide); the DAG's deploy stage then deploys into it."""
    code = ("import ray; from ray import serve; "
            f"ray.init(address='127.0.0.1:{state.ports['gcs']}', log_to_driver=False); "
            f"serve.start(proxy_location='HeadOnly', http_options={{'host': '127.0.0.1', 'port': {state.ports['serve']}}})")
    with open(STATE_DIR / "logs" / "serve-start.log", "ab") as log:
        subprocess.run([sys.executable, "-c", code], env=env, check=True, stdout=log, stderr=subprocess.STDOUT,
                       timeout=180, cwd="/")


# ------------------------------------------------------------------------------------------------ commands
NODE_PORTS = ("node_manager", "object_manager", "agent", "agent_grpc", "runtime_env", "metrics")  # one Ray node's
WORKER_PORT_KEYS = tuple(f"worker_{k}" for k in NODE_PORTS)


def _worker_ranges(ports: dict[str, int]) -> range:
    """The ports the two nodes' Ray workers may take: 200 from ``head_min_worker``, then the worker node's 200."""
    return range(ports["head_min_worker"], ports["worker_min_worker"] + 200)


def _port_layout(cid: str) -> dict[str, int]:
    """Every port of a new cluster: the components' (free ones) and where each node's worker range starts.

    Worker ranges sit above Ray's default 10002-19999 (the test suite's own local Ray) and below the kernel's
    ephemeral range where it leaves room; the free ports skip them anyway, since a component's port inside a
    node's worker range (or two components on one port) makes `ray start` refuse to start.
    """
    names = ["postgres", "s3", "mlflow", "gcs", "dashboard", "ray_client", "serve"]
    names += [f"{node}_{k}" for node in ("head", "worker") for k in NODE_PORTS]
    base = 20000 + (int(cid, 16) % max(1, (_ephemeral_low() - 20400) // 400)) * 400
    ports = {"head_min_worker": base, "worker_min_worker": base + 200}
    ports.update(zip(names, _free_ports(len(names), _worker_ranges(ports)), strict=True))
    return ports


def _new_state() -> State:
    cid = secrets.token_hex(3)
    ports = _port_layout(cid)
    temp = {n: f"/tmp/rc-{cid}{n[0]}" for n in ("head", "worker")}
    return State(cluster_id=cid, ports=ports, temp_dirs=temp, pg_bin=str(_pg_bin()), pg_as_user=_ensure_pg_user())


def cluster_up() -> Endpoints:
    """Start every component; returns the endpoints (also written to workspace/cluster/endpoints.json)."""
    if (old := load_state()) is not None and any(_alive(c.pid) for c in old.components.values()):
        raise RuntimeError(f"a cluster already runs (see {_state_path()}); run `make cluster-down` first")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state = _new_state()
    save_state(state)
    sec = STATE_DIR / "secrets"
    _secret(sec / "ray_token", lambda: secrets.token_hex(32))
    keys = (_secret(sec / "aws_access_key_id", lambda: "AK" + secrets.token_hex(9).upper()),
            _secret(sec / "aws_secret_access_key", lambda: secrets.token_urlsafe(30)))
    p = state.ports
    ep = Endpoints(ray_address=f"http://127.0.0.1:{p['dashboard']}", gcs_address=f"127.0.0.1:{p['gcs']}",
                   client_env=client_env(sec), mlflow_url=f"http://127.0.0.1:{p['mlflow']}",
                   s3_endpoint=f"http://127.0.0.1:{p['s3']}", bucket=BUCKET, aws_access_key_id=keys[0],
                   aws_secret_access_key=keys[1], serve_url=f"http://127.0.0.1:{p['serve']}", serve_port=p["serve"])
    (STATE_DIR / "endpoints.json").write_text(ep.model_dump_json(indent=2))
    os.chmod(STATE_DIR / "endpoints.json", 0o600)  # it holds the S3 keys
    steps: list[tuple[str, Callable[[], Component | None]]] = [
        ("postgres", lambda: start_postgres(state)),
        ("s3", lambda: start_moto(state, keys)),
        ("mlflow", lambda: start_mlflow(state, keys)),
        ("ray_head", lambda: start_ray_head(state, node_env(state, ep.model_dump()))),
        ("ray_worker", lambda: start_ray_worker(state, node_env(state, ep.model_dump()))),
    ]
    try:
        for name, start in steps:
            t0 = time.time()
            comp = start()
            state.components[name] = comp
            save_state(state)
            typer.echo(f"[cluster] {name}: up (pid {comp.pid}, {time.time() - t0:.1f} s)")
        start_serve(state, node_env(state, ep.model_dump()))
        typer.echo(f"[cluster] serve: proxy on {ep.serve_url}")
    except BaseException:
        typer.echo("[cluster] start-up failed; stopping what started", err=True)
        cluster_down()
        raise
    return ep


def _stop_postgres(comp: Component, grace_s: float = 20.0) -> None:
    """SIGINT to the postmaster (its pid is the first line of postmaster.pid): PostgreSQL's fast shutdown."""
    try:
        pid = int((STATE_DIR / "pg" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if pid in session_pids(comp.pid):
        os.kill(pid, signal.SIGINT)
        deadline = time.time() + grace_s
        while time.time() < deadline and _alive(pid):
            time.sleep(0.2)


def cluster_down() -> list[int]:
    """Stop every component in reverse order; returns the pids still alive afterwards (empty when clean)."""
    state = load_state()
    if state is None:
        return []
    comps = state.components
    # the two Ray nodes first: nothing of theirs needs flushing (jobs, the Serve app and checkpoints live in the
    # services), and their GCS, raylets and Serve actors linger on SIGTERM, so 5 s of grace, then SIGKILL
    stop_sessions([comps[n] for n in ("ray_worker", "ray_head") if n in comps], grace_s=5)
    stop_sessions([comps[n] for n in ("mlflow", "s3") if n in comps], grace_s=15)
    if "postgres" in comps:
        _stop_postgres(comps["postgres"])
        stop_session(comps["postgres"], grace_s=15)
    left = [pid for c in state.components.values() for pid in session_pids(c.pid)]
    if not left:
        for d in state.temp_dirs.values():
            shutil.rmtree(d, ignore_errors=True)
        _state_path().unlink(missing_ok=True)
    return left


@app.command()
def up() -> None:
    """Start PostgreSQL, the S3 API (bucket created), the MLflow server, a Ray head and a Ray worker node."""
    t0 = time.time()
    ep = cluster_up()
    typer.echo(f"[cluster] up in {time.time() - t0:.0f} s; endpoints in {STATE_DIR / 'endpoints.json'}")
    _print_urls(ep)


@app.command()
def down() -> None:
    """Stop everything `up` started (by pid / session) and remove Ray's temp dirs."""
    left = cluster_down()
    if left:
        typer.echo(f"[cluster] processes still alive: {left}", err=True)
        raise typer.Exit(1)
    typer.echo("[cluster] down: no process left")


@app.command()
def status() -> None:
    """Components, pids and endpoints of the running cluster."""
    state = load_state()
    if state is None:
        typer.echo("[cluster] not running")
        raise typer.Exit(1)
    for name, c in state.components.items():
        typer.echo(f"  {name:<11} pid {c.pid:<8} {'alive' if _alive(c.pid) else 'DEAD'}  log {c.log}")
    typer.echo(f"  ray nodes alive: {alive_nodes(state)}")
    _print_urls(load_endpoints())
    if not all(_alive(c.pid) for c in state.components.values()):
        raise typer.Exit(1)


@app.command("kill-worker")
def kill_worker() -> None:
    """Node-loss drill: kill -9 the worker node's raylet (its workers die with it)."""
    state = load_state()
    comp = state.components.get("ray_worker") if state else None
    pids = pids_named(comp.pid, "raylet") if comp else []
    if not pids:
        typer.echo("[cluster] no worker raylet runs", err=True)
        raise typer.Exit(1)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    typer.echo(f"[cluster] killed the worker node's raylet (pid {', '.join(map(str, pids))})")


@app.command("worker-up")
def worker_up() -> None:
    """Bring the worker node back (after kill-worker): what is left of the old one is stopped first."""
    state = load_state()
    if state is None:
        typer.echo("[cluster] not running", err=True)
        raise typer.Exit(1)
    # What is left of the lost node gets SIGKILL, not SIGTERM: on SIGTERM its `ray start` asks the GCS to drain
    # that node, and the GCS keeps sending the drain to the node's address until something answers there.
    if (old := state.components.get("ray_worker")) is not None:
        stop_session(old, grace_s=0, first=signal.SIGKILL)
    # Fresh ports, for the same reason: the GCS still holds the lost node ALIVE at its address for ~15 s (health
    # checks, drain RPCs). A new raylet on the same port was seen taking that drain and shutting down at start-up.
    avoid = {*_worker_ranges(state.ports), *state.ports.values()}  # the old node's ports included
    state.ports.update(zip(WORKER_PORT_KEYS, _free_ports(len(WORKER_PORT_KEYS), avoid), strict=True))
    save_state(state)
    state.components["ray_worker"] = start_ray_worker(state)
    save_state(state)
    typer.echo(f"[cluster] ray_worker: up again (pid {state.components['ray_worker'].pid})")


# What `--working-dir .` must not upload (Ray also honours .gitignore): state, virtualenvs, results, caches.
RUNTIME_ENV = {"excludes": ["workspace/", ".venv/", ".git/", "benchmarks/results/", "**/__pycache__/",
                            ".pytest_cache/", ".ruff_cache/", "*.pt", "*.safetensors", "*.tar", "*.png"]}


def submit_argv(ep: Endpoints, config: str, overrides: list[str], run_args: list[str]) -> list[str]:
    """The README's `ray job submit --working-dir .` of the DAG on ``config``, at this cluster's job API."""
    sets = [a for o in [f"serve.port={ep.serve_port}", *overrides] for a in ("--set", o)]
    return [str(BIN / "ray"), "job", "submit", "--address", ep.ray_address, "--working-dir", ".",
            "--runtime-env-json", json.dumps(RUNTIME_ENV), "--",
            "diffusion-pipeline", "run", "--config", config, *sets, *run_args]


def client_process_env(ep: Endpoints) -> dict[str, str]:
    """This process's environment plus the cluster's client_env, without a RAY_ADDRESS of another cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, **ep.client_env, "PATH": f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"}


def submit_job(config: str, overrides: list[str] | None = None, run_args: list[str] | None = None,
               timeout_s: float = 3600, capture: bool = False) -> subprocess.CompletedProcess:
    """Submit the DAG and wait for it; retries while the head's job agent is still coming up."""
    ep = load_endpoints()
    argv = submit_argv(ep, config, overrides or [], run_args or [])
    for _ in range(20):
        proc = subprocess.run(argv, env=client_process_env(ep), cwd=ROOT, timeout=timeout_s, text=True,
                              capture_output=True)
        if not capture:
            sys.stdout.write(proc.stdout)
            sys.stderr.write(proc.stderr)
        if "No available agent" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(3)
    return proc


@app.command()
def submit(config: str = typer.Option("configs/cluster_local.yaml", help="Pipeline config (relative to the repo)."),
           set_: list[str] = typer.Option([], "--set", help="Config overrides a.b=value, passed to the run."),
           until: str | None = typer.Option(None, help="Last stage to run (passed to the run)."),
           force: list[str] = typer.Option([], help="Stages to re-run (passed to the run).")) -> None:
    """`ray job submit --working-dir .` of `diffusion-pipeline run` on this cluster; prints the URLs after."""
    t0 = time.time()
    run_args = [*(["--until", until] if until else []), *[a for f in force for a in ("--force", f)]]
    proc = submit_job(config, set_, run_args)
    typer.echo(f"[cluster] job {'succeeded' if proc.returncode == 0 else 'FAILED'} in {time.time() - t0:.0f} s")
    _print_urls(load_endpoints())
    raise typer.Exit(proc.returncode)


def _print_urls(ep: Endpoints) -> None:
    typer.echo(f"  MLflow UI:      {ep.mlflow_url}\n  Ray dashboard:  {ep.ray_address}\n"
               f"  S3 endpoint:    {ep.s3_endpoint} (bucket {ep.bucket})\n  Serve endpoint: {ep.serve_url}/v1/generate")


if __name__ == "__main__":
    app()
