"""Fault soak: the random fault campaign at length (tests/support/campaign.py), on a private PostgreSQL and a
private Redis that it starts, restarts and removes, with real `tuneforge api` and two `tuneforge worker`s.

    python -m bench.faults [--faults 60] [--jobs 3] [--steps 400] [--seed N]

Prints every fault as it lands, then how many of each kind the jobs survived and the steps of work lost at each
hand-over. Exits 1 when any job failed or broke an invariant (fencing, resume point, exact final adapter).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", type=int, default=60, help="faults to land (each kind once per round)")
    parser.add_argument("--jobs", type=int, default=3, help="jobs kept in flight on the two workers")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per job (tiny model)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run's draws (printed at start)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)

    from tests.support.campaign import run_campaign
    from tests.support.servers import PrivatePostgres, PrivateRedis
    from tests.support.service import running_service
    from worker.training.tiny_model import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="tuneforge-soak-"))
    make_tiny_model(root / "tiny-llama")
    postgres, redis = PrivatePostgres(), PrivateRedis()
    postgres.start()
    redis.start()
    try:
        with running_service(root, tiny_model_dir=root / "tiny-llama", name=f"soak_{os.getpid()}",
                             pg_server=postgres.url, redis_url=redis.url, workers=2, quiet=True) as service:
            report = run_campaign(service, postgres, redis, seed=seed, jobs=args.jobs, faults=args.faults,
                                  steps=args.steps, say=lambda line: print(line, flush=True))
    finally:
        redis.close()
        postgres.close()
    print(report.summary())
    return 1 if report.problems or any(j["status"] != "succeeded" for j in report.jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
