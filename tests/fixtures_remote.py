"""A built dataset served by a real nginx on loopback (tests.remote_store), for the remote-shard tests."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures_loader import add_member_indexes, build_dataset
from tests.remote_store import TLS, Nginx, make_tls


@pytest.fixture(scope="module")
def served_shards(tmp_path_factory) -> tuple[Path, Nginx]:
    """(dataset dir, running nginx serving it): train 3 uneven shards (5, 2, 9 clips), val 1 shard of 7, indexed."""
    base = tmp_path_factory.mktemp("served")
    root = add_member_indexes(build_dataset(base / "data", {"train": [5, 2, 9], "val": [7]}, size=64))
    with Nginx(root, base / "nginx") as server:
        yield root, server


@dataclass
class HTTPSStore:
    root: Path        # the dataset of `served_shards`
    nginx: Nginx      # serving it over https with `tls`'s certificate for 127.0.0.1
    tls: TLS          # the test CA (trusted through SSL_CERT_FILE) and that certificate
    misnamed: Nginx   # the same files, with a certificate of the same CA for another host name
    other_ca: TLS     # a CA that signed neither


@pytest.fixture(scope="module")
def https_shards(served_shards, tmp_path_factory) -> HTTPSStore:
    root, _ = served_shards
    base = tmp_path_factory.mktemp("https")
    tls = make_tls(base / "tls")
    with Nginx(root, base / "nginx", tls=tls) as nginx, \
            Nginx(root, base / "misnamed", tls=make_tls(base / "tls-misnamed", ("other.example",), ca=tls)) as misnamed:
        yield HTTPSStore(root, nginx, tls, misnamed, make_tls(base / "other-ca"))
