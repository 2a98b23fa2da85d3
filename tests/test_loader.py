"""shards.loader on small real shards: batch counts per rank, exact-once eval, resume, damaged shards, URLs."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from shards.epoch_plan import batches_per_epoch
from shards.index import ShardError
from shards.loader import LoaderConfig, make_loader
from shards.manifest import ManifestError
from shards.split_info import load_split
from tests.fixtures_loader import (add_member_indexes, batches_as_data, build_dataset, check_batch_content,
                                   clip_number, run_epoch, same_batches)

REPO = Path(__file__).resolve().parent.parent

TRAIN_CLIPS = set(range(0, 16))   # shards of 5, 2, 9 clips
VAL_CLIPS = set(range(16, 23))    # one shard of 7 clips


@pytest.mark.parametrize("workers", [0, 2])
def test_train_uneven_shards_every_rank_same_batch_count(tiny_shards, workers):
    cfg = LoaderConfig(data=str(tiny_shards), split="train", batch_size=3, num_workers=workers, seed=7,
                       shuffle_buffer=4)
    per_rank = run_epoch(cfg, world_size=2)
    # 16 clips over 2 ranks x batch 3: 2 batches each, although the ranks' shards hold different counts
    assert [len(r) for r in per_rank] == [2, 2]
    seen = set()
    for batches in per_rank:
        for b in batches:
            assert b["fbank"].dtype == torch.float16 and b["fbank"].shape == (3, 1024, 128)
            assert b["frames"].dtype == torch.uint8 and b["frames"].shape == (3, 1, 3, 224, 224)
            assert b["valid"].all()
            assert all(0 <= f <= 19 for f in b["frame_index"].tolist())
            check_batch_content(b)
            seen |= {clip_number(k) for k in b["keys"]}
    assert seen <= TRAIN_CLIPS


def test_train_more_ranks_than_shards_wraps_around_without_hanging(tiny_shards):
    # 3 shards, 4 ranks x 2 workers = 8 slots: slots share shards sample by sample; counts still agree
    cfg = LoaderConfig(data=str(tiny_shards), split="train", batch_size=2, num_workers=0, shuffle_buffer=2)
    per_rank = run_epoch(cfg, world_size=4)
    assert {len(r) for r in per_rank} == {2}


def test_train_shuffle_is_deterministic_per_seed_and_epoch(tiny_shards):
    cfg = LoaderConfig(data=str(tiny_shards), split="train", batch_size=4, num_workers=0, seed=3, shuffle_buffer=8)
    keys = lambda epoch: [b["keys"] for b in run_epoch(cfg, 1, epoch)[0]]  # noqa: E731
    frames = lambda epoch: [b["frame_index"].tolist() for b in run_epoch(cfg, 1, epoch)[0]]  # noqa: E731
    assert keys(0) == keys(0) and frames(0) == frames(0)
    assert keys(0) != keys(1)


def test_resume_mid_epoch_yields_the_rest_of_the_same_epoch(tiny_shards):
    cfg = LoaderConfig(data=str(tiny_shards), split="train", batch_size=1, num_workers=2, seed=5, shuffle_buffer=3)
    full = run_epoch(cfg, world_size=1, epoch=2)[0]
    assert len(full) == 16
    resumed = run_epoch(cfg, world_size=1, epoch=2, start_batch=5)[0]   # odd: the workers' roles rotate
    assert [b["keys"] for b in resumed] == [b["keys"] for b in full[5:]]
    assert [b["frame_index"].tolist() for b in resumed] == [b["frame_index"].tolist() for b in full[5:]]
    assert [b["caption"] for b in resumed] == [b["caption"] for b in full[5:]]
    assert all(torch.equal(a["frames"], b["frames"]) for a, b in zip(resumed, full[5:]))


@pytest.mark.parametrize("world_size,workers,num_frames", [(2, 2, 1), (3, 0, 4)])
def test_eval_reads_every_clip_exactly_once(tiny_shards, world_size, workers, num_frames):
    # val has 1 shard for 4 slots (by-sample assignment); train has 3 shards for 3 slots (by-shard assignment)
    for split, clips in (("val", VAL_CLIPS), ("train", TRAIN_CLIPS)):
        cfg = LoaderConfig(data=str(tiny_shards), split=split, batch_size=2, num_workers=workers, train=False,
                           num_frames=num_frames)
        per_rank = run_epoch(cfg, world_size)
        assert len({len(r) for r in per_rank}) == 1, "every rank yields as many eval batches"
        got = Counter(clip_number(k) for r in per_rank for b in r for k, v in zip(b["keys"], b["valid"]) if v)
        assert set(got) == clips and set(got.values()) == {1}, got
        for r in per_rank:
            for b in r:
                # eval frame: F//2 for one frame, (F - nf)//2 as the window start
                assert b["frame_index"].tolist() == [10 if num_frames == 1 else 8] * len(b["keys"])
                assert b["frames"].shape[1] == num_frames
                check_batch_content(b)


def _damaged_copy(src, tmp_path):
    root = tmp_path / "damaged"
    shutil.copytree(src, root)
    bad = root / "shards" / "train" / "train-00002.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2 + 100])   # cut mid-member
    return root, bad


@pytest.mark.timeout(120)
def test_truncated_shard_is_named_or_skipped_never_hangs(tiny_shards, tmp_path):
    root, bad = _damaged_copy(tiny_shards, tmp_path)
    cfg = LoaderConfig(data=str(root), split="train", batch_size=2, num_workers=0, shuffle_buffer=2)
    with pytest.raises(ShardError, match="train-00002.tar.*truncated"):
        run_epoch(cfg, world_size=1)
    # with workers the error crosses the process boundary and still names the shard
    with pytest.raises(Exception, match="train-00002.tar"):
        run_epoch(LoaderConfig(**{**cfg.__dict__, "num_workers": 2}), world_size=1)
    skipping = LoaderConfig(**{**cfg.__dict__, "skip_bad_shards": True})
    with pytest.warns(UserWarning, match="train-00002.tar"):
        per_rank = run_epoch(skipping, world_size=2)   # the rank holding the bad shard wraps around its rest
    assert [len(r) for r in per_rank] == [4, 4]
    for r in per_rank:
        for b in r:
            check_batch_content(b)


def test_shard_with_fewer_samples_than_manifest_says_is_an_error(tiny_shards, tmp_path):
    root = tmp_path / "wrongcount"
    shutil.copytree(tiny_shards, root)
    m = json.loads((root / "manifest.json").read_text())
    m["splits"]["val"]["shards"][0]["num_samples"] = 8
    m["splits"]["val"]["num_samples"] = 8   # a manifest that adds up; the shard file holds one less
    (root / "manifest.json").write_text(json.dumps(m))
    cfg = LoaderConfig(data=str(root), split="val", batch_size=4, num_workers=0, train=False)
    with pytest.raises(ShardError, match="val-00000.tar: holds 7 samples, the manifest says 8"):
        run_epoch(cfg, world_size=1)


def test_pipe_urls_and_manifest_path(tiny_shards, tmp_path):
    """Shards read through a `pipe:` command the user gives (--shard-base; a non-seekable stream) and --data as
    the manifest's path. A manifest itself never names a command (tests/test_reliability_data.py)."""
    manifest = tmp_path / "piped.json"
    manifest.write_text((tiny_shards / "manifest.json").read_text())
    cfg = LoaderConfig(data=str(manifest), split="val", batch_size=3, num_workers=0, train=False,
                       shard_base=f"pipe:cat {tiny_shards}/{{path}}")
    (batches,) = run_epoch(cfg, world_size=1)
    assert sorted(clip_number(k) for b in batches for k, v in zip(b["keys"], b["valid"]) if v) == sorted(VAL_CLIPS)
    for b in batches:
        check_batch_content(b)


