"""Unit tests of the local cluster's port layout: no component port may land in a node's Ray worker range.

A CI run once failed there: ``ray start`` refused the worker node because its metrics port (a free port from
the kernel's ephemeral range) fell inside its own worker range, which then overlapped that range.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from types import SimpleNamespace

import pytest

from tests.cluster.conftest import local_cluster


def _offer(monkeypatch, ports: Iterable[int]) -> None:
    """Make the kernel's bind(("127.0.0.1", 0)) answer ``ports`` in this order."""
    offered = iter(ports)

    class FakeSocket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, addr):
            self.port = next(offered)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(local_cluster, "socket", SimpleNamespace(socket=FakeSocket))


def test_worker_ranges_stay_below_the_ephemeral_range_for_every_cluster_id(monkeypatch):
    monkeypatch.setattr(local_cluster, "_ephemeral_low", lambda: 32768)
    _offer(monkeypatch, itertools.cycle(range(40000, 60000)))
    for cid in range(0, 0xFFFFFF, 997):
        ports = local_cluster._port_layout(f"{cid:06x}")
        workers = local_cluster._worker_ranges(ports)
        assert workers.start >= 20000 and workers.stop <= 32768, (cid, workers)
        assert ports["worker_min_worker"] == ports["head_min_worker"] + 200


@pytest.mark.parametrize("ephemeral_low", [1024, 20000, 32768])
def test_free_ports_skip_the_worker_ranges_and_repeats(monkeypatch, ephemeral_low):
    """The kernel is made to offer ports inside the worker ranges, and each one twice; the layout skips both."""
    monkeypatch.setattr(local_cluster, "_ephemeral_low", lambda: ephemeral_low)
    _offer(monkeypatch, itertools.count(40000))
    base = local_cluster._port_layout("abcdef")["head_min_worker"]  # where this cluster id's ranges start
    _offer(monkeypatch, [p for p in range(base + 100, base + 2000) for _ in range(2)])
    ports = local_cluster._port_layout("abcdef")
    workers = local_cluster._worker_ranges(ports)
    assert workers == range(base, base + 400)
    components = {k: v for k, v in ports.items() if not k.endswith("_min_worker")}
    assert len(components) == 19 and len(set(components.values())) == 19
    assert not [k for k, v in components.items() if v in workers]
