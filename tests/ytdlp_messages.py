"""The messages the pinned yt-dlp (2026.10.26) raises for the failures the download stage classifies, verbatim
as its logger hands them over ("ERROR: ..." lines; ffmpeg's own stderr follows the line for section downloads),
with the (kind, reason) `pipeline.download.classify_error` must give each.

The text YouTube itself sends (the playability reason, such as "Private video") is quoted as yt-dlp passes it on;
what yt-dlp adds around it is checked against the installed yt-dlp's source by `SOURCE_FRAGMENTS`, so an
upgrade that rewords a message fails tests/test_youtube.py instead of misfiling clips in silence.
"""
from __future__ import annotations

ID = "abcdefghijk"
YT = f"ERROR: [youtube] {ID}: "

# yt_dlp.extractor.youtube._base.YoutubeBaseInfoExtractor._youtube_login_hint (checked by the test).
LOGIN_HINT = ("Use --cookies-from-browser or --cookies for the authentication. See  "
              "https://github.com/yt-dlp/yt-dlp/wiki/FAQ#how-do-i-pass-cookies-to-yt-dlp  for how to manually pass "
              "cookies. Also see  https://github.com/yt-dlp/yt-dlp/wiki/Extractors#exporting-youtube-cookies  for "
              "tips on effectively exporting YouTube cookies")

# _video.py builds this reason when YouTube answers "This content isn't available, try again later".
RATE_LIMIT_REASON = (
    "Video unavailable. This content isn't available, try again later. The current session has been "
    "rate-limited by YouTube for up to an hour. It is recommended to use `-t sleep` to add a delay between video "
    "requests to avoid exceeding the rate limit. For more information, refer to  "
    "https://github.com/yt-dlp/yt-dlp/wiki/Extractors#this-content-isnt-available-try-again-later")

NO_JS_WARNING = (
    "WARNING: [youtube] No supported JavaScript runtime could be found. Only deno is enabled by default; to use "
    "another runtime add  --js-runtimes RUNTIME[:PATH]  to your command/config. YouTube extraction without a JS "
    "runtime has been deprecated, and some formats may be missing. See  "
    "https://github.com/yt-dlp/yt-dlp/wiki/EJS  for details on installing one")

