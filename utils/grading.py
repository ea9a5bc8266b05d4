"""Grading a class with nbgrader: a hardened execute step, a check of submissions before grading, a report after.

The course's ``nbgrader_config.py`` swaps nbgrader's ``Execute`` step for :class:`GradingExecute`,
which

* runs the course's guard (:func:`utils.checks.core.guard_for_grading`) before every graded cell,
  so a check cell runs the course's checks even when a learner's code replaced them;
* survives a kernel that dies (``os._exit``, a segfault, the out-of-memory killer) or stops
  answering after a time-out: the notebook is still written, the cell where it happened and every
  later graded cell score 0 with a sentence saying why, and the batch goes on with the next student;
* caps each kernel's memory (``memory_limit_mb``, Linux) and each cell's output while it runs
  (``max_output_chars``), so one submission cannot exhaust the grading machine or write a
  100 MB notebook;
* does not fail a correct answer for text on stderr (a warning, a progress bar): the course's
  checks fail by raising, which nbgrader records as an error.

Two commands go around ``nbgrader autograde`` (see INSTRUCTORS.md)::

    python -m utils.grading pregrade 01_tokens_and_embeddings   # check and repair submissions
    nbgrader autograde 01_tokens_and_embeddings
    python -m utils.grading report 01_tokens_and_embeddings     # scores, and who needs a person

``pregrade`` repairs what would stop nbgrader (a notebook saved under another name, nbgrader
metadata lost or corrupted by an editor, a file that is not a notebook) and flags what a person
should look at (a missing notebook, locked cells edited, cells out of order, code that touches the
grading machinery). ``report`` adds what autograding found (a dead kernel, a time-out, replaced
checks, a gradebook score that disagrees with the graded notebook), marks those submissions
"needs manual grading" in the gradebook, and writes ``reports/<assignment>/report.csv``.
"""

from __future__ import annotations

import argparse
import ast
import csv
import datetime
import json
import re
import shutil
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import nbformat
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbformat.v4 import new_output
from nbgrader import utils as nbutils
from nbgrader.preprocessors import Execute, NbGraderPreprocessor
from traitlets import Bool, Integer, Unicode

# ---------------------------------------------------------------- the execute step

GUARD_LINE = ("__import__('utils.checks.core', fromlist=['core']).guard_for_grading(globals())"
              "  # added by the grader, removed again after the cell runs")
KERNEL_DIED = "KernelDied"
KERNEL_UNRESPONSIVE = "KernelUnresponsive"
NOT_RUN = "NotRun"
TRUNCATED = "output truncated by the grader"
TAMPER_NOTE = "replaced by code in this notebook"  # utils.checks.core.TAMPER_NOTE
GRADEBOOK_NOTE = ("Note from the grader: code in this notebook changed the gradebook while it ran; the grader put "
                  "the gradebook back as it was.\n")
NOTE_PREFIX = "Note from the course's checks: "
TAMPER_FAILED = "while it was being checked"             # the CheckFailed sentence of core._guard_after_learner


def _error(ename: str, evalue: str):
    return new_output("error", ename=ename, evalue=evalue, traceback=[f"\x1b[0;31m{ename}\x1b[0m: {evalue}"])


