"""Download stage against the real yt-dlp and ffmpeg, served from the loopback media server."""
import os
import subprocess

import pytest

from pipeline.clip_list import Clip
from pipeline.download import (BotWallError, DownloadConfig, build_url, classify_error, download_clip,
                               download_many, find_local_media, remove_stale_attempts)
from tests.media import MediaSpec, Route, make_media


def _cfg(template, **kw):
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("timeout_s", 60)
    return DownloadConfig(url_template=template, **kw)


def _duration(path):
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0",
                          str(path)], capture_output=True, text=True, check=True)
    return float(out.stdout)


def test_window_download_keeps_only_ten_seconds(audiocaps_media, tmp_path):
    case = audiocaps_media.cases["--0w1YA1Hm4_30000_40000"]  # 40 s video, window [30, 40), id starts with --
    clip = Clip(case.youtube_id, case.start_time)
    r = download_clip(clip, _cfg(audiocaps_media.url_template), tmp_path / "media")
    assert r.status == "ok" and r.attempts == 1
    assert r.path == tmp_path / "media" / "--0w1YA1Hm4_30000_40000.mp4"
    assert abs(_duration(r.path) - 10.0) < 0.3
    assert len(r.media_sha256) == 64
    assert list((tmp_path / "media" / ".tmp").iterdir()) == []  # no leftovers
    # Already there: no request at all.
    hits = dict(audiocaps_media.server.hits)
    again = download_clip(clip, _cfg(audiocaps_media.url_template), tmp_path / "media")
    assert again.status == "ok" and again.attempts == 0 and again.media_sha256 == r.media_sha256
    assert dict(audiocaps_media.server.hits) == hits


def test_permanent_errors_are_classified_and_not_retried(audiocaps_media, tmp_path):
    server = audiocaps_media.server
    cfg = _cfg(audiocaps_media.url_template, max_retries=3)
    before = server.hits["/v/3MoF8myFs8Y.mp4"]
    r404 = download_clip(Clip("3MoF8myFs8Y", 0), cfg, tmp_path)
    assert (r404.status, r404.reason, r404.attempts) == ("failed-permanent", "http-404", 1)
    assert "404" in r404.message
    assert server.hits["/v/3MoF8myFs8Y.mp4"] == before + 1
    html = download_clip(Clip("TQr9v-PQOc4", 0), cfg, tmp_path)
    assert (html.status, html.reason) == ("failed-permanent", "unsupported-url")


def test_transient_errors_back_off_and_then_succeed(media_server, tmp_path):
    src = make_media(tmp_path / "src.mp4", MediaSpec(10, width=256, height=256))
    media_server.routes["/flaky/AAAAAAAAAAA.mp4"] = Route(file=src, fail_first=2, fail_status=429)
    media_server.routes["/flaky/BBBBBBBBBBB.mp4"] = Route(file=src, fail_first=100, fail_status=503)
    cfg = _cfg(media_server.url_template("/flaky/"), max_retries=2)
    delays = []
    ok = download_clip(Clip("AAAAAAAAAAA", 0), cfg, tmp_path / "m", sleep=delays.append)
    assert ok.status == "ok" and ok.attempts == 3
    assert len(delays) == 2 and 0.005 <= delays[0] <= 0.01 and 0.01 <= delays[1] <= 0.02  # 2**i, jittered
    gone = download_clip(Clip("BBBBBBBBBBB", 0), cfg, tmp_path / "m", sleep=lambda s: None)
    assert (gone.status, gone.reason, gone.attempts) == ("failed-transient", "http-503", 3)


def test_a_stalled_download_is_killed_at_the_time_limit(media_server, tmp_path):
    media_server.routes["/stall/CCCCCCCCCCC.mp4"] = Route(body=b"x", stall_s=30)
    cfg = _cfg(media_server.url_template("/stall/"), timeout_s=2, max_retries=0)
    r = download_clip(Clip("CCCCCCCCCCC", 0), cfg, tmp_path)
    assert (r.status, r.reason) == ("failed-transient", "timeout")
    assert "time limit" in r.message


def test_bot_wall_stops_the_stage_and_leaves_the_rest_untried(media_server, tmp_path):
    # The site answers with the bot check as its status text; yt-dlp quotes it in its error.
    wall = Route(status=429, reason="Sign in to confirm you're not a bot")
    media_server.routes["/wall/DDDDDDDDDDD.mp4"] = wall
    clips = [Clip(y, 0) for y in ("DDDDDDDDDDD", "EEEEEEEEEEE", "FFFFFFFFFFF")]
    seen = []
    batch = download_many(clips, _cfg(media_server.url_template("/wall/"), workers=1, max_retries=3), tmp_path,
                          on_result=lambda clip, result: seen.append(clip.key))
    assert isinstance(batch.bot_wall, BotWallError) and "not a bot" in str(batch.bot_wall)
    assert "--cookies" in str(batch.bot_wall)
    assert seen == [] and batch.results == {}
    assert batch.untried == [c.key for c in clips]        # all stay pending
    assert wall.served == 1                                 # no retries against a bot wall
    assert media_server.hits["/wall/EEEEEEEEEEE.mp4"] == 0  # and no further clip tried


