import sqlite3

import pytest

from pipeline.clip_list import Clip
from pipeline.ledger import Ledger


def _clips(*ids):
    return [Clip(y, 0, ["c"], [1], "train", []) for y in ids]


def test_rerun_semantics_skip_ok_retry_transient_keep_permanent_pick_up_new(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with Ledger(path, "train") as led:
        assert led.upsert_pending(_clips("AAAAAAAAAAA", "BBBBBBBBBBB", "CCCCCCCCCCC", "DDDDDDDDDDD")) == 4
        led.record("AAAAAAAAAAA_0_10000", "ok", media_sha256="ab" * 32, stage="stage")
        led.record("BBBBBBBBBBB_0_10000", "failed-transient", "http-429", "HTTP Error 429", stage="download",
                   attempts=4)
        led.record("CCCCCCCCCCC_0_10000", "failed-permanent", "private", "Private video", stage="download")
    # A second build opens the same file and adds one new row; existing statuses are untouched.
    with Ledger(path, "train") as led:
        assert led.upsert_pending(_clips("AAAAAAAAAAA", "EEEEEEEEEEE")) == 1
        assert led.keys_to_process() == ["BBBBBBBBBBB_0_10000", "DDDDDDDDDDD_0_10000", "EEEEEEEEEEE_0_10000"]
        assert "CCCCCCCCCCC_0_10000" in led.keys_to_process(retry_permanent=True)
        assert led.counts() == {"ok": 1, "failed-permanent": 1, "failed-transient": 1, "pending": 2, "removed": 0}
        b = led.get("BBBBBBBBBBB_0_10000")
        assert (b.attempts, b.reason, b.stage, b.finished_at) == (4, "http-429", "download", None)
        led.record("BBBBBBBBBBB_0_10000", "ok", media_sha256="cd" * 32)
        b = led.get("BBBBBBBBBBB_0_10000")
        assert b.attempts == 5 and b.status == "ok" and b.finished_at >= b.created_at
        assert [f.key for f in led.failures()] == ["CCCCCCCCCCC_0_10000"]
        assert led.get("AAAAAAAAAAA_0_10000").media_sha256 == "ab" * 32


def test_splits_share_the_file_without_mixing(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with Ledger(path, "train") as train, Ledger(path, "val") as val:
        train.upsert_pending(_clips("AAAAAAAAAAA"))
        val.upsert_pending(_clips("AAAAAAAAAAA", "BBBBBBBBBBB"))
        val.record("AAAAAAAAAAA_0_10000", "ok")
        assert train.counts()["pending"] == 1 and val.counts() == {
            "ok": 1, "failed-permanent": 0, "failed-transient": 0, "pending": 1, "removed": 0}
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_bad_status_and_unknown_key_are_errors(tmp_path):
    with Ledger(tmp_path / "l.sqlite", "train") as led:
        led.upsert_pending(_clips("AAAAAAAAAAA"))
        with pytest.raises(ValueError, match="status"):
            led.record("AAAAAAAAAAA_0_10000", "done")
        with pytest.raises(KeyError, match="ZZZ"):
            led.record("ZZZ", "ok")
        led.record("AAAAAAAAAAA_0_10000", "failed-transient", "timeout", "x" * 10_000)
        assert len(led.get("AAAAAAAAAAA_0_10000").message) <= 2001
        led.set_pending(["AAAAAAAAAAA_0_10000"])
        assert led.get("AAAAAAAAAAA_0_10000").status == "pending"


def test_removed_rows_keep_their_history_are_never_processed_and_come_back_pending(tmp_path):
    with Ledger(tmp_path / "l.sqlite", "train") as led:
        led.upsert_pending(_clips("AAAAAAAAAAA", "BBBBBBBBBBB", "CCCCCCCCCCC"))
        led.record("AAAAAAAAAAA_0_10000", "ok", media_sha256="ab" * 32, attempts=2)
        led.record("BBBBBBBBBBB_0_10000", "failed-transient", "http-500", "HTTP Error 500", attempts=4)
        assert led.mark_removed(["AAAAAAAAAAA_0_10000", "BBBBBBBBBBB_0_10000"]) == 2
        assert led.mark_removed(["AAAAAAAAAAA_0_10000"]) == 0          # already removed
        a = led.get("AAAAAAAAAAA_0_10000")
        assert (a.status, a.attempts, a.media_sha256) == ("removed", 2, "ab" * 32)
        assert led.keys_to_process(retry_permanent=True) == ["CCCCCCCCCCC_0_10000"]
        assert led.failures() == []                                     # not a failure of this clip list
        assert led.counts() == {"ok": 0, "failed-permanent": 0, "failed-transient": 0, "pending": 1, "removed": 2}
        # The row comes back: pending again, history (attempts) kept; a row that never left is untouched.
        assert led.upsert_pending(_clips("AAAAAAAAAAA", "CCCCCCCCCCC")) == 0
        a = led.get("AAAAAAAAAAA_0_10000")
        assert (a.status, a.attempts, a.finished_at) == ("pending", 2, None)
        assert led.get("BBBBBBBBBBB_0_10000").status == "removed"


def test_download_attempts_that_succeed_are_counted(tmp_path):
    with Ledger(tmp_path / "l.sqlite", "train") as led:
        led.upsert_pending(_clips("AAAAAAAAAAA"))
        led.add_attempts("AAAAAAAAAAA_0_10000", 3)        # two 429s, then the file
        led.record("AAAAAAAAAAA_0_10000", "ok", attempts=0, stage="process")
        a = led.get("AAAAAAAAAAA_0_10000")
        assert (a.status, a.attempts, a.stage) == ("ok", 3, "process")
        with pytest.raises(KeyError, match="ZZZ"):
            led.add_attempts("ZZZ", 1)


def test_a_ledger_from_before_removed_is_migrated_in_place(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE clips (split TEXT NOT NULL, key TEXT NOT NULL, youtube_id TEXT NOT NULL,
            start_time INTEGER NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('ok', 'failed-permanent', 'failed-transient', 'pending')),
            stage TEXT, attempts INTEGER NOT NULL DEFAULT 0, reason TEXT, message TEXT, media_sha256 TEXT,
            created_at REAL NOT NULL, updated_at REAL NOT NULL, finished_at REAL, PRIMARY KEY (split, key));
        INSERT INTO clips VALUES ('train', 'AAAAAAAAAAA_0_10000', 'AAAAAAAAAAA', 0, 'ok', 'process', 1, NULL, NULL,
            'ab', 1.0, 2.0, 2.0);
    """)
    db.close()
    with Ledger(path, "train") as led:
        assert led.get("AAAAAAAAAAA_0_10000").media_sha256 == "ab"
        led.mark_removed(["AAAAAAAAAAA_0_10000"])
        assert led.get("AAAAAAAAAAA_0_10000").status == "removed"
    sql = sqlite3.connect(path).execute("SELECT sql FROM sqlite_master WHERE name='clips'").fetchone()[0]
    assert "'removed'" in sql


def test_clip_status_is_the_one_status_and_the_files_hold_its_plain_strings(tmp_path):
    """pipeline.status.ClipStatus is what the ledger accepts and stores (its schema's CHECK list is the enum's
    values) and what it returns; the manifest counts all but `removed`. The sqlite file holds plain text values."""
    import re

    from pipeline.ledger import _SCHEMA
    from pipeline.status import COUNTED, STATUSES, ClipStatus
    check = re.search(r"CHECK \(status IN \(([^)]*)\)\)", _SCHEMA).group(1)
    assert re.findall(r"'([^']+)'", check) == [s.value for s in ClipStatus] == list(STATUSES)
    assert [s.value for s in ClipStatus] == ["ok", "failed-permanent", "failed-transient", "pending", "removed"]
    assert list(COUNTED) == ["ok", "failed-permanent", "failed-transient", "pending"]   # a manifest's counts
    path = tmp_path / "l.sqlite"
    with Ledger(path, "train") as led:
        led.upsert_pending(_clips("AAAAAAAAAAA", "BBBBBBBBBBB"))
        led.record("AAAAAAAAAAA_0_10000", ClipStatus.FAILED_PERMANENT, "private")
        led.mark_removed(["BBBBBBBBBBB_0_10000"])
        a = led.get("AAAAAAAAAAA_0_10000")
        assert a.status is ClipStatus.FAILED_PERMANENT and all(type(k) is ClipStatus for k in led.counts())
    rows = sqlite3.connect(path).execute("SELECT key, status, typeof(status) FROM clips ORDER BY key").fetchall()
    assert rows == [("AAAAAAAAAAA_0_10000", "failed-permanent", "text"), ("BBBBBBBBBBB_0_10000", "removed", "text")]
