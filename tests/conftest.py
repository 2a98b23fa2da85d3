"""Session-wide test setup.

Prefect reads its settings at import time, so the isolated PREFECT_HOME must be set before any test module
imports prefect: that is why it happens here, at conftest import.
"""
import os
import tempfile
from pathlib import Path

_prefect_home = os.environ.get("AVCAP_TEST_PREFECT_HOME") or tempfile.mkdtemp(prefix="avcap-prefect-home-")
os.environ.setdefault("PREFECT_HOME", _prefect_home)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
# Everything the tests read lives in the repository: the AudioCaps CSVs under data/, the reference fixtures
# (the original implementation's outputs) under tests/data/reference/.
AUDIOCAPS_DIR = REPO_ROOT / "data" / "audiocaps"
REFERENCE_DIR = REPO_ROOT / "tests" / "data" / "reference"

# Fixture modules: each area of the project keeps its fixtures in its own file; skip_policy fails the run on any
# skip but those of an optional program (tests/skip_policy.py).
pytest_plugins = [
    "tests.skip_policy",
    "tests.fixtures_media",
    "tests.fixtures_model",
    "tests.fixtures_loader",
    "tests.fixtures_remote",
    "tests.fixtures_train",
    "tests.fixtures_ops",
    "tests.fixtures_dask",
]


import pytest  # noqa: E402  (after the environment is set: see the module docstring)


@pytest.fixture
def one_torch_thread():
    """Run a test's small torch ops on one thread: on a shared 2-core box a second thread only adds contention
    (measured ~5x slower for the model tests)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
