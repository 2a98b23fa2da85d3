#!/usr/bin/env bash
# The main job on its embedded default: a synthetic dataset served from loopback, built by the real pipeline,
# a tiny captioner trained with torchrun on 2 CPU processes, evaluated on held-out clips.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PREFECT_HOME="${PREFECT_HOME:-$PWD/out/.prefect}"
mkdir -p "$PREFECT_HOME"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m demo.run "$@"
