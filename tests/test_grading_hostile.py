"""Autograding that instructors can trust: broken and hostile submissions, each with a defined outcome.

Every case in ``grading.CASES`` is a submission built from the chapter's own student notebook
(see tests/grading.py) and graded in one ``nbgrader autograde`` batch together with the round-trip
students of test_nbgrader.py. For each case the test checks the score of every graded cell, the
total in nbgrader's CSV export, and the verdict of ``python -m utils.grading report`` ("ok", or
"review" with a readable reason). The batch must finish, and no case may change another student's
grade. The fast tests at the end check the pieces without nbgrader: the checks' guard inside an
IPython shell, the code scan, and that every check cell has hidden tests on fresh inputs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import nbformat
import pytest

import grading
from grading import CASES, GRADED_CHAPTERS, ROOT, graded_course, meta

CASE_IDS = [case.student for case in CASES]


@pytest.fixture(scope="module", params=GRADED_CHAPTERS)
def graded(request, tmp_path_factory):
    return graded_course(request.param, tmp_path_factory)


# ---------------------------------------------------------------- the batch


@pytest.mark.nbgrader
def test_the_batch_finishes_and_grades_every_notebook(graded):
    log = graded.autograde.stdout + graded.autograde.stderr
    assert graded.autograde.returncode == 0, log[-3000:]
    assert "There was an error processing assignment" not in log
    gradable = {"alice", "bob", "carol", "dave"} | {c.student for c in CASES} - {"x-missing", "x-garbage"}
    graded_students = {p.parent.parent.name for p in (graded.course / "autograded").glob("*/*/*.ipynb")}
    assert graded_students == gradable
    feedback = {p.parent.parent.name for p in (graded.course / "feedback").glob("*/*/*.html")}
    assert feedback == gradable


@pytest.mark.nbgrader
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_outcome(graded, case):
    chapter = graded.chapter
    expected = chapter.scores(case.zero(chapter))
    rows, report = graded.csv_rows(), graded.report_rows()
    assert case.student in rows, f"{case.student} has no row in grades.csv"
    if (graded.course / "autograded" / case.student).exists():
        assert graded.cell_scores(case.student) == expected, f"{case.student}: {case.outcome}"
    assert float(rows[case.student]["score"]) == sum(expected.values())
    assert float(rows[case.student]["max_score"]) == chapter.max_score
    row = report[case.student]
    assert row["status"] == case.status, f"{case.student}: {row['reasons']}"
    said = row["reasons"] + " " + row["notes"]
    for phrase in case.reasons:
        assert phrase in said, f"{case.student}: expected {phrase!r} in the report, got: {said}"


@pytest.mark.nbgrader
def test_no_case_touches_another_students_grade(graded):
    """The correct and blank submissions, graded in the same batch as every hostile one, keep their scores."""
    chapter = graded.chapter
    assert graded.cell_scores("alice") == chapter.scores()
    assert all(score == 0 for score in graded.cell_scores("bob").values())
    report = graded.report_rows()
    for student in ("alice", "bob", "carol", "dave"):
        assert report[student]["status"] == "ok", report[student]["reasons"]
        assert not report[student]["notes"], report[student]["notes"]
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{graded.course / 'gradebook.db'}") as gb:
        assert gb.find_assignment(chapter.name).max_score == chapter.max_score, "max scores were rewritten"


@pytest.mark.nbgrader
def test_flagged_submissions_are_marked_for_manual_grading(graded):
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{graded.course / 'gradebook.db'}") as gb:
        for case in CASES:
            if case.status != "review" or not (graded.course / "autograded" / case.student).exists():
                continue
            notebook = gb.find_submission_notebook(graded.chapter.name, graded.chapter.name, case.student)
            assert notebook.needs_manual_grade, f"{case.student} is not marked for manual grading"
        alice = gb.find_submission_notebook(graded.chapter.name, graded.chapter.name, "alice")
        assert not alice.needs_manual_grade


@pytest.mark.nbgrader
def test_hard_coded_answers_pass_the_visible_checks_only(graded):
    notebook = graded.autograded("x-hard-coded")
    for exercise in graded.chapter.exercises:
        cell = next(c for c in notebook.cells if meta(c).get("grade_id") == exercise.checks[0])
        printed = "".join(o.get("text", "") for o in cell.outputs)
        errors = [o for o in cell.outputs if o.get("output_type") == "error"]
        assert "✓" in printed, f"the visible check of {exercise.answer} did not pass the hard-coded answer"
        assert errors, f"the hidden tests of {exercise.answer} let the hard-coded answer through"


@pytest.mark.nbgrader
def test_shortcuts_and_tampering_are_explained_in_one_sentence(graded):
    feedback = (graded.course / "feedback" / "x-shortcut" / graded.chapter.name / f"{graded.chapter.name}.html")
    text = feedback.read_text()
    assert "the course&#39;s own utils." in text or "the course's own utils." in text
    deep = graded.autograded("x-patch-deep")
    first = graded.chapter.independent()[0].checks[0]
    cell = next(c for c in deep.cells if meta(c).get("grade_id") == first)
    error = next(o for o in cell.outputs if o.get("output_type") == "error")
    assert error["ename"] == "CheckFailed" and "while it was being checked" in error["evalue"]


@pytest.mark.nbgrader
def test_output_is_capped_and_feedback_stays_small(graded):
    for student in ("x-noisy", "x-loop", "x-exit"):
        name = graded.chapter.name
        notebook = graded.course / "autograded" / student / name / f"{name}.ipynb"
        feedback = graded.course / "feedback" / student / name / f"{name}.html"
        assert notebook.stat().st_size < 1_000_000 and feedback.stat().st_size < 2_000_000


@pytest.mark.nbgrader
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the memory cap is Linux's RLIMIT_DATA")
def test_the_memory_cap_turns_a_blow_up_into_an_error_in_that_cell(graded):
    notebook = graded.autograded("x-memory")
    check = graded.chapter.independent()[0].checks[0]
    cell = next(c for c in notebook.cells if meta(c).get("grade_id") == check)
    error = next(o for o in cell.outputs if o.get("output_type") == "error")
    assert "allocate memory" in error["evalue"] or "MemoryError" in error["evalue"], error["evalue"]


@pytest.mark.nbgrader
def test_a_dead_kernel_leaves_a_readable_reason_in_the_feedback(graded):
    notebook = graded.autograded("x-exit")
    reasons = [o["evalue"] for c in notebook.cells if c.cell_type == "code" for o in c.outputs
               if o.get("output_type") == "error" and o["ename"] in ("KernelDied", "NotRun")]
    assert reasons and all("the kernel died" in r.lower() for r in reasons)


@pytest.mark.nbgrader
def test_throughput_benchmark_runs(graded):
    """The benchmark of benchmarks/grading_throughput.py, on two submissions of the course graded above."""
    done = subprocess.run([sys.executable, "benchmarks/grading_throughput.py", "--submissions", "2",
                           "--course", str(graded.course), "--corpus-chars", str(grading.CORPUS_CHARS)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.search(r"2 notebooks autograded in [\d.]+ s: [\d.]+ s per notebook", done.stdout), done.stdout


# ---------------------------------------------------------------- the pieces, without nbgrader


SHELL = """
import contextlib, io, json, sys
from IPython.core.interactiveshell import InteractiveShell