class GradingExecute(Execute):
    """nbgrader's ``Execute`` step, hardened for submissions that may be broken or hostile."""

    guard_graded_cells = Bool(True, help="Run the course's guard before every graded cell.").tag(config=True)
    guard_code = Unicode(GUARD_LINE, help="The line the grader runs before each graded cell.").tag(config=True)
    memory_limit_mb = Integer(
        0, help="Cap on the kernel's data segment in MiB (Linux RLIMIT_DATA); 0 for no cap. A cell that "
                "allocates more gets a MemoryError instead of the machine running out of memory."
    ).tag(config=True)
    max_output_chars = Integer(
        200_000, help="Characters of output kept per cell while it runs; the rest is dropped (0: no cap)."
    ).tag(config=True)
    protect_gradebook = Bool(
        True, help="Keep a copy of the gradebook (SQLite) while a notebook runs and put it back if the notebook's "
                   "code changed it: nbgrader itself writes nothing during this step."
    ).tag(config=True)
    stderr_fails_cell = Bool(
        False, help="nbgrader's default scores a graded cell 0 when it writes to stderr; the course's checks "
                    "fail by raising, so stderr (warnings, progress bars) is kept as plain output instead."
    ).tag(config=True)

    # -- a whole notebook

    def preprocess(self, nb, resources=None, km=None):
        self._stopped: str | None = None
        database = self._gradebook_file(resources)
        before = database.read_bytes() if database is not None else None
        try:
            return super().preprocess(nb, resources, km)
        finally:
            if before is not None and (not database.is_file() or database.read_bytes() != before):
                database.write_bytes(before)
                self.log.error("The notebook's code changed the gradebook; it was put back.")
                first = next((c for c in nb.cells if c.cell_type == "code"), None)
                if first is not None:
                    first.setdefault("outputs", []).append(new_output("stream", name="stdout", text=GRADEBOOK_NOTE))

    def _gradebook_file(self, resources) -> Path | None:
        url = ((resources or {}).get("nbgrader") or {}).get("db_url", "")
        if not self.protect_gradebook or not url.startswith("sqlite:///"):
            return None
        path = Path(url[len("sqlite:///"):])
        return path if path.is_file() and path.stat().st_size < 512 * 1024 * 1024 else None

    async def async_start_new_kernel(self, **kwargs) -> None:
        await super().async_start_new_kernel(**kwargs)
        self._limit_memory()

    def start_new_kernel(self, **kwargs) -> None:  # nbclient binds the sync version to its own async one
        super().start_new_kernel(**kwargs)
        self._limit_memory()

    def _limit_memory(self) -> None:
        if self.memory_limit_mb <= 0:
            return
        pid = getattr(getattr(self.km, "provisioner", None), "pid", None)
        try:
            import resource

            limit = self.memory_limit_mb * 1024 * 1024
            resource.prlimit(pid, resource.RLIMIT_DATA, (limit, limit))
            self.log.info("Kernel %s: data segment capped at %d MiB", pid, self.memory_limit_mb)
        except (ImportError, AttributeError, OSError, TypeError, ValueError) as error:
            self.log.warning("Could not cap the kernel's memory (%s); grade in a container with a memory limit.", error)

    # -- one cell

    def preprocess_cell(self, cell, resources, index):
        graded = cell.cell_type == "code" and nbutils.is_grade(cell)
        if self._stopped is not None:
            if cell.cell_type == "code":
                cell.outputs = [_error(NOT_RUN, self._stopped)] if graded else []
                cell.execution_count = None
            return cell, resources
        source = cell.source
        if graded and self.guard_graded_cells and self.guard_code:
            cell.source = f"{self.guard_code}\n{source}"
        self._chars, self._truncated = 0, False
        try:
            cell, resources = super().preprocess_cell(cell, resources, index)
        except DeadKernelError:
            self._stop(cell, KERNEL_DIED, "the kernel died while this cell ran (os._exit, a crash, or the "
                                          "memory limit)")
        except CellTimeoutError:
            self._stop(cell, KERNEL_UNRESPONSIVE, f"the kernel did not stop when interrupted after the "
                                                  f"{self.timeout} s time limit of this cell")
        finally:
            cell.source = source
        if graded and not self.stderr_fails_cell:
            for output in cell.get("outputs", []):
                if output.get("output_type") == "stream" and output.get("name") == "stderr":
                    output["name"] = "stdout"
        return cell, resources

    def _stop(self, cell, ename: str, what: str) -> None:
        self.log.error("%s: %s; the remaining graded cells score 0.", ename, what)
        cell.setdefault("outputs", []).append(_error(ename, f"{what[0].upper()}{what[1:]}; this cell and every "
                                                            "later graded cell score 0."))
        self._stopped = f"Not run: {what} in an earlier cell."
        try:
            from jupyter_core.utils import run_sync

            if self.km is not None:
                run_sync(self.km.shutdown_kernel)(now=True)
        except Exception as error:  # noqa: BLE001 - the kernel is gone either way
            self.log.warning("Stopping the kernel: %s", error)

    def output(self, outs, msg, display_id, cell_index):
        content = msg.get("content", {})
        if msg.get("msg_type") == "error" or self.max_output_chars <= 0:
            return super().output(outs, msg, display_id, cell_index)
        size = len(content.get("text", "")) + sum(
            len(v) if isinstance(v, str) else len(json.dumps(v)) for v in (content.get("data") or {}).values())
        room = self.max_output_chars - self._chars
        self._chars += size
        if size <= room:
            return super().output(outs, msg, display_id, cell_index)
        out = None
        if room > 0 and msg.get("msg_type") == "stream":
            msg = {**msg, "content": {**content, "text": content["text"][:room]}}
            out = super().output(outs, msg, display_id, cell_index)
        if not self._truncated:
            self._truncated = True
            outs.append(new_output("stream", name="stdout", text=f"\n[... {TRUNCATED}: this cell printed more "
                                                                  f"than {self.max_output_chars:,} characters ...]\n"))
        return out


