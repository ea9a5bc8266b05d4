"""A real browser runs chapter 06 in JupyterLab, offline: the bertviz views and the widget explorer render.

JupyterLab is started on 127.0.0.1 with its own temporary configuration (no news pop-up, no update
check, nothing written to the user's ~/.jupyter), on a temporary copy of the chapter-06 solution
notebook, with COURSE_QUICK=1. Headless Debian Chromium (driven by Playwright, see tests/browser.py)
opens the notebook, runs all cells from the Run menu, waits until every cell has run, and checks
that the head view and the model view drew their SVG, that the ipywidgets explorer is in the page
with its plot, that no cell failed, and that the page raised no JavaScript error ("require is not
defined" included) and asked the network for nothing (but for the title cell's "Open in Colab" badge
image, answered with a local stand-in). Screenshots are saved as test artifacts:

    ch06_lab_after_run.png    the notebook after Run All, at the top
    ch06_head_view.png        bertviz's head view of the course model (offline)
    ch06_model_view.png       bertviz's model view of MiniLM (offline)
    ch06_head_explorer.png    the ipywidgets explorer of the course model
    ch06_lab_results.png      the closing results table
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

import pytest
from browser import artifacts_dir, chromium_page, free_port, server
from conftest import ROOT
from playwright.sync_api import TimeoutError as PlaywrightTimeout

CHAPTER = "06_looking_inside"
NOTEBOOK = f"{CHAPTER}.ipynb"
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
BADGE_STAND_IN = "<svg xmlns='http://www.w3.org/2000/svg' width='117' height='20'><rect width='117' height='20' fill='#555'/></svg>"
RUN_SECONDS = 300  # the notebook runs in about a minute with COURSE_QUICK=1; a busy 2-core machine gets slack


def _write_settings(config_dir: Path) -> None:
    """User settings for a fresh JupyterLab: never ask about news or updates (both would reach the
    network), and start the notebook's own kernel without asking which one."""
    settings = config_dir / "lab" / "user-settings" / "@jupyterlab"
    for extension, name, values in (("apputils-extension", "notification", {"fetchNews": "false", "checkForUpdates": False}),
                                    ("notebook-extension", "tracker", {"autoStartDefaultKernel": True})):
        (settings / extension).mkdir(parents=True, exist_ok=True)
        (settings / extension / f"{name}.jupyterlab-settings").write_text(json.dumps(values))


