"""Security properties checked on the source itself (AST, not grep: comments and strings do not count) and on
the real yt-dlp: safe deserialization, no tar extraction, argument lists with time limits, restricted URLs.
"""
from __future__ import annotations

import ast
import json
import random
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pipeline.clip_list import Clip
from pipeline.download import (DEFAULT_URL_TEMPLATE, DownloadConfig, build_url, classify_error, is_youtube_template,
                               validate_url_template, worker_job)
from tests.media import Route

REPO = Path(__file__).resolve().parent.parent
# The system's own code; tests and benchmarks are tools around it (still checked for torch.load and tar use).
PRODUCT = ["pipeline", "shards", "avcap", "flows.py", "train.py"]
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output"}


def _py_files(parts: list[str] | None = None) -> list[Path]:
    if parts is None:
        files = [p for p in REPO.rglob("*.py") if ".venv" not in p.parts and "site-packages" not in p.parts]
    else:
        files = []
        for part in parts:
            p = REPO / part
            files += [p] if p.is_file() else sorted(p.rglob("*.py"))
    assert files
    return sorted(files)


def _calls(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, parents


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    return func.id if isinstance(func, ast.Name) else "?"


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}"


def test_every_torch_load_uses_weights_only_true():
    found, bad = 0, []
    for path in _py_files():
        for call, _ in _calls(path):
            if _name(call.func) == "torch.load":
                found += 1
                kw = {k.arg: k.value for k in call.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    bad.append(_where(path, call))
    assert found >= 5 and bad == [], f"torch.load without weights_only=True at {bad}"


def test_tar_members_are_read_by_name_never_extracted_to_disk():
    bad = []
    for path in _py_files():
        for call, _ in _calls(path):
            if isinstance(call.func, ast.Attribute) and call.func.attr in ("extract", "extractall"):
                bad.append(_where(path, call))
            if _name(call.func) in ("shutil.unpack_archive",):
                bad.append(_where(path, call))
    assert bad == [], f"archive extraction to paths taken from the archive at {bad}"


def _subprocess_problems(parts: list[str]) -> list[str]:
    problems = []
    for path in _py_files(parts):
        text = path.read_text()
        for call, parents in _calls(path):
            name = _name(call.func)
            if name in ("os.system", "os.popen") or name.startswith("os.spawn") or name.startswith("os.exec"):
                problems.append(f"{_where(path, call)}: {name}")
                continue
            if not (name.startswith("subprocess.") and name.split(".")[-1] in SUBPROCESS_CALLS):
                continue
            kw = {k.arg: k.value for k in call.keywords}
            if isinstance(kw.get("shell"), ast.Constant) and kw["shell"].value:
                problems.append(f"{_where(path, call)}: shell=True")
            if call.args and isinstance(call.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp)):
                problems.append(f"{_where(path, call)}: a command line built from a string")
            if name.endswith("Popen"):
                # The time limit goes on communicate()/wait() in the function that starts the process.
                fn = call
                while fn in parents and not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    fn = parents[fn]
                body = ast.get_source_segment(text, fn) or ""
                if "timeout=" not in body:
                    problems.append(f"{_where(path, call)}: Popen without a time limit in its function")
            elif "timeout" not in kw:
                problems.append(f"{_where(path, call)}: {name} without timeout=")
    return problems


def test_subprocesses_get_argument_lists_and_time_limits():
    assert _subprocess_problems(PRODUCT) == []


def test_demo_subprocesses_get_time_limits():
    assert _subprocess_problems(["demo"]) == []


# ----------------------------------------------------------------------------------------------- URLs

def test_only_template_plus_validated_id_urls_and_the_host_never_moves():
    template = "https://media.example.org:8443/clips/{youtube_id}.mp4?x={youtube_id}"
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
    for _ in range(300):
        yid = "".join(rng.choice(alphabet) for _ in range(11))
        parts = urlsplit(build_url(template, yid))
        assert (parts.scheme, parts.netloc, parts.path) == ("https", "media.example.org:8443", f"/clips/{yid}.mp4")
    for bad in ["abc@evil.co", "abc/../etc", "abc?q=1&x=", "abc#frag12", "abc%2e%2e/a", "a:b@c.d/efg", "-" * 12]:
        with pytest.raises(ValueError, match="youtube_id"):
            build_url(template, bad)
    for bad in ["file:///etc/{youtube_id}", "ftp://h/{youtube_id}", "https://h/watch", "{youtube_id}",
                "javascript:{youtube_id}"]:
        with pytest.raises(ValueError):
            validate_url_template(bad)


def test_youtube_extractor_only_for_youtube_hosts():
    for t in ["https://www.youtube.com/watch?v={youtube_id}", "https://youtube.com/watch?v={youtube_id}",
              "https://m.youtube.com/watch?v={youtube_id}", "https://youtu.be/{youtube_id}"]:
        assert is_youtube_template(t), t
    for t in ["https://youtube.com.evil.org/{youtube_id}", "https://evilyoutube.com/{youtube_id}",
              "https://evil.org/?u=youtube.com/{youtube_id}", "http://127.0.0.1:9/{youtube_id}",
              "https://youtube.com@evil.org/{youtube_id}"]:
        assert not is_youtube_template(t), t


def test_yt_dlp_worker_refuses_urls_its_extractors_do_not_cover(media_server, tmp_path):
    # The worker is what really runs yt-dlp: restricted to the YouTube extractor, a loopback URL (one the generic
    # extractor would happily fetch) is refused before any request is made.
    media_server.routes["/sec/ABCDEFGHIJK.mp4"] = Route(body=b"x" * 1000)
    cfg = DownloadConfig(url_template=DEFAULT_URL_TEMPLATE, socket_timeout_s=5)
    job = worker_job(media_server.url("/sec/ABCDEFGHIJK.mp4"), Clip("ABCDEFGHIJK", 0), cfg, tmp_path)
    r = subprocess.run([sys.executable, "-m", "pipeline.download", "--worker"], input=json.dumps(job), cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    answer = json.loads(r.stdout.strip().splitlines()[-1])
    assert answer["ok"] is False and "no suitable extractor" in answer["message"].lower(), answer
    assert media_server.hits["/sec/ABCDEFGHIJK.mp4"] == 0
    assert classify_error(answer["message"]) == ("permanent", "unsupported-url")  # not retried
