"""The on-disk shard format does not move by accident: shards written from committed sample members must have
the sha256s recorded in tests/data/golden/shards.sha256.json (see its README)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from shards.writer import Sample, build_shards, staged_path, write_staged_sample

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"


def test_shards_from_committed_members_match_the_golden_sha256s(tmp_path):
    samples = [Sample(d.name, {m.name: m.read_bytes() for m in sorted(d.iterdir())})
               for d in sorted((GOLDEN / "samples").iterdir())]
    assert len(samples) == 4
    for s in samples:
        write_staged_sample(staged_path(tmp_path, "train", s.key), s)
    build_shards(tmp_path, "train", 2)
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
           for p in sorted((tmp_path / "shards" / "train").iterdir())}
    assert got == json.loads((GOLDEN / "shards.sha256.json").read_text())
