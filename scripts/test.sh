#!/usr/bin/env bash
# The whole test suite: installs everything, then lint and every test tier that runs without a GPU.
# Needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 (.ci/run starts them when down).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
. .venv/bin/activate
ruff check app worker migrations tests bench scripts
mypy app worker
python -m pytest -m "not gpu" "$@"
