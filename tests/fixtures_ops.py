"""A small finished build (media, staging, shards, manifest.json) for the audit, publish, schedule and flows
tests, and a real Prefect server on loopback (`prefect_server`) shared by the schedule and flows tests.

The build is made by the real pipeline (pipeline.build.run_build) from clips encoded with ffmpeg
(tests.media.make_media) and cached as DIR/media/{key}.mp4 the way the downloader leaves them (the window cut
out, so it starts at 0 in the file). Session-scoped and read-only: a test that corrupts something copies it first (`copy_build`).

Register in tests/conftest.py: `pytest_plugins = [..., "tests.fixtures_ops"]`.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.media import MediaSpec, make_media

# Valid 11-character ids (two beginning with '-', as many real ones do); different tones give distinct fbanks.
# With 2 shards, sha256(key) puts the first three in shard 1 and the last in shard 0.
OPS_CLIPS = [("opsAudit001", 0, 300.0), ("-opsAudit02", 30, 600.0), ("--opsAudit4", 0, 1200.0),
             ("opsAudit006", 20, 900.0)]
OPS_SPLIT = "test"


@dataclass
class OpsBuild:
    out_dir: Path
    keys: list[str]
    split: str


def clip_key(youtube_id: str, start: int) -> str:
    return f"{youtube_id}_{start * 1000}_{(start + 10) * 1000}"


def make_build(out: Path, clips=OPS_CLIPS, split: str = OPS_SPLIT) -> OpsBuild:
    """A build by pipeline.build.run_build from media already cached in DIR/media (no network is touched:
    the downloader returns a cached file as is; the URL template points at a closed port to make sure)."""
    from pipeline.build import BuildConfig, run_build
    from pipeline.download import DownloadConfig

    rows = ["audiocap_id,youtube_id,start_time,caption"]
    keys = []
    for i, (yid, start, tone) in enumerate(clips):
        key = clip_key(yid, start)
        make_media(out / "media" / f"{key}.mp4", MediaSpec(10, width=160, height=120, tone_hz=tone))
        rows.append(f"{900000 + i},{yid},{start},a steady tone of {tone:g} hertz")
        keys.append(key)
    csv_path = out.parent / f"{out.name}-{split}.csv"
    csv_path.write_bytes(("\r\n".join(rows) + "\r\n").encode())
    result = run_build(BuildConfig(csv=[csv_path], split=split, out=out, samples_per_shard=2,
                                   download=DownloadConfig(url_template="http://127.0.0.1:9/{youtube_id}.mp4",
                                                           max_retries=0, workers=1)))
    assert result.ok and result.counts["ok"] == len(clips), result
    return OpsBuild(out, sorted(keys), split)


def copy_build(build: OpsBuild, dest: Path) -> OpsBuild:
    shutil.copytree(build.out_dir, dest)
    return OpsBuild(dest, list(build.keys), build.split)


@pytest.fixture(scope="session")
def ops_build(tmp_path_factory) -> OpsBuild:
    """A finished 4-clip build in 2 shards; treat as read-only (use copy_build to modify).

    Made once per session at a fixed place under the session's base temp dir, so test modules that import
    this fixture (rather than getting it through pytest_plugins) share one build too."""
    root = tmp_path_factory.getbasetemp() / "ops_build"
    done = root / "complete"
    if not done.exists():
        if root.exists():
            shutil.rmtree(root)           # an earlier attempt in this session failed halfway
        root.mkdir()
        build = make_build(root / "out")
        done.write_text("\n".join(build.keys))
    keys = done.read_text().split("\n")
    return OpsBuild(root / "out", keys, OPS_SPLIT)


PREFECT_SERVER_START_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def prefect_settings(api: str):
    """This process talks to the server at `api` inside the block (other tests keep their ephemeral Prefect)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings
    return temporary_settings({PREFECT_API_URL: api})


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory, request):
    """`prefect server start` on 127.0.0.1 and a free port with its own PREFECT_HOME; yields (api_url, env).

    The small ops build is made while the server starts up (it takes seconds to migrate its db)."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=api, PREFECT_LOGGING_LEVEL="WARNING")
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    request.getfixturevalue("ops_build")
    deadline = time.monotonic() + PREFECT_SERVER_START_S
    while True:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise RuntimeError(f"prefect server did not come up on {api}: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    try:
        yield api, env
    finally:
        # Flows run in this process queue their logs for the API: send them before the server goes away.
        from prefect.logging.handlers import APILogHandler
        with prefect_settings(api):
            APILogHandler().flush()
        stop_process(proc)
        log.close()
