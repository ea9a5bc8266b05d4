"""The README's two commands, CI, and the dependency files agree with each other and work."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from importlib.metadata import version
from pathlib import Path

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    """The bash blocks under 'Two commands', in order: set up and open, then test."""
    section = README.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[ ;@]", spec, maxsplit=1)[0].lower()


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_ci_runs_exactly_the_readme_test_command():
    setup, test = readme_commands()
    assert "jupyter lab chapters/" in setup and "pytest" in test
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [test]


def test_every_direct_dependency_is_pinned_and_installed_at_its_pin():
    extras = project()["optional-dependencies"]
    names = {requirement_name(s) for s in project()["dependencies"]}
    names |= {requirement_name(s) for group in extras.values() for s in group} - {"transformer-course"}
    pinned = pins()
    assert not names - set(pinned), f"not pinned in constraints.txt: {sorted(names - set(pinned))}"
    assert pinned["torch"] == "2.13.0", "torch must stay at 2.13.0: the version with a local CPU wheel here"
    for name in names:
        assert version(name).split("+")[0] == pinned[name], f"{name} {version(name)} installed, {pinned[name]} pinned"


def test_environment_yml_matches_pyproject():
    text = (ROOT / "environment.yml").read_text()
    listed = dict(re.findall(r"^\s+- ([A-Za-z0-9_.-]+)==([^\s]+)$", text, re.M))
    wanted = {requirement_name(s) for s in project()["dependencies"] + project()["optional-dependencies"]["lab"]}
    assert set(listed) == wanted, f"environment.yml lists {sorted(listed)}, pyproject wants {sorted(wanted)}"
    for name, pinned_version in listed.items():
        assert pins()[name] == pinned_version, f"environment.yml pins {name}=={pinned_version}, constraints.txt {pins()[name]}"
    assert "-e .[lab]" in text and "-c constraints.txt" in text


def test_utils_imports_from_any_folder(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import utils, utils.checks; print(utils.__file__)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve() == (ROOT / "utils" / "__init__.py").resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_readme_setup_command_opens_jupyterlab_on_chapters():
    """Run the README's first command as written, plus flags that keep the server local and headless."""
    setup, _ = readme_commands()
    port, token = free_port(), "course-test"
    flags = f" --no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port={port} --IdentityProvider.token={token}"
    if os.geteuid() == 0:
        flags += " --allow-root"
    server = subprocess.Popen(["bash", "-c", setup + flags], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, listing = time.monotonic() + 240, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                url = f"http://127.0.0.1:{port}/api/contents?token={token}"
                with urllib.request.urlopen(url, timeout=5) as response:
                    listing = json.load(response)
                break
            except OSError:
                time.sleep(1)
        assert listing is not None, f"JupyterLab did not answer on 127.0.0.1:{port}"
        names = {item["name"] for item in listing["content"]}
        assert "01_tokens_and_embeddings" in names, f"JupyterLab's root is not chapters/: {sorted(names)}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab?token={token}", timeout=10) as response:
            assert response.status == 200 and b"JupyterLab" in response.read()
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
