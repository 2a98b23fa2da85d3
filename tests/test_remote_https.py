"""Remote shards over https from a real nginx holding certificates of a test CA (tests.remote_store.make_tls).

The CA is trusted the way a user trusts theirs, through SSL_CERT_FILE, set after this process imported aiohttp and
after the workers' forkserver started: batches equal the local ones through both HTTP clients, in this process and
in DataLoader workers, each byte fetched once. A certificate that fails verification (another CA, another host
name) is refused at once, named with the URL, and never retried: one handshake per request at the server."""
from __future__ import annotations

import re
import time

import pytest

from shards.index import ShardError
from shards.loader import make_loader
from shards.manifest import ManifestError
from shards.remote import RemoteConfig, RemoteReadError, RemoteStore, storage_options
from tests.fixtures_loader import batches_as_data, check_batch_content, run_epoch, same_batches
from tests.test_remote import CLIENTS, _cfg, _client_of, _epoch_fetching_each_byte_once, unindexed_manifest

UNVERIFIED = r"the server's TLS certificate could not be verified \(.*{why}.*\); a private CA is trusted through " \
             r"SSL_CERT_FILE"


@pytest.mark.parametrize("client", CLIENTS)
def test_https_batches_equal_local_with_the_ca_trusted_later(https_shards, monkeypatch, client):
    """In this process (aiohttp imported before: its own default context lacks the CA) and in 2 workers x 2 ranks
    (their forkserver started by the local run, before the CA was trusted); the manifest is read here, through
    aiohttp, with either client."""
    s = https_shards
    runs = ((0, 1), (2, 2))   # (workers, ranks)
    local = [batches_as_data(run_epoch(_cfg(str(s.root), client, num_workers=w, batch_size=2), r)) for w, r in runs]
    storage_options("https", RemoteConfig())   # imports aiohttp, which makes its default SSL context now
    monkeypatch.setenv("SSL_CERT_FILE", str(s.tls.ca_cert))
    for (workers, ranks), want in zip(runs, local):
        before, closed = len(s.nginx.log()), s.nginx.closed_before_request()
        cfg = _cfg(f"{s.nginx.url}/manifest.json", client, num_workers=workers, batch_size=2)
        remote = _epoch_fetching_each_byte_once(cfg, s.root, s.nginx, ranks)
        assert _client_of(s.nginx.log()[before:]) == {client}
        for r in remote:
            for b in r:
                check_batch_content(b)
        same_batches(want, batches_as_data(remote))
        assert s.nginx.closed_before_request() == closed, "no handshake refused"


def _closed_settle(server, expected: int) -> int:
    """nginx notes a refused handshake as it sees the connection close, a moment after the client gave up."""
    deadline = time.monotonic() + 5
    while server.closed_before_request() < expected and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)   # and any further one (a retry) would be noted by now
    return server.closed_before_request()


@pytest.mark.parametrize("fault", ["untrusted-CA", "hostname-mismatch"])
@pytest.mark.parametrize("client", CLIENTS)
def test_unverified_certificate_fails_fast_naming_the_url_without_retry(https_shards, monkeypatch, client, fault):
    s = https_shards
    if fault == "untrusted-CA":   # the server's CA is not the one trusted, nor one of the system's
        server, trusted, why = s.nginx, [s.other_ca.ca_cert, None], "unable to get local issuer certificate"
    else:                         # the CA is trusted, the certificate names another host
        server, trusted, why = s.misnamed, [s.tls.ca_cert], r"(mismatch|name matches target).*'127\.0\.0\.1'"
    unverified = UNVERIFIED.format(why=why)
    shard = f"{server.url}/shards/train/train-00000.tar"
    for ca in trusted:
        if ca is None:
            monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        else:
            monkeypatch.setenv("SSL_CERT_FILE", str(ca))
        slept: list[float] = []
        store = RemoteStore(RemoteConfig(http_client=client), sleep=slept.append)
        refused = server.closed_before_request()
        with pytest.raises(RemoteReadError, match=re.escape(shard) + ": reading failed: " + unverified):
            store.cat(shard)
        with pytest.raises(RemoteReadError, match=re.escape(shard) + ": reading bytes 0-511 failed: " + unverified):
            store.cat_ranges(shard, [0], [512])
        assert slept == [], "a certificate that fails verification is not tried again"
        assert _closed_settle(server, refused + 2) == refused + 2, "one handshake per request"
    # the loader, its shards on that server (the manifest local, --shard-base): a ShardError naming the shard's URL,
    # at once (a retry would first wait backoff_s)
    cfg = _cfg(str(s.root), client, shard_base=server.url, remote=RemoteConfig(http_client=client, backoff_s=30))
    t = time.monotonic()
    with pytest.raises(ShardError, match=re.escape(f"{server.url}/shards/train/train-") + r"\d+\.\S+.*" + unverified):
        run_epoch(cfg, 1)
    assert time.monotonic() - t < cfg.remote.backoff_s
    # the manifest on that server
    with pytest.raises(ManifestError, match=re.escape(f"dataset manifest {server.url}/manifest.json cannot be read: ")
                       + unverified):
        make_loader(_cfg(f"{server.url}/manifest.json", client))


def test_unindexed_shards_stream_over_https_and_a_refused_certificate_is_named(https_shards, monkeypatch):
    """Shards without an index are streamed whole through fsspec's open, which answers any failure with
    FileNotFoundError(url): a refused certificate is named all the same."""
    s = https_shards
    name = unindexed_manifest(s.root)
    local = batches_as_data(run_epoch(_cfg(str(s.root)), 1))
    monkeypatch.setenv("SSL_CERT_FILE", str(s.tls.ca_cert))
    before = len(s.nginx.log())
    same_batches(local, batches_as_data(run_epoch(_cfg(f"{s.nginx.url}/{name}"), 1)))
    gets = [line for line in s.nginx.log()[before:] if line.method == "GET" and line.path.endswith(".tar")]
    assert gets and all(line.range == "-" for line in gets)   # whole-shard GETs, no index read
    monkeypatch.setenv("SSL_CERT_FILE", str(s.other_ca.ca_cert))
    with pytest.raises(ShardError, match=re.escape(f"shard {s.nginx.url}/shards/train/train-") + r"\d+\.tar: cannot be "
                       r"read \(" + UNVERIFIED.format(why="unable to get local issuer certificate") + r"\)"):
        run_epoch(_cfg(str(s.root / name), shard_base=s.nginx.url), 1)
