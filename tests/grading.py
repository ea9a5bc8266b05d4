"""Build nbgrader courses and submissions for the grading tests and the throughput benchmark.

Everything a submission needs is derived from a chapter's solution notebook, by grade id: the
correct answers (the solution code without its markers), a wrong answer (the same functions
returning None), which check cells grade which answer, and which exercises no other exercise
calls (so breaking one costs exactly its own points). The hostile cases in ``CASES`` are written
against that description, so covering another chapter is a matter of adding its name to
``GRADED_CHAPTERS`` (and, optionally, its built-in shortcut to ``BUILTIN_SHORTCUTS``).
"""

from __future__ import annotations

import ast
import base64
import copy
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nbformat

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# Chapters the hostile suite grades; add a chapter here once its solution notebook has exercises.
GRADED_CHAPTERS = ["01_tokens_and_embeddings"]

# The chapter's forbidden built-in, as an answer a learner might write (the rules live in utils/checks).
BUILTIN_SHORTCUTS = {
    "01_tokens_and_embeddings": {
        "ex5-embed-one-hot": "def embed_one_hot(ids, weight):\n    return F.embedding(ids, weight)\n",
    },
}

# The temporary course grades with a short time limit and a small memory cap, so that the infinite
# loop and the memory blow-up cost seconds; the chapter's own cells need a fraction of either.
TEST_CONFIG = """
# --- added by tests/grading.py for a fast, bounded test run
c.Execute.timeout = {timeout}
c.GradingExecute.memory_limit_mb = {memory_mb}
c.GradingExecute.max_output_chars = 50_000
c.Exchange.root = {exchange!r}
c.CourseDirectory.course_id = "course101"
"""
TIMEOUT_S = 10
MEMORY_MB = 1500
CORPUS_CHARS = 25_000  # enough for every cell of chapter 01 (32 x 256 BPE tokens), a third of the time


def meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


# ---------------------------------------------------------------- what a chapter asks for


@dataclass
class Exercise:
    answer: str                 # grade id of the answer cell
    functions: list[str]        # the top-level functions it defines
    checks: list[str]           # grade ids of the check cells that follow it
    points: float


@dataclass
class Chapter:
    name: str
    answers: dict[str, str]     # grade id -> the solution's code without markers
    exercises: list[Exercise]
    points: dict[str, float]    # check grade id -> points
    imports: str                # the import statements of the notebook (for running answers in-process)
    visible_checks: dict[str, str] = field(default_factory=dict)  # check grade id -> its release source

    @property
    def max_score(self) -> float:
        return sum(self.points.values())

    @classmethod
    def load(cls, name: str) -> "Chapter":
        notebook = nbformat.read(ROOT / "solutions" / name / f"{name}.ipynb", as_version=4)
        answers, exercises, points, imports = {}, [], {}, []
        for cell in notebook.cells:
            m = meta(cell)
            if cell.cell_type == "code":
                try:
                    tree = ast.parse(cell.source)
                    imports += [ast.get_source_segment(cell.source, n) for n in tree.body
                                if isinstance(n, (ast.Import, ast.ImportFrom))]
                except SyntaxError:
                    pass
            if m.get("solution"):
                code = "\n".join(line for line in cell.source.splitlines()
                                 if "### BEGIN SOLUTION" not in line and "### END SOLUTION" not in line)
                answers[m["grade_id"]] = code
                functions = [n.name for n in ast.parse(code).body if isinstance(n, ast.FunctionDef)]
                exercises.append(Exercise(m["grade_id"], functions, [], 0.0))
            elif m.get("grade") and exercises:
                exercises[-1].checks.append(m["grade_id"])
                exercises[-1].points += float(m["points"])
                points[m["grade_id"]] = float(m["points"])
        return cls(name, answers, exercises, points, "\n".join(imports))

    def exercise(self, grade_id: str) -> Exercise:
        return next(e for e in self.exercises if grade_id in (e.answer, *e.checks))

    def independent(self) -> list[Exercise]:
        """Exercises whose functions no other answer calls: breaking one costs exactly its points."""
        result = []
        for exercise in self.exercises:
            others = "\n".join(code for gid, code in self.answers.items() if gid != exercise.answer)
            if not any(re.search(rf"\b{f}\b", others) for f in exercise.functions):
                result.append(exercise)
        return result

    def wrong(self, exercise: Exercise) -> str:
        """The exercise's functions, defined but returning None: a wrong answer for any exercise."""
        defs = [n for n in ast.parse(self.answers[exercise.answer]).body if isinstance(n, ast.FunctionDef)]
        return "\n\n".join(f"def {d.name}({ast.unparse(d.args)}):\n    return None\n" for d in defs)

    def scores(self, zero: set[str] = frozenset()) -> dict[str, float]:
        """check grade id -> expected points, with the checks of the exercises in ``zero`` (any grade id) at 0."""
        lost = {c for gid in zero for c in self.exercise(gid).checks}
        return {check: (0.0 if check in lost else points) for check, points in self.points.items()}


