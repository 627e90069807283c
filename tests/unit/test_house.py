"""The shape of the code that later work relies on: one seam for where a run executes, typed state, no dead
code, nothing but source in the repository."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "omni_core"
# Names this code base gives recipe entries when it walks a recipe.
ENTRY_NAMES = {"e", "entry", "entries", "accelerator", "existing", "layout"}


def _function(path: Path, name: str) -> ast.FunctionDef:
    return next(node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)
                and node.name == name)


def test_a_run_reads_check_get_the_executor_run_report():
    generate = _function(CORE / "runtime.py", "generate")
    assert generate.end_lineno - generate.lineno + 1 <= 40, "runtime.generate fits on one screen"
    branches = [node for node in ast.walk(generate) if isinstance(node, (ast.If, ast.IfExp, ast.Match, ast.Try))]
    assert not branches, f"runtime.generate branches at line(s) {[b.lineno for b in branches]}"
    calls = {node.func.attr for node in ast.walk(generate) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute)}
    assert {"get", "generate"} <= calls, "it gets the executor from the store and runs it"


def test_no_recipe_entry_is_asked_what_it_is_by_its_attributes():
    found = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
                    and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in ENTRY_NAMES):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"duck-typed recipe entries at {found}: declare the kind (ExecutionLayout, load_time, ...)"


def test_state_kept_with_a_loaded_model_is_typed():
    """No untyped dict of live objects handed between modules (it was `state["placement"]`, `state["pool"]`)."""
    bags = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and node.target.id in ("state", "derived") and "dict" in ast.unparse(node.annotation)):
                bags.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bags, f"string-keyed state at {bags}"
    from omni_core.load_state import LoadingModel, LoadState

    assert LoadingModel.__dataclass_fields__["state"].type in ("LoadState", LoadState)


def test_the_repository_holds_no_archives_or_wheels():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    archives = [f for f in files if f.endswith((".whl", ".zip", ".tar", ".tar.gz", ".tgz", ".egg", ".7z", ".rar"))]
    assert files and not archives, archives


def test_no_function_that_nothing_calls_and_no_unused_import():
    """vulture finds definitions nothing refers to; the whitelist names what ComfyUI, torch or diffusers call."""
    paths = ["omni_core", "nodes", "tools", "bench", "tests", "__init__.py"]  # tests/ holds the whitelist
    dead = subprocess.run([sys.executable, "-m", "vulture", *paths, "--min-confidence", "60"], cwd=ROOT,
                          capture_output=True, text=True)
    assert dead.returncode == 0, dead.stdout + dead.stderr
    unused = subprocess.run([sys.executable, "-m", "pyflakes", "omni_core", "nodes", "tools", "bench", "tests",
                             "__init__.py"], cwd=ROOT, capture_output=True, text=True)
    assert unused.returncode == 0, unused.stdout + unused.stderr
