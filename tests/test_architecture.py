"""The one-way architecture is enforced: import-linter's layers contracts in pyproject.toml hold, the global
contract names every module of the packages, and nothing imports the thin entry points flows.py and train.py."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "shards", "avcap", "demo")


def _contracts() -> list[dict]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_lint_imports_keeps_every_contract():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is part of the test extra (scripts/setup.sh installs it)"
    r = subprocess.run([exe, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and "0 broken" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]


def test_the_global_layers_name_every_module_and_nothing_is_ignored():
    contracts = _contracts()
    assert all("ignore_imports" not in c for c in contracts)
    named = {m.strip() for layer in contracts[0]["layers"] for m in layer.replace(":", "|").split("|")}
    modules = {f"{pkg}.{p.stem}" for pkg in PACKAGES for p in (REPO / pkg).glob("*.py") if p.stem != "__init__"}
    assert named == modules, f"missing: {sorted(modules - named)}; unknown: {sorted(named - modules)}"
    assert {c.get("containers", [None])[0] for c in contracts[1:]} == set(PACKAGES)
    assert all(c.get("exhaustive") is True for c in contracts[1:])


def test_no_module_imports_the_entry_points():
    offenders = []
    for path in REPO.glob("**/*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in (".venv", "build") or rel.name in ("flows.py", "train.py") and len(rel.parts) == 1:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{rel}:{node.lineno} imports {n}" for n in names if n in ("flows", "train")]
    assert not offenders, offenders


def test_project_modules_are_imported_at_module_level():
    """An import inside a function hides an edge from import-linter's reading of the module, and an import cycle
    with it. Only a heavy optional dependency may be imported there, and project modules never are, unless the
    line says why (`# lazy: ...` on it or just above it)."""
    offenders = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).glob("*.py")):
            text = path.read_text(encoding="utf-8")
            lines = text.splitlines()
            tree = ast.parse(text)
            for fn in ast.walk(tree):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(fn):
                    names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                             else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                    if isinstance(node, ast.ImportFrom) and node.level:
                        names = ["(relative)"]
                    ours = [n for n in names if n == "(relative)" or n.split(".")[0] in PACKAGES]
                    if ours and "# lazy:" not in " ".join(lines[max(0, node.lineno - 2):node.lineno]):
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {', '.join(ours)}")
    assert not offenders, sorted(set(offenders))
