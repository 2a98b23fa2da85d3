"""Per-clip status in one SQLite file (`DIR/ledger.sqlite`), one row per (split, key).

The ledger is what makes a rerun cheap and honest: finished clips are skipped, transient failures are tried
again, permanent ones are kept (unless asked to retry them), and new rows of the clip list (pipeline.clip_list)
show up as `pending`.
A `Ledger` is bound to one split; several splits share the file.

Statuses (pipeline.status.ClipStatus): `pending`, `ok`, `failed-transient`, `failed-permanent`, and `removed`:
the clip's row is gone from the CSV. A removed clip keeps its history (reason, message, attempts, media hash) but
is never processed and counts in no failure rate; if its row comes back it is `pending` again. `attempts` counts real download
attempts (yt-dlp runs, retries included, whether they ended in a failure or a success); a clip whose media
was already on disk or came from --media-dir has none for that run.

Only the orchestrating process writes to it (worker processes return results instead), and a lock serialises
the download threads, so one connection suffices. WAL keeps readers (audits, a second terminal) from blocking
the build.
"""
from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pipeline.clip_list import Clip
from pipeline.status import FAILED, FAILED_PERMANENT, FAILED_TRANSIENT, OK, PENDING, REMOVED, STATUSES, ClipStatus

# The CHECK list is the values of ClipStatus (tests/test_ledger.py holds them equal), written out because this
# text is what SQLite stores: a file created today has the same schema as one created before the enum.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS clips (
    split        TEXT NOT NULL,
    key          TEXT NOT NULL,
    youtube_id   TEXT NOT NULL,
    start_time   INTEGER NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('ok', 'failed-permanent', 'failed-transient', 'pending',
                                                 'removed')),
    stage        TEXT,              -- the stage of the last outcome: download / extract / features / stage
    attempts     INTEGER NOT NULL DEFAULT 0,   -- download attempts (yt-dlp runs), over all builds
    reason       TEXT,              -- short machine-readable reason, e.g. http-404, no-audio-stream
    message      TEXT,              -- tail of the tool's own output
    media_sha256 TEXT,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL,
    finished_at  REAL,
    PRIMARY KEY (split, key)
);
"""
_COLUMNS = ("split, key, youtube_id, start_time, status, stage, attempts, reason, message, media_sha256, "
            "created_at, updated_at, finished_at")
# Messages are tool output tails; keep the file small and readable.
MAX_MESSAGE_CHARS = 2000


class LedgerError(RuntimeError):
    """The ledger file cannot be opened or written (full disk, read-only directory, damaged file)."""


@dataclass
class LedgerEntry:
    split: str
    key: str
    youtube_id: str
    start_time: int
    status: ClipStatus
    stage: str | None
    attempts: int
    reason: str | None
    message: str | None
    media_sha256: str | None
    created_at: float
    updated_at: float
    finished_at: float | None

    def __post_init__(self):
        self.status = ClipStatus(self.status)


class Ledger:
    def __init__(self, path: str | Path, split: str):
        self.path = Path(path)
        self.split = split
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._errors("open"):
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._migrate()

    def _migrate(self) -> None:
        """Files written before `removed` existed have a CHECK constraint without it; SQLite cannot alter a
        constraint, so the table is copied into the current schema (one transaction: all or nothing)."""
        sql = self._db.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name='clips'").fetchone()[0]
        if "'removed'" in sql:
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("ALTER TABLE clips RENAME TO clips_old")
        # execute, not executescript: executescript would commit the open transaction first.
        self._db.execute(_SCHEMA.replace("CREATE TABLE IF NOT EXISTS", "CREATE TABLE"))
        self._db.execute(f"INSERT INTO clips ({_COLUMNS}) SELECT {_COLUMNS} FROM clips_old")
        self._db.execute("DROP TABLE clips_old")
        self._db.execute("COMMIT")

    @contextmanager
    def _errors(self, what: str):
        """SQLite says "disk I/O error" or "database or disk is full"; say which file and how much room is left."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            db = getattr(self, "_db", None)
            if db is not None and db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.DatabaseError:
                    pass  # the connection is beyond use; the error below says why
            try:
                mib = shutil.disk_usage(self.path.parent).free / 2**20
                free = f"{mib:.1f} MiB free on its filesystem" + (": no space left on device" if mib < 1 else "")
            except OSError:
                free = "free space unknown"
            raise LedgerError(f"ledger {self.path}: cannot {what} ({e}; {free}). Nothing was recorded by this "
                              "call: free space or fix the file, then run the build again") from e

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def upsert_pending(self, clips: Iterable[Clip]) -> int:
        """Add clips not yet in the ledger as pending, and bring `removed` ones back as pending; other rows keep
        their status. Returns how many were new."""
        now = time.time()
        clips = list(clips)
        rows = [(self.split, c.key, c.youtube_id, c.start_time, PENDING, now, now) for c in clips]
        with self._lock, self._errors("record new clips"):
            before = self._count()
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR IGNORE INTO clips (split, key, youtube_id, start_time, status, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            self._db.executemany(
                "UPDATE clips SET status=?, finished_at=NULL, updated_at=? WHERE split=? AND key=? AND status=?",
                [(PENDING, now, self.split, c.key, REMOVED) for c in clips])
            self._db.execute("COMMIT")
            return self._count() - before

    def mark_removed(self, keys: Iterable[str]) -> int:
        """Mark clips whose CSV row is gone as `removed` (history kept). Returns how many changed status."""
        now = time.time()
        with self._lock, self._errors("mark removed clips"):
            self._db.execute("BEGIN")
            changed = 0
            for k in keys:
                changed += self._db.execute(
                    "UPDATE clips SET status=?, updated_at=? WHERE split=? AND key=? AND status!=?",
                    (REMOVED, now, self.split, k, REMOVED)).rowcount
            self._db.execute("COMMIT")
            return changed

    def add_attempts(self, key: str, attempts: int, stage: str = "download") -> None:
        """Count `attempts` download attempts that ended in a success (the clip's status is decided later)."""
        if attempts <= 0:
            return
        with self._lock, self._errors(f"record attempts for {key}"):
            cur = self._db.execute("UPDATE clips SET attempts=attempts+?, stage=?, updated_at=? WHERE split=? AND "
                                   "key=?", (attempts, stage, time.time(), self.split, key))
            if cur.rowcount != 1:
                raise KeyError(f"clip {key!r} is not in the ledger for split {self.split!r}")

    def record(self, key: str, status: ClipStatus, reason: str | None = None, message: str | None = None,
               media_sha256: str | None = None, stage: str | None = None, attempts: int = 1) -> None:
        """Record the outcome of a clip, with `attempts` more download attempts (0 for an outcome of a later
        stage). `media_sha256=None` keeps the known hash."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {[str(s) for s in STATUSES]}")
        status = ClipStatus(status)
        if message is not None and len(message) > MAX_MESSAGE_CHARS:
            message = "…" + message[-MAX_MESSAGE_CHARS:]
        now = time.time()
        finished = now if status in (OK, FAILED_PERMANENT) else None
        with self._lock, self._errors(f"record {status} for {key}"):
            cur = self._db.execute(
                "UPDATE clips SET status=?, reason=?, message=?, stage=?, media_sha256=COALESCE(?, media_sha256),"
                " attempts=attempts+?, updated_at=?, finished_at=? WHERE split=? AND key=?",
                (status, reason, message, stage, media_sha256, attempts, now, finished, self.split, key))
            if cur.rowcount != 1:
                raise KeyError(f"clip {key!r} is not in the ledger for split {self.split!r}")

    def set_pending(self, keys: Iterable[str]) -> None:
        """Put clips back to pending (e.g. an `ok` clip whose staged sample is gone)."""
        now = time.time()
        with self._lock, self._errors("reset clips to pending"):
            self._db.executemany(
                "UPDATE clips SET status=?, finished_at=NULL, updated_at=? WHERE split=? AND key=?",
                [(PENDING, now, self.split, k) for k in keys])

    def get(self, key: str) -> LedgerEntry | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM clips WHERE split=? AND key=?", (self.split, key)).fetchone()
        return LedgerEntry(**dict(row)) if row else None

    def entries(self, status: ClipStatus | None = None) -> list[LedgerEntry]:
        q, args = "SELECT * FROM clips WHERE split=?", [self.split]
        if status is not None:
            q, args = q + " AND status=?", args + [status]
        with self._lock:
            rows = self._db.execute(q + " ORDER BY key", args).fetchall()
        return [LedgerEntry(**dict(r)) for r in rows]

    def keys_to_process(self, retry_permanent: bool = False, retry_reasons: Iterable[str] = ()) -> list[str]:
        """Pending and transient failures; permanent failures too when asked, all of them or those whose
        reason is one of `retry_reasons` (a misclassified reason is repaired without retrying every permanent
        failure). Sorted for a stable order."""
        wanted = [PENDING, FAILED_TRANSIENT] + ([FAILED_PERMANENT] if retry_permanent else [])
        reasons = list(retry_reasons)
        marks, rmarks = ",".join("?" * len(wanted)), ",".join("?" * len(reasons))
        by_reason = f" OR (status=? AND reason IN ({rmarks}))" if reasons else ""
        with self._lock:
            rows = self._db.execute(
                f"SELECT key FROM clips WHERE split=? AND (status IN ({marks}){by_reason}) ORDER BY key",
                [self.split, *wanted, *([FAILED_PERMANENT, *reasons] if reasons else [])]).fetchall()
        return [r["key"] for r in rows]

    def counts(self) -> dict[ClipStatus, int]:
        """Clips per status for this split; every status is present (0 when none)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT status, COUNT(*) AS n FROM clips WHERE split=? GROUP BY status", (self.split,)).fetchall()
        out = {s: 0 for s in STATUSES}
        out.update({ClipStatus(r["status"]): r["n"] for r in rows})
        return out

    def failures(self) -> list[LedgerEntry]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM clips WHERE split=? AND status IN ({','.join('?' * len(FAILED))}) ORDER BY key",
                (self.split, *FAILED)).fetchall()
        return [LedgerEntry(**dict(r)) for r in rows]

    def _count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM clips WHERE split=?", (self.split,)).fetchone()[0]
