"""Every notebook runs top to bottom on CPU: solutions cleanly, student versions failing only in their checks."""

import pytest
from conftest import (
    CHAPTER_NOTEBOOKS,
    SOLUTION_NOTEBOOKS,
    errors_of,
    execute_notebook,
    executed_solution,
    nbgrader_meta,
)

# Chapter 01 must run in under 2 minutes on a laptop CPU; later chapters in under 5.
TIME_LIMIT_SECONDS = {"01_tokens_and_embeddings": 120}
DEFAULT_LIMIT_SECONDS = 300


@pytest.mark.notebook
@pytest.mark.parametrize("path", SOLUTION_NOTEBOOKS, ids=lambda p: p.parent.name)
def test_solution_notebook_runs_clean(path):
    notebook, seconds = executed_solution(path)  # shared with the book test (test_book.py)
    limit = TIME_LIMIT_SECONDS.get(path.parent.name, DEFAULT_LIMIT_SECONDS)
    assert seconds < limit, f"{path.name} took {seconds:.0f} s, over its {limit} s budget"
    for cell in notebook.cells:
        if nbgrader_meta(cell).get("grade"):
            text = "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")
            assert "✓" in text, f"check cell {nbgrader_meta(cell)['grade_id']} printed no success line"
    print(f"{path.name}: {seconds:.1f} s")


@pytest.mark.notebook
@pytest.mark.parametrize("path", CHAPTER_NOTEBOOKS, ids=lambda p: p.parent.name)
def test_student_notebook_fails_only_in_its_checks(path):
    notebook = execute_notebook(path, allow_errors=True)
    graded = {nbgrader_meta(c)["grade_id"] for c in notebook.cells if nbgrader_meta(c).get("grade")}
    failing = {}
    for index, cell in enumerate(notebook.cells):
        for error in errors_of(cell):
            grade_id = nbgrader_meta(cell).get("grade_id", f"cell {index}")
            failing[grade_id] = error
    assert graded, "the student notebook has no graded check cells"
    assert set(failing) == graded, f"cells failing: {sorted(failing)}; check cells: {sorted(graded)}"
    for grade_id, error in failing.items():
        assert error["ename"] in ("ExerciseNotDone", "NotImplementedError"), f"{grade_id}: {error['ename']}: {error['evalue']}"
        assert "not implemented yet" in error["evalue"]
        assert len(error["traceback"]) == 1, f"{grade_id} shows a traceback instead of one sentence"
