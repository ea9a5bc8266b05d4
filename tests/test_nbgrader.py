"""The nbgrader round trip with real commands in a temporary course folder.

generate_assignment -> submissions (correct, blank, wrong) -> autograde -> generate_feedback -> export.
"""

import csv
import re
import shutil

import nbformat
import pytest
from nbgrader.api import Gradebook

from conftest import ROOT, nbgrader, nbgrader_meta

CHAPTER = "01_tokens_and_embeddings"
WRONG_ANSWERS = {
    # a wrong value: decode shifts every id by one
    "ex1-char-tokenizer": '''
def encode_chars(text, vocab):
    index_of = {ch: i for i, ch in enumerate(vocab)}
    return [index_of[ch] for ch in text]


def decode_chars(ids, vocab):
    return "".join(vocab[(i + 1) % len(vocab)] for i in ids)
''',
    # the forbidden shortcut: a lookup instead of the one-hot product
    "ex5-embed-one-hot": '''
def embed_one_hot(ids, weight):
    return weight[ids]
''',
}


def solution_answers(solution_path):
    """grade_id -> the solution's code with the nbgrader markers removed, as a student would write it."""
    answers = {}
    for cell in nbformat.read(solution_path, as_version=4).cells:
        if nbgrader_meta(cell).get("solution"):
            lines = [line for line in cell.source.splitlines() if "### BEGIN SOLUTION" not in line
                     and "### END SOLUTION" not in line]
            answers[nbgrader_meta(cell)["grade_id"]] = "\n".join(lines)
    return answers


def submit(course, student, release_path, answers):
    """Write a student's submission: the released notebook with some answer cells filled in."""
    notebook = nbformat.read(release_path, as_version=4)
    for cell in notebook.cells:
        grade_id = nbgrader_meta(cell).get("grade_id")
        if grade_id in answers:
            cell.source = answers[grade_id]
    folder = course / "submitted" / student / CHAPTER
    folder.mkdir(parents=True)
    nbformat.write(notebook, folder / release_path.name)


@pytest.fixture(scope="module")
def graded_course(tmp_path_factory):
    course = tmp_path_factory.mktemp("course")
    shutil.copy(ROOT / "nbgrader_config.py", course)
    shutil.copytree(ROOT / "solutions" / CHAPTER, course / "solutions" / CHAPTER)
    nbgrader("generate_assignment", CHAPTER, "--force", cwd=course)

    release = course / "chapters" / CHAPTER / f"{CHAPTER}.ipynb"
    correct = solution_answers(ROOT / "solutions" / CHAPTER / f"{CHAPTER}.ipynb")
    submit(course, "alice", release, correct)                                   # everything right
    submit(course, "bob", release, {})                                          # untouched
    submit(course, "carol", release, {**correct, "ex1-char-tokenizer": WRONG_ANSWERS["ex1-char-tokenizer"]})
    submit(course, "dave", release, {**correct, "ex5-embed-one-hot": WRONG_ANSWERS["ex5-embed-one-hot"]})

    nbgrader("autograde", CHAPTER, "--force", cwd=course, timeout=900)
    nbgrader("generate_feedback", CHAPTER, "--force", cwd=course)
    nbgrader("export", cwd=course)
    return course


def scores(course):
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        result = {}
        for student in ("alice", "bob", "carol", "dave"):
            submission = gradebook.find_submission_notebook(CHAPTER, CHAPTER, student)
            result[student] = {grade.name: (grade.score, grade.max_score) for grade in submission.grades}
        return result


@pytest.mark.nbgrader
def test_exported_totals(graded_course):
    rows = {row["student_id"]: row for row in csv.DictReader(open(graded_course / "grades.csv"))}
    max_score = float(rows["alice"]["max_score"])
    assert max_score >= 10
    assert float(rows["alice"]["score"]) == max_score
    assert float(rows["bob"]["score"]) == 0.0
    assert float(rows["carol"]["score"]) == max_score - 2
    assert float(rows["dave"]["score"]) == max_score - 2


@pytest.mark.nbgrader
def test_wrong_answers_lose_exactly_their_exercise(graded_course):
    per_cell = scores(graded_course)
    for grade_id, (score, max_score) in per_cell["alice"].items():
        assert score == max_score, f"alice lost points on {grade_id}"
    assert all(score == 0 for score, _ in per_cell["bob"].values())
    assert {g for g, (s, m) in per_cell["carol"].items() if s < m} == {"ex1-check"}
    assert {g for g, (s, m) in per_cell["dave"].items() if s < m} == {"ex5-check"}


@pytest.mark.nbgrader
def test_hidden_tests_ran_and_feedback_explains_in_one_sentence(graded_course):
    autograded = nbformat.read(graded_course / "autograded" / "alice" / CHAPTER / f"{CHAPTER}.ipynb", as_version=4)
    check = next(c for c in autograded.cells if nbgrader_meta(c).get("grade_id") == "ex3-check")
    assert "BEGIN HIDDEN TESTS" in check.source, "autograde did not restore the hidden tests"
    assert "all 40 test inputs" in "".join(o.get("text", "") for o in check.outputs)

    feedback = (graded_course / "feedback" / "dave" / CHAPTER / f"{CHAPTER}.html").read_text()
    assert "used indexing with a tensor of ids (weight[ids]), a shortcut this exercise asks you to do without" in feedback
    assert not re.search(r"site-packages/torch", feedback), "feedback shows a torch traceback"