# ---------------------------------------------------------------- building submissions

def filled(release: Path, answers: dict[str, str]):
    """The released notebook with answer cells replaced by ``answers`` (grade id -> code)."""
    notebook = nbformat.read(release, as_version=4)
    for cell in notebook.cells:
        if meta(cell).get("grade_id") in answers:
            cell.source = answers[meta(cell)["grade_id"]]
    return notebook


def cell_of(notebook, grade_id: str):
    return next(c for c in notebook.cells if meta(c).get("grade_id") == grade_id)


def index_of(notebook, grade_id: str) -> int:
    return next(i for i, c in enumerate(notebook.cells) if meta(c).get("grade_id") == grade_id)


def patch_entry_points(release_check_source: str) -> str:
    """Lines that replace every ``checks.<module>.<function>`` a check cell calls with a no-op."""
    calls = sorted(set(re.findall(r"checks\.(\w+)\.(\w+)\(", release_check_source)))
    return "\n".join(f"checks.{module}.{function} = lambda *args, **kwargs: None" for module, function in calls)


KEY_SOURCE = '''
def _key(value):
    import torch
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.shape), tuple(value.detach().flatten().tolist()))
    if isinstance(value, dict):
        return ("dict", tuple(sorted(((repr(_key(k)), _key(v)) for k, v in value.items()), key=lambda kv: kv[0])))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    return ("value", repr(value))
'''


def hard_coded_answers(chapter: Chapter, release: Path) -> dict[str, str]:
    """Answers that return the right values for exactly the inputs the visible checks use, and fail elsewhere.

    The visible check cells run here, in this process, against the solution's functions; every
    call is recorded and written into the answer as a lookup table.
    """
    namespace: dict = {}
    exec(chapter.imports, namespace)  # noqa: S102 - the course's own notebook code
    for code in chapter.answers.values():
        exec(code, namespace)  # noqa: S102
    exec(KEY_SOURCE, namespace)  # noqa: S102
    key = namespace["_key"]
    tables: dict[str, dict] = {}

    def recorder(name, fn):
        def recorded(*args):
            frozen = key(args)
            result = fn(*copy.deepcopy(args))
            tables.setdefault(name, {})[frozen] = copy.deepcopy(result)
            return result
        return recorded

    release_nb = nbformat.read(release, as_version=4)
    answers = {}
    for exercise in chapter.exercises:
        scope = dict(namespace)
        for function in exercise.functions:
            scope[function] = recorder(function, namespace[function])
        for check in exercise.checks:
            exec(cell_of(release_nb, check).source, scope)  # noqa: S102 - the visible check only
        table = base64.b64encode(pickle.dumps({f: tables.get(f, {}) for f in exercise.functions})).decode()
        lines = ["import base64 as _b64, copy as _copy, pickle as _pickle", KEY_SOURCE,
                 f"_SEEN_{exercise.answer.replace('-', '_')} = _pickle.loads(_b64.b64decode({table!r}))"]
        for function in exercise.functions:
            lines.append(f"def {function}(*args):\n    return _copy.deepcopy("
                         f"_SEEN_{exercise.answer.replace('-', '_')}[{function!r}][_key(args)])\n")
        answers[exercise.answer] = "\n".join(lines)
    return answers


