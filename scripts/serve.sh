#!/usr/bin/env bash
# Installs tuneforge and runs the embedded service (API + worker, SQLite, folder broker) on
# http://127.0.0.1:8000 with the tiny demo model registered as "tiny-llama".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/tuneforge serve "$@"
