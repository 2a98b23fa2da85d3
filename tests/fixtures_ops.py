"""A small finished build (media, staging, shards, manifest.json) for the audit, publish and schedule tests.

The build is made by the real pipeline (pipeline.build.run_build) from clips encoded with ffmpeg
(tests.media.make_media) and cached as DIR/media/{key}.mp4 the way the downloader leaves them (the window cut
out, so it starts at 0 in the file). Session-scoped and read-only: a test that corrupts something copies it first (`copy_build`).

Register in tests/conftest.py: `pytest_plugins = [..., "tests.fixtures_ops"]`.
"""
from __future__ import annotations

import shutil
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
