"""pipeline.audit on a real small build: a clean build passes; a corrupted byte, a swapped frame, a changed fbank
parameter and a different tool version are each caught and named."""
from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

import pytest

from pipeline.audit import add_audit_arguments, audit_main
from pipeline.audit_checks import platform_parts, run_audit, sample_clips
from pipeline.audit_report import AuditConfig, AuditError
from shards.manifest import fingerprint
from shards.hashing import file_sha256
from shards.writer import Sample, write_shard
from tests.fixtures_ops import copy_build


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _write_manifest(out: Path, m: dict) -> None:
    (out / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True))


def _found(report) -> set[tuple[str, str]]:
    return {(m.check, m.target) for m in report.mismatches}


def _shard_of(out: Path, split: str, key: str) -> dict:
    for s in _manifest(out)["splits"][split]["shards"]:
        with tarfile.open(out / s["path"]) as tf:
            if any(n.startswith(key + ".") for n in tf.getnames()):
                return s
    raise AssertionError(f"{key} in no shard")


def test_clean_build_passes_bitwise_and_writes_report(ops_build):
    report = run_audit(AuditConfig(ops_build.out_dir, sample=-1, seed=0))
    assert report.ok, [str(m) for m in report.mismatches]
    assert report.clips_sampled == ops_build.keys
    assert report.shards_checked == 2 and report.samples_counted == len(ops_build.keys)
    # Same machine as the build: the fbank comparison must be the strict one, and the report says so.
    assert report.fbank_comparison.startswith("split test: bitwise")
    saved = json.loads(Path(report.report_path).read_text())
    assert Path(report.report_path).parent == ops_build.out_dir / "audit"
    assert saved["ok"] is True and saved["clips_sampled"] == ops_build.keys and saved["mismatches"] == []
    assert saved["tool_versions_manifest"]["test"]["torch"] == saved["tool_versions_here"]["torch"]


def test_sample_is_seeded_and_bounded():
    keys = [f"k{i:02d}" for i in range(30)]
    a = sample_clips(keys, 5, seed=7)
    assert len(a) == 5 and set(a) <= set(keys) and a == sorted(a)
    assert sample_clips(list(reversed(keys)), 5, seed=7) == a    # order found does not matter
    assert sample_clips(keys, 5, seed=8) != a
    assert sample_clips(keys, -1, seed=0) == keys and sample_clips(keys, 99, seed=0) == keys
    assert sample_clips(keys, 0, seed=0) == []


