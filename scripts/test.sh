#!/usr/bin/env bash
# The test command of the README: sets up the machine when needed, then runs the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k loader`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Prefect: its own home per run (a temporary local server and database), no analytics, no hub calls.
export PREFECT_HOME="${PREFECT_HOME:-$(mktemp -d -t avcap-prefect-XXXXXX)}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
