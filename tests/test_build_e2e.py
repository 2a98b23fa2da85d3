"""End to end: generated clips under real AudioCaps ids -> yt-dlp over HTTP -> ffmpeg -> fbank -> shards.

One reference build (plain Python, module scope) is checked in depth; a second build through the CLI and its
Prefect flow must give byte-identical shards, and so must a CLI build killed with SIGKILL and run again.
"""
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from pipeline import orchestrate as flows
from pipeline.build import BuildConfig, run_build
from pipeline.download import DownloadConfig
from pipeline.features import FbankConfig, compute_fbank
from pipeline.ledger import Ledger
from shards.manifest import load_dataset_manifest
from shards.writer import shard_index
from tests.fixtures_ops import OPS_CLIPS, clip_key, copy_build
from tests.media import Route

pytestmark = pytest.mark.slow  # a reference build, a CLI build under Prefect, a killed build and its rerun, ...

REPO = Path(__file__).resolve().parent.parent
FRAMES = 4  # fewer frames than the default keeps the test quick; the default 20 is covered by tests/test_extract.py


def _config(media, out, **kw):
    download = DownloadConfig(url_template=kw.pop("url_template", media.url_template), backoff_base_s=0.01,
                              max_retries=1, timeout_s=60, workers=3)
    from pipeline.extract import ExtractConfig
    return BuildConfig(csv=[media.csv_path], split="test", out=out, cpu_workers=2, samples_per_shard=4,
                       download=download, extract=ExtractConfig(frames=FRAMES), **kw)


def _cli(media, out, *extra):
    return [sys.executable, "flows.py", "build", "--csv", str(media.csv_path), "--split", "test", "--out",
            str(out), "--url-template", media.url_template, "--samples-per-shard", "4", "--frames", str(FRAMES),
            "--cpu-workers", "1", "--download-workers", "2", "--max-retries", "1", "--backoff", "0.01", *extra]


def _shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted((out / "shards" / "test").glob("*.tar"))}


def _samples(out):
    for shard in sorted((out / "shards" / "test").glob("*.tar")):
        with tarfile.open(shard) as tf:
            members = {}
            for ti in tf:
                key, _, name = ti.name.partition(".")
                members.setdefault(key, {})[name] = tf.extractfile(ti).read()
        yield from members.items()


def _fbank_one_thread(wav):
    # The pipeline computes fbanks with one torch thread (pipeline.build._one_torch_thread): several threads
    # change the last bits of some float32 sums, which can flip a float16 rounding.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return compute_fbank(wav, FbankConfig())
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(audiocaps_media, tmp_path_factory):
    out = tmp_path_factory.mktemp("build_ref")
    result = run_build(_config(audiocaps_media, out))
    return out, result


def test_build_outcomes_reasons_and_manifest(reference, audiocaps_media):
    out, result = reference
    cases = audiocaps_media.cases
    ok_keys = {c.key for c in audiocaps_media.ok_cases()}
    assert result.ok and result.total == len(cases)
    assert result.counts == {"ok": len(ok_keys), "failed-permanent": len(cases) - len(ok_keys),
                             "failed-transient": 0, "pending": 0}
    assert result.row_errors == [f"{audiocaps_media.csv_path}:{audiocaps_media.bad_row_line}: youtube_id "
                                 "'not-an-id!' is not 11 characters of [A-Za-z0-9_-]"]
    with Ledger(out / "ledger.sqlite", "test") as ledger:
        for case in cases.values():
            e = ledger.get(case.key)
            assert (e.status, e.reason) == (case.status, case.reason), case.kind
            assert e.attempts == 1
            if case.status == "ok":
                assert len(e.media_sha256) == 64
                assert (out / "media" / f"{case.key}.mp4").is_file()  # kept for audits
            else:
                assert e.message, case.kind  # the tool's own words are kept
    manifest = json.loads((out / "manifest.json").read_text())["splits"]["test"]
    assert manifest["counts"] == result.counts
    assert {f["key"]: f["reason"] for f in manifest["failures"]} == {
        c.key: c.reason for c in cases.values() if c.status != "ok"}
    assert manifest["num_shards"] == 4 and manifest["fingerprint_parts"]["extract"]["frames"] == FRAMES
    assert manifest["norm_stats"]["count"] > 0
    for s in manifest["shards"]:
        data = (out / s["path"]).read_bytes()
        assert len(data) == s["bytes"]
    assert sum(s["num_samples"] for s in manifest["shards"]) == len(ok_keys)
    # Nothing outside the layout.
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} <= {
        "ledger.sqlite", "ledger.sqlite-shm", "ledger.sqlite-wal", "manifest.json", "media", "shards", "staging"}
    assert not [p for p in (out / "shards").rglob("*") if p.name.startswith(".")]


