"""Remote shards over HTTP from a real nginx (tests.remote_store): same batches as local, each byte fetched at most
once per epoch and rank, transient faults recovered, permanent ones and replaced shards named; through both HTTP
clients (libcurl, the default, and fsspec's aiohttp), told apart by their User-Agent in nginx's log."""
from __future__ import annotations

import http.client
import json
import multiprocessing
import re
import shutil
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import shards.remote as remote
from avcap.distributed import DistEnv
from avcap.evaluate import EvalConfig
from avcap.train_config import TrainConfig, config_from_args
from avcap.train_data import EvalData, eval_data_of
from shards.epoch_plan import plan_epoch
from shards.index import ShardError, ShardIndexError
from shards.loader import LoaderConfig, make_loader
from shards.remote import RemoteConfig, RemoteStore, remote_config_from_json
from shards.split_info import load_split
from tests.fixtures_loader import (add_member_indexes, batches_as_data, build_dataset, check_batch_content,
                                   run_epoch, same_batches)
from tests.remote_store import FaultProxy, Nginx

FAST_RETRY = RemoteConfig(backoff_s=0.01)
SMALL_WINDOWS = RemoteConfig(backoff_s=0.01, window_samples=1, windows_ahead=1)
CLIENTS = ("curl", "fsspec")


def _cfg(data: str, client: str = "curl", **kw) -> LoaderConfig:
    base = dict(split="train", batch_size=3, num_workers=0, seed=3, shuffle_buffer=4, num_frames=2,
                remote=RemoteConfig(backoff_s=FAST_RETRY.backoff_s, http_client=client))
    return LoaderConfig(data=data, **{**base, **kw})


def _client_of(lines) -> set[str]:
    """Which HTTP client made the shard requests of an nginx log excerpt, by User-Agent."""
    agents = {line.agent for line in lines if line.path.endswith((".tar", ".idx.json"))}
    assert agents, "no shard request in the log"
    return {"curl" if a.startswith("libcurl/") else "fsspec" if "aiohttp" in a else a for a in agents}


def _ranges(lines, suffix=".tar"):
    """{path: [(start, end_exclusive)]} of the ranged GETs of shards in an nginx log excerpt."""
    out = defaultdict(list)
    for line in lines:
        if line.method == "GET" and line.path.endswith(suffix):
            m = re.fullmatch(r"bytes=(\d+)-(\d+)", line.range)
            assert m and line.status == 206, f"not a ranged read of a single range: {line}"
            out[line.path].append((int(m[1]), int(m[2]) + 1))
    return out


def _epoch_fetching_each_byte_once(cfg: LoaderConfig, root, nginx: Nginx | FaultProxy, world_size: int,
                                   prefix: str = "") -> list[list[dict]]:
    """run_epoch over HTTP, checking the server's log per rank (nginx's, or the fault proxy's in front of a store
    without one; `prefix`: the dataset's path there): no sample byte asked for twice, the manifest once, each
    index and end probe at most once per worker."""
    sizes = {f"{prefix}/{s['path']}": s["bytes"]
             for s in json.loads((root / "manifest.json").read_text())["splits"][cfg.split]["shards"]}
    out = []
    for rank in range(world_size):
        before = len(nginx.log())
        it, n = make_loader(cfg, rank, world_size, 0)
        out.append(list(it))
        assert len(out[-1]) == n
        lines = nginx.log()[before:]
        ranges = _ranges(lines)
        assert ranges and set(ranges) <= set(sizes)
        for path, rs in ranges.items():
            # the 1 KiB end-of-tar probe (the shard's size check) and the index are per worker reading the shard
            probes = [r for r in rs if r == (sizes[path] - 1024, sizes[path])]
            assert 1 <= len(probes) <= max(1, cfg.num_workers)
            rs = sorted(r for r in rs if r not in probes)
            for (s0, e0), (s1, _) in zip(rs, rs[1:]):
                assert e0 <= s1, f"rank {rank}: {path} bytes {s1}-{e0 - 1} fetched twice in one epoch"
            assert sum(e - s for s, e in rs) <= sizes[path]
        index_gets = [line for line in lines if line.path.endswith(".idx.json")]
        assert len(index_gets) <= max(1, cfg.num_workers) * len(sizes)
        assert [line.path for line in lines if line.method == "GET" and line.path.endswith("manifest.json")
                ] == [f"{prefix}/manifest.json"]
    return out


