"""The book site builds offline from the executed chapters, and every page works in a real browser.

The build is the real one (tools/book.py staging, then ``jupyter-book build --warningiserror``) on a
copy of book/ in a temporary folder; the chapters are the same executions the notebook tests check
(conftest.executed_solution), so nothing runs twice. The browser is Debian's Chromium with every
request off this machine blocked: a page that still reaches for a CDN fails here.
"""

from __future__ import annotations

import html.parser
import re
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest
import yaml
from browser import artifacts_dir, chromium_page, free_port, server
from conftest import ROOT, executed_solution, nbgrader_meta
from playwright.sync_api import TimeoutError as PlaywrightTimeout

import book as book_tool

CHAPTERS = book_tool.chapters()
CDN_HOSTS = ("cdn.jsdelivr.net", "cdnjs.cloudflare.com", "unpkg.com", "code.jquery.com", "d3js.org",
             "requirejs.org", "fonts.googleapis.com")


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    return [entry["file"] for part in toc["parts"] for entry in part["chapters"]]


def test_the_table_of_contents_lists_every_chapter():
    listed = toc_files()
    for name in CHAPTERS:
        assert f"chapters/{name}" in listed, f"book/_toc.yml has no page for {name}"
    pages = [f for f in listed if not f.startswith("chapters/")]
    for page in pages:
        source = book_tool.STAGED_PAGES.get(page, ROOT / "book" / f"{page}.md")
        assert source.exists(), f"book/_toc.yml lists {page}, which has no source file"