def colab_saved(notebook):
    """What Google Colab writes when a learner downloads the notebook: its metadata, no cell ids, minor 0."""
    saved = copy.deepcopy(notebook)
    saved.metadata = {"colab": {"provenance": [], "collapsed_sections": [], "name": "Copy of notebook"},
                      "kernelspec": {"name": "python3", "display_name": "Python 3"},
                      "language_info": {"name": "python"}, "accelerator": "GPU", "gpuClass": "standard"}
    saved.nbformat_minor = 0
    for number, cell in enumerate(saved.cells):
        cell.pop("id", None)
        cell.metadata["id"] = f"c{number:04d}Xy"
        if cell.cell_type == "code":
            cell.metadata["colab"] = {"base_uri": "https://localhost:8080/"}
            cell.metadata["outputId"] = f"o{number:04d}-colab"
    return saved


# ---------------------------------------------------------------- the hostile cases


@dataclass
class Case:
    student: str
    title: str                                   # the row in the closing table
    build: Callable[[Chapter, Path], object]     # (chapter, release notebook path) -> submission
    zero: Callable[[Chapter], set[str]]          # grade ids of the exercises expected to score 0
    status: str                                  # "ok" or "review" in the report
    reasons: tuple[str, ...] = ()                # phrases expected in the report's reasons (or notes)
    outcome: str = ""                            # the expected outcome, in words


def _ind(chapter: Chapter, i: int) -> Exercise:
    return chapter.independent()[i]


def _all(chapter):
    return {e.answer for e in chapter.exercises}


def _build_locked(ch: Chapter, release: Path):
    a, b, c = ch.independent()[:3]
    depended = next((e for e in ch.exercises if e not in ch.independent()), None)
    answers = {**ch.answers, a.answer: ch.wrong(a), b.answer: ch.wrong(b), c.answer: ch.wrong(c)}
    if depended:
        answers[depended.answer] = ch.wrong(depended)
    nb = filled(release, answers)
    cell_of(nb, a.checks[0]).source = "pass"                          # the locked test edited to `pass`
    del nb.cells[index_of(nb, b.checks[0])]                           # the test cell deleted
    cell_of(nb, c.checks[0]).cell_type = "markdown"                   # the test cell made markdown
    cell_of(nb, c.checks[0]).pop("outputs", None)
    cell_of(nb, c.checks[0]).pop("execution_count", None)
    if depended:                                                      # grade id renamed, cell gutted
        cell = cell_of(nb, depended.checks[0])
        cell.metadata.nbgrader["grade_id"] = "my-own-check"
        cell.source = "pass"
    return nb


def _zero_locked(ch):
    zero = {e.answer for e in ch.independent()[:3]}
    depended = [e for e in ch.exercises if e not in ch.independent()]
    if depended:
        zero.add(depended[0].answer)
        zero |= {e.answer for e in ch.exercises if any(re.search(rf"\b{f}\b", ch.answers[e.answer])
                                                       for f in depended[0].functions) and e is not depended[0]}
    return zero


def _build_cells(ch: Chapter, release: Path):
    a, b, c = ch.independent()[:3]
    nb = filled(release, {**ch.answers, a.answer: ch.wrong(a)})
    i = index_of(nb, a.checks[0])                                     # test cell duplicated, later copy gutted
    duplicate = copy.deepcopy(nb.cells[i])
    duplicate.pop("id", None)
    duplicate.source = "pass"
    nb.cells.insert(i + 1, duplicate)
    answer = cell_of(nb, b.answer)                                    # answer cell saved as a raw cell
    answer.cell_type = "raw"
    answer.pop("outputs", None)
    answer.pop("execution_count", None)
    cell_of(nb, b.checks[0]).metadata.nbgrader["points"] = 100        # points raised in the metadata
    j = index_of(nb, c.answer)                                        # answer duplicated: a wrong draft first
    draft = copy.deepcopy(nb.cells[j])
    draft.pop("id", None)
    draft.source = ch.wrong(c)
    nb.cells.insert(j, draft)
    return nb


