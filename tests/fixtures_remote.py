"""A built dataset served by a real nginx on loopback (tests.remote_store), for the remote-shard tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures_loader import add_member_indexes, build_dataset
from tests.remote_store import Nginx


@pytest.fixture(scope="module")
def served_shards(tmp_path_factory) -> tuple[Path, Nginx]:
    """(dataset dir, running nginx serving it): train 3 uneven shards (5, 2, 9 clips), val 1 shard of 7, indexed."""
    base = tmp_path_factory.mktemp("served")
    root = add_member_indexes(build_dataset(base / "data", {"train": [5, 2, 9], "val": [7]}, size=64))
    with Nginx(root, base / "nginx") as server:
        yield root, server