class RepairCells(NbGraderPreprocessor):
    """Sanitize step before nbgrader's own: the metadata repairs of ``pregrade``, from the gradebook alone.

    Duplicated cells keep their metadata on the last copy only, cells naming an unknown grade id
    become ordinary cells, answer and locked cells that lost their metadata are found again (by the
    functions they define, by their text), and cells still missing are put back. Without this,
    nbgrader 0.9.6 stops grading the student in each of these cases.
    """

    def preprocess(self, nb, resources):
        info = resources["nbgrader"]
        try:
            cells = _expected(info["db_url"], info["assignment"]).get(info["notebook"])
        except Exception as error:  # noqa: BLE001 - nbgrader reports a missing assignment itself
            self.log.warning("RepairCells: %s", error)
            return nb, resources
        for kind, message in _restore_metadata(nb, cells or [], None):
            self.log.warning("%s: %s", info["student"], message)
        return nb, resources


# ---------------------------------------------------------------- findings

REPAIRED, REVIEW = "repaired", "review"


@dataclass
class Finding:
    """One thing ``pregrade`` or ``report`` found about one student's notebook."""

    student: str
    notebook: str
    kind: str  # REPAIRED (fixed, the grade is right) or REVIEW (a person should look)
    message: str


@dataclass
class Course:
    """The folders of an nbgrader course, read from its ``nbgrader_config.py``."""

    root: Path
    submitted: Path
    autograded: Path
    release: Path
    db_url: str

    @classmethod
    def load(cls, root: Path | str = ".") -> "Course":
        from nbgrader.coursedir import CourseDirectory
        from traitlets.config.loader import PyFileConfigLoader

        root = Path(root).resolve()
        config = PyFileConfigLoader("nbgrader_config.py", path=str(root)).load_config() \
            if (root / "nbgrader_config.py").exists() else None
        coursedir = CourseDirectory(config=config) if config is not None else CourseDirectory()
        coursedir.root = str(root)
        return cls(root, root / coursedir.submitted_directory, root / coursedir.autograded_directory,
                   root / coursedir.release_directory, coursedir.db_url)

    def gradebook(self):
        from nbgrader.api import Gradebook

        return Gradebook(self.db_url)

    def reports(self, assignment: str) -> Path:
        folder = self.root / "reports" / assignment
        folder.mkdir(parents=True, exist_ok=True)
        return folder


@dataclass
class _SourceCell:
    name: str
    cell_type: str
    locked: bool
    source: str
    grade: bool
    solution: bool
    points: float | None


def _expected(db_url: str, assignment: str) -> dict[str, list[_SourceCell]]:
    """notebook name -> its nbgrader cells, from the gradebook that generate_assignment filled."""
    from nbgrader.api import Gradebook

    with Gradebook(db_url) as gb:
        result = {}
        for notebook in gb.find_assignment(assignment).notebooks:
            grades = {c.name: c.max_score for c in notebook.grade_cells}
            solutions = {c.name for c in notebook.solution_cells}
            result[notebook.name] = [
                _SourceCell(c.name, c.cell_type, c.locked, c.source, c.name in grades, c.name in solutions,
                            grades.get(c.name))
                for c in notebook.source_cells]
        return result


def _meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


def _defined_names(source: str) -> set[str]:
    """Top-level functions and classes a cell defines."""
    return {a or b for a, b in re.findall(r"^(?:async\s+)?def\s+(\w+)|^class\s+(\w+)", source, flags=re.M)}


def _without_hidden_tests(source: str) -> str:
    return re.sub(r"^[ \t]*### BEGIN HIDDEN TESTS.*?### END HIDDEN TESTS[ \t]*\n?", "", source, flags=re.S | re.M)


# ---------------------------------------------------------------- reading the code a learner wrote