def test_bad_manifest_inputs_are_named(tiny_shards, tmp_path):
    with pytest.raises(ValueError, match="no split 'test'.*splits: \\['train', 'val'\\]"):
        load_split(str(tiny_shards), "test")
    with pytest.raises(FileNotFoundError, match="manifest.json does not exist"):
        load_split(str(tmp_path / "nowhere"), "train")
    info = load_split(str(tiny_shards), "train")
    assert (info.num_samples, info.frames_per_clip, info.target_length) == (16, 20, 1024)
    assert batches_per_epoch(info, world_size=2, num_workers=2, batch_size=3, train=True) == 2
    with pytest.raises(ValueError, match="num_frames=21 but the dataset has 20"):
        make_loader(LoaderConfig(data=str(tiny_shards), num_frames=21, num_workers=0))
    # One manifest form, the pipeline's: a split entry that lists only its shards (frames per clip and fbank at
    # the top, as hand-made datasets once had) is refused, naming the split and what it lacks.
    flat = tmp_path / "flat" / "manifest.json"
    flat.parent.mkdir()
    flat.write_text(json.dumps({"format_version": 2, "frames_per_clip": 20, "fbank": {"target_length": 1024},
                                "splits": {"train": {"shards": [{"path": "shards/train/train-00000.tar",
                                                                 "num_samples": 5}]}}}))
    with pytest.raises(ManifestError, match=r"flat/manifest.json split 'train': split entry lacks fields "
                                            r"\['changes', 'config', .*'fingerprint_parts'"):
        load_split(str(flat.parent), "train")


