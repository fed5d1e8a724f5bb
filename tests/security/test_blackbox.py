"""Schemathesis 4 from outside: the real `tuneforge api` process on Postgres, read through its /openapi.json.

Every check (`--checks all`), positive and negative data, the coverage, fuzzing and stateful phases. Two runs:
a project key over every operation (admin ones must answer the documented 403), and an admin key over the
admin operations. Zero failures, and at least MIN_CASES generated cases between them. The seed is fixed so
CI is repeatable; TUNEFORGE_FUZZ_SEED=random draws one (printed), any number replays that run.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.service import Service, running_service

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CONFIG = Path(__file__).with_name("schemathesis.toml")
MIN_CASES = 2000
EXAMPLES = int(os.environ.get("TUNEFORGE_BLACKBOX_EXAMPLES", "25"))


def schemathesis(service: Service, *, key: str, seed: int, only: str | None) -> tuple[int, str]:
    """One `st run` against the service; its generated case count and its output."""
    command = [str(Path(sys.executable).with_name("st")), "--config-file", str(CONFIG), "run",
               f"{service.base_url}/openapi.json", "--header", f"Authorization: Bearer {key}",
               "--checks", "all", "--mode", "all", "--phases", "examples,coverage,fuzzing,stateful",
               "--max-examples", str(EXAMPLES), "--seed", str(seed), "--continue-on-failure",
               "--request-timeout", "30", "--no-color", "--warnings", "off"]
    if only is not None:
        command += ["--include-path-regex", only]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    found = re.search(r"(\d+) generated", output)
    assert done.returncode == 0, f"schemathesis found failures (seed {seed}):\n{output[-20000:]}"
    assert found is not None, output[-5000:]
    return int(found.group(1)), output


def test_blackbox_fuzz_of_the_real_api(tmp_path: Path, tiny_model_dir: Path) -> None:
    chosen = os.environ.get("TUNEFORGE_FUZZ_SEED", "1")
    seed = random.randrange(1, 1_000_000) if chosen == "random" else int(chosen)
    print(f"black-box fuzz seed {seed} (replay with TUNEFORGE_FUZZ_SEED={seed})")
    # Model registrations go to a hub that refuses at once (port 9, discard): 502 hub_unavailable, no waiting.
    with running_service(tmp_path, tiny_model_dir=tiny_model_dir, name=f"blackbox_{os.getpid()}", workers=0,
                         quiet=True, extra_env={"HF_ENDPOINT": "http://127.0.0.1:9"}) as service:
        created = subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "fuzz-admin", "--admin"],
                                 env=service.env, check=True, capture_output=True, text=True)
        admin_key = json.loads(created.stdout.strip().splitlines()[-1])["key"]
        project_cases, project_output = schemathesis(service, key=service.api_key, seed=seed, only=None)
        admin_cases, _ = schemathesis(service, key=admin_key, seed=seed, only="^/v1/admin")
    print(f"black-box fuzz: {project_cases} cases with a project key, {admin_cases} with an admin key")
    # The stateful phase ran scenarios that chain operations through the links schemathesis infers.
    assert re.search(r"Stateful .*\n\s*\n\s*Scenarios:\s+[1-9]", project_output), project_output[-5000:]
    assert project_cases + admin_cases >= MIN_CASES
