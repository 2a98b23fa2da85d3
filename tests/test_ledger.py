import sqlite3

import pytest

from pipeline.ledger import Ledger
from pipeline.manifest import Clip


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
        assert led.counts() == {"ok": 1, "failed-permanent": 1, "failed-transient": 1, "pending": 2}
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
            "ok": 1, "failed-permanent": 0, "failed-transient": 0, "pending": 1}
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