shell = InteractiveShell.instance()
results = []
for source in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        error = shell.run_cell(source, store_history=False).error_in_exec
    results.append({"error": type(error).__name__ if error else None, "message": str(error or ""),
                    "out": out.getvalue()})
print("RESULTS" + json.dumps(results))
"""


def in_shell(*cells: str) -> list[dict]:
    """Run cells in a fresh IPython shell (its own process), after the set-up cell's import, as a notebook would."""
    done = subprocess.run([sys.executable, "-c", SHELL, json.dumps(["from utils import checks\nimport torch", *cells])],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "RESULTS" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(done.stdout.split("RESULTS", 1)[1])[1:]


WRONG_MERGE = "def merge_pair(ids, pair, new_id):\n    return list(ids)\n"
RIGHT_MERGE = ("def merge_pair(ids, pair, new_id):\n    out, i = [], 0\n    while i < len(ids):\n"
               "        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == tuple(pair):\n"
               "            out.append(new_id)\n            i += 2\n"
               "        else:\n            out.append(ids[i])\n            i += 1\n    return out\n")


def test_guard_restores_replaced_checks_before_the_next_cell():
    patch, check, compare = in_shell(
        WRONG_MERGE + "checks.ch01.check_merge_pair = lambda *a, **k: None\n"
                      "torch.allclose = lambda *a, **k: True\nchecks = None",
        "checks.ch01.check_merge_pair(merge_pair)",
        "print(torch.allclose(torch.zeros(1), torch.ones(1)))")
    assert patch["error"] is None
    assert check["error"] == "CheckFailed", check
    assert "were replaced by code in this notebook" in check["out"] and "check_merge_pair" in check["out"]
    assert compare["out"].strip() == "False"


def test_a_function_that_patches_while_checked_fails():
    (result,) = in_shell("def merge_pair(ids, pair, new_id):\n"
                         "    checks.core.difference = lambda *a, **k: None\n    return list(ids)\n"
                         "checks.ch01.check_merge_pair(merge_pair)")
    assert result["error"] == "CheckFailed" and "while it was being checked" in result["message"], result


def test_grading_guard_reinstalls_a_removed_hook():
    _, graded, hooks = in_shell(
        WRONG_MERGE + "get_ipython().events.callbacks['pre_run_cell'].clear()\n"
                      "checks.ch01.check_merge_pair = lambda *a, **k: None",
        "from utils.checks import core as _c\n_c.guard_for_grading(globals())\n"
        "checks.ch01.check_merge_pair(merge_pair)",
        "print(len(_c._hooks(get_ipython())))")
    assert graded["error"] == "CheckFailed", graded
    assert "the course's pre-run hook" in graded["out"]
    assert hooks["out"].strip() == "1"


def test_correct_work_sees_no_guard_notes():
    """Libraries that wrap torch functions on import (torch._dynamo, transformers) are not taken for tampering."""
    imports, check = in_shell("import matplotlib.pyplot\nimport transformers\nimport torch._dynamo\n" + RIGHT_MERGE,
                              "checks.ch01.check_merge_pair(merge_pair)")
    assert imports["error"] is None and check["error"] is None, (imports, check)
    assert "Note from the course" not in imports["out"] + check["out"] and "all 8 test inputs" in check["out"]


@pytest.mark.parametrize("chapter", GRADED_CHAPTERS)
def test_the_code_scan_stays_quiet_on_the_solutions(chapter):
    from utils.grading import _imported_names, scan_code

    notebook = nbformat.read(ROOT / "solutions" / chapter / f"{chapter}.ipynb", as_version=4)
    imported = _imported_names(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code" and meta(cell).get("solution"):
            assert scan_code(cell.source, imported) == [], meta(cell)["grade_id"]


def test_the_code_scan_names_each_trick():
    from utils.grading import scan_code

    imported = {"checks", "torch", "F", "sys", "builtins"}
    cases = {
        "checks.ch01.check_x = None": "replaces `checks.ch01.check_x`",
        "torch.testing.assert_close = print": "replaces `torch.testing.assert_close`",
        "setattr(torch, 'allclose', print)": "calls setattr on `torch`",
        "checks = 3": "rebinds the name `checks`",
        "import os\nos._exit(1)": "ends the kernel",
        "from os import _exit": "imports os._exit",
        "import sqlite3": "imports sqlite3",
        "open('../../../gradebook.db')": "names the grader's files",
        "sys.modules['utils.checks'] = None": "writes into `sys.modules`",
        "f = merge_pair.__code__": "reaches `__code__`",
        "get_ipython().events.callbacks.clear()": "drives the IPython shell",
    }
    for source, phrase in cases.items():
        found = " ".join(scan_code(source, imported))
        assert phrase in found, f"{source!r}: {found}"


@pytest.mark.parametrize("chapter", GRADED_CHAPTERS)
def test_every_check_cell_has_hidden_tests_on_fresh_inputs(chapter):
    """Hard-coding the visible tests cannot pass: each graded cell runs hidden checks with other seeds."""
    notebook = nbformat.read(ROOT / "solutions" / chapter / f"{chapter}.ipynb", as_version=4)
    for cell in notebook.cells:
        if not meta(cell).get("grade"):
            continue
        visible, _, hidden = cell.source.partition("### BEGIN HIDDEN TESTS")
        assert hidden, f"{meta(cell)['grade_id']} has no hidden tests"
        seeds = set(re.findall(r"seed=(\d+)", hidden)) - set(re.findall(r"seed=(\d+)", visible))
        assert seeds or "expect(" in hidden, f"{meta(cell)['grade_id']}: the hidden tests reuse the visible inputs"