def test_a_page_folds_answers_and_drops_hidden_tests():
    source = nbformat.read(book_tool.source_path(CHAPTERS[1]), as_version=4)
    page = book_tool.for_the_book(source)
    answers = [c for c in source.cells if nbgrader_meta(c).get("solution")]
    folded = [c for c in page.cells if "hide-input" in c.metadata.get("tags", [])]
    assert answers and len(folded) == len(answers)
    text = "\n".join(c.source for c in page.cells)
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
        assert marker not in text
    assert not any("nbgrader" in c.metadata for c in page.cells)
    assert sum("checks." in c.source for c in page.cells) >= len(answers), "the visible checks stay on the page"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The built site: a copy of book/ with the executed chapters and the instructor guide staged into it."""
    work = tmp_path_factory.mktemp("book")
    source = work / "book"
    shutil.copytree(ROOT / "book", source, ignore=shutil.ignore_patterns("_build", "chapters", "instructors.md"))
    book_tool.stage_pages(source)
    cache = work / "executed"
    for name in CHAPTERS:
        notebook, _ = executed_solution(book_tool.source_path(name))
        book_tool.store_execution(name, notebook, cache)
        cached = book_tool.cached_execution(name, cache)
        assert cached is not None, "a stored execution must count as current"
        book_tool.stage(name, cached, source / "chapters")
    return book_tool.build(source, work / "out", timeout=600)


def chapter_page(site: Path, name: str) -> Path:
    return site / "chapters" / f"{name}.html"


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.targets: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        for key in ("href", "src"):
            if attrs.get(key):
                self.targets.append(attrs[key])


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(errors="replace"))
    return parser


@pytest.mark.book
def test_every_chapter_has_a_page_without_answers_markers_or_cdn(site):
    for name in CHAPTERS:
        page = chapter_page(site, name)
        assert page.exists(), f"no page for {name}"
        text = page.read_text()
        assert "Show solution" in text, f"{name}: the answers are not folded behind a toggle"
        assert "BEGIN HIDDEN TESTS" not in text and "BEGIN SOLUTION" not in text
        assert "colab.research.google.com/github/" in text and f"chapters/{name}/{name}.ipynb" in text, \
            f"{name}: no Colab link to the student notebook"
    for page in site.rglob("*.html"):
        text = page.read_text(errors="replace")
        for host in CDN_HOSTS:
            for match in re.finditer(rf"<(?:script|link)[^>]+(?:src|href)=[\"'](?:https?:)?//{re.escape(host)}", text):
                pytest.fail(f"{page.relative_to(site)} loads from {host}: {match.group(0)[:120]}")
    for vendored in ("_static/widgets/embed-amd.js", "_static/widgets/require.js", "_static/mathjax/tex-svg.js"):
        assert (site / vendored).exists(), f"{vendored} is not in the build"


@pytest.mark.book
def test_internal_links_and_anchors_resolve(site):
    broken = []
    ids = {}
    pages = sorted(p for p in site.rglob("*.html") if "_static" not in p.relative_to(site).parts)  # not theme templates
    for page in pages:
        ids[page] = _parse(page).ids
    for page in pages:
        for target in _parse(page).targets:
            parts = urlsplit(target)
            if parts.scheme or target.startswith(("//", "mailto:", "javascript:", "data:")):
                continue
            path = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if path.is_dir():
                path = path / "index.html"
            if not path.exists():
                broken.append(f"{page.relative_to(site)} -> {target}")
            elif parts.fragment and path.suffix == ".html" and path in ids and parts.fragment not in ids[path]:
                broken.append(f"{page.relative_to(site)} -> {target} (no such anchor)")
    assert not broken, f"{len(broken)} broken links, first: {broken[:8]}"


def _shows_widgets(notebook) -> bool:
    """Whether an executed notebook displays widgets and saved their state (the book must render those views)."""
    state = notebook.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    views = [o for c in notebook.cells for o in c.get("outputs", [])
             if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    return bool(state.get("state")) and bool(views)


@pytest.mark.book
@pytest.mark.timeout(600)
def test_pages_render_in_a_browser_with_the_network_closed(site):
    port = free_port()
    shots = artifacts_dir()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(site)]
    pages = ["index.html", "setup.html", "instructors.html"] + [f"chapters/{name}.html" for name in CHAPTERS]
    with server(command, port, site), chromium_page() as (page, problems):
        for relative in pages:
            before = len(problems)
            page.goto(f"http://127.0.0.1:{port}/{relative}", wait_until="load")
            try:  # best effort: the checks below wait for each thing they look at
                page.wait_for_load_state("networkidle", timeout=15_000)
            except PlaywrightTimeout:
                pass  # once in CI a page never went idle for 60 s; every request it made is still checked
            slug = relative.removesuffix(".html").replace("/", "_")
            assert page.locator("main h1, article h1").count() >= 1, f"{relative} has no title"
            if relative.startswith("chapters/"):
                name = Path(relative).stem
                notebook = nbformat.read(site.parents[2] / "book" / "chapters" / f"{name}.ipynb", as_version=4)
                images = sum(1 for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
                shown = page.locator("img[src*='.png']").count()
                assert shown >= images > 0, f"{relative}: {shown} plots shown, the notebook made {images}"
                math = any("$" in c.source for c in notebook.cells if c.cell_type == "markdown")
                if math:
                    page.wait_for_selector("mjx-container", state="attached", timeout=30_000)
                toggle = page.locator("details.hide summary").first
                assert toggle.count() == 1, f"{relative}: no 'Show solution' toggle"
                toggle.scroll_into_view_if_needed()
                page.screenshot(path=str(shots / f"book_{slug}_solution_folded.png"))
                toggle.click()
                page.wait_for_timeout(600)  # the toggle's opening animation
                page.screenshot(path=str(shots / f"book_{slug}_solution_shown.png"))
                bertviz_views = sum("course-bertviz" in o.get("data", {}).get("text/html", "")
                                    for c in notebook.cells for o in c.get("outputs", []))
                if bertviz_views:
                    views = page.locator(".course-bertviz")
                    assert views.count() == bertviz_views, f"{relative}: {views.count()} of {bertviz_views} bertviz views"
                    for index in range(bertviz_views):
                        view = views.nth(index)
                        view.locator("svg").first.wait_for(state="attached", timeout=30_000)
                        assert view.locator("svg *").count() > 50, f"{relative}: bertviz view {index + 1} drew an empty SVG"
                        view.scroll_into_view_if_needed()
                        page.screenshot(path=str(shots / f"book_{slug}_bertviz_{index + 1}.png"))
                if _shows_widgets(notebook):
                    widget = page.locator(".jupyter-widgets, .widget-box, .widget-dropdown").first
                    widget.wait_for(state="attached", timeout=30_000)
                    widget.scroll_into_view_if_needed()
                    page.wait_for_timeout(500)
                    page.screenshot(path=str(shots / f"book_{slug}_widget.png"))
            page.screenshot(path=str(shots / f"book_{slug}.png"))
            assert len(problems) == before, f"{relative}: {problems[before:]}"


def test_the_pages_workflow_builds_with_the_same_command_and_publishes_its_output():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())
    triggers = workflow[True] if True in workflow else workflow["on"]  # YAML 1.1 reads the key `on` as True
    assert triggers["push"]["branches"] == ["main"]
    assert workflow["permissions"]["pages"] == "write" and workflow["permissions"]["id-token"] == "write"
    steps = workflow["jobs"]["build"]["steps"]
    runs = "\n".join(step.get("run", "") for step in steps)
    assert "tools/book.py" in runs and "-c constraints.txt" in runs and "torch==2.13.0" in runs
    upload = next(step for step in steps if step.get("uses", "").startswith("actions/upload-pages-artifact"))
    default_site = (book_tool.BOOK / "_build" / "html").relative_to(ROOT).as_posix()
    assert upload["with"]["path"] == default_site, "the workflow must upload the folder tools/book.py builds"
    cache = next(step for step in steps if step.get("uses", "").startswith("actions/cache"))
    assert cache["with"]["path"] == book_tool.EXECUTED.relative_to(ROOT).as_posix()
    deploy = workflow["jobs"]["deploy"]
    assert deploy["needs"] == "build" and deploy["steps"][0]["uses"].startswith("actions/deploy-pages")
