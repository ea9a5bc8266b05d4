"""Shared helpers for the test suite: paths, running notebooks, and nbgrader commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # tests import tools/chapters.py
sys.path.insert(0, str(ROOT / "benchmarks"))  # and the benchmarks' plain baselines

# The suite runs as `.venv/bin/python -m pytest` without activating the environment; nbgrader
# shells out to tools installed beside this interpreter (alembic), so put them on PATH as activation would.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
# The one documented switch that shortens long training loops (see utils/__init__.py); checks still run in full.
os.environ.setdefault("COURSE_QUICK", "1")

SOLUTION_NOTEBOOKS = sorted(ROOT.glob("solutions/*/*.ipynb"))
CHAPTER_NOTEBOOKS = sorted(ROOT.glob("chapters/*/*.ipynb"))


def execute_notebook(path: Path, allow_errors: bool = False, timeout: int = 300) -> nbformat.NotebookNode:
    """Execute a notebook in its own folder with the real kernel, as a learner would; return it with outputs."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=allow_errors,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    return notebook


_EXECUTED_SOLUTIONS: dict[Path, tuple[nbformat.NotebookNode, float]] = {}


def executed_solution(path: Path) -> tuple[nbformat.NotebookNode, float]:
    """An instructor notebook executed once per test session, and the seconds that took.

    The notebook tests check it; the book test renders the same executions instead of running
    every chapter a second time. Callers get a copy they may change.
    """
    import copy
    import time

    if path not in _EXECUTED_SOLUTIONS:
        start = time.perf_counter()
        notebook = execute_notebook(path)
        _EXECUTED_SOLUTIONS[path] = (notebook, time.perf_counter() - start)
    notebook, seconds = _EXECUTED_SOLUTIONS[path]
    return copy.deepcopy(notebook), seconds


def errors_of(cell) -> list:
    return [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]


def nbgrader(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a real ``nbgrader`` command in ``cwd`` with this interpreter; fail with its output if it fails."""
    done = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"nbgrader {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def nbgrader_meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def copy_of(fn):
    """The same code as a learner's own function object (the reference itself counts as a shortcut)."""
    import types

    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__)


def rejection(check, answer) -> str:
    """The one-line message ``check(answer)`` fails with; it must never print a tensor."""
    from utils import checks

    with pytest.raises(checks.CheckFailed) as info:
        check(answer)
    message = str(info.value)
    assert "\n" not in message, "a check message must be one line"
    assert "tensor(" not in message, "a check message must never print a tensor"
    return message
