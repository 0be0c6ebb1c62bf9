"""One way to reach storage: local paths, ``s3://`` and ``gs://`` URIs, all through ``pyarrow.fs``.

Everything the pipeline keeps outside a process goes through here: shards read and written, manifests, stage
records, the workspace lock, and Ray Train checkpoints (``RunConfig(storage_filesystem=...)`` takes the same
``pyarrow.fs`` object). Why pyarrow.fs: Ray Train already persists checkpoints with it, so shards and
checkpoints share one client and one configuration; it is a dependency we have anyway (Ray, MLflow); its C++
S3 and GCS clients stream reads and writes without a CLI, a subprocess or another SDK stack.

Configuration comes from the environment, as for every AWS/GCP SDK:

* S3: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (an S3-compatible server such as MinIO or moto;
  ``http://`` endpoints are plain HTTP), ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (else the SDK's default), and
  credentials from the SDK's default chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, profile, IAM role).
  ``MLFLOW_S3_ENDPOINT_URL`` is MLflow's own setting for its artifact store and is left to MLflow.
* GCS: application default credentials.

Writes are atomic: a local file is written under a unique temporary name and ``os.replace``-d; an object is one
PUT (or one completed multipart upload), which S3 and GCS make visible all at once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import posixpath
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

log = logging.getLogger(__name__)
OBJECT_SCHEMES = ("s3", "gs", "gcs")
_FILESYSTEMS: dict[tuple, pafs.FileSystem] = {}


def is_object_uri(uri: str | Path) -> bool:
    """True for ``s3://`` / ``gs://`` / ``gcs://`` URIs (object storage), False for local paths."""
    return isinstance(uri, str) and urlparse(uri).scheme in OBJECT_SCHEMES


def check_object_uri(uri: str, *, field: str) -> str:
    """``uri`` with a bucket and no trailing slash, or ValueError naming ``field`` and the accepted forms."""
    p = urlparse(uri)
    if p.scheme not in OBJECT_SCHEMES or not p.netloc:
        raise ValueError(f"{field}: expected s3://bucket/prefix or gs://bucket/prefix, got {uri!r}")
    return uri.rstrip("/")


def s3_options() -> dict[str, str]:
    """The S3 client settings taken from the environment (endpoint and region)."""
    opts = {}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["region"] = region
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_override"] = endpoint
    return opts


def filesystem(scheme: str) -> pafs.FileSystem:
    """The filesystem for ``scheme`` ("" = local), built from the environment, one per process and settings."""
    scheme = "gs" if scheme == "gcs" else scheme
    opts = s3_options() if scheme == "s3" else {}
    key = (os.getpid(), scheme, tuple(sorted(opts.items())))
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        if scheme == "s3":
            fs = pafs.S3FileSystem(**opts)
        elif scheme == "gs":
            fs = pafs.GcsFileSystem()
        elif scheme in ("", "file"):
            fs = pafs.LocalFileSystem()
        else:
            raise ValueError(f"unsupported storage scheme {scheme!r} (accepted: local paths, s3://, gs://)")
        _FILESYSTEMS[key] = fs
    return fs


