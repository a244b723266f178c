"""The test PostgreSQL (cluster/postgres/local_postgres.sh; .ci/run starts it): its admin URI from
$SSLGRID_TEST_POSTGRES, and a fresh database per test, dropped afterwards, so reruns start clean."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from bench.tracking_load import scratch_postgres

ENV = "SSLGRID_TEST_POSTGRES"


def admin_uri() -> str:
    """$SSLGRID_TEST_POSTGRES (a role with CREATEDB). Without it the test is skipped, or fails under CI
    (where .ci/run installs and starts PostgreSQL, so its absence is a broken CI)."""
    uri = os.environ.get(ENV)
    if not uri:
        why = (f"${ENV} is not set: start the test PostgreSQL with `cluster/postgres/local_postgres.sh start` "
               f"(as root) and `eval \"$(cluster/postgres/local_postgres.sh env)\"`")
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"CI is set and {why}")
        pytest.skip(why)
    return uri


@pytest.fixture
def pg_database() -> Iterator[str]:
    """The URI of a database created for this test and dropped after it."""
    with scratch_postgres(admin_uri(), prefix="sslgrid_test") as uri:
        yield uri