def test_corrupt_byte_in_shard_is_named(ops_build, tmp_path):
    b = copy_build(ops_build, tmp_path / "out")
    shard = _manifest(b.out_dir)["splits"]["test"]["shards"][0]
    path = b.out_dir / shard["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    report = run_audit(AuditConfig(b.out_dir, sample=0))
    assert not report.ok
    assert ("shard-sha256", shard["path"]) in _found(report)
    assert all(m.target == shard["path"] for m in report.mismatches), [str(m) for m in report.mismatches]
    args = add_audit_arguments(argparse.ArgumentParser()).parse_args(
        ["--out", str(b.out_dir), "--sample", "0", "--no-prefect"])
    assert audit_main(args) == 1


def test_missing_shard_and_wrong_count_are_named(ops_build, tmp_path):
    b = copy_build(ops_build, tmp_path / "out")
    m = _manifest(b.out_dir)
    first, second = m["splits"]["test"]["shards"]
    (b.out_dir / first["path"]).unlink()
    second["num_samples"] += 1
    m["splits"]["test"]["num_samples"] += 1   # a manifest that adds up; the shard file holds one less
    _write_manifest(b.out_dir, m)
    report = run_audit(AuditConfig(b.out_dir, sample=0))
    assert ("shard-missing", first["path"]) in _found(report)
    assert ("shard-samples", second["path"]) in _found(report)


def test_corrupt_or_missing_member_index_is_named(ops_build, tmp_path):
    b = copy_build(ops_build, tmp_path / "out")
    first, second = _manifest(b.out_dir)["splits"]["test"]["shards"]
    index = b.out_dir / first["index"]["path"]
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0x01       # same size: only the hash can tell
    index.write_bytes(bytes(data))
    (b.out_dir / second["index"]["path"]).unlink()

    report = run_audit(AuditConfig(b.out_dir, sample=0))
    assert _found(report) == {("index-sha256", first["index"]["path"]), ("index-missing", second["index"]["path"])}, \
        [str(m) for m in report.mismatches]
    assert "does not match manifest" in next(m.message for m in report.mismatches if m.check == "index-sha256")


def test_swapped_frame_is_caught_by_reextraction(ops_build, tmp_path):
    b = copy_build(ops_build, tmp_path / "out")
    key = ops_build.keys[0]
    entry = _shard_of(b.out_dir, "test", key)
    path = b.out_dir / entry["path"]
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for ti in tf:
            k, _, member = ti.name.partition(".")
            samples.setdefault(k, {})[member] = tf.extractfile(ti).read()
    s = samples[key]
    s["frame03.jpg"], s["frame04.jpg"] = s["frame04.jpg"], s["frame03.jpg"]
    write_shard(path, [Sample(k, v) for k, v in samples.items()])
    # Make the manifest agree with the new shard bytes: only re-extraction can tell now.
    m = _manifest(b.out_dir)
    for e in m["splits"]["test"]["shards"]:
        if e["path"] == entry["path"]:
            e["sha256"], e["bytes"] = file_sha256(path), path.stat().st_size
            index = b.out_dir / e["index"]["path"]      # write_shard rewrote the member index too
            e["index"]["sha256"], e["index"]["bytes"] = file_sha256(index), index.stat().st_size
    _write_manifest(b.out_dir, m)

    report = run_audit(AuditConfig(b.out_dir, sample=-1))
    assert _found(report) == {("frame", f"{key}.frame03.jpg"), ("frame", f"{key}.frame04.jpg")}, \
        [str(m) for m in report.mismatches]
    msg = next(m.message for m in report.mismatches if m.target.endswith("frame03.jpg"))
    assert "re-extracted frame 04" in msg


def test_changed_fbank_parameter_is_caught(ops_build, tmp_path):
    b = copy_build(ops_build, tmp_path / "out")
    m = _manifest(b.out_dir)
    split = m["splits"]["test"]
    split["fingerprint_parts"]["fbank"]["preemphasis_coefficient"] = 0.9
    _write_manifest(b.out_dir, m)

    report = run_audit(AuditConfig(b.out_dir, sample=1, seed=0))
    key = report.clips_sampled[0]
    found = _found(report)
    assert ("fbank", f"{key}.fbank.npy") in found
    # The manifest was edited without updating its fingerprint: named as well.
    assert ("fingerprint", "test") in found
    assert "not bitwise equal" in next(x.message for x in report.mismatches if x.check == "fbank")

    # A consistent manifest (fingerprint recomputed) claiming another parameter: the fbank check alone catches it.
    split["fingerprint"] = fingerprint(split["fingerprint_parts"])
    m["fbank"] = dict(split["fingerprint_parts"]["fbank"])    # the loader's copy follows the split's
    _write_manifest(b.out_dir, m)
    report = run_audit(AuditConfig(b.out_dir, sample=1, seed=0))
    assert _found(report) == {("fbank", f"{key}.fbank.npy")}, [str(x) for x in report.mismatches]

    # The loader's dataset-wide copy disagreeing with what the split recorded is named too.
    m["fbank"]["num_mel_bins"] = 64
    _write_manifest(b.out_dir, m)
    report = run_audit(AuditConfig(b.out_dir, sample=0))
    assert _found(report) == {("config", "manifest.fbank")}
    assert "num_mel_bins: manifest 128, here 64" in report.mismatches[0].message


def test_tool_version_difference_is_named_and_fbank_uses_tolerance(ops_build, tmp_path):
    b = copy_build(ops_build, tmp_path / "out")
    m = _manifest(b.out_dir)
    m["splits"]["test"]["tool_versions"]["torch"] = "1.13.1"
    _write_manifest(b.out_dir, m)
    report = run_audit(AuditConfig(b.out_dir, sample=1, fbank_tolerance=0.05))
    assert _found(report) == {("tool-version", "torch")}
    assert "'1.13.1'" in report.mismatches[0].message
    assert "within tolerance 0.05" in report.fbank_comparison and "torch" in report.fbank_comparison


def test_changed_media_is_named(ops_build, tmp_path):
    b = copy_build(ops_build, tmp_path / "out")
    key = ops_build.keys[0]
    other = ops_build.keys[1]
    (b.out_dir / "media" / f"{key}.mp4").write_bytes((b.out_dir / "media" / f"{other}.mp4").read_bytes())
    report = run_audit(AuditConfig(b.out_dir, sample=-1))
    checks = {c for c, t in _found(report) if t.startswith(key) or t == f"media/{key}.mp4"}
    # (testsrc2 pictures do not depend on the tone, so the frames still agree: only media and audio differ.)
    assert {"media", "waveform"} <= checks
    assert all(t.startswith(key) or t == f"media/{key}.mp4" for _, t in _found(report))


def test_no_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(AuditError, match="no manifest.json"):
        run_audit(AuditConfig(tmp_path))
    args = add_audit_arguments(argparse.ArgumentParser()).parse_args(["--out", str(tmp_path), "--no-prefect"])
    assert audit_main(args) == 2
    with pytest.raises(ValueError, match="sample"):
        AuditConfig(tmp_path, sample=-5)


def test_media_from_users_media_dir_is_found(ops_build, tmp_path):
    """A build from --media-dir keeps no DIR/media copy: the audit looks in the user's directory recorded in the
    manifest config, under the names the build accepts there ({youtube_id}_{start_time}.* is a cut window)."""
    b = copy_build(ops_build, tmp_path / "out")
    user_media = tmp_path / "videos"
    user_media.mkdir()
    key = ops_build.keys[-1]
    assert key == "opsAudit006_20000_30000"
    (b.out_dir / "media" / f"{key}.mp4").rename(user_media / "opsAudit006_20.mp4")
    for p in (b.out_dir / "media").iterdir():
        p.unlink()
    m = _manifest(b.out_dir)
    m["splits"]["test"]["config"]["media_dir"] = str(user_media)
    _write_manifest(b.out_dir, m)

    report = run_audit(AuditConfig(b.out_dir, sample=-1))
    # The three clips whose media is gone are named; the one in the user's directory re-extracts and matches.
    assert _found(report) == {("media", k) for k in ops_build.keys if k != key}, [str(x) for x in report.mismatches]


def test_other_kernel_is_info_but_other_arch_is_a_mismatch(ops_build, tmp_path):
    """An audit on another host of the same OS and architecture passes (bitwise still applies): the kernel
    release and tools that do not decide sample content are named as information only."""
    assert platform_parts("Linux-6.1.0-18-amd64-x86_64-with-glibc2.36") == {"os": "Linux", "arch": "x86_64"}
    assert platform_parts("macOS-14.5-arm64-arm-64bit") == {"os": "macOS", "arch": "arm64"}
    b = copy_build(ops_build, tmp_path / "out")
    m = _manifest(b.out_dir)
    tools = m["splits"]["test"]["tool_versions"]
    os_name, _, rest = tools["platform"].partition("-")
    arch = platform_parts(tools["platform"])["arch"]
    tools["platform"] = f"{os_name}-0.0.1-othercloud-{arch}-with-glibc2.99"
    tools["yt-dlp"] = "1999.01.01"
    _write_manifest(b.out_dir, m)
    report = run_audit(AuditConfig(b.out_dir, sample=1))
    assert report.ok, [str(x) for x in report.mismatches]
    assert report.fbank_comparison.startswith("split test: bitwise")
    info = " ".join(report.notes)
    assert "platform differs" in info and "yt-dlp differs" in info and "not a mismatch" in info

    tools["platform"] = f"{os_name}-0.0.1-{'aarch64' if arch != 'aarch64' else 'x86_64'}-with-glibc2.99"
    _write_manifest(b.out_dir, m)
    report = run_audit(AuditConfig(b.out_dir, sample=0))
    assert _found(report) == {("tool-version", "arch")}
    assert "within tolerance" in report.fbank_comparison and "arch" in report.fbank_comparison