def test_http_batches_equal_local_2_ranks_2_workers_resume_and_each_byte_once(served_shards):
    """Also the regression test of the refetching: on main a slot's shuffle buffer (200 samples) was filled by
    wrapping around its few samples, so one epoch of 11 samples read each shard ~92 times over HTTP. Now a slot
    reads what its batches use, and a wrap-around pass reuses the bytes it already has."""
    root, nginx = served_shards
    url = f"{nginx.url}/manifest.json"
    # 16 clips: 4 batches a rank, 2 per worker (4 rows a slot); windows of 1 sample, 1 in flight, so that the next
    # shard is started ahead in the middle of the current one (as with real shard and window sizes)
    cfg = _cfg(url, num_workers=2, batch_size=2, remote=SMALL_WINDOWS)
    info = load_split(str(root), "train")
    slots = plan_epoch(info, 4, cfg.seed, 0, True)
    have = [sum(p.count(info.shards[p.shard].num_samples) for p in parts) for parts in slots]
    assert min(have) < 4, "the setup should make a slot wrap around (read part of its shards twice)"
    local = batches_as_data(run_epoch(_cfg(str(root), num_workers=2, batch_size=2), 2))
    before = len(nginx.log())
    remote = _epoch_fetching_each_byte_once(cfg, root, nginx, 2)
    assert _client_of(nginx.log()[before:]) == {"curl"}
    for r in remote:
        for b in r:
            check_batch_content(b)
    same_batches(local, batches_as_data(remote))
    # resume at a mid-epoch batch: the rest of the same epoch, tensor for tensor
    same_batches([r[1:] for r in local], batches_as_data(run_epoch(cfg, 2, start_batch=1)))
    # eval: every clip once, same batches
    kw = dict(split="val", batch_size=2, num_workers=2, train=False)
    same_batches(batches_as_data(run_epoch(_cfg(str(root), **kw), 2)),
                 batches_as_data(_epoch_fetching_each_byte_once(_cfg(url, **kw), root, nginx, 2)))


@pytest.mark.parametrize("client", CLIENTS)
def test_default_shuffle_buffer_no_longer_rereads_shards(served_shards, client):
    root, nginx = served_shards
    before = len(nginx.log())
    cfg = _cfg(f"{nginx.url}/manifest.json", client, shuffle_buffer=200)
    _epoch_fetching_each_byte_once(cfg, root, nginx, 1)
    # one slot reads whole shards (5, 2, 9 samples): with 1-sample windows the next one starts mid-shard
    small = RemoteConfig(**{**SMALL_WINDOWS.__dict__, "http_client": client})
    same_batches(batches_as_data(run_epoch(LoaderConfig(**{**cfg.__dict__, "data": str(root)}), 1)),
                 batches_as_data(_epoch_fetching_each_byte_once(LoaderConfig(**{**cfg.__dict__, "remote": small}),
                                                                root, nginx, 1)))
    assert _client_of(nginx.log()[before:]) == {client}


@pytest.mark.parametrize("client", CLIENTS)
def test_transient_faults_recover_permanent_ones_name_the_url(served_shards, client):
    root, nginx = served_shards
    local = batches_as_data(run_epoch(_cfg(str(root)), 1))
    shard = "/shards/train/train-00000.tar"
    with FaultProxy(nginx.port) as proxy:
        url = f"{proxy.url}/manifest.json"
        # 503 twice then 200; a connection reset half way through a range (the first GET is the 1 KiB end
        # probe, the second a sample's members): both recovered, same batches
        for faults in (("503", "503"), ("pass", "reset")):
            proxy.requests.clear()
            proxy.fail(shard, *faults)
            before = len(nginx.log())
            same_batches(local, batches_as_data(run_epoch(_cfg(url, client), 1)))
            injected = [f for _, p, f in proxy.requests if p == shard and f not in (None, "pass")]
            assert injected == [f for f in faults if f != "pass"]
            assert _client_of(nginx.log()[before:]) == {client}
        # permanent: named with the URL and the status, no retry
        proxy.fail(shard, "404")
        with pytest.raises(ShardError, match=re.escape(f"{proxy.url}{shard}") + r".*HTTP 404"):
            run_epoch(_cfg(url, client), 1)
        proxy.fail("/shards/train/train-00001.idx.json", "403")
        with pytest.raises(ShardIndexError, match=re.escape(f"{proxy.url}/shards/train/train-00001.idx.json")
                           + r" of shard .*train-00001.tar: listed in the manifest but cannot be read .*HTTP 403"):
            run_epoch(_cfg(url, client), 1)
        # a server (or a proxy) that ignores Range: named, not retried, the whole file not read into memory
        proxy.fail(shard, "pass", "ignore-range")
        with pytest.raises(ShardError, match=re.escape(f"{proxy.url}{shard}") + r": asked for bytes \d+-\d+ .*the "
                                             r"server ignores Range requests"):
            run_epoch(_cfg(url, client), 1)
        # transient past the retries: named too
        proxy.fail(shard, *["503"] * FAST_RETRY.attempts)
        with pytest.raises(ShardError, match=re.escape(f"{proxy.url}{shard}") + r".*still failing after 5 attempts"
                                             r": HTTP 503"):
            run_epoch(_cfg(url, client), 1)


