"""The repository stands on its own: its data is byte-exact in the tree, nothing in it points outside the tree,
and the suite's skip policy (tests/skip_policy.py) turns every unlisted skip into a failure."""
from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import AUDIOCAPS_DIR, REPO_ROOT
from tests.skip_policy import OPTIONAL_PROGRAMS

# ------------------------------------------------------------------------------------------ AudioCaps CSVs

# sha256 of the files as the AudioCaps repository ships them (CRLF line endings); data/audiocaps/README.md.
CSV_SHA256 = {
    "train": "c0c5223db682b3bf724ce7e7ce58d5b36929f74572e8526a7211f92d2eef7c8e",
    "val": "dab1c96641d5f3053ddb99dca3949450da9a75737bda53e11cc0aa8b102be0c3",
    "test": "b91c4b7ded2f4f6e7db5b9c4983dc1e1dca3d556f505b61e3fd65cac7e1c638a",
}
# rows, distinct clips (youtube_id, start_time): the figures data/audiocaps/README.md states
CSV_COUNTS = {"train": (49838, 49838), "val": (2475, 495), "test": (4875, 975)}


@pytest.mark.parametrize("split", sorted(CSV_SHA256))
def test_audiocaps_csv_is_byte_exact_with_crlf_endings(split):
    path = AUDIOCAPS_DIR / f"{split}.csv"
    data = path.read_bytes()
    lines = data.split(b"\r\n")
    # Line endings first: a checkout that converted them would fail the hash below for a less obvious reason.
    assert lines[-1] == b"", f"{path}: does not end with CRLF"
    bare = [i + 1 for i, line in enumerate(lines) if b"\n" in line or b"\r" in line]
    assert not bare, f"{path}: lines {bare[:5]} do not end with CRLF (is the .gitattributes -text rule applied?)"
    assert hashlib.sha256(data).hexdigest() == CSV_SHA256[split], f"{path}: not the byte-exact AudioCaps file"

    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["audiocap_id", "youtube_id", "start_time", "caption"]
    clips = {(r["youtube_id"], r["start_time"]) for r in rows}
    assert (len(rows), len(clips)) == CSV_COUNTS[split]


def test_gitattributes_keeps_the_csvs_byte_exact():
    rules = (REPO_ROOT / ".gitattributes").read_text().splitlines()
    assert "data/audiocaps/*.csv -text" in rules


# ------------------------------------------------------------------ nothing points outside the repository