_PROTECTED_CALLS = {
    "os._exit": "ends the kernel (os._exit)", "os.kill": "sends signals to processes (os.kill)",
    "os.killpg": "sends signals to processes", "signal.signal": "changes signal handlers (signal.signal)",
    "sys.setprofile": "switches the interpreter's profiler (sys.setprofile)",
    "sys.settrace": "switches the interpreter's tracer (sys.settrace)", "sys._getframe": "reads other frames",
    "importlib.reload": "reloads modules (importlib.reload)", "get_ipython": "drives the IPython shell",
    "gc.get_referrers": "searches the garbage collector", "gc.get_objects": "searches the garbage collector",
    "os.system": "runs shell commands", "os.chmod": "changes file permissions", "os.remove": "deletes files",
    "os.unlink": "deletes files", "shutil.rmtree": "deletes folders", "resource.setrlimit": "changes resource limits",
}
_PROTECTED_IMPORTS = {"ctypes": "loads C code (ctypes)", "sqlite3": "opens databases (sqlite3)",
                      "subprocess": "runs programs (subprocess)", "importlib": "imports modules by hand (importlib)",
                      "signal": "handles signals", "resource": "changes resource limits", "gc": "searches the "
                      "garbage collector", "threading": "starts threads", "multiprocessing": "starts processes",
                      "builtins": "reaches the built-in functions"}
_PROTECTED_ATTRIBUTES = {"__code__", "__globals__", "__builtins__", "f_globals", "f_locals", "f_back",
                         "_pop_mode", "_pop_mode_temporarily", "DisableTorchFunction", "__subclasses__",
                         "__dict__"}
_PROTECTED_STRINGS = ("gradebook", "autograded", "submitted/", "solutions/", "nbgrader", "hidden tests")
_PROTECTED_FROM = {"os": {"_exit", "kill", "killpg", "system"}, "sys": {"setprofile", "settrace", "_getframe", "modules"},
                   "importlib": {"reload"}}
# Modules whose attributes the checks rely on: assigning to them is how a check gets replaced.
_PROTECTED_MODULES = ("utils", "torch", "builtins", "sys", "math", "random", "copy", "numbers", "IPython")


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Call):
        parts.append(_dotted(node.func) + "()")
    elif isinstance(node, ast.Name):
        parts.append(node.id)
    else:
        return ""
    return ".".join(reversed(parts))


