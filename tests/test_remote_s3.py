"""s3:// shards from a real S3 API: moto's S3 server on loopback (tests.remote_store.MotoS3), reached through s3fs
with credentials and endpoint from the environment as a user's would be, behind the fault proxy, which counts the
requests and bytes (moto keeps no access log) and injects faults. Same checks as tests/test_remote.py over HTTP:
batches equal the local ones, each byte once per epoch and rank, faults recovered or named with the s3:// URL."""
from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shards.index import ShardError, ShardIndexError
from tests.fixtures_loader import (add_member_indexes, batches_as_data, build_dataset, check_batch_content,
                                   run_epoch, same_batches)
from tests.remote_store import FaultProxy, MotoS3, make_tls
from tests.test_remote import SMALL_WINDOWS, _cfg, _epoch_fetching_each_byte_once

BUCKET = "avcap"


@pytest.fixture(scope="module")
def s3_store(tmp_path_factory):
    """(s3fs filesystem on moto, fault proxy in front of moto): a bucket, nothing in it yet."""
    import s3fs
    with MotoS3() as moto, FaultProxy(moto.port) as proxy:
        env = moto.env()
        fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                               endpoint_url=moto.url, skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield fs, moto, proxy


@pytest.fixture
def s3_env(s3_store, monkeypatch):
    """The loader's environment: dummy credentials and the proxy as the S3 endpoint (AWS_ENDPOINT_URL_S3, which
    botocore reads when s3fs makes its client; every test uses the same one, as s3fs keeps its filesystems)."""
    fs, moto, proxy = s3_store
    for k, v in moto.env(endpoint=proxy.url).items():
        monkeypatch.setenv(k, v)
    return s3_store


def _upload(fs, root, prefix: str) -> str:
    fs.put(f"{root}/", f"{BUCKET}/{prefix}/", recursive=True)
    return f"s3://{BUCKET}/{prefix}/manifest.json"


def test_s3_batches_equal_local_2_ranks_2_workers_resume_and_each_byte_once(s3_env, tmp_path):
    fs, _, proxy = s3_env
    root = add_member_indexes(build_dataset(tmp_path / "data", {"train": [5, 2, 9]}, size=64))
    url = _upload(fs, root, "equal")
    # 16 clips, 2 ranks x 2 workers, 1-sample windows (the next shard starts ahead mid-shard), wrap-around
    cfg = _cfg(url, num_workers=2, batch_size=2, remote=SMALL_WINDOWS)
    local = batches_as_data(run_epoch(_cfg(str(root), num_workers=2, batch_size=2), 2))
    before = len(proxy.log())
    remote = _epoch_fetching_each_byte_once(cfg, root, proxy, 2, prefix=f"/{BUCKET}/equal")
    # an index is read whole without s3fs's HEAD in front (storage_options: max_concurrency 1)
    assert not [line for line in proxy.log()[before:] if line.method == "HEAD" and line.path.endswith(".idx.json")]
    for r in remote:
        for b in r:
            check_batch_content(b)
    same_batches(local, batches_as_data(remote))
    # resume at a mid-epoch batch: the rest of the same epoch, tensor for tensor
    same_batches([r[1:] for r in local], batches_as_data(run_epoch(cfg, 2, start_batch=1)))


def test_s3_transient_faults_recover_missing_and_replaced_shards_are_named(s3_env, tmp_path):
    fs, _, proxy = s3_env
    root = add_member_indexes(build_dataset(tmp_path / "data", {"train": [3, 3, 4]}, size=32))
    shards = root / "shards" / "train"
    original = (shards / "train-00000.tar").read_bytes()
    assert len(original) == (shards / "train-00001.tar").stat().st_size, "equal sizes: only the headers tell"
    url = _upload(fs, root, "faults")
    key = f"{BUCKET}/faults/shards/train/train-00000.tar"
    shard = f"s3://{key}"
    cfg = _cfg(url, num_frames=1, batch_size=2)
    local = batches_as_data(run_epoch(_cfg(str(root), num_frames=1, batch_size=2), 1))
    # 503 (S3's SlowDown) twice then 200: retried by RemoteStore, same batches. botocore's own retries are off:
    # 503 on every one of the 5 attempts fails after exactly 5 requests, named
    proxy.requests.clear()
    proxy.fail(f"/{key}", "503", "503")
    same_batches(local, batches_as_data(run_epoch(cfg, 1)))
    assert [f for _, p, f in proxy.requests if p == f"/{key}" and f] == ["503", "503"]
    proxy.requests.clear()
    proxy.fail(f"/{key}", *["503"] * 5)
    with pytest.raises(ShardError, match=re.escape(shard) + r".*still failing after 5 attempts: S3 503 \(HTTP 503\)"):
        run_epoch(cfg, 1)
    assert [f for _, p, f in proxy.requests if p == f"/{key}"] == ["503"] * 5
    # same size, other samples: the header in front of the first member read names another clip
    fs.pipe(key, (shards / "train-00001.tar").read_bytes())
    with pytest.raises(ShardIndexError, match=re.escape(shard) + r": its index places clip0000xxx_0_10000\.\S+ "
                       r"\(\d+ bytes\) at offset \d+, but the tar header there disagrees: it names "
                       r"'clip0003xxx_3000_13000\.\S+'"):
        run_epoch(cfg, 1)
    # another size: caught by the manifest's size before any member is read; truncated: S3's 416 (InvalidRange)
    fs.pipe(key, (shards / "train-00002.tar").read_bytes())
    with pytest.raises(ShardError, match=re.escape(shard) + rf": the manifest says {len(original)} bytes, but its "
                                         r"last 1024 bytes are not the end"):
        run_epoch(cfg, 1)
    fs.pipe(key, original[:-4096])
    with pytest.raises(ShardError, match=re.escape(shard) + rf": the manifest says {len(original)} bytes, but it "
                                         r"is shorter .*InvalidRange \(HTTP 416\)"):
        run_epoch(cfg, 1)
    # a missing object (moto's own NoSuchKey): named, not retried
    fs.rm(key)
    proxy.requests.clear()
    with pytest.raises(ShardError, match=re.escape(shard) + r": reading bytes \d+-\d+ failed: S3 NoSuchKey "
                                         r"\(HTTP 404\)"):
        run_epoch(cfg, 1)
    assert [m for m, p, _ in proxy.requests if p == f"/{key}"] == ["GET"]
    fs.pipe(key, original)
    fs.rm(f"{BUCKET}/faults/shards/train/train-00001.idx.json")
    with pytest.raises(ShardIndexError, match=re.escape(f"s3://{BUCKET}/faults/shards/train/train-00001.idx.json")
                       + r" of shard .*train-00001.tar: listed in the manifest but cannot be read .*S3 NoSuchKey"):
        run_epoch(cfg, 1)


