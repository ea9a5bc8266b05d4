"""The nbgrader round trip with real commands in a temporary course folder.

generate_assignment -> release -> fetch/submit/collect (alice, bob) and copied submissions (carol,
dave and the hostile cases of test_grading_hostile.py) -> pregrade -> autograde -> report ->
generate_feedback -> export. The course is graded once (tests/grading.py) and shared by both files.
"""

import re

import nbformat
import pytest

from grading import graded_course, meta

CHAPTER = "01_tokens_and_embeddings"


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    return graded_course(CHAPTER, tmp_path_factory)


@pytest.mark.nbgrader
def test_exported_totals(graded):
    rows = graded.csv_rows()
    max_score = float(rows["alice"]["max_score"])
    assert max_score >= 10
    assert float(rows["alice"]["score"]) == max_score
    assert float(rows["bob"]["score"]) == 0.0
    assert float(rows["carol"]["score"]) == max_score - 2
    assert float(rows["dave"]["score"]) == max_score - 2


@pytest.mark.nbgrader
def test_wrong_answers_lose_exactly_their_exercise(graded):
    per_cell = {student: graded.cell_scores(student) for student in ("alice", "bob", "carol", "dave")}
    for grade_id, score in per_cell["alice"].items():
        assert score == graded.chapter.points[grade_id], f"alice lost points on {grade_id}"
    assert all(score == 0 for score in per_cell["bob"].values())
    assert {g for g, s in per_cell["carol"].items() if s < graded.chapter.points[g]} == {"ex1-check"}
    assert {g for g, s in per_cell["dave"].items() if s < graded.chapter.points[g]} == {"ex5-check"}


@pytest.mark.nbgrader
def test_hidden_tests_ran_and_feedback_explains_in_one_sentence(graded):
    autograded = graded.autograded("alice")
    check = next(c for c in autograded.cells if meta(c).get("grade_id") == "ex3-check")
    assert "BEGIN HIDDEN TESTS" in check.source, "autograde did not restore the hidden tests"
    assert "all 40 test inputs" in "".join(o.get("text", "") for o in check.outputs)
    assert "guard_for_grading" not in check.source, "the grader's guard line stayed in the graded notebook"

    feedback = (graded.course / "feedback" / "dave" / CHAPTER / f"{CHAPTER}.html").read_text()
    assert "used indexing with a tensor of ids (weight[ids]), a shortcut this exercise asks you to do without" in feedback
    assert not re.search(r"site-packages/torch", feedback), "feedback shows a torch traceback"
    assert "HIDDEN TESTS" not in feedback and "seed=7505" not in feedback, "feedback shows the hidden tests"


@pytest.mark.nbgrader
def test_submissions_came_through_the_exchange(graded):
    for student in ("alice", "bob"):
        folder = graded.course / "submitted" / student / CHAPTER
        assert (folder / "timestamp.txt").exists(), f"{student}'s submission was not collected by nbgrader collect"
        nbformat.read(folder / f"{CHAPTER}.ipynb", as_version=4)
