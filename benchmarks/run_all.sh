#!/usr/bin/env bash
# Reruns the CPU benchmarks at small sizes (a few minutes on 2 cores) and prints each one's table under the
# machine line BENCHMARKS.md asks for. The figures in BENCHMARKS.md come from the larger sizes each section's
# command names; this is the quick check that every benchmark still runs and roughly where it stands.
#
#   bash benchmarks/run_all.sh            # all of them
#   bash benchmarks/run_all.sh loader ops # only those named (see the list below)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PREFECT_HOME="${PREFECT_HOME:-$(mktemp -d -t avcap-bench-prefect-XXXXXX)}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
pin=""
if command -v taskset >/dev/null 2>&1; then pin="taskset -c 0"; fi

# name | command (small sizes)
benchmarks=(
  "pipeline|$pin $PY benchmarks/bench_pipeline.py --clips 6"
  "loader|$PY benchmarks/bench_loader.py --clips 32 --repeats 2"
  "train|$PY benchmarks/bench_train.py --steps 12 --warmup 4 --batch-size 4 --clips 48"
  "generate|$PY benchmarks/bench_generate.py --threads 1 --max-steps 12"
  "checkpoint|$PY benchmarks/bench_checkpoint.py --num-frames 1 --dir ${TMPDIR:-/tmp}/avcap-bench-ckpt"
  "ops|$PY benchmarks/bench_ops.py --clips 4 --repeats 1"
  "caption-stage|$PY benchmarks/bench_caption_stage.py --clips 100"
  "disk|$PY benchmarks/bench_disk.py --clips 4 --samples-per-shard 2"
  "demo-step|$PY benchmarks/bench_demo_step.py --steps 3"
  "demo-media|$PY benchmarks/bench_demo_media.py --clips 12 --workers 2"
  "gallery|$PY benchmarks/bench_gallery.py --clips 120 --sample 40 --repeats 1"
  "remote|$PY benchmarks/bench_remote.py --clips 64 --per-shard 32 --repeats 1"
  "handoff|$PY benchmarks/bench_handoff.py --batches 100 --rounds 1"
  "generation-precision|$PY benchmarks/bench_generation_precision.py"
)

machine() {
  local model
  model=$(grep -m1 "model name" /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) cores, ${model:-$(uname -m)}; load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

failed=()
for entry in "${benchmarks[@]}"; do
  name=${entry%%|*}
  cmd=${entry#*|}
  if [ $# -gt 0 ] && [[ " $* " != *" $name "* ]]; then continue; fi
  echo "## $name"
  echo
  echo "Machine at start: $(machine)"
  echo "Command: \`${cmd# }\`"
  echo
  start=$(date +%s)
  if ! bash -c "$cmd"; then failed+=("$name"); echo "($name FAILED)"; fi
  echo
  echo "Took $(( $(date +%s) - start )) s; load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
done
rm -rf "${TMPDIR:-/tmp}/avcap-bench-ckpt"
if [ ${#failed[@]} -gt 0 ]; then echo "failed: ${failed[*]}" >&2; exit 1; fi