def test_s3_endpoint_from_fsspec_environment_in_a_new_process(s3_store, tmp_path):
    """FSSPEC_S3_ENDPOINT_URL instead of AWS_ENDPOINT_URL_S3: fsspec reads it when imported, so it is set before
    the process starts, as a user's shell would; the manifest (main process) and the shards (a worker) follow it."""
    fs, moto, _ = s3_store
    root = add_member_indexes(build_dataset(tmp_path / "data", {"train": [3, 4]}, size=32))
    url = _upload(fs, root, "fsspec-env")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    env.update({k: v for k, v in moto.env().items() if k != "AWS_ENDPOINT_URL_S3"}, FSSPEC_S3_ENDPOINT_URL=moto.url,
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    code = ("import pickle, sys; from tests.test_remote import _cfg; "
            "from tests.fixtures_loader import batches_as_data, run_epoch; "
            "sys.stdout.buffer.write(pickle.dumps(batches_as_data(run_epoch(_cfg(sys.argv[1], num_workers=1), 1))))")
    out = subprocess.run([sys.executable, "-c", code, url], env=env, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-3000:]
    same_batches(batches_as_data(run_epoch(_cfg(str(root)), 1)), pickle.loads(out.stdout))


def test_s3_over_https_trusts_aws_ca_bundle_and_refuses_an_unverified_certificate_at_once(tmp_path):
    """S3 itself is https. botocore verifies the endpoint's certificate with its own bundle (certifi's) unless
    AWS_CA_BUNDLE names one, SSL_CERT_FILE does not count: with AWS_CA_BUNDLE naming the CA, batches (manifest in
    the main process, shards in a worker) equal the local ones; without it, or with only SSL_CERT_FILE, the run
    stops naming the s3:// URL, the certificate and AWS_CA_BUNDLE, and the read is not retried. New processes: s3fs
    keeps its filesystems per process whatever the endpoint in the environment."""
    import s3fs
    tls = make_tls(tmp_path / "tls")
    root = add_member_indexes(build_dataset(tmp_path / "data", {"train": [3, 4]}, size=32))
    with MotoS3(tls=tls) as moto:
        env = moto.env()
        fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                               endpoint_url=moto.url, client_kwargs={"verify": str(tls.ca_cert)},
                               skip_instance_cache=True)
        fs.mkdir(BUCKET)
        url = _upload(fs, root, "tls")
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_", "SSL_CERT"))}
        base.update(env, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        code = ("import pickle, sys; from tests.test_remote import _cfg; "
                "from tests.fixtures_loader import batches_as_data, run_epoch; "
                "sys.stdout.buffer.write(pickle.dumps(batches_as_data(run_epoch(_cfg(sys.argv[1], num_workers=1), "
                "1))))")
        out = subprocess.run([sys.executable, "-c", code, url], env={**base, "AWS_CA_BUNDLE": str(tls.ca_cert)},
                             capture_output=True, timeout=120)
        assert out.returncode == 0, out.stderr.decode(errors="replace")[-3000:]
        same_batches(batches_as_data(run_epoch(_cfg(str(root)), 1)), pickle.loads(out.stdout))

        refused = ("import sys; from shards.remote import RemoteConfig, RemoteReadError, RemoteStore\n"
                   "slept = []\n"
                   "store = RemoteStore(RemoteConfig(backoff_s=0.01), sleep=slept.append)\n"
                   "try:\n    store.cat(sys.argv[1])\n"
                   "except RemoteReadError as e:\n    print(e); print('slept', len(slept))\n")
        for extra in ({}, {"SSL_CERT_FILE": str(tls.ca_cert)}):
            out = subprocess.run([sys.executable, "-c", refused, url], env={**base, **extra}, capture_output=True,
                                 text=True, timeout=120)
            assert out.returncode == 0, out.stderr[-3000:]
            said = out.stdout
            assert url in said and "TLS certificate could not be verified" in said and "AWS_CA_BUNDLE" in said, said
            assert said.strip().endswith("slept 0"), f"a certificate failure was retried: {said}"
