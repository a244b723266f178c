"""The small version of bench/tracking_load.py: a few concurrent writers (threads over two
processes, each with its own client) log a stage's metrics, system metrics, progress tags and an
artifact through `sslgrid server`, backed by SQLite and by PostgreSQL; every point lands exactly
once and no call fails. No timing is asserted: the bench prints those."""
from __future__ import annotations

import pytest

from bench.tracking_load import Workload, run_load, scratch_postgres, tracking_server
from tests.integration.postgres import admin_uri

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_concurrent_writers_lose_and_double_nothing(tmp_path, store):
    work = Workload(steps=6, system_every=3, artifact_bytes=256 * 1024)
    if store == "sqlite":
        with tracking_server(f"sqlite:///{tmp_path / 'store.db'}", tmp_path) as uri:
            out = run_load(uri, store, writers=4, work=work, processes=2, tmp=tmp_path)
    else:
        with scratch_postgres(admin_uri(), prefix="sslgrid_test") as db, tracking_server(db, tmp_path) as uri:
            out = run_load(uri, store, writers=4, work=work, processes=2, tmp=tmp_path)
    assert out.errors == []
    assert out.points == 4 * sum(len(m) for _, m in work.batches(0)) and len(out.latencies) == 4 * len(work.batches(0))
    assert (out.lost, out.doubled) == (0, 0)
    assert out.spread == "2 proc × 2 threads"
