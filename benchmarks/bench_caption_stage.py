"""Cost of pipeline.build.caption_stage on an up-to-date build: every build reads the json member of each finished
clip's sample to find changed captions, from the shards (through their member index, after each shard's sha256
is checked once per process) now that a finished build keeps no staged copy. Copies one real sample under N keys,
writes them as shards (256 per shard) and deletes the staged copies as a build does, then times the stage with
nothing to update (first call: shards verified; second: verified already) and with every caption changed (a
staged json update per clip).

    .venv/bin/python benchmarks/bench_caption_stage.py --clips 300
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.build import BuildConfig, caption_stage  # noqa: E402
from pipeline.clip_list import Clip  # noqa: E402
from pipeline.download import DownloadConfig  # noqa: E402
from pipeline.ledger import Ledger  # noqa: E402
from pipeline.stage import stage_clip  # noqa: E402
from pipeline.status import OK  # noqa: E402
from shards.sample_format import encode_json  # noqa: E402
from shards.writer import (Sample, build_shards, discard_staged, split_samples, staged_path,  # noqa: E402
                           write_staged_sample)
from tests.media import MediaSpec, make_media  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clips", type=int, default=300)
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-captions-"))
    try:
        media = make_media(root / "m.mp4", MediaSpec(10, width=160, height=120))
        clips = [Clip(f"bench{i:06d}", 0, [f"caption {i}"], [i], "train", []) for i in range(a.clips)]
        cfg = BuildConfig(csv=[media], split="train", out=root / "out",
                          download=DownloadConfig(url_template="http://127.0.0.1:9/{youtube_id}.mp4"))
        first = staged_path(cfg.out, "train", clips[0].key)
        meta = {"key": clips[0].key, "youtube_id": clips[0].youtube_id, "start_time": 0, "split": "train",
                "captions": clips[0].captions, "audiocap_ids": clips[0].audiocap_ids}
        sample = stage_clip(media, 0, meta, first)
        for c in clips[1:]:
            members = dict(sample.members, json=encode_json(dict(sample.meta, key=c.key, captions=c.captions,
                                                                 audiocap_ids=c.audiocap_ids)))
            write_staged_sample(staged_path(cfg.out, "train", c.key), Sample(c.key, members))
        with Ledger(cfg.out / "ledger.sqlite", "train") as ledger:
            ledger.upsert_pending(clips)
            for c in clips:
                ledger.record(c.key, OK, attempts=0)
        size = first.stat().st_size
        shards = build_shards(cfg.out, "train", max(1, len(clips) // 256))
        discard_staged(cfg.out, "train", shards.keys)
        t = time.perf_counter()
        assert caption_stage(cfg, clips) == []
        cold = time.perf_counter() - t
        t = time.perf_counter()
        assert caption_stage(cfg, clips) == []
        unchanged = time.perf_counter() - t
        changed = [Clip(c.youtube_id, 0, [c.captions[0] + " (edited)"], c.audiocap_ids, "train", []) for c in clips]
        t = time.perf_counter()
        assert len(caption_stage(cfg, changed)) == len(clips)
        rewrite = time.perf_counter() - t
        assert split_samples(cfg.out, "train").meta(clips[0].key)["captions"] == changed[0].captions
        print(f"{a.clips} samples of {size / 1024:.0f} KiB in {len(shards.shards)} shards: nothing changed "
              f"{cold:.3f} s with the shards' sha256 check ({1e3 * cold / a.clips:.2f} ms/clip), {unchanged:.3f} s "
              f"after it ({1e3 * unchanged / a.clips:.2f} ms/clip); every caption changed {rewrite:.3f} s "
              f"({1e3 * rewrite / a.clips:.2f} ms/clip)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
