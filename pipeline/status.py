"""The status of a clip, defined once: what the ledger stores, the download and process stages return, and the
dataset manifest counts.

A `StrEnum`, so a member is its string (`ClipStatus.OK == "ok"`, `json.dumps` and sqlite write "ok"): the
ledger file and manifest.json hold the same values as before the enum, and files written earlier read back.

- `pending`: listed in the CSV, not processed yet (or to be processed again);
- `ok`: its sample is staged or in the shards;
- `failed-transient`: failed in a way a later run may not (network, rate limit, full disk): tried again;
- `failed-permanent`: failed for good (video gone, no audio stream): kept unless a retry is asked for;
- `removed`: its row left the CSV; history kept, never processed, in no count of the manifest.
"""
from __future__ import annotations

from enum import StrEnum


class ClipStatus(StrEnum):
    OK = "ok"
    FAILED_PERMANENT = "failed-permanent"
    FAILED_TRANSIENT = "failed-transient"
    PENDING = "pending"
    REMOVED = "removed"


# Short names of the members for code that compares statuses often (`o.status == OK`); the same objects.
OK = ClipStatus.OK
FAILED_PERMANENT = ClipStatus.FAILED_PERMANENT
FAILED_TRANSIENT = ClipStatus.FAILED_TRANSIENT
PENDING = ClipStatus.PENDING
REMOVED = ClipStatus.REMOVED

STATUSES = tuple(ClipStatus)                                       # every status, in the ledger's count order
FAILED = (FAILED_PERMANENT, FAILED_TRANSIENT)                      # what the manifest's `failures` list
COUNTED = (OK, FAILED_PERMANENT, FAILED_TRANSIENT, PENDING)        # always present in the manifest's `counts`
