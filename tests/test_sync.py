"""chapters/ is exactly what nbgrader generates from solutions/ now, and every link is current."""

import re

import nbformat
import pytest

import chapters as chapter_tool
from conftest import ROOT, nbgrader_meta


def normalized(path):
    """What a learner sees and nbgrader relies on: cell types, sources, grading metadata; not ids or outputs."""
    notebook = nbformat.read(path, as_version=4)
    return [(c.cell_type, c.source, nbgrader_meta(c), c.metadata.get("editable"), c.metadata.get("deletable"))
            for c in notebook.cells]


@pytest.fixture(scope="module")
def fresh_release(tmp_path_factory):
    release = tmp_path_factory.mktemp("release")
    chapter_tool.generate(release)
    return release


def test_every_solution_has_a_committed_chapter():
    assert chapter_tool.assignments(), "solutions/ holds no chapter"
    for name in chapter_tool.assignments():
        assert (ROOT / "chapters" / name).is_dir(), f"chapters/{name} is missing: run python tools/chapters.py"
    extra = {p.name for p in (ROOT / "chapters").iterdir() if p.is_dir()} - set(chapter_tool.assignments())
    assert not extra, f"chapters/ has folders with no source in solutions/: {sorted(extra)}"


def test_chapters_equal_a_fresh_nbgrader_release(fresh_release):
    for name in chapter_tool.assignments():
        fresh = sorted(p.name for p in (fresh_release / name).iterdir())
        committed = sorted(p.name for p in (ROOT / "chapters" / name).iterdir())
        assert fresh == committed, f"chapters/{name} files differ from a fresh release"
        for file in fresh:
            ours, theirs = ROOT / "chapters" / name / file, fresh_release / name / file
            if file.endswith(".ipynb"):
                same = normalized(ours) == normalized(theirs)
            else:
                same = ours.read_bytes() == theirs.read_bytes()
            assert same, f"chapters/{name}/{file} is stale: run python tools/chapters.py"


def test_solutions_carry_no_outputs():
    for path in ROOT.glob("solutions/*/*.ipynb"):
        for cell in nbformat.read(path, as_version=4).cells:
            assert not cell.get("outputs") and not cell.get("execution_count"), f"{path.name} has saved outputs"


def test_student_versions_hide_solutions_and_hidden_tests():
    for path in ROOT.glob("chapters/*/*.ipynb"):
        text = path.read_text()
        for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
            assert marker not in text, f"{path.name} leaks '{marker}'"


def test_every_exercise_has_visible_and_hidden_tests():
    for path in ROOT.glob("solutions/*/*.ipynb"):
        cells = nbformat.read(path, as_version=4).cells
        answers = [c for c in cells if nbgrader_meta(c).get("solution")]
        tests = [c for c in cells if nbgrader_meta(c).get("grade")]
        assert len(answers) >= 3 and len(tests) == len(answers), path.name
        for cell in tests:
            visible = cell.source.split("### BEGIN HIDDEN TESTS")[0]
            assert "checks." in visible, f"{nbgrader_meta(cell)['grade_id']} has no visible check"
            assert "### BEGIN HIDDEN TESTS" in cell.source, f"{nbgrader_meta(cell)['grade_id']} has no hidden tests"


def test_links_carry_the_one_repository_url():
    stale = [str(p.relative_to(ROOT)) for p in chapter_tool.stamped_files() if chapter_tool.stamp_file(p, write=False)]
    assert not stale, f"links out of date in {stale}: run python tools/chapters.py"
    url = chapter_tool.repo_url()
    for path in ROOT.glob("solutions/*/*.ipynb"):
        notebook = nbformat.read(path, as_version=4)
        text = "\n".join(c.source for c in notebook.cells)
        assert chapter_tool.colab_url(f"chapters/{path.parent.name}/{path.name}") in notebook.cells[0].source
        assert f"git+{url}" in text and 'if "google.colab" in sys.modules' in text


def test_readme_maps_every_chapter_with_a_colab_badge():
    readme = (ROOT / "README.md").read_text()
    for name in chapter_tool.assignments():
        assert chapter_tool.colab_url(f"chapters/{name}/{name}.ipynb") in readme
        assert re.search(rf"\]\(chapters/{name}/?\)", readme), f"README's chapter map does not link chapters/{name}"