# -----------------------------------------------------------------------------
# member index (manifest format 2): the indexed reader

@pytest.fixture(scope="module")
def indexed_shards(tmp_path_factory):
    """The tiny_shards layout again (same clips, same bytes), with member indexes."""
    return add_member_indexes(build_dataset(tmp_path_factory.mktemp("indexed"), {"train": [5, 2, 9], "val": [7]}))


def _rewrite_manifest(root, edit):
    m = json.loads((root / "manifest.json").read_text())
    edit(m)
    (root / "manifest.json").write_text(json.dumps(m))


def _flac_header_offsets(path):
    import tarfile
    with tarfile.open(path) as tf:
        return [ti.offset for ti in tf if ti.name.endswith(".flac")]


def test_indexed_reader_gives_the_same_batches_and_never_parses_unused_headers(tiny_shards, indexed_shards,
                                                                              tmp_path):
    from shards.readers import IndexedShardReader
    info = load_split(str(indexed_shards), "train")
    assert all(s.index_url and s.sha256 and s.bytes for s in info.shards)
    reader = IndexedShardReader(info.shards[0])
    assert len(reader) == 5
    reader.close()
    for cfg in (LoaderConfig(data="", split="train", batch_size=3, num_workers=0, seed=7, shuffle_buffer=4,
                             num_frames=4),
                LoaderConfig(data="", split="val", batch_size=2, num_workers=2, train=False)):
        plain = batches_as_data(run_epoch(LoaderConfig(**{**cfg.__dict__, "data": str(tiny_shards)}), 2))
        indexed = run_epoch(LoaderConfig(**{**cfg.__dict__, "data": str(indexed_shards)}), 2)
        for r in indexed:
            for b in r:
                check_batch_content(b)
        same_batches(plain, batches_as_data(indexed))
    # Wreck the header of every (never used) flac member in a copy: the indexed reader does not notice, the
    # header-parsing reader (same shards, manifest without the index) does. The manifest still records the
    # original sha256: the loader does not hash whole shards, it compares the index's record with the manifest.
    root = tmp_path / "wrecked"
    shutil.copytree(indexed_shards, root)
    shard = root / "shards" / "val" / "val-00000.tar"
    data = bytearray(shard.read_bytes())
    for off in _flac_header_offsets(shard):
        data[off + 257: off + 262] = b"XXXXX"   # ustar magic gone and checksum now wrong
    shard.write_bytes(bytes(data))
    cfg = LoaderConfig(data=str(root), split="val", batch_size=7, num_workers=0, train=False)
    (batches,) = run_epoch(cfg, 1)
    assert sorted(clip_number(k) for k in batches[0]["keys"]) == sorted(VAL_CLIPS)
    _rewrite_manifest(root, lambda m: m["splits"]["val"]["shards"][0].update(index=None))
    with pytest.raises(ShardError, match="val-00000.tar: corrupt tar header"):
        run_epoch(cfg, 1)


