"""The suite's skip policy, a pytest plugin (registered by tests/conftest.py): a skipped test fails the run.

A test that skips because something is missing is a test that silently stops proving anything, so the only
skips allowed are those of `OPTIONAL_PROGRAMS`: external programs that no package registry provides or that the
machine must grant, which `scripts/setup.sh` therefore cannot install. The README lists the same entries. A test
skips for one of them only through `skip_without(name, detail)`; any other skip (a bare `pytest.skip`, a
`skipif` marker, `importorskip`, a module-level skip) and any xfail is reported as a failure that names the reason.
"""
from __future__ import annotations

import re
from typing import NoReturn

import pytest

# name -> what it is and how a user provides it (the README's "Optional programs" section says the same).
OPTIONAL_PROGRAMS: dict[str, str] = {
    "stanford-corenlp-3.6.0": "the Stanford CoreNLP 3.6.0 jars SPICE needs (stanford-corenlp-3.6.0.jar and "
                              "stanford-corenlp-3.6.0-models.jar); no package registry has them: put them in a "
                              "directory and set AVCAP_SPICE_JARS to it",
    "mount-tmpfs": "mount(8) of a 2 MiB tmpfs for the full-disk tests (a read-only one for the read-only --out "
                   "test); needs root or CAP_SYS_ADMIN (a container needs --cap-add SYS_ADMIN)",
}

_PREFIX = "optional program "
_ALLOWED = re.compile(re.escape(_PREFIX) + r"'([^']+)' unavailable: ")


def skip_without(program: str, detail: str) -> NoReturn:
    """Skip the calling test because the optional `program` is missing; `detail` says what was tried."""
    __tracebackhide__ = True   # the skip is reported at the caller's line
    if program not in OPTIONAL_PROGRAMS:
        raise KeyError(f"skip_without({program!r}): not one of the optional programs {sorted(OPTIONAL_PROGRAMS)}")
    pytest.skip(f"{_PREFIX}{program!r} unavailable: {detail}")


def allowed_skip(reason: str) -> bool:
    m = _ALLOWED.search(reason)
    return bool(m) and m.group(1) in OPTIONAL_PROGRAMS


def _reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:   # (path, line, "Skipped: reason")
        return str(longrepr[2])
    return str(longrepr)


def _refuse(report) -> None:
    if not report.skipped:
        return
    reason = _reason(report)
    if hasattr(report, "wasxfail"):
        what = f"xfail ({report.wasxfail or 'no reason given'})"
        del report.wasxfail       # else reporters take the failed report for an unexpected pass
    elif allowed_skip(reason):
        return
    else:
        what = f"skip ({reason})"
    report.outcome = "failed"
    report.longrepr = (f"{what}: this suite fails on skips. Only the optional programs of tests/skip_policy.py "
                       f"({', '.join(sorted(OPTIONAL_PROGRAMS))}) may be missing, through skip_without(); "
                       "anything else must be installed by scripts/setup.sh or made to run.")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _refuse(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _refuse(report)
    return report