def scan_code(source: str, imported: set[str], reserved: tuple[str, ...] = ("checks",)) -> list[str]:
    """Sentences naming what in ``source`` touches the grading machinery, one per line of code.

    ``imported`` are the names the notebook binds to modules (``torch``, ``F``, ``checks`` ...):
    assigning to their attributes is how checks get replaced. Nothing here changes a score; it
    tells the instructor where to look.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    found: dict[int, str] = {}

    def note(node, text):
        found.setdefault(getattr(node, "lineno", 0), text)

    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            for item in (target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]):
                root = _dotted(item.value if isinstance(item, ast.Subscript) else item).split(".")[0]
                if isinstance(item, ast.Attribute) and root in imported:
                    note(node, f"replaces `{_dotted(item)}`")
                elif isinstance(item, ast.Subscript) and (root in imported or root in ("sys", "__builtins__")):
                    note(node, f"writes into `{_dotted(item.value)}`")
                elif isinstance(item, ast.Name) and item.id in reserved:
                    note(node, f"rebinds the name `{item.id}`")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                module = (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
                if bound in reserved and not (module == "utils" and alias.name == "checks"):
                    note(node, f"rebinds the name `{bound}`")
                top = module.split(".")[0] if isinstance(node, ast.ImportFrom) else alias.name.split(".")[0]
                if top in _PROTECTED_IMPORTS:
                    note(node, f"imports {top}, which {_PROTECTED_IMPORTS[top].split(' (')[0]}")
                if isinstance(node, ast.ImportFrom) and alias.name in _PROTECTED_FROM.get(module, ()):
                    note(node, f"imports {module}.{alias.name}")
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in reserved:
            note(node, f"rebinds the name `{node.name}`")
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("setattr", "delattr", "object.__setattr__") and node.args:
                root = _dotted(node.args[0]).split(".")[0]
                if root in imported:
                    note(node, f"calls {name} on `{_dotted(node.args[0])}`")
            if name in ("exec", "eval", "compile") or name.endswith("__import__"):
                note(node, f"runs code it builds at run time ({name})")
            for pattern, what in _PROTECTED_CALLS.items():
                if name == pattern or name.endswith("." + pattern):
                    note(node, what)
        if isinstance(node, ast.Attribute) and node.attr in _PROTECTED_ATTRIBUTES:
            note(node, f"reaches `{node.attr}`")
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if any(word in node.value.lower() for word in _PROTECTED_STRINGS):
                note(node, "names the grader's files")
    return [f"line {line}: {text}" for line, text in sorted(found.items())]


def _imported_names(notebook) -> set[str]:
    """Names the notebook binds to the modules (or their members) that the checks rely on."""
    names = {"sys", "builtins", "__builtins__"}
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.asname or a.name.split(".")[0] for a in node.names
                             if a.name.split(".")[0] in _PROTECTED_MODULES)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _PROTECTED_MODULES:
                names.update(a.asname or a.name for a in node.names)
    return names


# ---------------------------------------------------------------- before grading


def _backup(course: Course, assignment: str, student: str, path: Path) -> None:
    folder = course.root / "pregrade_originals" / student / assignment
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / path.name).exists():
        shutil.copy2(path, folder / path.name)


def _grade_ids(path: Path) -> set[str]:
    try:
        return {_meta(c).get("grade_id") for c in nbformat.read(path, as_version=4).cells} - {None}
    except Exception:  # noqa: BLE001 - an unreadable file has no grade ids
        return set()


def _find_renamed(folder: Path, name: str, known: set[str], cells: list[_SourceCell]) -> Path | None:
    """The notebook a student saved under another name (``Copy of X.ipynb``, ``X (1).ipynb``), if exactly one fits."""
    others = [p for p in folder.glob("*.ipynb") if p.stem not in known]
    ours = {c.name for c in cells}
    fitting = [p for p in others if _grade_ids(p) & ours or name.lower() in p.stem.lower()]
    return fitting[0] if len(fitting) == 1 else None


def _in_release_order(cells: list[_SourceCell], release) -> list[_SourceCell]:
    if release is None:
        return cells
    position = {_meta(c).get("grade_id"): i for i, c in enumerate(release.cells)}
    return sorted(cells, key=lambda c: position.get(c.name, len(position)))


def _restore_metadata(notebook, cells: list[_SourceCell], release) -> list[tuple[str, str]]:
    """Give back nbgrader metadata an editor dropped or corrupted; return (kind, sentence) for each repair."""
    done = []
    known = {c.name: c for c in cells}
    templates = {_meta(c).get("grade_id"): c for c in release.cells if _meta(c).get("grade_id")} if release else {}

    def metadata_of(source_cell):
        if source_cell.name in templates:
            return json.loads(json.dumps(_meta(templates[source_cell.name])))
        return {"grade": source_cell.grade, "grade_id": source_cell.name, "locked": source_cell.locked,
                "schema_version": 3, "solution": source_cell.solution, "task": False,
                **({"points": source_cell.points} if source_cell.grade else {})}

    # A cell copied with its metadata: the last copy keeps it, as nbgrader decides (nbgrader 0.9.6 itself
    # leaves an empty dict on the others, which its add_missing_cells step then trips over).
    ids = [_meta(c).get("grade_id") for c in notebook.cells]
    for grade_id in sorted({g for g in ids if g is not None and ids.count(g) > 1}):
        copies = [c for c in notebook.cells if _meta(c).get("grade_id") == grade_id]
        for cell in copies[:-1]:
            cell.metadata.pop("nbgrader")
        done.append((REVIEW, f"cell {grade_id} appears {len(copies)} times; the last copy is graded"))
    # nbgrader metadata naming a cell the assignment does not have: an ordinary cell, so nbgrader does not stop.
    for index, cell in enumerate(notebook.cells):
        grade_id = _meta(cell).get("grade_id")
        if "nbgrader" in cell.get("metadata", {}) and grade_id not in known:
            cell.metadata.pop("nbgrader")
            done.append((REVIEW, f"cell {index + 1} carried nbgrader metadata for an unknown cell {grade_id!r}; "
                                 "it is graded as an ordinary cell"))
    present = {_meta(c).get("grade_id") for c in notebook.cells} - {None}
    plain = [c for c in notebook.cells if not _meta(c)]
    for source_cell in cells:
        if source_cell.name in present:
            continue
        found = None
        if source_cell.solution and source_cell.cell_type == "code":
            # An answer cell: the last plain code cell that defines the same functions.
            wanted = _defined_names(source_cell.source)
            matches = [c for c in plain if c.cell_type == "code" and wanted and wanted <= _defined_names(c.source)]
            found = matches[-1] if matches else None
            how = f"by the functions it defines ({', '.join(sorted(wanted))})"
        else:
            # A locked cell: a plain cell with the same text as the release.
            text = templates[source_cell.name].source if source_cell.name in templates else \
                _without_hidden_tests(source_cell.source)
            matches = [c for c in plain if c.source.strip() == text.strip()]
            found = matches[-1] if matches else None
            how = "by its text"
        if found is not None:
            found.metadata["nbgrader"] = metadata_of(source_cell)
            plain.remove(found)
            present.add(source_cell.name)
            done.append((REPAIRED, f"cell {source_cell.name} had lost its nbgrader metadata; found {how}"))
    # Cells still missing: put them back after the cell that precedes them in the release.
    order = [c.name for c in _in_release_order(cells, release)]
    for position, name in enumerate(order):
        if name in present:
            continue
        source_cell = known[name]
        if name in templates:
            cell = nbformat.from_dict(json.loads(json.dumps(templates[name])))
        elif source_cell.cell_type == "code":
            cell = nbformat.v4.new_code_cell(source_cell.source if not source_cell.solution else
                                             "raise NotImplementedError()")
        else:
            cell = nbformat.v4.new_markdown_cell(source_cell.source if not source_cell.solution else "")
        cell.metadata["nbgrader"] = metadata_of(source_cell)
        if notebook.get("nbformat_minor", 0) >= 5:
            cell["id"] = uuid.uuid4().hex[:8]
        else:
            cell.pop("id", None)
        before = [n for n in order[:position] if n in present]
        at = 0
        if before:
            at = next(i for i, c in enumerate(notebook.cells) if _meta(c).get("grade_id") == before[-1]) + 1
        notebook.cells.insert(at, cell)
        present.add(name)
        what = "answer cell (put back blank)" if source_cell.solution else "locked cell"
        done.append((REVIEW, f"the {what} {name} was missing from the submission; it was put back"))
    # Grade cells whose points were removed: nbgrader reads them before it restores anything.
    for cell in notebook.cells:
        meta = _meta(cell)
        source_cell = known.get(meta.get("grade_id"))
        if source_cell is not None and source_cell.grade and meta.get("grade") and "points" not in meta:
            meta["points"] = source_cell.points
    return done


def _inspect(notebook, cells: list[_SourceCell], release) -> list[tuple[str, str]]:
    """(kind, sentence) for what nbgrader fixes by itself but a person may want to know, and for suspicious code."""
    found = []
    ids = [_meta(c).get("grade_id") for c in notebook.cells if _meta(c).get("grade_id")]
    known = {c.name: c for c in cells}
    release_source = {(_meta(c).get("grade_id")): c.source for c in release.cells} if release else {}
    for cell in notebook.cells:
        grade_id = _meta(cell).get("grade_id")
        source_cell = known.get(grade_id)
        if source_cell is None:
            continue
        if cell.cell_type != source_cell.cell_type:
            found.append((REPAIRED, f"cell {grade_id} was changed to a {cell.cell_type} cell; nbgrader makes it a "
                                    f"{source_cell.cell_type} cell again"))
        if source_cell.locked and grade_id in release_source and cell.source != release_source[grade_id]:
            found.append((REVIEW, f"the locked cell {grade_id} was edited; autograde runs the original"))
    order = [c.name for c in cells]
    seen = [g for g in dict.fromkeys(reversed(ids))][::-1]  # last copies, in notebook order
    expected = [g for g in order if g in seen]
    if seen != expected:
        first = next(g for g, e in zip(seen, expected) if g != e)
        found.append((REVIEW, f"cells are out of order (cell {first} moved); a check may run before its answer"))
    if notebook.metadata.get("colab") is not None or "google.colab" in json.dumps(notebook.metadata):
        found.append((REPAIRED, "saved by Google Colab; nbgrader restores the kernel and the metadata it needs"))
    imported = _imported_names(notebook)
    unchanged = {c.source for c in release.cells} if release else set()
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code" or cell.source in unchanged or (_meta(cell).get("locked") and
                                                                    not _meta(cell).get("solution")):
            continue
        where = _meta(cell).get("grade_id") or f"cell {index + 1}"
        for sentence in scan_code(cell.source, imported):
            found.append((REVIEW, f"{where}, {sentence}"))
    return found


def pregrade(assignment: str, root: Path | str = ".") -> list[Finding]:
    """Check every submission of ``assignment`` before ``nbgrader autograde``; repair what would stop nbgrader.

    Originals of repaired files are kept in ``pregrade_originals/``; findings go to
    ``reports/<assignment>/pregrade.json`` for :func:`report`.
    """
    course = Course.load(root)
    expected = _expected(course.db_url, assignment)
    findings: list[Finding] = []
    with course.gradebook() as gb:
        roster = {s.id for s in gb.students}
    students = sorted(roster | {p.name for p in course.submitted.glob("*") if p.is_dir()})
    for student in students:
        folder = course.submitted / student / assignment
        for name, cells in expected.items():
            def add(kind, message, _name=name, _student=student):
                findings.append(Finding(_student, _name, kind, message))

            path = folder / f"{name}.ipynb"
            if not folder.is_dir():
                add(REVIEW, "no submission")
                continue
            if not path.exists():
                renamed = _find_renamed(folder, name, set(expected), cells)
                if renamed is None:
                    add(REVIEW, f"no {name}.ipynb in the submission; it scores 0")
                    continue
                _backup(course, assignment, student, renamed)
                renamed.rename(path)
                add(REPAIRED, f"the notebook was saved as {renamed.name!r}; it is graded as {path.name}")
            try:
                notebook = nbformat.read(path, as_version=4)
            except Exception as error:  # noqa: BLE001 - any unreadable file
                _backup(course, assignment, student, path)
                path.rename(path.with_name(path.name + ".unreadable"))
                reason = re.split(r"[:\n]", str(error).strip())[0][:80] if str(error).strip() else type(error).__name__
                add(REVIEW, f"{name}.ipynb is not a readable notebook ({reason}); it scores 0")
                continue
            release_path = course.release / assignment / f"{name}.ipynb"
            release = nbformat.read(release_path, as_version=4) if release_path.exists() else None
            cells = _in_release_order(cells, release)
            repairs = _restore_metadata(notebook, cells, release)
            for kind, message in _inspect(notebook, cells, release):
                add(kind, message)
            if repairs:
                _backup(course, assignment, student, path)
                nbformat.write(notebook, path)
                for kind, message in repairs:
                    add(kind, message)
    _ensure_students(course, {f.student for f in findings if f.kind == REVIEW})
    out = course.reports(assignment) / "pregrade.json"
    out.write_text(json.dumps([asdict(f) for f in findings], indent=1, ensure_ascii=False))
    return findings


def _ensure_students(course: Course, students: set[str]) -> None:
    """Students with nothing gradable still get a row (score 0) in ``nbgrader export``."""
    with course.gradebook() as gb:
        for student in students:
            gb.update_or_create_student(student)


# ---------------------------------------------------------------- after grading


def _outputs_text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", "") if isinstance(output.get("text", ""), str) else "")
        parts.append(f"{output.get('ename', '')}: {output.get('evalue', '')}")
    return "\n".join(parts)


def _inspect_graded(notebook) -> list[str]:
    found = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        grade_id = _meta(cell).get("grade_id") or "a cell"
        names = {o.get("ename") for o in cell.get("outputs", []) if o.get("output_type") == "error"}
        text = _outputs_text(cell)
        if KERNEL_DIED in names:
            found.append(f"the kernel died in {grade_id}; later graded cells scored 0")
        if KERNEL_UNRESPONSIVE in names:
            found.append(f"the kernel stopped answering in {grade_id}; later graded cells scored 0")
        if "CellTimeoutError" in names and KERNEL_UNRESPONSIVE not in names:
            found.append(f"{grade_id} ran past the time limit and scored 0")
        if TAMPER_NOTE in text or TAMPER_FAILED in text:
            line = next(line for line in text.splitlines() if TAMPER_NOTE in line or TAMPER_FAILED in line)
            found.append(f"in {grade_id}: {line.strip().removeprefix(NOTE_PREFIX).rstrip('.')}")
        if GRADEBOOK_NOTE.strip() in text:
            found.append("code in this notebook changed the gradebook while it ran (the change was undone)")
        if TRUNCATED in text and nbutils.is_grade(cell):
            found.append(f"the output of {grade_id} was truncated")
    return found


def report(assignment: str, root: Path | str = ".", mark_manual: bool = True) -> list[dict]:
    """One row per student and notebook: score, max score, "ok" or "review", and the reasons.

    Reads the gradebook, the autograded notebooks and ``pregrade.json``; writes
    ``reports/<assignment>/report.csv`` and ``report.md``; with ``mark_manual``, submissions to
    review are marked "needs manual grading" in the gradebook.
    """
    from nbgrader.api import MissingEntry

    course = Course.load(root)
    expected = _expected(course.db_url, assignment)
    pre_path = course.reports(assignment) / "pregrade.json"
    pre = [Finding(**f) for f in json.loads(pre_path.read_text())] if pre_path.exists() else []
    rows = []
    with course.gradebook() as gb:
        students = sorted({s.id for s in gb.students} | {f.student for f in pre})
        for student in students:
            for name in expected:
                reasons = [f.message for f in pre if f.student == student and f.notebook == name and f.kind == REVIEW]
                notes = [f.message for f in pre if f.student == student and f.notebook == name and f.kind == REPAIRED]
                score = max_score = None
                try:
                    submission = gb.find_submission_notebook(name, assignment, student)
                except MissingEntry:
                    submission = None
                max_score = sum(c.points or 0 for c in expected[name] if c.grade)
                if submission is None:
                    score = 0.0
                    if not reasons:
                        reasons.append("not autograded (no submission)")
                else:
                    score = submission.score
                    graded = course.autograded / student / assignment / f"{name}.ipynb"
                    if not graded.exists():
                        reasons.append("autograde failed for this notebook (see the autograde log); scored 0")
                    else:
                        notebook = nbformat.read(graded, as_version=4)
                        findings = _inspect_graded(notebook)
                        reasons += [f for f in findings if "truncated" not in f]
                        notes += [f for f in findings if "truncated" in f]
                        in_notebook = {_meta(c).get("grade_id"): nbutils.determine_grade(c)[0]
                                       for c in notebook.cells if nbutils.is_grade(c)}
                        for grade in submission.grades:
                            if grade.auto_score is not None and grade.name in in_notebook \
                                    and in_notebook[grade.name] != grade.auto_score:
                                reasons.append(f"the gradebook gives {grade.name} {grade.auto_score:g} points but the "
                                               f"graded notebook earns {in_notebook[grade.name]:g}: the gradebook "
                                               "may have been changed")
                    if reasons and mark_manual:
                        for grade in submission.grades:
                            grade.needs_manual_grade = True
                        gb.db.commit()
                rows.append({"student_id": student, "notebook": name, "score": float(score or 0),
                             "max_score": float(max_score), "status": "review" if reasons else "ok",
                             "reasons": "; ".join(dict.fromkeys(reasons)), "notes": "; ".join(dict.fromkeys(notes))})
    folder = course.reports(assignment)
    with open(folder / "report.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["student_id"])
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {assignment}: grading report ({datetime.datetime.now():%Y-%m-%d %H:%M})", "",
             "| student | notebook | score | status | reasons | notes |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['student_id']} | {r['notebook']} | {r['score']:g} / {r['max_score']:g} | {r['status']} | "
              f"{r['reasons'].replace('|', '/')} | {r['notes'].replace('|', '/')} |" for r in rows]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    return rows


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.grading", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["pregrade", "report"])
    parser.add_argument("assignment", help="the assignment (chapter) name, e.g. 01_tokens_and_embeddings")
    parser.add_argument("--root", default=".", help="the course folder (with nbgrader_config.py); default: here")
    args = parser.parse_args(argv)
    if args.command == "pregrade":
        findings = pregrade(args.assignment, args.root)
        for f in findings:
            print(f"{f.kind:8}  {f.student:16} {f.notebook}: {f.message}")
        reviews = {f.student for f in findings if f.kind == REVIEW}
        print(f"{len(findings)} findings; {len(reviews)} student(s) to review. Next: nbgrader autograde {args.assignment}")
    else:
        rows = report(args.assignment, args.root)
        for r in rows:
            print(f"{r['student_id']:16} {r['score']:6g} / {r['max_score']:g}  {r['status']:6}  {r['reasons']}")
        print(f"{sum(r['status'] == 'review' for r in rows)} of {len(rows)} to review; "
              f"written to {Course.load(args.root).reports(args.assignment) / 'report.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