def _build_loop(ch, release):
    a = _ind(ch, 0)
    body = "\n".join(f"def {f}(*args):\n    while True:\n        pass\n" for f in a.functions)
    return filled(release, {**ch.answers, a.answer: body})


def _build_deaf_loop(ch, release):
    b = _ind(ch, 1)
    body = "\n".join(f"def {f}(*args):\n    import signal\n    signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                     f"    while True:\n        pass\n" for f in b.functions)
    return filled(release, {**ch.answers, b.answer: body})


def _build_exit(ch, release):
    b = _ind(ch, 1)
    body = "import os\n\n" + "\n".join(f"def {f}(*args):\n    os._exit(1)\n" for f in b.functions)
    return filled(release, {**ch.answers, b.answer: body})


def _after(ch: Chapter, exercise: Exercise) -> set[str]:
    """The exercise and every exercise after it (what a dead kernel costs)."""
    names = [e.answer for e in ch.exercises]
    return set(names[names.index(exercise.answer):])


def _build_memory(ch, release):
    a = _ind(ch, 0)
    # torch.empty maps memory without touching it: were the cap missing, this would cost address space, not RAM.
    hog = ("    import torch\n    hog = []\n"
           "    for _ in range(400):  # 40 GB if nothing stops it; the kernel's cap does\n"
           "        hog.append(torch.empty(25_000_000))\n")
    body = "\n".join(f"def {f}(*args):\n{hog}    return None\n" for f in a.functions)
    return filled(release, {**ch.answers, a.answer: body})


def _build_noisy(ch, release):
    a, b = ch.independent()[:2]
    answers = dict(ch.answers)
    noise = ("    import sys, warnings\n    warnings.warn('this API is deprecated', DeprecationWarning)\n"
             "    warnings.warn('a learner warning')\n    print('debugging', args, file=sys.stderr)\n")
    answers[a.answer] = ch.answers[a.answer] + "\n\n" + "\n".join(
        f"_{f}_quiet = {f}\n\ndef {f}(*args):\n{noise}    return _{f}_quiet(*args)\n" for f in a.functions)
    answers[b.answer] = ch.answers[b.answer] + "\n\n" + "\n".join(
        f"_{f}_quiet = {f}\n\ndef {f}(*args):\n    print('spam ' * 20_000)\n    return _{f}_quiet(*args)\n"
        for f in b.functions)
    return filled(release, answers)


def _build_patch_names(ch, release):
    a, b, c = ch.independent()[:3]
    nb = filled(release, {**ch.answers, a.answer: ch.wrong(a), b.answer: ch.wrong(b), c.answer: ch.wrong(c)})
    release_nb = nbformat.read(release, as_version=4)
    cell_of(nb, a.answer).source += "\n\n# make the check of this exercise pass\n" + patch_entry_points(
        "\n".join(cell_of(release_nb, g).source for g in a.checks))
    cell_of(nb, b.answer).source += ("\n\n\nclass _Anything:\n    def __getattr__(self, name):\n        return self\n\n"
                                     "    def __call__(self, *args, **kwargs):\n        return None\n\n\n"
                                     "checks = _Anything()\n")
    cell_of(nb, c.answer).source += (
        "\n\nimport torch\nimport utils.checks\n"
        "torch.isclose = lambda a, b, **kw: torch.ones(torch.broadcast_shapes(a.shape, b.shape), dtype=torch.bool)\n"
        "torch.allclose = lambda *args, **kwargs: True\ntorch.equal = lambda *args: True\n"
        "torch.testing.assert_close = lambda *args, **kwargs: None\n"
        "utils.checks.core.difference = lambda *args, **kwargs: None\n"
        "utils.checks.expect = lambda *args, **kwargs: None\n")
    return nb


def _build_patch_deep(ch, release):
    a, b, c = ch.independent()[:3]
    release_nb = nbformat.read(release, as_version=4)
    in_call = "\n".join(f"def {f}(*args):\n    import utils.checks.core as core\n"
                        f"    core.difference = lambda *args, **kwargs: None\n    return None\n" for f in a.functions)
    unhook = ("\n\nget_ipython().events.callbacks['pre_run_cell'].clear()  # the course's guard, gone\n"
              + patch_entry_points("\n".join(cell_of(release_nb, g).source for g in b.checks)) + "\n")
    tensor = ("\n\nimport torch\ntorch.Tensor.all = lambda self, *args, **kwargs: torch.tensor(True)\n"
              "torch.Tensor.__eq__ = lambda self, other: torch.ones_like(self, dtype=torch.bool)\n"
              "checks.expect = lambda *args, **kwargs: 99  # a number as the cell's value: nbgrader's partial credit\n")
    nb = filled(release, {**ch.answers, a.answer: in_call, b.answer: ch.wrong(b) + unhook,
                          c.answer: ch.wrong(c) + tensor})
    return nb


def _reference_of(function: str):
    """The course's own implementation of ``function`` in utils (the shortcut a learner might call)."""
    import importlib
    import pkgutil

    import utils

    for info in pkgutil.iter_modules(utils.__path__):
        if info.name in ("checks", "grading"):
            continue
        module = importlib.import_module(f"utils.{info.name}")
        if callable(getattr(module, function, None)) and getattr(module, function).__module__ == module.__name__:
            return module.__name__
    return None


def _shortcut_exercises(ch: Chapter) -> list[Exercise]:
    shortcuts = BUILTIN_SHORTCUTS.get(ch.name, {})
    with_reference = [e for e in ch.independent() if all(_reference_of(f) for f in e.functions)
                      and e.answer not in shortcuts]
    return with_reference[:2] + [ch.exercise(g) for g in shortcuts]


def _build_shortcuts(ch, release):
    answers = dict(ch.answers)
    references = [e for e in _shortcut_exercises(ch) if e.answer not in BUILTIN_SHORTCUTS.get(ch.name, {})]
    if references:  # an alias of the course's function, and a call to it
        first = references[0]
        answers[first.answer] = "\n".join(f"from {_reference_of(f)} import {f}" for f in first.functions)
    for exercise in references[1:2]:
        answers[exercise.answer] = "\n".join(
            f"import {_reference_of(f)}\n\ndef {f}(*args):\n    return {_reference_of(f)}.{f}(*args)\n"
            for f in exercise.functions)
    answers.update(BUILTIN_SHORTCUTS.get(ch.name, {}))
    return filled(release, answers)


def _build_hard_coded(ch, release):
    return filled(release, {**ch.answers, **hard_coded_answers(ch, release)})


def _build_colab(ch, release):
    return {f"Copy of {release.name}": colab_saved(filled(release, ch.answers))}


def _build_stripped(ch, release):
    nb = filled(release, ch.answers)
    for cell in nb.cells:
        cell.metadata = {}
    return nb


def _build_gradebook_writer(ch, release):
    a = _ind(ch, 0)
    attack = ("\n\nimport sqlite3\n_db = sqlite3.connect('../../../gradebook.db')\n"
              "_db.execute('UPDATE grade SET auto_score = 0')  # everyone graded before me\n"
              "_db.execute('UPDATE grade_cells SET max_score = 1000')\n_db.commit()\n")
    return filled(release, {**ch.answers, a.answer: ch.answers[a.answer] + attack})


CASES = [
    Case("x-locked", "locked test cells: edited to `pass`, deleted, made markdown, grade id renamed (wrong answers "
         "behind each)", _build_locked, _zero_locked, "review",
         ("was edited", "was missing from the submission", "unknown cell"),
         "each locked cell restored from the gradebook; the wrong answers behind them score 0"),
    Case("x-cells", "a test cell duplicated (later copy gutted), an answer saved as a raw cell, points raised to 100, "
         "an answer duplicated (wrong draft first)", _build_cells, lambda ch: {_ind(ch, 0).answer}, "review",
         ("appears 2 times", "raw cell"),
         "nbgrader grades the last copy, restores type and points: only the wrong exercise scores 0"),
    Case("x-loop", "an infinite loop in an answer", _build_loop, lambda ch: {_ind(ch, 0).answer}, "review",
         ("ran past the time limit",), "that check cell is interrupted after the time limit and scores 0; the rest "
         "of the notebook is graded"),
    Case("x-deaf-loop", "an infinite loop that ignores the interrupt (SIGINT)", _build_deaf_loop,
         lambda ch: _after(ch, _ind(ch, 1)), "review", ("stopped answering",),
         "the kernel is killed; that cell and every later graded cell score 0 with a reason; the batch goes on"),
    Case("x-exit", "the kernel killed by `os._exit(1)` inside an answer", _build_exit,
         lambda ch: _after(ch, _ind(ch, 1)), "review", ("the kernel died",),
         "cells before it keep their points, that cell and later graded cells score 0 with a reason; the batch goes on"),
    Case("x-memory", "a memory blow-up (allocating without end)", _build_memory, lambda ch: {_ind(ch, 0).answer},
         "ok", (), "the kernel's memory cap turns it into a MemoryError: that exercise scores 0, the kernel lives on"),
    Case("x-noisy", "correct answers that print warnings to stderr and megabytes of output inside the checks",
         _build_noisy, lambda ch: set(), "ok", ("output of",),
         "full marks; stderr kept as plain output; output capped per cell"),
    Case("x-patch", "checks monkeypatched to pass: entry points replaced, the name `checks` rebound, torch.isclose/"
         "allclose/equal, torch.testing.assert_close, core.difference and checks.expect replaced (wrong answers)",
         _build_patch_names, lambda ch: {e.answer for e in ch.independent()[:3]}, "review",
         ("replaced by code in this notebook", "replaces `torch.isclose`", "rebinds the name `checks`"),
         "the guard restores the course's code before each check: the wrong answers score 0; flagged"),
    Case("x-patch-deep", "patching while being checked, the guard's IPython hook removed, Tensor.all/__eq__ "
         "replaced, checks.expect returning 99 (wrong answers)", _build_patch_deep,
         lambda ch: {e.answer for e in ch.independent()[:3]}, "review",
         ("while it was being checked", "the course's pre-run hook", "drives the IPython shell"),
         "the check fails the answer that patches during the call; the grader's guard line restores the hook "
         "and the checks; all score 0; flagged"),
    Case("x-shortcut", "the answer calls the forbidden shortcut: the course's own function (aliased, and called) "
         "and PyTorch's built-in", _build_shortcuts, lambda ch: {e.answer for e in _shortcut_exercises(ch)}, "ok",
         (), "each such exercise scores 0 with a sentence naming the shortcut"),
    Case("x-hard-coded", "every answer hard-coded to the inputs of the visible tests", _build_hard_coded, _all, "ok",
         (), "the visible checks pass, the hidden tests on fresh inputs fail: 0"),
    Case("x-colab", "a notebook saved by Colab (its metadata, kernelspec, no cell ids, `Copy of` file name)",
         _build_colab, lambda ch: set(), "ok", ("graded as", "saved by Google Colab"),
         "pregrade renames it; nbgrader restores the kernelspec: full marks"),
    Case("x-stripped", "every cell's metadata stripped (an editor that drops nbgrader's metadata)", _build_stripped,
         lambda ch: set(), "ok", ("lost its nbgrader metadata",),
         "pregrade finds the cells again by the functions they define and by their text: full marks "
         "(nbgrader alone fails this student)"),
    Case("x-missing", "a missing notebook (the folder holds something else)", lambda ch, release: {"notes.txt": "hi"},
         _all, "review", ("in the submission; it scores 0",), "0 in grades.csv, flagged"),
    Case("x-garbage", "a file that is not a notebook (truncated JSON)",
         lambda ch, release: {release.name: release.read_text()[:500]}, _all, "review", ("not a readable notebook",),
         "0 in grades.csv, flagged; the batch goes on"),
    Case("x-writer", "an answer that rewrites the gradebook with sqlite3 (other students' scores, max scores)",
         _build_gradebook_writer, lambda ch: set(), "review", ("changed the gradebook", "imports sqlite3"),
         "the grader restores the gradebook after the notebook ran; no other grade changes; flagged"),
]


# The round trip of tests/test_nbgrader.py: a correct, a blank, a wrong and a shortcut submission.
WRONG_ANSWERS = {
    "01_tokens_and_embeddings": {
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
    },
}


def base_submissions(chapter: Chapter, release: Path) -> dict[str, object]:
    """alice: every answer right; bob: the release untouched; carol and dave: one exercise wrong each."""
    wrong = WRONG_ANSWERS.get(chapter.name) or {e.answer: chapter.wrong(e) for e in chapter.independent()[:2]}
    (carol, carol_answer), (dave, dave_answer) = list(wrong.items())[:2]
    return {"alice": filled(release, chapter.answers), "bob": filled(release, {}),
            "carol": filled(release, {**chapter.answers, carol: carol_answer}),
            "dave": filled(release, {**chapter.answers, dave: dave_answer})}


# ---------------------------------------------------------------- running nbgrader


def run(*args: str, cwd: Path, env: dict | None = None, timeout: int = 900,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run a real command with this interpreter's tools on PATH; fail with its output if it fails."""
    env = {**os.environ, **(env or {})}
    env["PATH"] = str(Path(PYTHON).parent) + os.pathsep + env.get("PATH", "")
    done = subprocess.run([PYTHON, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def small_corpus(folder: Path, chars: int = CORPUS_CHARS) -> dict[str, str]:
    """Environment that makes the chapter read a short corpus from ``folder`` (a fresh cache, COURSE_CORPUS)."""
    from utils import data

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text(data.load_shakespeare(verbose=False)[:chars], encoding="utf-8")
    return {"COURSE_CORPUS": str(corpus), "COURSE_CACHE": str(folder / "cache"), "COURSE_QUICK": "1"}


def make_course(folder: Path, chapter: str, env: dict, timeout: int = TIMEOUT_S, memory_mb: int = MEMORY_MB) -> Path:
    """A course folder with the repository's nbgrader_config.py (plus test limits) and one chapter generated."""
    course = folder / "course"
    course.mkdir(parents=True)
    (folder / "exchange").mkdir()
    config = (ROOT / "nbgrader_config.py").read_text()
    config += TEST_CONFIG.format(timeout=timeout, memory_mb=memory_mb, exchange=str(folder / "exchange"))
    (course / "nbgrader_config.py").write_text(config)
    shutil.copytree(ROOT / "solutions" / chapter, course / "solutions" / chapter)
    run("-m", "nbgrader", "generate_assignment", chapter, "--force", cwd=course, env=env)
    return course


def release_path(course: Path, chapter: str) -> Path:
    return course / "chapters" / chapter / f"{chapter}.ipynb"


def write_submission(course: Path, chapter: str, student: str, submission) -> None:
    """Put a submission where ``nbgrader collect`` would: submitted/<student>/<chapter>/."""
    folder = course / "submitted" / student / chapter
    folder.mkdir(parents=True, exist_ok=True)
    if submission is None:
        return
    if isinstance(submission, nbformat.NotebookNode):
        submission = {f"{chapter}.ipynb": submission}
    for name, content in submission.items():
        # Written as plain JSON, unvalidated: hostile notebooks need not be valid.
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content, indent=1))


def submit_through_exchange(course: Path, chapter: str, student: str, notebook, env: dict) -> None:
    """A student fetches the released notebook, writes ``notebook`` over it and submits, as nbgrader's exchange expects."""
    home = course.parent / "students" / student
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(course / "nbgrader_config.py", home)
    run("-m", "nbgrader", "fetch_assignment", chapter, cwd=home, env=env)
    nbformat.write(notebook, home / chapter / f"{chapter}.ipynb")
    # nbgrader takes the student id from the login name; --student stands in for separate accounts.
    run("-m", "nbgrader", "submit", chapter, f"--student={student}", cwd=home, env=env)


@dataclass
class Graded:
    """A course after the whole workflow, with what each step printed and how long autograde took."""

    course: Path
    chapter: Chapter
    autograde: subprocess.CompletedProcess
    pregrade: subprocess.CompletedProcess
    report: subprocess.CompletedProcess
    autograde_seconds: float
    notebooks_graded: int

    def csv_rows(self) -> dict[str, dict]:
        import csv

        with open(self.course / "grades.csv") as handle:
            return {row["student_id"]: row for row in csv.DictReader(handle)}

    def report_rows(self) -> dict[str, dict]:
        import csv

        with open(self.course / "reports" / self.chapter.name / "report.csv") as handle:
            return {row["student_id"]: row for row in csv.DictReader(handle)}

    def cell_scores(self, student: str) -> dict[str, float]:
        from nbgrader.api import Gradebook

        with Gradebook(f"sqlite:///{self.course / 'gradebook.db'}") as gb:
            notebook = gb.find_submission_notebook(self.chapter.name, self.chapter.name, student)
            return {grade.name: grade.score for grade in notebook.grades}

    def autograded(self, student: str):
        name = self.chapter.name
        return nbformat.read(self.course / "autograded" / student / name / f"{name}.ipynb", as_version=4)


def grade_course(folder: Path, chapter_name: str, build: Callable[[Chapter, Path], tuple[dict, dict]],
                 env: dict, timeout: int = TIMEOUT_S) -> Graded:
    """The instructor workflow with real commands: generate, release, fetch/submit/collect (the ``exchange``
    submissions), the rest copied into submitted/, pregrade, autograde, report, generate_feedback, export.

    ``build(chapter, release)`` returns ``(submissions, exchange)``, each student -> submission,
    made from the student notebook that generate_assignment has just written.
    """
    chapter = Chapter.load(chapter_name)
    course = make_course(folder, chapter_name, env, timeout=timeout)
    submissions, exchange = build(chapter, release_path(course, chapter_name))
    if exchange:
        run("-m", "nbgrader", "release_assignment", chapter_name, cwd=course, env=env)
        for student, notebook in exchange.items():
            submit_through_exchange(course, chapter_name, student, notebook, env)
        run("-m", "nbgrader", "collect", chapter_name, cwd=course, env=env)
    for student, submission in submissions.items():
        write_submission(course, chapter_name, student, submission)
    pre = run("-m", "utils.grading", "pregrade", chapter_name, cwd=course, env=env)
    start = time.perf_counter()
    auto = run("-m", "nbgrader", "autograde", chapter_name, "--force", cwd=course, env=env, timeout=1800, check=False)
    seconds = time.perf_counter() - start
    rep = run("-m", "utils.grading", "report", chapter_name, cwd=course, env=env)
    run("-m", "nbgrader", "generate_feedback", chapter_name, "--force", cwd=course, env=env)
    run("-m", "nbgrader", "export", cwd=course, env=env)
    graded = len(list((course / "autograded").glob(f"*/{chapter_name}/*.ipynb")))
    return Graded(course, chapter, auto, pre, rep, seconds, graded)



_GRADED: dict[str, Graded] = {}


def graded_course(chapter_name: str, tmp_path_factory) -> Graded:
    """The class of one chapter, graded once per test session: the four round-trip students and every case.

    alice and bob hand in through nbgrader's exchange (fetch, submit, collect); the others are
    copied into submitted/, as an instructor does with files collected some other way.
    """
    def build(chapter: Chapter, release: Path) -> tuple[dict, dict]:
        base = base_submissions(chapter, release)
        exchange = {student: base.pop(student) for student in ("alice", "bob")}
        return {**base, **{case.student: case.build(chapter, release) for case in CASES}}, exchange

    if chapter_name not in _GRADED:
        folder = tmp_path_factory.mktemp(f"grading-{chapter_name[:2]}")
        _GRADED[chapter_name] = grade_course(folder, chapter_name, build, small_corpus(folder / "corpus"))
    return _GRADED[chapter_name]