def test_stale_or_mismatched_index_is_detected_and_names_the_shard(indexed_shards, tmp_path):
    from shards.index import ShardIndexError
    cfg = LoaderConfig(data="", split="val", batch_size=7, num_workers=0, train=False)

    def fresh(name):
        root = tmp_path / name
        shutil.copytree(indexed_shards, root)
        return root, root / "shards" / "val" / "val-00000.idx.json", LoaderConfig(**{**cfg.__dict__, "data": str(root)})

    # 1. the sidecar replaced by another shard's (sha256 differs from the manifest's record)
    root, idx, c = fresh("swapped")
    shutil.copy(root / "shards" / "train" / "train-00000.idx.json", idx)
    with pytest.raises(ShardIndexError, match=r"val-00000.idx.json of shard .*val-00000.tar: sha256 differs"):
        run_epoch(c, 1)
    # 2. an index that passes the manifest check but places a member wrongly: caught at the tar header
    root, idx, c = fresh("shifted")
    raw = json.loads(idx.read_text())
    fb = raw["members"].index("fbank.npy")
    raw["samples"][3][1][fb] += 512
    idx.write_bytes(json.dumps(raw).encode())
    _rewrite_manifest(root, lambda m: m["splits"]["val"]["shards"][0]["index"].update(
        sha256=hashlib.sha256(idx.read_bytes()).hexdigest()))
    with pytest.raises(ShardIndexError, match=r"val-00000.tar: its index places clip0019xxx_19000_29000.fbank.npy "
                                              r".* tar header there disagrees"):
        run_epoch(c, 1)
    # 3. the manifest and its index describe an older build of the shard (sha256 of the shard differs)
    root, idx, c = fresh("rebuilt")
    _rewrite_manifest(root, lambda m: m["splits"]["val"]["shards"][0].update(sha256="0" * 64))
    with pytest.raises(ShardIndexError, match=r"val-00000.tar: stale or mismatched index: it is for shard sha256"):
        run_epoch(c, 1)
    # 4. the shard cut short: a damaged shard (ShardError, as without an index), not an index problem
    root, idx, c = fresh("truncated")
    shard = root / "shards" / "val" / "val-00000.tar"
    shard.write_bytes(shard.read_bytes()[:-2048])
    with pytest.raises(ShardError, match=r"val-00000.tar: \d+ bytes, the manifest says \d+ \(truncated") as e:
        run_epoch(c, 1)
    assert e.type is ShardError
    # 5. the sidecar listed but gone
    root, idx, c = fresh("missing")
    idx.unlink()
    with pytest.raises(ShardIndexError, match="val-00000.idx.json .* cannot be read"):
        run_epoch(c, 1)


class _WorkerProbe(torch.utils.data.IterableDataset):
    """Yields what a loader worker started with: its frozen objects and what its collector tracks."""

    def __iter__(self):
        import gc
        yield {"frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())}


def test_a_loader_worker_freezes_what_it_starts_with(tiny_shards):
    """A loader worker's collector leaves the objects it forked with alone (a full collection would copy every
    page of them from the forkserver: slower epochs). What the forkserver has loaded is checked in a fresh
    process below (this one's server may have been started by another test)."""
    loader, _ = make_loader(LoaderConfig(data=str(tiny_shards), split="train", batch_size=1, num_workers=1))
    probe = torch.utils.data.DataLoader(_WorkerProbe(), batch_size=None, num_workers=1,
                                        multiprocessing_context=loader.multiprocessing_context,
                                        worker_init_fn=loader.worker_init_fn)
    (got,) = list(probe)
    assert got["frozen"] > 100_000 > got["tracked"], got   # torch & co. frozen; what the worker made, not


def test_a_split_read_once_serves_every_epoch_whatever_the_manifest_says_later(tiny_shards, tmp_path):
    """Training reads the split once and gives it to each epoch's loader: a manifest republished (here: gone)
    during the run changes nothing, and a split given for another split than the config's is refused."""
    data = tmp_path / "data"
    shutil.copytree(tiny_shards, data)
    cfg = LoaderConfig(data=str(data), split="train", batch_size=2, num_workers=0, seed=1, shuffle_buffer=4)
    info = load_split(str(data), "train")
    first = [b["keys"] for b in make_loader(cfg, epoch=1, info=info)[0]]
    (data / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError):
        make_loader(cfg, epoch=1)
    assert [b["keys"] for b in make_loader(cfg, epoch=1, info=info)[0]] == first
    with pytest.raises(ValueError, match="the split given is 'train', the config asks for 'val'"):
        make_loader(LoaderConfig(data=str(data), split="val"), info=info)


def _check_split_on_rank(rank: int, store: str, dirs: list[str], out: str) -> None:
    import torch.distributed as dist
    from avcap.distributed import DistEnv
    from avcap.train_data import check_same_split_on_every_rank
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=len(dirs))
    try:
        check_same_split_on_every_rank(load_split(dirs[rank], "train"), DistEnv(rank, len(dirs), rank,
                                                                                torch.device("cpu")), dirs[rank])
        said = "ok"
    except ValueError as e:
        said = str(e)
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}").write_text(said)


