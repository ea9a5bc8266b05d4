"""A real headless browser for the tests: Debian's Chromium driven by Playwright, never a downloaded one.

    with chromium_page() as (page, problems):
        page.goto("http://127.0.0.1:PORT/...")
        ...
        assert not problems, problems

``problems`` collects every JavaScript error the page raises and every console message at level
"error", so a test can assert that none happened. Screenshots go to ``test-artifacts/screenshots/``
(or ``$COURSE_ARTIFACTS/screenshots``) and stay there as test artifacts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The flags that keep Chromium from reaching for the network on a machine with none (see the design doc).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def chromium_path() -> str:
    """The browser binary: $COURSE_CHROMIUM, else Debian's /usr/bin/chromium (tools/install_browser.sh installs it)."""
    for candidate in (os.environ.get("COURSE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).exists():
            return candidate
    message = "no Chromium found: run `bash tools/install_browser.sh` (the README's test command does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("COURSE_ARTIFACTS", ROOT / "test-artifacts")) / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    """Return once something listens on 127.0.0.1:port; fail after ``timeout`` seconds or if the server died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with code {process.returncode} before listening on port {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"nothing listened on 127.0.0.1:{port} within {timeout:.0f} s")


@contextlib.contextmanager
def server(command: list[str], port: int, cwd: Path, env: dict | None = None, timeout: float = 60) -> Iterator[subprocess.Popen]:
    """Run a local server (bound to 127.0.0.1 by its command) for the duration of the block, then stop it."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **(env or {})}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(port, process, timeout)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)


@contextlib.contextmanager
def chromium_page(width: int = 1400, height: int = 1000, offline: bool = True):
    """A fresh headless Chromium page and the list of JavaScript problems it reports.

    ``offline`` blocks every request that does not go to 127.0.0.1 or localhost, so a page that still
    reaches for a CDN shows it as a failed request in ``problems`` instead of quietly working online.
    """
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": width, "height": height})
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            page.set_default_timeout(60_000)
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", lambda message: problems.append(f"console {message.type}: {message.text}")
                    if message.type == "error" else None)
            page.on("response", lambda response: problems.append(f"HTTP {response.status}: {response.url}")
                    if response.status >= 400 else None)
            if offline:
                def only_local(route):
                    host = route.request.url.split("/")[2].split(":")[0] if "://" in route.request.url else ""
                    if route.request.url.startswith(("data:", "blob:", "about:")) or host in ("127.0.0.1", "localhost"):
                        return route.continue_()
                    problems.append(f"blocked request to the network: {route.request.url}")
                    return route.abort()
                browser.route("**/*", only_local)
            yield page, problems
        finally:
            browser.close()
