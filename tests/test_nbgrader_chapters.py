"""Every chapter with exercises grades correctly with the real workflow, not only chapter 01.

The hostile suite (test_grading_hostile.py) exercises the grading machinery on chapter 01; here each
later chapter goes through generate, pregrade, autograde, report, feedback and export with four
students: all right, blank, and two with one exercise wrong (a function that returns None).
The course's real corpus is used, and the course's own per-cell time limit (120 s).
"""

import shutil

import pytest

from grading import CASES, GRADED_CHAPTERS, ROOT, base_submissions, grade_course  # noqa: F401

LATER_CHAPTERS = sorted(p.name for p in (ROOT / "solutions").iterdir()
                        if p.is_dir() and any(p.glob("*.ipynb")) and p.name not in GRADED_CHAPTERS)


def _course_env(folder):
    """A fresh cache holding the real corpus and MiniLM (copied, so nothing downloads), as on a grader's machine."""
    from utils import data

    cache = folder / "cache"
    cache.mkdir(parents=True)
    source = data.cache_dir()
    data.load_shakespeare(verbose=False)
    for name in ("shakespeare.txt", "shakespeare.source"):
        if (source / name).exists():
            shutil.copy(source / name, cache / name)
    minilm = data.minilm_path(verbose=False)  # chapters 04 and 06 load it; the suite's own cache has it after the first use
    if minilm.is_relative_to(source):
        shutil.copytree(minilm, cache / minilm.relative_to(source))
    return {"COURSE_CACHE": str(cache), "COURSE_QUICK": "1"}


@pytest.mark.nbgrader
@pytest.mark.parametrize("chapter_name", LATER_CHAPTERS)
def test_chapter_grades_right_blank_and_wrong(chapter_name, tmp_path):
    graded = grade_course(tmp_path, chapter_name, lambda chapter, release: (base_submissions(chapter, release), {}),
                          _course_env(tmp_path), timeout=120)
    assert graded.notebooks_graded == 4, graded.autograde.stderr[-3000:]
    rows = graded.csv_rows()
    points = graded.chapter.points
    max_score = float(rows["alice"]["max_score"])
    assert max_score == sum(points.values()) and max_score >= 10
    assert float(rows["alice"]["score"]) == max_score, graded.cell_scores("alice")
    assert float(rows["bob"]["score"]) == 0.0
    for student in ("carol", "dave"):
        lost = {g for g, s in graded.cell_scores(student).items() if s < points[g]}
        assert len(lost) == 1, f"{student} lost points on {sorted(lost)}, expected exactly one exercise"
        assert float(rows[student]["score"]) == max_score - points[lost.pop()]
    report = graded.report_rows()
    assert report["alice"]["status"] == "ok", report["alice"]
