#!/usr/bin/env bash
# Idempotent, unattended setup for a fresh machine: Debian's ffmpeg, nginx, Java, espeak-ng and chromium when
# missing, a .venv with the pinned install and its test and s3 extras (pytest, moto, s3fs). Safe to run twice: the
# pip step is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

# ffmpeg is required; nginx is the remote shard store of the tests (tests/remote_store.py), its echo module adds the
# latency of benchmarks/bench_remote.py (and of a test of that); a Java runtime runs
# METEOR and the Stanford PTB tokenizer (the metrics fall back to their Java-free path without it, but the tests
# of the Java path need it); espeak-ng only gives the demo its speech clips (the demo drops that class without it);
# chromium is the real browser the gallery tests load their pages in (headless).
has_nginx() { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; }
has_nginx_echo() { [ -e /usr/lib/nginx/modules/ngx_http_echo_module.so ]; }
missing=()
if ! command -v ffmpeg >/dev/null 2>&1 || ! command -v ffprobe >/dev/null 2>&1; then missing+=(ffmpeg); fi
if ! has_nginx; then missing+=(nginx); fi
if ! has_nginx_echo; then missing+=(libnginx-mod-http-echo); fi
if ! command -v java >/dev/null 2>&1; then missing+=(default-jre-headless); fi
if ! command -v espeak-ng >/dev/null 2>&1; then missing+=(espeak-ng); fi
if ! command -v chromium >/dev/null 2>&1; then missing+=(chromium); fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing ${missing[*]} from Debian" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -q >&2
  if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}" >&2; then
    command -v ffmpeg >/dev/null 2>&1 || { echo "[setup] could not install ffmpeg" >&2; exit 1; }
    has_nginx || { echo "[setup] could not install nginx" >&2; exit 1; }
    has_nginx_echo || { echo "[setup] could not install nginx's echo module (libnginx-mod-http-echo)" >&2; exit 1; }
    command -v java >/dev/null 2>&1 || echo "[setup] warning: no Java runtime; METEOR is unavailable and the" \
      "Java metric tests fail" >&2
    command -v espeak-ng >/dev/null 2>&1 || echo "[setup] warning: espeak-ng not installed; the demo runs" \
      "without its speech class" >&2
    command -v chromium >/dev/null 2>&1 || echo "[setup] warning: chromium not installed; the gallery's" \
      "browser tests fail" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv" >&2
  "$PY" -m venv .venv
fi

stamp=.venv/.avcap-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing pinned dependencies into .venv (first time: a few minutes)" >&2
  log=.venv/setup.log
  if ! { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e ".[test,s3]" ; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "[setup] pip install failed; full log in $log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