def resolve(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it): ``s3://bucket/key`` -> (S3FileSystem, ``bucket/key``); a local path ->
    (LocalFileSystem, absolute path)."""
    if is_object_uri(uri):
        p = urlparse(str(uri))
        return filesystem(p.scheme), f"{p.netloc}{p.path}".rstrip("/")
    return filesystem(""), str(Path(str(uri).removeprefix("file://")).expanduser().resolve())


def join(base: str | Path, *parts: str) -> str:
    """Join path parts onto a local path or an object URI."""
    if is_object_uri(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return str(Path(base).joinpath(*parts))


def open_input(uri: str | Path) -> IO[bytes]:
    """A sequential binary input stream (what a tar reader needs): objects stream, nothing is downloaded first."""
    if not is_object_uri(uri):
        return open(uri, "rb")  # noqa: SIM115 - the caller closes it
    fs, path = resolve(uri)
    return fs.open_input_stream(path)


def read_bytes(uri: str | Path) -> bytes:
    """The whole file/object; FileNotFoundError when it does not exist."""
    with open_input(uri) as f:
        return f.read()


def read_json(uri: str | Path, *, attempts: int = 4) -> Any:
    """Parse a JSON file/object; FileNotFoundError when missing, ValueError when it stays unparseable.

    pyarrow reads an object as a HEAD (its size) and then ranged GETs, so a read racing an overwrite can return
    a torn mix of two versions (the new bytes cut or padded to the old size). That never parses, so a parse
    failure is retried a few times before the object is called corrupt.
    """
    for attempt in range(attempts):
        data = read_bytes(uri)
        try:
            return json.loads(data)
        except ValueError:
            if attempt == attempts - 1 or not is_object_uri(uri):
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def exists(uri: str | Path) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def unique_suffix() -> str:
    """``<host>-<pid>-<random>``: distinct across processes and hosts, so concurrent writers never share a name."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def write_bytes(uri: str | Path, data: bytes) -> None:
    """Write ``data`` atomically: readers see the old content or the new, never a part.

    Local: a unique temporary name beside the target, then ``os.replace``. Object: a single PUT.
    """
    if is_object_uri(uri):
        fs, path = resolve(uri)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{unique_suffix()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def list_files(uri: str | Path) -> list[tuple[str, int, float | None]]:
    """(name relative to ``uri``, size, mtime in unix seconds or None) of every file below ``uri``; [] if none."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    out = []
    for i in infos:
        if i.type == pafs.FileType.File:
            mtime = i.mtime.timestamp() if i.mtime is not None else None
            out.append((posixpath.relpath(i.path, path), int(i.size), mtime))
    return sorted(out)


def delete(uri: str | Path) -> None:
    """Delete one file/object; missing is fine."""
    fs, path = resolve(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def delete_tree(uri: str | Path) -> None:
    """Delete a directory / every object under a prefix; missing is fine."""
    fs, path = resolve(uri)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


def make_bucket(uri: str) -> None:
    """Create the bucket of ``uri`` if it does not exist (test fixtures and local clusters)."""
    p = urlparse(uri)
    fs = pafs.S3FileSystem(**s3_options(), allow_bucket_creation=True) if p.scheme == "s3" else filesystem(p.scheme)
    if fs.get_file_info(p.netloc).type == pafs.FileType.NotFound:
        fs.create_dir(p.netloc)


def train_storage(storage_path: str) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig``: object URIs go through the same
    configured filesystem as the data (so a custom endpoint reaches checkpoints too); local paths stay as they are.
    """
    if not is_object_uri(storage_path):
        return storage_path, None
    fs, path = resolve(storage_path)
    return path, fs


# ------------------------------------------------------------------------------------- webdataset streams
def _gopen_object(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> IO[bytes]:
    if mode != "rb":
        raise ValueError(f"{url}: webdataset may only read object storage through pipelines.storage (mode {mode!r})")
    return open_input(url)


def register_webdataset_schemes() -> None:
    """Make ``webdataset.gopen`` (so ``wds.WebDataset("s3://...")``) stream ``s3://`` / ``gs://`` through here
    instead of its default ``aws`` / ``gsutil`` subprocesses."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the module (the package re-exports a function of that name)
    for scheme in OBJECT_SCHEMES:
        gopen.gopen_schemes[scheme] = _gopen_object



# ------------------------------------------------------------------------------------------------ the lock
class LockHeld(RuntimeError):
    """Another process holds the lock; the message names the lock, its holder and what to do."""


class StoreLock:
    """An exclusive, non-blocking lock at ``uri`` (a local path or an object-store prefix); a context manager.

    * Local: ``fcntl.flock`` on ``uri`` (the kernel releases it when the holder dies, however it dies); the
      holder's identity is written beside it for the refusal message.
    * Object store: conditional writes are not in pyarrow.fs (apache/arrow#44281), so the lock is a set of
      claims ``<uri>/<host>-<pid>-<rand>.json`` relying only on the strong read-after-write and list consistency
      of S3 and GCS. A claimant PUTs its claim, then lists: it holds the lock iff its claim is the only live one.
      Mutual exclusion: of two claimants the one that lists second sees both claims, so at most one wins (both
      may refuse if both PUT before either lists). A claim is live while its LastModified (the server's clock) is
      within ``ttl_s`` of the newest claim's; the holder re-PUTs it every ``ttl_s / 4``, so a killed holder's
      claim goes stale after ``ttl_s`` and is then removed by the next claimant.
    """

    def __init__(self, uri: str | Path, *, ttl_s: float = 60.0, what: str = "lock"):
        self.uri, self.ttl_s, self.what = str(uri), ttl_s, what
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "since_unix": None, "ttl_s": ttl_s}
        self._fd: int | None = None
        self._claim: str | None = None
        self._stop = None

    # -------------------------------------------------------------------------------------------- local
    def _acquire_local(self) -> None:
        path = Path(self.uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(self._refusal(self._read_owner(path.with_name(path.name + ".owner.json")))) from None
        self._fd = fd
        self.owner["since_unix"] = time.time()
        write_bytes(path.with_name(path.name + ".owner.json"), json.dumps(self.owner).encode())

    # ------------------------------------------------------------------------------------------- object
    def _acquire_object(self) -> None:
        self.owner["since_unix"] = time.time()
        name = f"{unique_suffix()}.json"
        claim = join(self.uri, name)
        write_bytes(claim, json.dumps(self.owner).encode())
        claims = {n: t for n, _, t in list_files(self.uri) if n.endswith(".json")}
        newest = max((t for t in claims.values() if t is not None), default=None)
        live = []
        for n, t in claims.items():
            if n == name:
                continue
            if newest is not None and t is not None and t < newest - self.ttl_s:
                log.warning("%s: removing stale claim %s (not renewed for > %.0f s)", self.uri, n, self.ttl_s)
                delete(join(self.uri, n))
            else:
                live.append(n)
        if live:
            delete(claim)
            raise LockHeld(self._refusal(self._read_owner(join(self.uri, live[0]))))
        self._claim, self._stop = claim, threading.Event()
        threading.Thread(target=self._renew, name=f"renew {claim}", daemon=True).start()

    def _renew(self) -> None:

        while not self._stop.wait(self.ttl_s / 4):
            try:
                write_bytes(self._claim, json.dumps(self.owner).encode())
            except OSError as e:  # keep trying; the lock is lost only if this lasts ttl_s
                log.warning("%s: cannot renew lock claim: %s", self._claim, e)

    # ------------------------------------------------------------------------------------------- common
    @staticmethod
    def _read_owner(uri: str | Path) -> dict | None:

        try:
            return read_json(uri)
        except (OSError, ValueError):
            return None

    def _refusal(self, owner: dict | None) -> str:

        who = "another process"
        if owner:
            age = time.time() - float(owner.get("since_unix") or time.time())
            who = f"pid {owner.get('pid')} on {owner.get('host')} (for {age:.0f} s)"
        return (f"{self.what} {self.uri} is held by {who}; wait for it to finish. "
                + ("A killed holder's lock is released by the OS." if not is_object_uri(self.uri) else
                   f"A killed holder's claim expires {float((owner or {}).get('ttl_s') or self.ttl_s):.0f} s "
                   "after its last renewal."))

    def acquire(self) -> StoreLock:
        """Take the lock or raise :class:`LockHeld` at once (never blocks)."""
        (self._acquire_object if is_object_uri(self.uri) else self._acquire_local)()
        return self

    def release(self) -> None:
        if self._fd is not None:
            Path(self.uri).with_name(Path(self.uri).name + ".owner.json").unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._claim is not None:
            self._stop.set()
            delete(self._claim)
            self._claim = None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