def test_every_sample_is_self_consistent_and_carries_its_captions(reference, audiocaps_media):
    out, _ = reference
    seen = set()
    for key, m in _samples(out):
        case = audiocaps_media.cases[key]
        meta = json.loads(m["json"])
        assert meta["captions"] == case.captions and len(meta["captions"]) == 5
        assert meta["audiocap_ids"] == case.audiocap_ids
        assert (meta["youtube_id"], meta["start_time"], meta["split"]) == (case.youtube_id, case.start_time, "test")
        assert abs(meta["duration"] - case.duration) < 0.1, (case.kind, meta["duration"])
        wav, sr = sf.read(io.BytesIO(m["flac"]), dtype="int16")
        assert sr == 16000 and wav.ndim == 1 and abs(len(wav) / sr - case.duration) < 0.1
        fbank = np.load(io.BytesIO(m["fbank.npy"]))
        assert fbank.shape == (1024, 128) and fbank.dtype == np.float16
        np.testing.assert_array_equal(fbank, _fbank_one_thread(wav))
        frames = sorted(n for n in m if n.startswith("frame"))
        assert frames == [f"frame{i:02d}.jpg" for i in range(FRAMES)]
        assert Image.open(io.BytesIO(m[frames[0]])).size == (224, 224)
        seen.add(key)
    assert seen == {c.key for c in audiocaps_media.ok_cases()}


def test_rerun_skips_finished_clips_and_retries_permanent_only_when_asked(reference, audiocaps_media):
    out, _ = reference
    server = audiocaps_media.server
    before_bytes = _shard_bytes(out)
    before_hits = dict(server.hits)
    again = run_build(_config(audiocaps_media, out))
    assert again.counts == reference[1].counts
    assert dict(server.hits) == before_hits  # nothing downloaded again, permanent failures not retried
    assert _shard_bytes(out) == before_bytes
    manifest = json.loads((out / "manifest.json").read_text())["splits"]["test"]
    assert manifest["changes"]["shards_written"] == []
    retried = run_build(_config(audiocaps_media, out, retry_permanent=True))
    assert server.hits["/v/3MoF8myFs8Y.mp4"] == before_hits["/v/3MoF8myFs8Y.mp4"] + 1
    with Ledger(out / "ledger.sqlite", "test") as ledger:
        assert ledger.get("3MoF8myFs8Y_0_10000").attempts == 2
    assert retried.counts == reference[1].counts


