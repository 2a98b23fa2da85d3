"""A real tmpfs mounted for one test: a tiny disk (full-disk faults) or a read-only one. Needs root or
CAP_SYS_ADMIN; without it the test is skipped through the allowlisted optional program `mount-tmpfs`."""
from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path

from tests.skip_policy import skip_without


@contextmanager
def mounted_tmpfs(mnt: Path, options: str):
    """tmpfs with mount `options` (e.g. "size=2m", "ro,size=1m") at the new directory `mnt`, unmounted after."""
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True, text=True,
                       timeout=30)
    if r.returncode != 0:
        skip_without("mount-tmpfs", f"mount -t tmpfs -o {options} failed: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)
