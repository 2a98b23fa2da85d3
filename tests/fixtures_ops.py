"""A small finished build (media, staging, shards, manifest.json) for the audit, publish and schedule tests.

The build is made by the real stages: clips encoded with ffmpeg (tests.media.make_media) and cached as
DIR/media/{key}.mp4 the way the downloader leaves them (the window cut out, so it starts at 0), staged with
shards.writer.stage_clip (one ffmpeg decode + Kaldi fbank), sharded with build_shards and described with
shards.manifest. Session-scoped and read-only: a test that corrupts something copies it first (`copy_build`).

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
OPS_NUM_SHARDS = 2


@dataclass
class OpsBuild:
    out_dir: Path
    keys: list[str]
    split: str


def clip_key(youtube_id: str, start: int) -> str:
    return f"{youtube_id}_{start * 1000}_{(start + 10) * 1000}"


def make_build(out: Path, clips=OPS_CLIPS, split: str = OPS_SPLIT, num_shards: int = OPS_NUM_SHARDS) -> OpsBuild:
    from pipeline.download import sha256_file
    from pipeline.extract import ExtractConfig
    from pipeline.features import FbankConfig
    from shards.manifest import make_split_manifest, write_dataset_manifest
    from shards.writer import build_shards, stage_clip, staged_path

    extract_cfg, fbank_cfg = ExtractConfig(), FbankConfig()
    keys = []
    for yid, start, tone in clips:
        key = clip_key(yid, start)
        media = make_media(out / "media" / f"{key}.mp4", MediaSpec(10, width=160, height=120, tone_hz=tone))
        meta = {"key": key, "youtube_id": yid, "start_time": start, "split": split,
                "captions": [f"a tone of {tone:g} hertz"], "audiocap_ids": [len(keys) + 1],
                "media_sha256": sha256_file(media)}
        out_path = staged_path(out, split, key)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        stage_clip(media, 0, meta, out_path, extract_cfg, fbank_cfg)
        keys.append(key)
    result = build_shards(out, split, num_shards)
    entry = make_split_manifest(split=split, config={"out": str(out), "num_shards": num_shards},
                                extract_cfg=extract_cfg, fbank_cfg=fbank_cfg, inputs=[],
                                samples_per_shard=256, num_shards=num_shards, build=result,
                                counts={"ok": len(keys)}, failures=[])
    write_dataset_manifest(out, entry)
    return OpsBuild(out, sorted(keys), split)


def copy_build(build: OpsBuild, dest: Path) -> OpsBuild:
    shutil.copytree(build.out_dir, dest)
    return OpsBuild(dest, list(build.keys), build.split)


@pytest.fixture(scope="session")
def ops_build(tmp_path_factory) -> OpsBuild:
    """A finished 4-clip build in 2 shards; treat as read-only (use copy_build to modify)."""
    return make_build(tmp_path_factory.mktemp("ops_build") / "out")