MESSAGES: list[tuple[str, str, str]] = [
    # --- the stops
    (YT + RATE_LIMIT_REASON, "rate-limit", "rate-limit"),
    (YT + RATE_LIMIT_REASON.replace("The current session", "Your account"), "rate-limit", "rate-limit"),
    (YT + "Video unavailable. YouTube is requiring a captcha challenge before playback", "bot-wall", "captcha"),
    (YT + f"Sign in to confirm you’re not a bot. {LOGIN_HINT}", "bot-wall", "bot-wall"),
    (YT + f"Sign in to confirm you're not a bot. {LOGIN_HINT}", "bot-wall", "bot-wall"),
    ("ERROR: [youtube] All player responses are invalid. Your IP is likely being blocked by Youtube",
     "bot-wall", "ip-blocked"),
    # --- no formats: a missing JS runtime / PO token on our side, never permanent
    (YT + "Requested format is not available. Use --list-formats for a list of available formats",
     "transient", "no-formats"),
    (YT + "No video formats found!", "transient", "no-formats"),
    (NO_JS_WARNING + "\n" + YT + "Requested format is not available. Use --list-formats for a list of available "
     "formats", "transient", "no-formats"),
    # --- YouTube playability reasons: permanent
    (YT + f"Private video. Sign in if you've been granted access to this video. {LOGIN_HINT}", "permanent", "private"),
    (YT + f"Sign in to confirm your age. This video may be inappropriate for some users. {LOGIN_HINT}",
     "permanent", "age-restricted"),
    (YT + "Video unavailable. This video has been removed by the uploader", "permanent", "removed"),
    (YT + "Video unavailable. This video has been removed by the user", "permanent", "removed"),
    (YT + "Video unavailable. This video is no longer available because the YouTube account associated with this "
     "video has been terminated.", "permanent", "removed"),
    (YT + "Video unavailable. This video is no longer available due to a copyright claim by SME",
     "permanent", "copyright"),
    (YT + "Video unavailable. This video contains content from SME, who has blocked it on copyright grounds",
     "permanent", "copyright"),
    (YT + "The uploader has not made this video available in your country\nThis video is available in Japan.\n"
     "You might want to use a VPN or a proxy server (with --proxy) to workaround.", "permanent", "geo-restricted"),
    (YT + "Video unavailable. The uploader has blocked it in your country", "permanent", "geo-restricted"),
    (YT + "Join this channel to get access to members-only content like this video, and other exclusive perks.",
     "permanent", "members-only"),
    (YT + "This video is only available for registered users. Use --cookies, --cookies-from-browser, --username "
     "and --password, --netrc-cmd, or --netrc (youtube) to provide account credentials. See  "
     "https://github.com/yt-dlp/yt-dlp/wiki/FAQ#how-do-i-pass-cookies-to-yt-dlp  for how to manually pass cookies",
     "permanent", "login-required"),
    (YT + "This video is DRM protected", "permanent", "drm"),
    (YT + "Video unavailable", "permanent", "unavailable"),
    (YT + "Video unavailable. This video is unavailable", "permanent", "unavailable"),
    # --- the window itself (pipeline.extract / pipeline.build)
    ("the window starts past the end of the video (start 40 s, video 31.20 s)", "permanent", "start-past-end"),
    # --- URLs outside the allowed extractors
    ("ERROR: Unsupported URL: http://127.0.0.1:8000/page.html", "permanent", "unsupported-url"),
    # --- HTTP errors (yt_dlp.networking.exceptions.HTTPError: "HTTP Error {status}: {reason}")
    ("ERROR: unable to download video data: HTTP Error 429: Too Many Requests", "transient", "http-429"),
    ("ERROR: unable to download video data: HTTP Error 403: Forbidden", "transient", "http-403"),
    ("ERROR: unable to download video data: HTTP Error 503: Service Unavailable", "transient", "http-503"),
    ("ERROR: [generic] Unable to download webpage: HTTP Error 404: Not Found (caused by <HTTPError 404: Not Found>)",
     "permanent", "http-404"),
    ("ERROR: unable to download video data: HTTP Error 410: Gone", "permanent", "http-410"),
    # --- ffmpeg during a section download: yt-dlp only says it exited; ffmpeg's stderr names the cause
    ("ERROR: ffmpeg exited with code 8\n[https @ 0x55d0c0] HTTP error 404 Not Found\n"
     "[in#0 @ 0x55d0c1] Error opening input: Server returned 404 Not Found", "permanent", "http-404"),
    ("ERROR: ffmpeg exited with code 8\n[https @ 0x55d0c0] HTTP error 416 Requested Range Not Satisfiable\n"
     "Server returned 4XX Client Error, but not one of 40{0,1,3,4}", "permanent", "http-416"),
    ("ERROR: ffmpeg exited with code 1\n[https @ 0x55d0c0] HTTP error 502 Bad Gateway\n"
     "Server returned 5XX Server Error reply", "transient", "http-502"),
    ("ERROR: ffmpeg exited with code 1\n[https @ 0x55d0c0] Stream ends prematurely at 2000, should be 92843",
     "transient", "network"),
    ("ERROR: ffmpeg exited with code 1\n[mp4 @ 0x55d0c0] Error writing trailer: No space left on device",
     "transient", "disk-full"),
    ("ERROR: [download] Got error: The read operation timed out", "transient", "timeout"),
    ("ERROR: [Errno 104] Connection reset by peer", "transient", "network"),
    # --- a WARNING line never classifies a clip; unknown errors are transient
    (NO_JS_WARNING + "\nWARNING: [youtube] Video unavailable\nERROR: something nobody has seen before",
     "transient", "unknown-error"),
    ("ERROR: something nobody has seen before", "transient", "unknown-error"),
]

# What yt-dlp itself writes into the messages above: each must appear verbatim in the installed yt-dlp's source.
SOURCE_FRAGMENTS = [
    "This content isn't available, try again later",
    "has been rate-limited by YouTube for up to an hour. It is recommended to use `-t sleep` to add a delay ",
    "YouTube is requiring a captcha challenge before playback",
    "All player responses are invalid. Your IP is likely being blocked by Youtube",
    "This video is only available for registered users",
    "This video is DRM protected",
    "Requested format is not available. Use --list-formats for a list of available formats",
    "No video formats found!",
    "unable to download video data: ",
    "HTTP Error {response.status}: {response.reason}",
    "You might want to use a VPN or a proxy server (with --proxy) to workaround.",
    "Unsupported URL: ",
    "No supported JavaScript runtime could be found. Only deno is enabled by default; ",
    "%s exited with code %d",
]
