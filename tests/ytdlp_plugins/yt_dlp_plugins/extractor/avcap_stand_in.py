"""A yt-dlp extractor plugin used only by the tests (tests/test_youtube.py puts its folder on PYTHONPATH).

It overrides the generic extractor through yt-dlp's plugin mechanism (`plugin_name=`), so it takes the generic
extractor's place for a loopback URL template, and stands in for YouTube's answers that a loopback server cannot
give. It does nothing unless AVCAP_STAND_IN names a state directory:
  limited.json  {"youtube_id": n}: answer that id with YouTube's real rate-limit message n more times
                (-1: always); the count goes down with each answer
  log.jsonl     one line per extraction: the id and the ids it found in yt-dlp's cache (section avcap-stand-in)
Each extraction adds its id to that cache entry, through yt-dlp's own cache (the build's shared cache dir).
"""
import json
import os
from pathlib import Path

from yt_dlp.extractor.generic import GenericIE


class AvcapStandInIE(GenericIE, plugin_name="avcapstandin"):
    def _real_extract(self, url):
        state = os.environ.get("AVCAP_STAND_IN")
        if not state:
            return super()._real_extract(url)
        state = Path(state)
        video_id = url.rstrip("/").rsplit("/", 1)[-1].split(".")[0]
        seen = self.cache.load("avcap-stand-in", "seen") or []
        with open(state / "log.jsonl", "a") as f:
            f.write(json.dumps({"id": video_id, "cache_seen": seen}) + "\n")
        self.cache.store("avcap-stand-in", "seen", seen + [video_id])
        limited_path = state / "limited.json"
        limited = json.loads(limited_path.read_text()) if limited_path.exists() else {}
        left = limited.get(video_id, 0)
        if left:
            limited[video_id] = left - 1 if left > 0 else left
            limited_path.write_text(json.dumps(limited))
            from tests.ytdlp_messages import RATE_LIMIT_REASON
            self.raise_no_formats(RATE_LIMIT_REASON, expected=True, video_id=video_id)
        return super()._real_extract(url)