@pytest.mark.parametrize("client", CLIENTS)
def test_shard_replaced_by_another_of_the_same_name_is_caught(tmp_path, client):
    root = add_member_indexes(build_dataset(tmp_path / "data", {"train": [3, 3, 4]}, size=32))
    shards = root / "shards" / "train"
    original = (shards / "train-00000.tar").read_bytes()
    assert len(original) == (shards / "train-00001.tar").stat().st_size, "equal sizes: only the headers tell"
    cfg = _cfg("", client, num_frames=1, batch_size=2)
    with Nginx(root, tmp_path / "nginx") as nginx:
        url = f"{nginx.url}/manifest.json"
        # same size, other samples: the header in front of the first member read names another clip
        shutil.copy(shards / "train-00001.tar", shards / "train-00000.tar")
        with pytest.raises(ShardIndexError, match=re.escape(f"{nginx.url}/shards/train/train-00000.tar")
                           + r": its index places clip0000xxx_0_10000\.\S+ \(\d+ bytes\) at offset \d+, but the "
                             r"tar header there disagrees: it names 'clip0003xxx_3000_13000\.\S+' \(\d+ bytes\)"):
            run_epoch(LoaderConfig(**{**cfg.__dict__, "data": url}), 1)
        # another size: caught before any member is read, by the manifest's size
        shutil.copy(shards / "train-00002.tar", shards / "train-00000.tar")
        with pytest.raises(ShardError, match=re.escape(f"{nginx.url}/shards/train/train-00000.tar")
                           + rf": the manifest says {len(original)} bytes, but its last 1024 bytes are not the end"):
            run_epoch(LoaderConfig(**{**cfg.__dict__, "data": url}), 1)
        (shards / "train-00000.tar").write_bytes(original[:-4096])
        with pytest.raises(ShardError, match=rf"train-00000.tar: the manifest says {len(original)} bytes, but it "
                                             r"is shorter"):
            run_epoch(LoaderConfig(**{**cfg.__dict__, "data": url}), 1)


def unindexed_manifest(root) -> str:
    """The name of a copy of `root`'s manifest that lists no member index (its shards are streamed whole)."""
    m = json.loads((root / "manifest.json").read_text())
    m["format_version"] = 1
    for s in m["splits"]["train"]["shards"]:
        s["index"] = None
    (root / "manifest-noindex.json").write_text(json.dumps(m))
    return "manifest-noindex.json"


def test_unindexed_shards_stream_over_http_without_curl(served_shards, monkeypatch):
    """Shards without an index are streamed whole, through fsspec: nothing runs a `curl` binary (the Docker image
    has none), so the run works with an empty PATH."""
    root, nginx = served_shards
    name = unindexed_manifest(root)
    local = batches_as_data(run_epoch(_cfg(str(root)), 1))
    before = len(nginx.log())
    monkeypatch.setenv("PATH", "")
    same_batches(local, batches_as_data(run_epoch(_cfg(f"{nginx.url}/{name}"), 1)))
    gets = [line for line in nginx.log()[before:] if line.method == "GET" and line.path.endswith(".tar")]
    assert gets and all(line.range == "-" for line in gets)   # whole-shard GETs, no index read


