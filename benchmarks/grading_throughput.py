"""Grading throughput: autograde a class of submissions of one chapter and print seconds per notebook.

    python benchmarks/grading_throughput.py [--submissions 30] [--chapter 01_tokens_and_embeddings]

Builds a course in a temporary folder with the repository's nbgrader_config.py (the course's
hardened execute step, its 120 s cell limit and memory cap), generates the chapter, writes
``--submissions`` student notebooks (a third correct, a third with one exercise wrong, a third
handed back blank, so failing checks are timed too) and runs one ``nbgrader autograde`` over all
of them, then ``generate_feedback``. Every notebook runs top to bottom on the chapter's full
corpus, as in a real class; ``--corpus-chars`` shortens the corpus for a quick run, ``--course``
reuses a course folder where the chapter was already generated (its gradebook is copied, not changed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def _meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


def _answers(chapter: str) -> dict[str, str]:
    """grade id -> the solution's code without the nbgrader markers."""
    notebook = nbformat.read(ROOT / "solutions" / chapter / f"{chapter}.ipynb", as_version=4)
    return {_meta(c)["grade_id"]: "\n".join(line for line in c.source.splitlines()
                                            if "### BEGIN SOLUTION" not in line and "### END SOLUTION" not in line)
            for c in notebook.cells if _meta(c).get("solution")}


def _nbgrader(*args: str, cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"nbgrader {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def _course(folder: Path, chapter: str, reuse: Path | None, env: dict) -> Path:
    course = folder / "course"
    if reuse is not None:
        course.mkdir()
        for name in ("nbgrader_config.py", "gradebook.db"):
            shutil.copy(reuse / name, course / name)
        for name in ("solutions", "chapters"):
            shutil.copytree(reuse / name / chapter, course / name / chapter)
        return course
    course.mkdir()
    shutil.copy(ROOT / "nbgrader_config.py", course)
    shutil.copytree(ROOT / "solutions" / chapter, course / "solutions" / chapter)
    seconds = _nbgrader("generate_assignment", chapter, "--force", cwd=course, env=env)
    print(f"generate_assignment: {seconds:.1f} s")
    return course


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submissions", type=int, default=30)
    parser.add_argument("--chapter", default="01_tokens_and_embeddings")
    parser.add_argument("--corpus-chars", type=int, default=0, help="shorten the corpus (0: the full corpus)")
    parser.add_argument("--course", type=Path, help="a course folder where the chapter was already generated")
    args = parser.parse_args()

    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    with tempfile.TemporaryDirectory(prefix="grading-throughput-") as tmp:
        folder = Path(tmp)
        if args.corpus_chars:
            from utils import data

            corpus = folder / "corpus.txt"
            corpus.write_text(data.load_shakespeare(verbose=False)[: args.corpus_chars], encoding="utf-8")
            env.update(COURSE_CORPUS=str(corpus), COURSE_CACHE=str(folder / "cache"))
        course = _course(folder, args.chapter, args.course, env)
        release = course / "chapters" / args.chapter / f"{args.chapter}.ipynb"
        answers = _answers(args.chapter)
        first = next(iter(answers))
        for i in range(args.submissions):
            notebook = nbformat.read(release, as_version=4)
            kind = ("correct", "one wrong", "blank")[i % 3]
            for cell in notebook.cells:
                grade_id = _meta(cell).get("grade_id")
                if grade_id in answers and kind != "blank":
                    cell.source = answers[grade_id] if (kind == "correct" or grade_id != first) else "pass"
            target = course / "submitted" / f"student{i:03d}" / args.chapter
            target.mkdir(parents=True)
            nbformat.write(notebook, target / release.name)

        seconds = _nbgrader("autograde", args.chapter, "--force", cwd=course, env=env)
        graded = len(list((course / "autograded").glob(f"*/{args.chapter}/*.ipynb")))
        feedback = _nbgrader("generate_feedback", args.chapter, "--force", cwd=course, env=env)
        print(f"{graded} notebooks autograded in {seconds:.1f} s: {seconds / max(graded, 1):.1f} s per notebook "
              f"(one nbgrader autograde run, {os.cpu_count()} CPU cores)")
        print(f"generate_feedback: {feedback:.1f} s, {feedback / max(graded, 1):.2f} s per notebook")
        if graded != args.submissions:
            raise SystemExit(f"only {graded} of {args.submissions} submissions were graded")


if __name__ == "__main__":
    main()