def _kernel_is_this_python() -> None:
    """The server runs with this interpreter, so the python3 kernel it starts must be this environment's."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    executable = spec.argv[0]
    # jupyter_client replaces a bare "python" with the server's own sys.executable.
    assert executable in ("python", "python3", sys.executable) or Path(executable).resolve().is_relative_to(
        Path(sys.prefix).resolve()), f"the python3 kernel runs {executable}, not this environment's {sys.executable}"


def _wait_for_run(page, deadline: float) -> None:
    """Until every code cell has an execution count (none pending) and the closing table is shown."""
    idle_since = None
    while time.monotonic() < deadline:
        state = page.evaluate("""() => {
            const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(p => p.textContent.trim());
            const done = prompts.filter(p => /^\\[\\d+\\]:$/.test(p)).length;
            const running = prompts.filter(p => p.includes('*')).length;
            const cells = document.querySelectorAll('.jp-CodeCell');
            const last = cells[cells.length - 1];
            const table = last ? last.querySelector('.jp-OutputArea-output table') !== null : false;
            const errors = document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]').length;
            return {done, running, total: prompts.length, table, errors};
        }""")
        if state["errors"]:
            return
        if state["table"] and state["running"] == 0 and state["done"] == state["total"]:
            return
        idle_since = idle_since or time.monotonic() if state["running"] == 0 else None
        if idle_since and time.monotonic() - idle_since > 30:  # nothing queued, nothing running: the run stopped
            break
        _accept_dialogs(page)
        page.wait_for_timeout(1000)
    page.screenshot(path=str(artifacts_dir() / "ch06_lab_stopped.png"))
    pytest.fail(f"the notebook did not run to the end (screenshot ch06_lab_stopped.png): {state}; dialogs: {DIALOGS}")


DIALOGS: list[str] = []  # the text of every dialog JupyterLab opened, reported if the test fails


def _accept_dialogs(page) -> None:
    """Accept a dialog JupyterLab opens on a slow start (such as the kernel choice), noting its text."""
    dialog = page.locator(".jp-Dialog")
    while dialog.count():
        DIALOGS.append(" ".join(dialog.first.inner_text().split()))
        page.screenshot(path=str(artifacts_dir() / f"ch06_lab_dialog_{len(DIALOGS)}.png"))
        dialog.first.locator(".jp-Dialog-button.jp-mod-accept").first.click()
        dialog.first.wait_for(state="detached", timeout=15_000)


def _run_all_cells(page) -> None:
    """Run > Run All Cells, as a learner would; tried again if no cell starts (a menu opened too early)."""
    started = "() => [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))"
    for _ in range(3):
        _accept_dialogs(page)
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        try:
            page.wait_for_function(started, timeout=20_000)
            return
        except PlaywrightTimeout:
            page.keyboard.press("Escape")
    page.screenshot(path=str(artifacts_dir() / "ch06_lab_run_all_failed.png"))
    pytest.fail(f"Run > Run All Cells started no cell (screenshot ch06_lab_run_all_failed.png); dialogs: {DIALOGS}")


def _screenshot(page, locator, name: str) -> Path:
    """The window with ``locator``'s top scrolled to the top of the notebook: the view as a learner sees it."""
    path = artifacts_dir() / name
    locator.evaluate("node => node.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(300)
    page.screenshot(path=str(path))
    return path


@pytest.mark.notebook
@pytest.mark.timeout(420)
def test_chapter_06_views_render_offline_in_jupyterlab(tmp_path):
    _kernel_is_this_python()
    from utils.data import cache_dir

    work, config, runtime = tmp_path / "work", tmp_path / "jupyter-config", tmp_path / "jupyter-runtime"
    work.mkdir()
    shutil.copy(ROOT / "solutions" / CHAPTER / NOTEBOOK, work / NOTEBOOK)
    _write_settings(config)
    port, token = free_port(), secrets.token_hex(16)
    env = {
        "JUPYTER_CONFIG_DIR": str(config), "JUPYTER_RUNTIME_DIR": str(runtime),
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "COURSE_QUICK": "1", "COURSE_CACHE": str(cache_dir()),  # the corpus and MiniLM already there: nothing downloads
    }
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={work}", "--LabApp.news_url=",
               "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate"]
    if os.geteuid() == 0:
        command.append("--allow-root")

    shots = []
    with server(command, port, cwd=work, env=env, timeout=90), chromium_page(width=1400, height=1200) as (page, problems):
        # The one remote address the notebook names is its "Open in Colab" badge, an <img> in the title cell
        # (offline it would show as a broken image). It gets a local stand-in, so that any other request to
        # the network, a CDN script above all, is what `problems` reports.
        page.route(COLAB_BADGE, lambda route: route.fulfill(content_type="image/svg+xml", body=BADGE_STAND_IN))
        page.goto(f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK}?token={token}")
        page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first.wait_for(timeout=90_000)
        page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(timeout=90_000)

        _run_all_cells(page)
        _wait_for_run(page, time.monotonic() + RUN_SECONDS)

        failed = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]')
        assert failed.count() == 0, f"a cell failed in JupyterLab: {failed.first.inner_text()[:500]}"
        page.mouse.move(5, 1195)  # off the views: bertviz highlights the token under the pointer
        shots.append(_screenshot(page, page.locator(".jp-Notebook .jp-Cell").first, "ch06_lab_after_run.png"))

        views = page.locator(".course-bertviz")
        assert views.count() == 2, f"expected the head view and the model view, found {views.count()} bertviz outputs"
        for index, name in enumerate(("head", "model")):
            view = views.nth(index)
            assert view.locator("#vis svg").count() == 1, f"bertviz's {name} view drew no SVG"
            assert view.locator("#vis svg *").count() > 50, f"bertviz's {name} view SVG is empty"
            assert view.locator(".course-bertviz-pending").count() == 0, f"the {name} view's script did not finish"
            shots.append(_screenshot(page, view, f"ch06_{name}_view.png"))

        explorer = page.locator(".course-head-explorer")
        assert explorer.count() == 1, "the ipywidgets head explorer is not in the page"
        assert explorer.locator(".widget-dropdown").count() == 3, "the explorer lacks its layer, head and query menus"
        assert page.locator(".jupyter-widgets").count() > 3
        assert explorer.locator(".notice, .widget-label", has_text="Showing the first 64 of 128 tokens.").count() == 1
        explorer.locator("img").first.wait_for(timeout=30_000)  # the plot inside the widget's Output
        shots.append(_screenshot(page, explorer, "ch06_head_explorer.png"))

        table = page.locator(".jp-CodeCell").last.locator(".jp-OutputArea-output table")
        shots.append(_screenshot(page, table, "ch06_lab_results.png"))

        page.wait_for_timeout(500)  # let late console messages arrive before judging
        text = "\n".join(problems)
        assert "require is not defined" not in text
        assert not problems, f"the page reported problems:\n{text[:3000]}"
    for shot in shots:
        assert shot.exists() and shot.stat().st_size > 5_000, f"screenshot {shot.name} is missing or empty"