def test_nginx_delay_is_per_request_and_keeps_ranges_and_statuses(served_shards, tmp_path):
    """The benchmark's latency (tests.remote_store: nginx's own timer, no proxy copying bytes): every request on a
    keep-alive connection waits for it, ranges and error statuses are answered as without it, and it is a timer,
    not a queue (concurrent requests wait together)."""
    root, _ = served_shards
    tar = root / "shards" / "train" / "train-00000.tar"
    data, delay = tar.read_bytes(), 0.1
    with Nginx(root, tmp_path / "nginx", delay_s=delay) as slow:
        conn = http.client.HTTPConnection("127.0.0.1", slow.port, timeout=10)
        for rng, status, body in ((f"bytes=512-1535", 206, data[512:1536]), (None, 200, data),
                                  (f"bytes={len(data)}-", 416, None)):
            t = time.perf_counter()
            conn.request("GET", "/shards/train/train-00000.tar", headers={"Range": rng} if rng else {})
            resp = conn.getresponse()
            got = resp.read()
            assert time.perf_counter() - t >= delay and resp.status == status
            assert body is None or got == body
        t = time.perf_counter()
        conn.request("GET", "/shards/train/nothere.tar")
        assert conn.getresponse().status == 404 and time.perf_counter() - t >= delay

        def one(_):
            c = http.client.HTTPConnection("127.0.0.1", slow.port, timeout=10)
            c.request("GET", "/shards/train/train-00000.tar", headers={"Range": "bytes=0-511"})
            return c.getresponse().read()
        t = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(one, range(8))) == [data[:512]] * 8
        assert delay <= time.perf_counter() - t < 6 * delay, "8 concurrent requests should wait together"
        assert [line.status for line in slow.log()] == [206, 200, 416, 404] + [206] * 8


def test_one_curl_loop_serves_concurrent_callers_within_max_connections(served_shards, tmp_path, monkeypatch):
    """Every libcurl request of a store goes through one loop thread, whatever thread asks (the reader's windows
    run in a thread pool): concurrent callers each get their own bytes back; the loop holds at most
    `max_connections` connections (one connection serializes requests the server delays); it ends when idle and
    starts again with the next request."""
    root, _ = served_shards
    tar = root / "shards" / "train" / "train-00002.tar"
    data, delay = tar.read_bytes(), 0.05
    spans = [[(i * 1000 + k * 300, i * 1000 + k * 300 + 100) for k in range(3)] for i in range(8)]
    with Nginx(root, tmp_path / "nginx", delay_s=delay) as slow:
        url = f"{slow.url}/shards/train/train-00002.tar"

        answered_by = set()
        done = remote._CurlLoop._done
        monkeypatch.setattr(remote._CurlLoop, "_done",
                            lambda self, *a: (answered_by.add(threading.current_thread()), done(self, *a))[1])

        def run(cfg: RemoteConfig) -> float:
            store = RemoteStore(cfg)
            answered_by.clear()
            t = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                got = list(pool.map(lambda s: store.cat_ranges(url, [a for a, _ in s], [b for _, b in s]), spans))
            took = time.perf_counter() - t
            assert got == [[data[a:b] for a, b in s] for s in spans]
            assert answered_by == {store._curl.thread}, "not one loop thread for the store's requests"
            return took

        wide = run(RemoteConfig())
        narrow = run(RemoteConfig(max_connections=1))
        assert narrow >= 24 * delay, f"24 requests on one connection took {narrow:.3f} s: not serialized"
        assert wide < 12 * delay, f"24 concurrent requests took {wide:.3f} s: not in flight together"

        monkeypatch.setattr(remote._CurlLoop, "IDLE_S", 0.05)
        store = RemoteStore(RemoteConfig())
        assert store.cat_ranges(url, [0], [512]) == [data[:512]]
        first = store._curl.thread
        first.join(timeout=10)
        assert not first.is_alive() and store._curl.thread is None   # ended once idle
        assert store.cat_ranges(url, [512], [1024]) == [data[512:1024]]   # and starts again
        assert store._curl.thread is not None and store._curl.thread is not first
    with pytest.raises(ValueError, match="max_connections"):
        RemoteConfig(max_connections=0)
    with pytest.raises(ValueError, match="windows_ahead and window_samples"):
        RemoteConfig(windows_ahead=0)