def _project_files() -> list[Path]:
    """The tracked files and those git would add (not ignored); where there is no git checkout (the Docker image copies the tree without .git), the
    files of the tree minus what .gitignore/.dockerignore keep out of it."""
    git = shutil.which("git")
    if git and (REPO_ROOT / ".git").exists():
        out = subprocess.run([git, "-C", str(REPO_ROOT), "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, check=True,
                             timeout=60).stdout
        return [REPO_ROOT / p for p in out.decode().split("\0") if p and (REPO_ROOT / p).is_file()]
    skip_dirs = {".git", ".venv", "out", "runs", "build", "__pycache__", ".pytest_cache"}
    found = []
    for root, dirs, files in os.walk(REPO_ROOT):
        dirs[:] = [d for d in dirs if d not in skip_dirs and not d.endswith(".egg-info")]
        found += [Path(root) / f for f in files]
    return found


# Each pattern is written so that its own source text does not match it: this file is scanned like any other.
_SIBLING = re.compile(r"\.\./" + "shared")
_SPEC = re.compile(r"\b" + "SPEC" + r"(?:\.md\b|\s*§)")   # the file, or a citation of its sections
_ENV = re.compile("AVCAP_" + "SHARED")
# An absolute path of a development machine: the work, root, home/<name> (but the image's own user, avcap) and
# Users/<name> folders at the top of a Unix file system, or a Windows user folder. The slash must start the path:
# not inside a URL (host/work/), a relative path (data/work/) or a file name; so the /data/ac examples,
# s3://bucket/root/x or http://h/home/a/ do not count.
_START = r"(?<![\w.~:/\\-])"
_ABS = re.compile(_START + r"/(?:work|root)/"
                  + "|" + _START + r"/(?:home|Users)/(?!avcap/)[A-Za-z0-9_][\w.-]*/"
                  + "|" + r"\b[A-Za-z]:\\\\?Users\\")
# Paths built from the repository's parent: a name for the repository root followed by .parent / .parents[ / "..".
_ROOT_UP = re.compile(r"\b\w*(?:root|repo)\w*\s*(?:\.parent\b|\.parents\s*\[|/\s*[\"']\.\.[\"'/])", re.IGNORECASE)
# Path(__file__)[.resolve()].parent x k and .parents[n], os.path.dirname nested k times around __file__, and
# `$(dirname "$0")/..` chains in shell scripts: judged against how deep the file sits in the tree.
_FILE_PARENTS = re.compile(r"Path\(\s*__file__\s*\)(?:\.(?:resolve|absolute)\(\))?((?:\.parent\b)+)")
_FILE_PARENTS_N = re.compile(r"Path\(\s*__file__\s*\)(?:\.(?:resolve|absolute)\(\))?\.parents\[(\d+)\]")
_DIRNAME = re.compile(r"((?:os\.path\.dirname\(\s*)+)(?:os\.path\.(?:abspath|realpath)\(\s*)?__file__")
_SH_UP = re.compile(r"dirname \"?\$(?:0|\{BASH_SOURCE\[0\]\})\"?\)\"?((?:/\.\.)+)")


def _escapes(depth: int, line: str) -> bool:
    """Does this line build a path above the repository root from a file `depth` folders deep?"""
    for m in _FILE_PARENTS.finditer(line):        # k parents of the file: the repository root at k = depth + 1
        if m.group(1).count(".parent") > depth + 1:
            return True
    if any(int(m.group(1)) > depth for m in _FILE_PARENTS_N.finditer(line)):
        return True
    if any(m.group(1).count("dirname") > depth + 1 for m in _DIRNAME.finditer(line)):
        return True
    return any(m.group(1).count("/..") > depth for m in _SH_UP.finditer(line))


_PATTERNS = (("the sibling shared folder", _SIBLING), ("an outside spec file", _SPEC),
             ("an environment variable for the shared folder", _ENV),
             ("an absolute path of a development machine", _ABS),
             ("the repository's parent directory", _ROOT_UP))


def _offences(rel: str, text: str) -> list[str]:
    # Whole-file searches first: most files (the 4 MB train.csv among them) match nothing, line by line is slow.
    if not any(p.search(text) for _, p in _PATTERNS) and "__file__" not in text and "dirname" not in text:
        return []
    depth = rel.count("/")
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for what, pattern in _PATTERNS:
            if pattern.search(line):
                found.append(f"{rel}:{n}: {what}: {line.strip()[:160]}")
        if _escapes(depth, line):
            found.append(f"{rel}:{n}: a path above the repository root: {line.strip()[:160]}")
    return found


def test_no_tracked_file_points_outside_the_repository():
    files = _project_files()
    assert any(p.name == "test_standalone.py" for p in files), "the scan must cover this file too"
    offences = []
    for path in files:
        data = path.read_bytes()
        if b"\0" in data:          # tensors, checkpoints: binary
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        offences += _offences(path.relative_to(REPO_ROOT).as_posix(), text)
    assert not offences, "files that depend on something outside the repository:\n" + "\n".join(offences)


@pytest.mark.parametrize("rel, line", [
    ("README.md", "flows.py build --csv ../" "shared/data/audiocaps/train.csv"),
    ("avcap/model.py", "see " "SPEC" ".md §3"),
    ("avcap/model.py", "# eps 1e-8 (" "SPEC" " §3)"),
    ("tests/conftest.py", "os.environ['AVCAP_" "SHARED']"),
    ("avcap/model.py", '"""Weights under /' 'work/shared/reference."""'),
    ("BENCHMARKS.md", "python bench.py --out /" "root/tmp/x"),
    ("README.md", "cp /" "home/alice/cookies.txt ."),
    ("README.md", "C:\\" "Users\\alice\\data"),
    ("tests/conftest.py", "REF = REPO_ROOT" ".parent / 'shared'"),
    ("tests/x.py", "Path(__file__).resolve()" ".parent.parent.parent / 'shared'"),
    ("tests/x.py", "Path(__file__)" ".parents[2]"),
    ("flows.py", "Path(__file__).resolve()" ".parent.parent"),
    ("tests/x.py", "os.path.dirname(os.path.dirname(" "os.path.dirname(os.path.abspath(__file__))))"),
    ("scripts/x.sh", 'cd "$(dirname "$0")' '/../.."'),
])
def test_scan_flags_outside_paths(rel, line):
    assert _offences(rel, line), line


@pytest.mark.parametrize("rel, line", [
    ("README.md", "flows.py build --split train --out /data/ac --cookies cookies.txt"),
    ("README.md", "--publish s3://bucket/root/ac and https://example.com/home/alice/x and http://h/work/a"),
    ("Dockerfile", "ENV PREFECT_HOME=/home/avcap/.prefect"),
    ("tests/x.py", "REPO = Path(__file__).resolve().parent.parent"),
    ("avcap/x.py", "Path(__file__).parents[1] / 'data'"),
    ("scripts/x.sh", 'cd "$(dirname "$0")/.."'),
    ("tests/x.py", "bad = '../../../tmp/pwned'  # a path traversal the CSV reader must refuse"),
    ("docs/x.md", "data/work/ and ./root/ are relative"),
    ("avcap/tokenizer.py", 'SPECIAL_TOKENS = ("[PAD]", "[UNK]")  # docs/original.md §1'),
])
def test_scan_leaves_project_paths_alone(rel, line):
    assert not _offences(rel, line), line


# ------------------------------------------------------------------------------- docs/original.md citations

_CITATION = re.compile(r"docs/original\.md §(\d+)(?:[-–](\d+))?(?:,? [\"'“]([A-Z][\w ]*)[\"'”])?")


def test_every_citation_of_docs_original_names_a_section_it_has():
    """`docs/original.md §N` (or §N-M, or §N "Subsection") must point at a numbered section, and a named
    subsection must be a heading inside that section."""
    doc = (REPO_ROOT / "docs" / "original.md").read_text()
    sections = {int(m.group(1)): m.start() for m in re.finditer(r"^## (\d+)\. ", doc, re.MULTILINE)}
    assert sorted(sections) == list(range(1, 8)), sorted(sections)
    bounds = sorted(sections.values()) + [len(doc)]
    body = {n: doc[start:bounds[bounds.index(start) + 1]] for n, start in sections.items()}
    bad, cited = [], 0
    for path in _project_files():
        if path.suffix not in (".py", ".md", ".sh", ".toml") or path.name == "test_standalone.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in _CITATION.finditer(line):
                cited += 1
                first, last, sub = int(m.group(1)), int(m.group(2) or m.group(1)), m.group(3)
                where = f"{path.relative_to(REPO_ROOT)}:{n}: {m.group(0)}"
                if not all(k in body for k in range(first, last + 1)):
                    bad.append(f"{where}: no such section")
                elif sub and not re.search(rf"^###+ {re.escape(sub.strip())}\b", body[first], re.MULTILINE):
                    bad.append(f"{where}: §{first} has no subsection {sub!r}")
    assert cited > 10, "the citation pattern no longer finds the code's citations"
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------------------- skip policy

_MODULE_SKIP = "import pytest\npytest.skip('no data', allow_module_level=True)\ndef test_it():\n    pass\n"
_CASES = {
    "test_plain_skip.py": "import pytest\ndef test_it():\n    pytest.skip('no ffmpeg here')\n",
    "test_skipif.py": "import pytest\n@pytest.mark.skipif(True, reason='no java')\ndef test_it():\n    pass\n",
    "test_xfail.py": "import pytest\n@pytest.mark.xfail(reason='known bug')\ndef test_it():\n    assert False\n",
    "test_unknown_program.py": "from tests.skip_policy import skip_without\n"
                               "def test_it():\n    skip_without('ffmpeg', 'not on PATH')\n",
    "test_allowed.py": "from tests.skip_policy import skip_without\n"
                       "def test_it():\n    skip_without('mount-tmpfs', 'mount: permission denied')\n",
    "test_passes.py": "def test_it():\n    assert True\n",
}


def _pytest(tmp_path: Path, files: dict[str, str]) -> tuple[int, dict[str, str], str]:
    """Run pytest with only the skip policy plugin over `files`; -> (exit status, {file: outcome}, output)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    # Only the skip policy: no other installed plugin (quicker, and none of them can change the outcome).
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    xml = tmp_path / "report.xml"
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.skip_policy", "-p", "no:cacheprovider",
                        "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), f"--junitxml={xml}",
                        str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    outcomes = {}
    if xml.exists():
        for case in ET.parse(xml).iter("testcase"):
            name = (case.get("file") or case.get("classname", "").split(".")[0] + ".py").split("/")[-1]
            kinds = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
            outcomes[name] = kinds[0] if kinds else "passed"
    return r.returncode, outcomes, r.stdout + r.stderr


def test_skip_policy_fails_every_skip_but_an_optional_program(tmp_path):
    code, outcomes, out = _pytest(tmp_path / "mixed", _CASES)
    assert code == 1, out
    assert outcomes == {"test_plain_skip.py": "failure", "test_skipif.py": "error", "test_xfail.py": "failure",
                        "test_unknown_program.py": "failure",
                        "test_allowed.py": "skipped", "test_passes.py": "passed"}, out
    assert "skip (Skipped: no ffmpeg here): this suite fails on skips" in out
    assert "xfail (known bug)" in out and "not one of the optional programs" in out

    code, outcomes, out = _pytest(tmp_path / "allowed",
                                  {k: _CASES[k] for k in ("test_allowed.py", "test_passes.py")})
    assert code == 0 and outcomes == {"test_allowed.py": "skipped", "test_passes.py": "passed"}, out


def test_a_module_level_skip_or_an_empty_run_fails(tmp_path):
    # A module that skips at import is a collection error: the run stops (exit 2) instead of shrinking.
    code, _, out = _pytest(tmp_path / "module", {"test_module_skip.py": _MODULE_SKIP,
                                                  "test_passes.py": _CASES["test_passes.py"]})
    assert code == pytest.ExitCode.INTERRUPTED and "skip (Skipped: no data): this suite fails on skips" in out, out
    # Nothing collected is exit 5, which scripts/test.sh passes through as a failure.
    code, _, out = _pytest(tmp_path / "empty", {})
    assert code == pytest.ExitCode.NO_TESTS_COLLECTED, out


def test_optional_programs_are_listed_in_the_readme():
    readme = (REPO_ROOT / "README.md").read_text()
    missing = [name for name in OPTIONAL_PROGRAMS if f"`{name}`" not in readme]
    assert not missing, f"README.md does not list the optional programs {missing} (tests/skip_policy.py)"


# Built from parts so that this file's own text does not match.
_CONFLICT = re.compile("^(?:" + "<" * 7 + " |" + ">" * 7 + " |" + "=" * 7 + "$)", re.MULTILINE)


def test_no_file_holds_an_unresolved_merge_conflict():
    stuck = []
    for path in _project_files():
        data = path.read_bytes()
        if b"\0" in data:
            continue
        text = data.decode("utf-8", errors="replace")
        stuck += [f"{path.relative_to(REPO_ROOT)}:{text[:m.start()].count(chr(10)) + 1}" for m in _CONFLICT.finditer(text)]
    assert not stuck, "merge conflict markers left in: " + ", ".join(stuck)