def test_second_build_through_the_cli_is_byte_identical(reference, audiocaps_media, tmp_path):
    out = tmp_path / "second"
    proc = subprocess.run(_cli(audiocaps_media, out), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "download:" in proc.stderr and "process:" in proc.stderr  # progress per stage
    ref = _shard_bytes(reference[0])
    assert ref and _shard_bytes(out) == ref


def test_build_killed_with_sigkill_and_rerun_gives_the_same_shards(reference, audiocaps_media, tmp_path):
    out = tmp_path / "killed"
    # The same downloaded media as the reference (a build reuses DIR/media/{key}.mp4), so the kill lands in the
    # middle of the process stage, the one that writes staged samples.
    shutil.copytree(reference[0] / "media", out / "media", ignore=shutil.ignore_patterns(".tmp"))
    staging = out / "staging" / "test"
    err = open(tmp_path / "killed.stderr", "w+")
    proc = subprocess.Popen(_cli(audiocaps_media, out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if staging.is_dir() and any(p.name.endswith(".tar") for p in staging.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build ended before it could be killed: " + err.seek(0) * "" + err.read()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the flow, its Prefect server and any worker: all at once
    proc.wait()
    staged = [p for p in staging.iterdir() if p.name.endswith(".tar") and not p.name.startswith(".")]
    assert 1 <= len(staged) < len(audiocaps_media.ok_cases())  # killed mid-way
    assert not (out / "shards" / "test").exists()
    # The rerun, through the same command (without Prefect here: Prefect only wraps the same stages).
    assert flows.main(_cli(audiocaps_media, out)[2:] + ["--no-prefect"]) == flows.EXIT_OK
    assert _shard_bytes(out) == _shard_bytes(reference[0])
    assert (out / "reports" / "gallery-test.html").is_file(), "the direct build writes its gallery too"


def test_media_dir_builds_without_downloading(audiocaps_media, tmp_path):
    hits = sum(audiocaps_media.server.hits.values())
    cfg = _config(audiocaps_media, tmp_path, media_dir=audiocaps_media.media_dir)
    cfg.download.proxy = "http://alice:s3cret@127.0.0.1:9"  # unused without downloads; must not leak
    result = run_build(cfg)
    assert sum(audiocaps_media.server.hits.values()) == hits
    with Ledger(tmp_path / "ledger.sqlite", "test") as ledger:
        reasons = {c.kind: ledger.get(c.key).reason for c in audiocaps_media.cases.values()}
    assert reasons["404"] == "media-not-found" and reasons["html"] == "undecodable"
    assert reasons["no-audio"] == "no-audio-stream" and reasons["48k-stereo"] is None
    assert result.counts["ok"] == len(audiocaps_media.ok_cases())
    manifest_text = (tmp_path / "manifest.json").read_text()
    assert "s3cret" not in manifest_text and "http://***@127.0.0.1:9" in manifest_text


def test_exit_codes(audiocaps_media, media_server, tmp_path, monkeypatch, capsys):
    base = ["build", "--no-prefect", "--split", "test", "--frames", "2", "--max-retries", "0"]
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("not,a,header\n")
    assert flows.main(base + ["--csv", str(bad_csv), "--out", str(tmp_path / "a")]) == flows.EXIT_ERROR
    assert "cannot read the clip list" in capsys.readouterr().err
    # A wrong template fails every clip: that must not pass quietly.
    wrong = media_server.url_template("/nowhere/")
    assert flows.main(base + ["--csv", str(audiocaps_media.csv_path), "--out", str(tmp_path / "b"),
                              "--url-template", wrong, "--limit", "3"]) == flows.EXIT_FAILURE_RATE
    assert "100.0% of the clips failed" in capsys.readouterr().err
    media_server.routes["/wall/7fmOlUlwoNg.mp4"] = Route(status=429, reason="Sign in to confirm you're not a bot")
    assert flows.main(base + ["--csv", str(audiocaps_media.csv_path), "--out", str(tmp_path / "c"),
                              "--url-template", media_server.url_template("/wall/"), "--limit", "3",
                              "--download-workers", "1"]) == flows.EXIT_BOT_WALL
    assert "bot wall" in capsys.readouterr().err
    with Ledger(tmp_path / "c" / "ledger.sqlite", "test") as ledger:
        assert ledger.counts()["pending"] == 3
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert flows.main(base + ["--csv", str(audiocaps_media.csv_path), "--out", str(tmp_path / "d")]) == flows.EXIT_ERROR
    assert "ffmpeg and ffprobe not found" in capsys.readouterr().err


# ------------------------------------------------------------------ the CSV changes between builds (ops build)

def _ops_csv(path: Path, clips, captions: dict[str, str] | None = None) -> Path:
    """The ops build's CSV (tests.fixtures_ops.make_build's rows), with some captions replaced by key."""
    rows = ["audiocap_id,youtube_id,start_time,caption"]
    for i, (yid, start, tone) in enumerate(OPS_CLIPS):
        if (yid, start, tone) in clips:
            caption = (captions or {}).get(clip_key(yid, start), f"a steady tone of {tone:g} hertz")
            rows.append(f"{900000 + i},{yid},{start},{caption}")
    path.write_bytes(("\r\n".join(rows) + "\r\n").encode())
    return path


def _ops_config(csv: Path, out: Path, **kw) -> BuildConfig:
    # As tests.fixtures_ops.make_build: media is cached in out/media, the template points at a closed port.
    return BuildConfig(csv=[csv], split="test", out=out, samples_per_shard=2,
                       download=DownloadConfig(url_template="http://127.0.0.1:9/{youtube_id}.mp4", max_retries=0,
                                               workers=1), **kw)


def _shard_files(out: Path) -> dict[str, bytes]:
    """Shards and their member indexes."""
    d = out / "shards" / "test"
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.startswith(".")}


def test_changed_caption_updates_one_sample_and_equals_a_fresh_build(ops_build, tmp_path):
    b = copy_build(ops_build, tmp_path / "v1")
    before = _shard_files(b.out_dir)
    yid, start, _ = OPS_CLIPS[2]
    key = clip_key(yid, start)
    v2 = _ops_csv(tmp_path / "v2.csv", OPS_CLIPS, {key: "a tone then a bird sings"})

    result = run_build(_ops_config(v2, b.out_dir))
    assert result.changes["updated"] == [key] and result.stages["process"].clips == 0   # nothing decoded again
    after = _shard_files(b.out_dir)
    changed = sorted(name for name in before if before[name] != after[name])
    written = [Path(p).name for p in result.changes["shards_written"]]
    assert len(written) == 1 and changed == sorted([written[0], written[0].replace(".tar", ".idx.json")])
    entry = json.loads((b.out_dir / "manifest.json").read_text())["splits"]["test"]
    assert entry["changes"]["updated"] == 1 and entry["changes"]["added"] == entry["changes"]["removed"] == 0
    metas = {k: json.loads(m["json"]) for k, m in _samples(b.out_dir)}
    assert metas[key]["captions"] == ["a tone then a bird sings"]

    # A fresh build of v2 from the same media gives the same bytes, shards and indexes alike.
    fresh = tmp_path / "fresh"
    shutil.copytree(ops_build.out_dir / "media", fresh / "media")
    run_build(_ops_config(v2, fresh))
    assert _shard_files(fresh) == after
    # The same CSV again: nothing to update.
    assert run_build(_ops_config(v2, b.out_dir)).changes["updated"] == []


def test_removed_row_is_removed_not_failed_and_comes_back(ops_build, tmp_path):
    b = copy_build(ops_build, tmp_path / "out")
    original = _shard_files(b.out_dir)
    yid, start, _ = OPS_CLIPS[1]
    gone = clip_key(yid, start)
    v3 = _ops_csv(tmp_path / "v3.csv", [c for c in OPS_CLIPS if c[0] != yid])

    result = run_build(_ops_config(v3, b.out_dir))
    assert result.changes["dropped_rows"] == [gone] and result.changes["removed"] == [gone]
    assert result.ok and result.failure_rate == 0 and result.counts["ok"] == len(OPS_CLIPS) - 1
    with Ledger(b.out_dir / "ledger.sqlite", "test") as ledger:
        e = ledger.get(gone)
        assert (e.status, e.media_sha256 is not None) == ("removed", True)   # history kept
    entry = json.loads((b.out_dir / "manifest.json").read_text())["splits"]["test"]
    assert entry["failures"] == [] and entry["num_samples"] == len(OPS_CLIPS) - 1

    # A --limit run leaves the rows it skips alone (they are still in the CSV): nothing is marked removed.
    v1 = _ops_csv(tmp_path / "v1.csv", OPS_CLIPS)
    limited = run_build(_ops_config(v1, b.out_dir, limit=1))   # the first row only
    assert limited.changes["dropped_rows"] == []
    with Ledger(b.out_dir / "ledger.sqlite", "test") as ledger:
        assert ledger.counts()["removed"] == 1

    # The row is back: pending, built again from the cached media, and the shards are the original ones.
    back = run_build(_ops_config(v1, b.out_dir))
    assert gone in back.changes["added"] and back.counts["ok"] == len(OPS_CLIPS)
    with Ledger(b.out_dir / "ledger.sqlite", "test") as ledger:
        assert ledger.get(gone).status == "ok" and ledger.counts()["removed"] == 0
    assert _shard_files(b.out_dir) == original


# ------------------------------------------------------------------ one copy of each sample on disk

def _disk_bytes(root: Path, skip=("media", ".cache")) -> int:
    """What `du` counts (allocated blocks) under root, without the media cache."""
    total = 0
    for p in root.rglob("*"):
        if any(part in skip for part in p.relative_to(root).parts):
            continue
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_blocks * 512
    return total


def test_a_finished_build_keeps_one_copy_of_each_sample(reference):
    out, result = reference
    # The samples are in the shards only: no staged tar or json update is left behind.
    assert not [p for p in (out / "staging" / "test").iterdir() if not p.name.startswith(".")]
    shard_bytes = sum(s["bytes"] for s in result.shards)
    assert shard_bytes > 0 and _disk_bytes(out) <= 1.05 * shard_bytes, (_disk_bytes(out), shard_bytes)


_CRASH_CHILD = """
import sys
from pathlib import Path
from pipeline.build import BuildConfig, run_build
from pipeline.download import DownloadConfig
run_build(BuildConfig(csv=[Path(sys.argv[1])], split="test", out=Path(sys.argv[2]), samples_per_shard=2,
                      download=DownloadConfig(url_template="http://127.0.0.1:9/{youtube_id}.mp4", max_retries=0,
                                              workers=1)))
"""


@pytest.mark.parametrize("point", ["shard-renamed", "manifest-written"])
def test_a_build_killed_between_shards_manifest_and_cleanup_loses_no_clip(ops_build, tmp_path, point):
    """SIGKILL (the build kills itself at shards.atomic.crash_point) after the first shard of an incremental
    build is renamed into place but before the manifest names it, or after the manifest but before the staged
    copies go: the rerun finds every sample (nothing is made again) and writes a fresh build's bytes."""
    b = copy_build(ops_build, tmp_path / "out")
    old_manifest = (b.out_dir / "manifest.json").read_bytes()
    yid, start, _ = OPS_CLIPS[2]
    key = clip_key(yid, start)
    # A caption change and a removal in the same shard, samples read from the old shard (no staged copy).
    v2 = _ops_csv(tmp_path / "v2.csv", [c for c in OPS_CLIPS if c != OPS_CLIPS[0]], {key: "a tone then a bird"})
    env = dict(os.environ, AVCAP_CRASH_AT=point, PYTHONPATH=str(REPO))
    child = subprocess.run([sys.executable, "-c", _CRASH_CHILD, str(v2), str(b.out_dir)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    staging = b.out_dir / "staging" / "test"
    assert [p.name for p in staging.iterdir() if not p.name.startswith(".")] == [f"{key}.json"]
    entry = json.loads(old_manifest)["splits"]["test"]
    on_disk = {s["path"]: s["sha256"] for s in entry["shards"]}
    manifest_now = (b.out_dir / "manifest.json").read_bytes()
    if point == "shard-renamed":
        assert manifest_now == old_manifest      # the manifest still names the old shard, the disk holds the new
        assert any(hashlib.sha256((b.out_dir / p).read_bytes()).hexdigest() != sha for p, sha in on_disk.items())
    else:
        assert manifest_now != old_manifest

    rerun = run_build(_ops_config(v2, b.out_dir))
    assert rerun.ok and rerun.counts["ok"] == len(OPS_CLIPS) - 1 and rerun.stages["process"].clips == 0
    assert not [p for p in staging.iterdir() if not p.name.startswith(".")]
    fresh = tmp_path / "fresh"
    shutil.copytree(ops_build.out_dir / "media", fresh / "media")
    run_build(_ops_config(v2, fresh))
    assert _shard_files(b.out_dir) == _shard_files(fresh)
    got = {s.path: s.sha256 for s in load_dataset_manifest(b.out_dir).splits["test"].shards}
    assert got == {s.path: s.sha256 for s in load_dataset_manifest(fresh).splits["test"].shards}


def test_a_damaged_shard_is_not_trusted_its_clips_are_made_again(ops_build, tmp_path, caplog):
    b = copy_build(ops_build, tmp_path / "out")
    original = _shard_files(b.out_dir)
    victim = b.out_dir / "shards" / "test" / "test-00001.tar"
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 3] ^= 0x01
    victim.write_bytes(bytes(blob))
    in_victim = [k for k in b.keys if shard_index(k, 2) == 1]
    with caplog.at_level(logging.WARNING, logger="avcap.build"):
        result = run_build(_ops_config(_ops_csv(tmp_path / "v1.csv", OPS_CLIPS), b.out_dir))
    assert result.ok and result.counts["ok"] == len(OPS_CLIPS)
    # Said clearly, and made again from the media: the clips of the damaged shard, and only they.
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"{len(in_victim)} ok clips have no staged sample and are in no intact shard" in warning
    assert "test-00001.tar is not used" in warning and "damaged" in warning
    assert result.stages["process"].clips == len(in_victim)
    assert _shard_files(b.out_dir) == original