@pytest.mark.parametrize("republished", [False, True])
def test_ranks_that_read_different_shard_lists_all_refuse_to_train(tiny_shards, tmp_path, republished):
    """Two gloo ranks, each reading the split where it starts: the same dataset (copied: another place, the
    same shards) passes; a manifest republished between the ranks' reads stops every rank, naming them."""
    other = tmp_path / "other"
    if republished:
        build_dataset(other, {"train": [5, 2, 8], "val": [7]})
    else:
        shutil.copytree(tiny_shards, other)
    dirs = [str(tiny_shards), str(other)]
    torch.multiprocessing.start_processes(_check_split_on_rank, args=(str(tmp_path / "store"), dirs, str(tmp_path)),
                                          nprocs=2, start_method="forkserver")
    said = [(tmp_path / f"rank{r}").read_text() for r in range(2)]
    if not republished:
        assert said == ["ok", "ok"]
    else:
        for s in said:
            assert "the ranks read different shard lists for split 'train'" in s
            assert "ranks [0]:" in s and "ranks [1]:" in s and "start the run again" in s


_MAIN_SCRIPT = '''
import json, os, sys
first = "email.mime.text" not in sys.modules   # this process imports it here, or found it loaded
import email.mime.text  # noqa: E402,F401  (stands for what a training script imports)
with open(os.environ["PROBE_OUT"], "a") as f:
    f.write(json.dumps({"pid": os.getpid(), "name": __name__, "first": first}) + "\\n")

import torch  # noqa: E402
from shards.loader import LoaderConfig, make_loader, _main_module  # noqa: E402


class Probe(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield os.getpid(), sorted(m for m in ("pycurl", "fsspec.utils") if m in sys.modules)


if __name__ == "__main__":
    loader, _ = make_loader(LoaderConfig(data=sys.argv[1], split="train", batch_size=1, num_workers=1))
    probe = torch.utils.data.DataLoader(Probe(), batch_size=None, num_workers=1,
                                        multiprocessing_context=loader.multiprocessing_context,
                                        worker_init_fn=loader.worker_init_fn)
    print(json.dumps({"preload": _main_module(), "workers": [list(probe), list(probe)]}))
'''


def test_the_forkserver_loads_the_main_script_so_workers_do_not_import_its_modules_again(tiny_shards, tmp_path):
    """Each loader worker runs the main script as it starts; run from its directory (`python train.py` in the
    repository), the forkserver has loaded it with its imports, so a worker finds them loaded instead of importing
    them at every epoch's start. Run from elsewhere, nothing of that name is loaded in the server. Either way the
    server has loaded the remote client's modules (pycurl, fsspec.utils)."""
    script = tmp_path / "my_train.py"
    script.write_text(_MAIN_SCRIPT)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "my_train.py").write_text("raise SystemExit('another my_train.py: must not be imported')\n")
    for cwd, loaded in ((tmp_path, True), (elsewhere, False)):
        out = tmp_path / f"probe-{loaded}.jsonl"
        env = dict(os.environ, PROBE_OUT=str(out), PYTHONPATH=str(REPO))
        r = subprocess.run([sys.executable, str(script), str(tiny_shards)], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        said = json.loads(r.stdout.strip().splitlines()[-1])
        assert said["preload"] == (["my_train"] if loaded else [])
        runs = [json.loads(line) for line in out.read_text().splitlines()]
        by_pid = {x["pid"]: x for x in runs}
        main, workers = runs[0], [by_pid[p] for w in said["workers"] for p, _ in w]
        # the HTTP client a worker reads remote shards with is loaded before its first request
        assert all(preloaded == ["fsspec.utils", "pycurl"] for w in said["workers"] for _, preloaded in w)
        assert main["name"] == "__main__" and main["first"]
        assert [x["name"] for x in runs].count("my_train") == int(loaded), runs   # the forkserver, once
        assert len(workers) == 2 and all(w["name"] == "__mp_main__" and w["first"] != loaded for w in workers), runs


def test_the_main_module_to_load_is_named_only_when_the_server_finds_that_file(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    said_main = "from shards.loader import _main_module\nprint(_main_module())\n"
    (pkg / "__init__.py").write_text("")
    for name in ("run.py", "__main__.py"):
        (pkg / name).write_text(said_main)
    (tmp_path / "tool").write_text(said_main)   # a script without .py: no module to import
    env = dict(os.environ, PYTHONPATH=str(REPO))
    said = lambda *args, cwd=tmp_path: subprocess.run([sys.executable, *args], cwd=cwd, env=env,  # noqa: E731
                                                      capture_output=True, text=True, timeout=60).stdout.strip()
    assert said("-m", "pkg.run") == "['pkg.run']"
    assert said("-m", "pkg") == "[]"                    # X.__main__ mains are not run in workers
    assert said(str(pkg / "run.py"), cwd=pkg) == "['run']"
    assert said(str(pkg / "run.py")) == "[]"            # the server would look for run.py in tmp_path
    assert said("tool") == "[]"
    assert said("-c", said_main) == "[]"