def test_classifier_knows_youtube_messages():
    cases = {
        "ERROR: [youtube] abc: Private video. Sign in if you've been granted access": ("permanent", "private"),
        "ERROR: [youtube] abc: Video unavailable. This video has been removed by the uploader": ("permanent", "removed"),
        "ERROR: [youtube] abc: Video unavailable. This video is no longer available because the YouTube account "
        "associated with this video has been terminated.": ("permanent", "removed"),
        "ERROR: [youtube] abc: Sign in to confirm your age. This video may be inappropriate for some users.":
            ("permanent", "age-restricted"),
        "ERROR: [youtube] abc: The uploader has not made this video available in your country": ("permanent", "geo-restricted"),
        "ERROR: [youtube] abc: Video unavailable. The uploader has blocked it in your country": ("permanent", "geo-restricted"),
        "ERROR: [youtube] abc: Video unavailable. This video contains content from SME, who has blocked it on "
        "copyright grounds": ("permanent", "copyright"),
        "ERROR: [youtube] abc: Video unavailable": ("permanent", "unavailable"),
        "ERROR: unable to download video data: HTTP Error 429: Too Many Requests": ("transient", "http-429"),
        "ERROR: unable to download video data: HTTP Error 403: Forbidden": ("transient", "http-403"),
        "[https @ 0x5] HTTP error 502 Bad Gateway\nServer returned 5XX Server Error reply": ("transient", "http-502"),
        "ERROR: [download] Got error: The read operation timed out": ("transient", "timeout"),
        "ERROR: [Errno 104] Connection reset by peer": ("transient", "network"),
        "ERROR: [youtube] abc: Sign in to confirm you’re not a bot. Use --cookies": ("bot-wall", "bot-wall"),
        "ERROR: something nobody has seen before": ("transient", "unknown-error"),
    }
    for message, expected in cases.items():
        assert classify_error(message) == expected, message


def test_local_media_lookup_prefers_the_cut_clip(tmp_path):
    clip = Clip("-NrFeH-kBSM", 30)
    assert find_local_media(clip, tmp_path) is None
    (tmp_path / "-NrFeH-kBSM.webm").write_bytes(b"x")
    (tmp_path / "-NrFeH-kBSM.part").write_bytes(b"x")       # a partial download is not media
    (tmp_path / "-NrFeH-kBSMX.mp4").write_bytes(b"x")       # another id with the same prefix
    whole = find_local_media(clip, tmp_path)
    assert whole.name == "-NrFeH-kBSM.webm" and whole.path.is_absolute() and whole.offset == 30.0
    (tmp_path / f"{clip.key}.mp4").write_bytes(b"x")         # a build's own media cache: the window cut out
    cached = find_local_media(clip, tmp_path)
    assert cached.name == f"{clip.key}.mp4" and cached.offset == 0.0
    (tmp_path / "-NrFeH-kBSM_30.mp4").write_bytes(b"x")
    cut = find_local_media(clip, tmp_path)
    assert cut.name == "-NrFeH-kBSM_30.mp4" and cut.offset == 0.0


def test_a_connection_dropped_mid_body_is_a_transient_failure(media_server, tmp_path):
    src = make_media(tmp_path / "src.mp4", MediaSpec(10))
    media_server.routes["/drop/GGGGGGGGGGG.mp4"] = Route(file=src, drop_after_bytes=2000)
    r = download_clip(Clip("GGGGGGGGGGG", 0), _cfg(media_server.url_template("/drop/"), max_retries=0), tmp_path)
    assert (r.status, r.reason) == ("failed-transient", "network"), r
    assert "prematurely" in r.message  # ffmpeg's own words are kept
    assert not (tmp_path / "GGGGGGGGGGG_0_10000.mp4").exists()


def test_leftovers_of_a_killed_attempt_are_removed_but_not_a_running_one(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / ".tmp" / f".AAAAAAAAAAA_0_10000.tmp-{dead.pid}-x1").mkdir(parents=True)
    (tmp_path / ".tmp" / f".BBBBBBBBBBB_0_10000.tmp-{os.getpid()}-x2").mkdir()
    assert remove_stale_attempts(tmp_path) == 1
    assert [p.name.split(".")[1] for p in (tmp_path / ".tmp").iterdir()] == ["BBBBBBBBBBB_0_10000"]


def test_templates_and_ids_are_checked_before_any_request():
    with pytest.raises(ValueError, match="placeholder"):
        DownloadConfig(url_template="https://example.com/watch")
    with pytest.raises(ValueError, match="http"):
        DownloadConfig(url_template="file:///etc/{youtube_id}")
    with pytest.raises(ValueError, match="youtube_id"):
        build_url("https://e.com/{youtube_id}", "../../x?a=b&c")
    with pytest.raises(ValueError, match="cookies"):
        DownloadConfig(cookies="/nonexistent/cookies.txt")
