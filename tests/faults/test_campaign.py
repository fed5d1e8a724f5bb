"""The random fault campaign, short form: every kind of fault lands at least once on jobs running on two workers
over a private Postgres and a private Redis; every job must come through whole (tests/support/campaign.py).
The long form is the soak, `python -m bench.faults`. Replay a failure with TUNEFORGE_CAMPAIGN_SEED=<printed seed>."""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.campaign import FAULT_KINDS, run_campaign
from tests.support.servers import PrivatePostgres, PrivateRedis
from tests.support.service import running_service

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]


@pytest.fixture
def servers() -> Iterator[tuple[PrivatePostgres, PrivateRedis]]:
    postgres, redis = PrivatePostgres(), PrivateRedis()
    postgres.start()
    redis.start()
    try:
        yield postgres, redis
    finally:
        redis.close()
        postgres.close()


def test_a_random_fault_campaign_loses_no_job(tmp_path: Path, tiny_model_dir: Path,
                                              servers: tuple[PrivatePostgres, PrivateRedis]) -> None:
    postgres, redis = servers
    seed = int(os.environ.get("TUNEFORGE_CAMPAIGN_SEED") or random.SystemRandom().randrange(10**6))
    with running_service(tmp_path, tiny_model_dir=tiny_model_dir, name=f"campaign_{os.getpid()}",
                         pg_server=postgres.url, redis_url=redis.url, workers=2, quiet=True) as service:
        report = run_campaign(service, postgres, redis, seed=seed, jobs=2, faults=len(FAULT_KINDS) + 3, steps=200,
                              say=lambda line: sys.stderr.write(line + "\n"))
    sys.stderr.write(report.summary() + "\n")
    assert {f.kind for f in report.faults if f.skipped is None} == set(FAULT_KINDS)
    assert not report.problems, f"seed {seed}:\n" + report.summary()
    assert all(job["status"] == "succeeded" for job in report.jobs)
