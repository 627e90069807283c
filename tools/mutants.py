"""The mutant check: plants each bug of a curated list (tests/mutants.toml) in a copy of the repository, one
at a time, runs the tests that should catch it, and fails if any bug survives.

    python tools/mutants.py                      # every mutant; writes nothing
    python tools/mutants.py --out bench/results/mutants.md
    python tools/mutants.py --only offload-keeps-every-block fp8-rounds-through-e5m2
    python tools/mutants.py --list

Each entry names a file, an exact snippet that must occur there exactly once (so the list cannot rot
silently when the code changes: a missing or repeated snippet is an error), its replacement, the tests
that must fail with it, and why the bug matters. The copy holds the tracked (and untracked, not ignored)
files; `.build` (the environment, ComfyUI, the test models) is linked, never copied or changed. The named
tests first run once on the unmutated copy: a mutant only counts as caught by tests that pass without it.
Exit status 0 when every mutant is caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "tests" / "mutants.toml"
PYTHON = ROOT / ".build" / "venv" / "bin" / "python"
PYTEST = ["-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
TIMEOUT_S = 1800  # per mutant: a bug that hangs a test counts as caught (the suite would not pass)


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    why: str


@dataclass
class Outcome:
    mutant: Mutant
    verdict: str  # caught, survived, timeout (caught), or an error in the list
    seconds: float
    detail: str = ""
    caught_by: str = ""  # the first test that failed


def load(path: Path = LIST) -> list[Mutant]:
    entries = tomllib.loads(path.read_text())["mutant"]
    mutants = []
    for entry in entries:
        unknown = set(entry) - {"id", "file", "original", "replacement", "tests", "why"}
        if unknown:
            raise ValueError(f"mutant {entry.get('id')}: unknown keys {sorted(unknown)}")
        mutants.append(Mutant(entry["id"], entry["file"], entry["original"], entry["replacement"],
                              tuple(entry["tests"]), entry["why"].strip()))
    ids = [m.id for m in mutants]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate mutant ids in {path}")
    return mutants


def problem(mutant: Mutant, root: Path = ROOT) -> str | None:
    """Why the mutant cannot be applied to the code as it is now, or None."""
    path = root / mutant.file
    if not path.is_file():
        return f"{mutant.file} does not exist"
    count = path.read_text().count(mutant.original)
    if count != 1:
        return f"the snippet occurs {count} times in {mutant.file} (must be exactly once)"
    if mutant.original == mutant.replacement:
        return "the replacement is the original"
    return None


def repository_files(root: Path = ROOT) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True)
    return [name for name in out.stdout.decode().split("\0") if name and (root / name).is_file()]


def make_copy(target: Path, root: Path = ROOT) -> None:
    for name in repository_files(root):
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, destination)
    (target / ".build").symlink_to(root / ".build", target_is_directory=True)


def run_tests(copy: Path, tests: list[str], log_path: Path) -> tuple[int | None, float]:
    """pytest's exit status (None on timeout) and the seconds it took; its output goes to log_path."""
    command = [str(PYTHON), *PYTEST, *tests]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    start = time.perf_counter()
    with log_path.open("w") as log:
        try:
            status = subprocess.run(command, cwd=copy, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    timeout=TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            status = None
    return status, time.perf_counter() - start


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def first_failure(path: Path) -> str:
    """The first failed test of pytest's short summary (FAILED/ERROR node id)."""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1].split(" - ", 1)[0]
    return ""


def check(mutants: list[Mutant], copy: Path, logs: Path, say=print) -> list[Outcome]:
    outcomes = []
    for mutant in mutants:
        reason = problem(mutant, copy)
        if reason:
            outcomes.append(Outcome(mutant, f"error: {reason}", 0.0))
            say(f"{mutant.id}: ERROR {reason}")
            continue
        path = copy / mutant.file
        pristine = path.read_text()
        path.write_text(pristine.replace(mutant.original, mutant.replacement))
        try:
            status, seconds = run_tests(copy, list(mutant.tests), logs / f"{mutant.id}.log")
        finally:
            path.write_text(pristine)
        # 1: a test failed; 2: collection failed (the mutant broke an import). 4 and 5 mean the list names
        # tests that do not exist or selects none: an error in the list, not a catch.
        if status is None:
            verdict = "timeout (caught)"
        elif status in (1, 2):
            verdict = "caught"
        elif status == 0:
            verdict = "survived"
        else:
            verdict = f"error: pytest exited with {status}"
        log = logs / f"{mutant.id}.log"
        detail = tail(log) if verdict != "caught" else ""
        outcomes.append(Outcome(mutant, verdict, seconds, detail, first_failure(log) if verdict == "caught" else ""))
        say(f"{mutant.id}: {verdict} ({seconds:.0f} s)")
    return outcomes


def markdown(outcomes: list[Outcome], baseline_s: float, total_s: float, command: str) -> str:
    caught = sum(o.verdict.startswith(("caught", "timeout")) for o in outcomes)
    lines = [
        "# Mutant check",
        "",
        f"`{command}` on this repository's tests/mutants.toml: {caught} of {len(outcomes)} planted bugs caught, "
        f"{total_s / 60:.1f} min in all (the named tests on the unmutated copy first: {baseline_s:.0f} s).",
        "",
        "| mutant | file | verdict | seconds | tests run | first failure | why it matters |",
        "| --- | --- | --- | ---: | --- | --- | --- |",
    ]
    for o in outcomes:
        tests = "<br>".join(f"`{t}`" for t in o.mutant.tests)
        why = " ".join(o.mutant.why.split())
        failed = f"`{o.caught_by}`" if o.caught_by else ""
        lines.append(f"| `{o.mutant.id}` | `{o.mutant.file}` | {o.verdict} | {o.seconds:.0f} | {tests} | {failed} | {why} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="ID", help="run these mutants only")
    parser.add_argument("--list", action="store_true", help="list the mutants and check their snippets, run nothing")
    parser.add_argument("--out", type=Path, help="write the results as markdown here")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip running the named tests on the unmutated copy first")
    args = parser.parse_args(argv)
    mutants = load()
    if args.only:
        unknown = set(args.only) - {m.id for m in mutants}
        if unknown:
            parser.error(f"unknown mutant ids: {sorted(unknown)}")
        mutants = [m for m in mutants if m.id in args.only]
    problems = {m.id: problem(m) for m in mutants if problem(m)}
    if args.list or problems:
        for m in mutants:
            print(f"{m.id:40s} {m.file}: {problems.get(m.id) or 'ok'}")
        return 1 if problems else 0

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="omni-mutants-") as tmp:
        copy, logs = Path(tmp) / "repo", Path(tmp) / "logs"
        copy.mkdir()
        logs.mkdir()
        make_copy(copy)
        baseline_s = 0.0
        if not args.no_baseline:
            tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
            status, baseline_s = run_tests(copy, tests, logs / "baseline.log")
            print(f"baseline (unmutated): pytest exited with {status} ({baseline_s:.0f} s)")
            if status != 0:
                print(tail(logs / "baseline.log", 40))
                print("the named tests must pass on the unmutated code before a failure can count as a catch")
                return 1
        outcomes = check(mutants, copy, logs)
    total_s = time.perf_counter() - started
    command = "python tools/mutants.py" + (f" --only {' '.join(args.only)}" if args.only else "")
    text = markdown(outcomes, baseline_s, total_s, command)
    if args.out:
        args.out.write_text(text)
    for o in outcomes:
        if o.detail:
            print(f"--- {o.mutant.id}: {o.verdict}\n{o.detail}")
    print(text)
    return 0 if all(o.verdict.startswith(("caught", "timeout")) for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
