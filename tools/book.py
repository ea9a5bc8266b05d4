"""Build the course's book site with Jupyter Book 1.x, offline.

    python tools/book.py                   # execute what changed, stage the chapters, build book/_build/html
    python tools/book.py --output DIR      # build into DIR/_build/html instead

What it does, in order:

1. **Execute** every instructor notebook in ``solutions/`` with nbclient, as a learner would (in its
   own folder, widget state saved in the notebook). Executions are cached in
   ``book/_build/executed/NAME.ipynb``, stamped with a hash of the notebook's cells, the ``utils``
   package's source and ``COURSE_QUICK``; a later build re-executes only the chapters whose hash
   changed, so a rebuild after the first one takes about a minute.
2. **Stage** each executed notebook as ``book/chapters/NAME.ipynb`` (generated, not committed): the
   answer cells lose their nbgrader markers and fold behind a "Show solution" toggle, and the check
   cells lose their hidden tests, which stay in ``solutions/`` only. The instructor guide is the
   repository's INSTRUCTORS.md, copied in as ``book/instructors.md``.
3. **Build** with ``jupyter-book build --warningiserror``. Execution is off in the book's own config:
   step 1 already ran everything. The widget manager, require.js and MathJax come from
   ``book/_vendor/`` (see tools/vendor_book_js.sh), never from a CDN.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
SOLUTIONS = ROOT / "solutions"
STAGED = BOOK / "chapters"
EXECUTED = BOOK / "_build" / "executed"

HIDDEN_TESTS = re.compile(r"\n?[ \t]*### BEGIN HIDDEN TESTS.*?### END HIDDEN TESTS[ \t]*\n?", re.DOTALL)
SOLUTION_MARKER = re.compile(r"^[ \t]*### (BEGIN|END) SOLUTION[ \t]*\n?", re.MULTILINE)
# The notebooks' Colab badge is an image on Google's site; the book shows its own copy, so a page
# loads nothing from elsewhere (the badge still links to Colab).
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
LOCAL_BADGE = "../colab-badge.svg"  # book/colab-badge.svg, seen from book/chapters/


def chapters() -> list[str]:
    """Chapter names, e.g. ['01_tokens_and_embeddings', ...]: every folder of solutions/ holding a notebook."""
    return sorted(p.name for p in SOLUTIONS.iterdir() if p.is_dir() and (p / f"{p.name}.ipynb").exists())


def source_path(name: str) -> Path:
    return SOLUTIONS / name / f"{name}.ipynb"


def execution_key(name: str) -> str:
    """What an executed copy depends on: the notebook's cells, the utils package, and the QUICK switch."""
    digest = hashlib.sha256()
    notebook = nbformat.read(source_path(name), as_version=4)
    for cell in notebook.cells:
        digest.update(cell.cell_type.encode() + b"\0" + cell.source.encode() + b"\0")
    for path in sorted((ROOT / "utils").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    digest.update(b"quick=" + os.environ.get("COURSE_QUICK", "").encode())
    return digest.hexdigest()


def cached_execution(name: str, cache: Path = EXECUTED) -> nbformat.NotebookNode | None:
    path = cache / f"{name}.ipynb"
    if not path.exists():
        return None
    notebook = nbformat.read(path, as_version=4)
    return notebook if notebook.metadata.get("course_book", {}).get("key") == execution_key(name) else None


def store_execution(name: str, notebook: nbformat.NotebookNode, cache: Path = EXECUTED) -> Path:
    """Keep an executed notebook in the cache under the key of the current sources."""
    cache.mkdir(parents=True, exist_ok=True)
    notebook.metadata["course_book"] = {"key": execution_key(name)}
    path = cache / f"{name}.ipynb"
    nbformat.write(notebook, path)
    return path


def execute(name: str, timeout: int = 600) -> nbformat.NotebookNode:
    """Run the instructor notebook top to bottom in its own folder, saving widget state for the book."""
    from nbclient import NotebookClient

    notebook = nbformat.read(source_path(name), as_version=4)
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", store_widget_state=True,
                   resources={"metadata": {"path": str(source_path(name).parent)}}).execute()
    return notebook


def executed(name: str, cache: Path = EXECUTED) -> nbformat.NotebookNode:
    notebook = cached_execution(name, cache)
    if notebook is not None:
        print(f"{name}: executed copy is current")
        return notebook
    start = time.perf_counter()
    print(f"{name}: executing ...", flush=True)
    notebook = execute(name)
    store_execution(name, notebook, cache)
    print(f"{name}: executed in {time.perf_counter() - start:.0f} s")
    return notebook


def for_the_book(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The page a reader sees: solutions folded behind a toggle, hidden tests removed, nbgrader metadata gone."""
    notebook = nbformat.from_dict(notebook)
    for cell in notebook.cells:
        grading = cell.metadata.pop("nbgrader", {})
        if cell.cell_type == "markdown":
            cell.source = cell.source.replace(COLAB_BADGE, LOCAL_BADGE)
        if cell.cell_type != "code":
            continue
        if grading.get("solution"):
            cell.source = SOLUTION_MARKER.sub("", cell.source).strip("\n")
            tags = cell.metadata.setdefault("tags", [])
            if "hide-input" not in tags:
                tags.append("hide-input")
        if grading.get("grade"):
            cell.source = HIDDEN_TESTS.sub("\n", cell.source).strip("\n")
    notebook.metadata.pop("course_book", None)
    return notebook


def stage(name: str, notebook: nbformat.NotebookNode, folder: Path = STAGED) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.ipynb"
    nbformat.write(for_the_book(notebook), path)
    return path


# Pages whose source lives outside book/: staged into it (and git-ignored there) at every build.
STAGED_PAGES = {"instructors": ROOT / "INSTRUCTORS.md"}


def stage_pages(folder: Path = BOOK) -> None:
    """Copy the pages that live outside book/ into it: the instructor guide is INSTRUCTORS.md itself."""
    for page, source in STAGED_PAGES.items():
        (folder / f"{page}.md").write_text(source.read_text())


def build(source: Path = BOOK, output: Path | None = None, timeout: int = 900) -> Path:
    """Run jupyter-book on the book folder ``source`` (warnings are errors); return the folder of the HTML site."""
    output = output or source
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    command = [str(jupyter_book), "build", str(source), "--path-output", str(output), "--warningiserror", "--keep-going"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed (exit {done.returncode}):\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}")
    return output / "_build" / "html"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=BOOK, help="the site goes to OUTPUT/_build/html")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    for name in chapters():
        stage(name, executed(name))
    stage_pages()
    site = build(BOOK, args.output)
    print(f"built {site / 'index.html'} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
