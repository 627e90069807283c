"""The mutant check (tools/mutants.py, tests/mutants.toml): the list stays applicable to the code as it is,
and the runner tells a caught bug from a surviving one."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tools import mutants

ROOT = Path(__file__).resolve().parents[2]


def test_every_mutant_applies_once_and_names_tests_that_exist():
    listed = mutants.load()
    assert len(listed) >= 15
    for mutant in listed:
        assert mutants.problem(mutant) is None, mutant.id
        assert mutant.why and mutant.tests, mutant.id
        for test in mutant.tests:
            path, _, name = test.partition("::")
            source = (ROOT / path).read_text()
            function = re.sub(r"\[.*\]$", "", name)
            assert re.search(rf"^def {re.escape(function)}\(", source, re.M), f"{mutant.id}: no {test}"


def test_a_snippet_that_is_missing_or_repeated_is_an_error():
    mutant = mutants.Mutant("x", "omni_core/memory.py", "ACTIVATION_COPIES = 4", "ACTIVATION_COPIES = 5", ("t",), "w")
    assert mutants.problem(mutant) == "the snippet occurs 0 times in omni_core/memory.py (must be exactly once)"
    repeated = mutants.Mutant("x", "omni_core/memory.py", "import", "export", ("t",), "w")
    assert re.fullmatch(r"the snippet occurs \d+ times in omni_core/memory.py \(must be exactly once\)",
                        mutants.problem(repeated))


def test_the_runner_tells_caught_from_survived(tmp_path):
    """A two-file repository: one bug its test catches, one it cannot see, one whose test does not exist."""
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "__init__.py").write_text("")
    (repo / "pkg" / "calc.py").write_text("def double(x):\n    return x * 2\n\n\ndef unused(x):\n    return x + 1\n")
    (repo / "test_calc.py").write_text("from pkg.calc import double\n\n\ndef test_double():\n    assert double(3) == 6\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "."], cwd=repo, check=True)
    copy, logs = tmp_path / "copy", tmp_path / "logs"
    copy.mkdir()
    logs.mkdir()
    for name in mutants.repository_files(repo):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_text((repo / name).read_text())
    listed = [
        mutants.Mutant("caught", "pkg/calc.py", "x * 2", "x * 3", ("test_calc.py",), "w"),
        mutants.Mutant("survives", "pkg/calc.py", "x + 1", "x + 2", ("test_calc.py",), "w"),
        mutants.Mutant("no-such-test", "pkg/calc.py", "x * 2", "x * 4", ("test_calc.py::test_triple",), "w"),
        mutants.Mutant("stale", "pkg/calc.py", "x * 5", "x * 6", ("test_calc.py",), "w"),
    ]
    outcomes = {o.mutant.id: o for o in mutants.check(listed, copy, logs, say=lambda _: None)}
    assert outcomes["caught"].verdict == "caught" and "test_double" in outcomes["caught"].caught_by
    assert outcomes["survives"].verdict == "survived"
    assert outcomes["no-such-test"].verdict == "error: pytest exited with 4"
    assert outcomes["stale"].verdict.startswith("error: the snippet occurs 0 times")
    assert (copy / "pkg" / "calc.py").read_text() == (repo / "pkg" / "calc.py").read_text(), "the copy is restored"
