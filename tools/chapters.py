"""Regenerate the student notebooks in chapters/ from the instructor notebooks in solutions/.

    python tools/chapters.py            # stamp links, then run nbgrader for every chapter
    python tools/chapters.py 06_x 07_y  # the same for the named chapters only

The repository URL lives in one place, ``[project.urls] Repository`` in pyproject.toml. This
script writes it into each notebook's "Open in Colab" badge and Colab install line, and into the
README's chapter map, before nbgrader copies the notebooks to chapters/. The test suite runs the
same functions and fails if chapters/ or any link is stale.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions"
CHAPTERS = ROOT / "chapters"

COLAB_LINK = re.compile(r"https://colab\.research\.google\.com/github/[^\s)\"'\]\\]+?/blob/main/(chapters/[^\s)\"'\]\\]+\.ipynb)")
INSTALL_SPEC = re.compile(r"git\+https://github\.com/[^\s\"'@\\]+")


def repo_url() -> str:
    """The course's repository URL, from pyproject.toml."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return meta["project"]["urls"]["Repository"].rstrip("/")


def colab_url(notebook: str) -> str:
    """The Colab address that opens ``notebook`` (a path like chapters/01_x/01_x.ipynb) from GitHub."""
    owner_repo = repo_url().removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{owner_repo}/blob/main/{notebook}"


def stamp_links(text: str) -> str:
    """Rewrite every Colab link and git install spec in ``text`` to the current repository URL."""
    text = COLAB_LINK.sub(lambda m: colab_url(m.group(1)), text)
    return INSTALL_SPEC.sub("git+" + repo_url(), text)


def assignments() -> list[str]:
    """Chapter folder names, e.g. ['01_tokens']: every folder of solutions/ that holds a notebook."""
    return sorted(p.name for p in SOLUTIONS.iterdir() if p.is_dir() and any(p.glob("*.ipynb")))


def stamped_files() -> list[Path]:
    return sorted(SOLUTIONS.glob("*/*.ipynb")) + sorted(SOLUTIONS.glob("*/README.md")) + [ROOT / "README.md"]


def generate(release_dir: Path, names: list[str] | None = None) -> None:
    """Run ``nbgrader generate_assignment`` for each chapter, writing student versions to ``release_dir``."""
    for name in names or assignments():
        command = [sys.executable, "-m", "nbgrader", "generate_assignment", name, "--force", "--no-db",
                   f"--CourseDirectory.release_directory={release_dir}", "--log-level=WARN"]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"nbgrader generate_assignment {name} failed:\n{done.stdout}\n{done.stderr}")


def stamp_file(path: Path, write: bool = True) -> bool:
    """Stamp the links in a Markdown file or in each cell of a notebook; True if anything changed."""
    if path.suffix == ".ipynb":
        notebook = nbformat.read(path, as_version=4)
        changed = False
        for cell in notebook.cells:
            stamped = stamp_links(cell.source)
            if stamped != cell.source:
                cell.source, changed = stamped, True
        if changed and write:
            nbformat.write(notebook, path)
        return changed
    text = path.read_text()
    stamped = stamp_links(text)
    if stamped != text and write:
        path.write_text(stamped)
    return stamped != text


def main(names: list[str] | None = None) -> None:
    names = names or assignments()
    unknown = sorted(set(names) - set(assignments()))
    if unknown:
        sys.exit(f"no chapter in solutions/ named {', '.join(unknown)}; chapters are {', '.join(assignments())}")
    for path in stamped_files():
        if stamp_file(path):
            print(f"updated links in {path.relative_to(ROOT)}")
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), names)
        for name in names:
            target = CHAPTERS / name
            if target.exists():
                for old in target.iterdir():
                    if old.is_file():
                        old.unlink()
            target.mkdir(parents=True, exist_ok=True)
            for new in (Path(tmp) / name).iterdir():
                if new.is_file():
                    (target / new.name).write_bytes(new.read_bytes())
            print(f"chapters/{name}: regenerated from solutions/{name}")


if __name__ == "__main__":
    main(sys.argv[1:])