def test_indexes_of_the_next_two_shards_are_asked_for_as_a_shard_starts(served_shards):
    """A shard is started ahead (its first windows requested) while the current one's last `windows_ahead x
    window_samples` samples are decoded; for that start not to wait on the index, the index is requested when the
    shard before the current one starts: one slot reading the 3 train shards asks for the third shard's index
    before any member of the second."""
    root, nginx = served_shards
    cfg = _cfg(f"{nginx.url}/manifest.json", batch_size=2, remote=SMALL_WINDOWS)
    info = load_split(str(root), "train")
    (parts,) = plan_epoch(info, 1, cfg.seed, 0, True)
    paths = ["/" + info.shards[p.shard].entry.path for p in parts]
    # the first shard (9 samples) is long enough for the third index to arrive well before the second is started
    assert len(paths) == 3 and info.shards[parts[0].shard].num_samples == 9
    before = len(nginx.log())
    run_epoch(cfg, 1)
    order = [(line.path, line.range) for line in nginx.log()[before:] if line.method == "GET"]
    third_index = order.index((paths[2].removesuffix(".tar") + ".idx.json", "-"))
    probe = f"-{info.shards[parts[1].shard].bytes - 1}"   # the end probe comes with the index: not a member
    second_members = [i for i, (p, r) in enumerate(order) if p == paths[1] and r != "-" and not r.endswith(probe)]
    assert second_members and third_index < min(second_members), order


def test_a_forked_child_makes_its_own_curl_loop(served_shards):
    """A process forked from one whose store already runs its libcurl loop (the thread is not copied, the
    connections would be shared) reads through a loop and connections of its own; the parent's still work."""
    root, nginx = served_shards
    url = f"{nginx.url}/shards/train/train-00002.tar"
    data = (root / "shards" / "train" / "train-00002.tar").read_bytes()
    store = RemoteStore(FAST_RETRY)
    assert store.cat_ranges(url, [0], [512]) == [data[:512]]
    parent_loop = store._curl
    ctx = multiprocessing.get_context("fork")   # the child inherits `store` itself, not a pickled copy
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_read_in_child, args=(store, url, theirs))
    child.start()
    assert ours.poll(30), "the forked child did not answer"
    got, same_loop = ours.recv()
    child.join(10)
    assert got == data[512:2048] and not same_loop and child.exitcode == 0
    assert store.cat_ranges(url, [2048], [4096]) == [data[2048:4096]] and store._curl is parent_loop


def _read_in_child(store, url, conn):
    parent = store._curl
    (got,) = store.cat_ranges(url, [512], [2048])
    conn.send((got, store._curl is parent))


def test_the_remote_flag_sets_the_loaders_remote_config_and_names_what_is_wrong(served_shards):
    """`--remote` (train.py and avcap.evaluate): a JSON object of RemoteConfig fields reaches the loader of the
    train and the eval split (here the HTTP client, told apart in nginx's log); a bad one stops the run before it
    starts, naming the flag and the field."""
    root, nginx = served_shards
    assert remote_config_from_json("") == RemoteConfig()
    got = remote_config_from_json('{"windows_ahead": 12, "timeout_s": 5, "http_client": "fsspec"}')
    assert got == RemoteConfig(windows_ahead=12, timeout_s=5.0, http_client="fsspec")
    for bad, said in (('{"windows": 3}', r"unknown RemoteConfig field\(s\) \['windows'\]"),
                      ('{"windows_ahead": "3"}', "windows_ahead must be a JSON int"),
                      ('{"timeout_s": true}', "timeout_s must be a JSON number"),
                      ('{"windows_ahead": 0}', "windows_ahead and window_samples must be >= 1"),
                      ('{"attempts": 0}', "attempts >= 1"),
                      ('[3]', "must be a JSON object"), ("{windows", "not JSON")):
        with pytest.raises(ValueError, match="--remote: .*" + said):
            remote_config_from_json(bad)
        with pytest.raises(ValueError, match="invalid TrainConfig: --remote: .*" + said):
            config_from_args(["--data", "d", "--remote", bad])
    cfg = config_from_args(["--data", f"{nginx.url}/manifest.json", "--remote", '{"http_client": "fsspec"}',
                            "--eval-split", "val", "--num-workers", "0", "--eval-batch-size", "3"])
    assert cfg.remote == '{"http_client": "fsspec"}' and EvalConfig(remote=cfg.remote).remote == cfg.remote
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    for data in (eval_data_of(cfg), EvalData(data=cfg.data, split="val", num_frames=2, batch_size=3,
                                             norm_mean=TrainConfig.norm_mean, norm_std=TrainConfig.norm_std,
                                             num_workers=0, remote='{"http_client": "fsspec"}')):
        before = len(nginx.log())
        assert sum(len(b.keys) for b in data.open(env)) == 7
        assert _client_of(nginx.log()[before:]) == {"fsspec"}
