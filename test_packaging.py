"""The package: pyproject.toml makes the one module a ``local-endpoints`` command.

Pure checks read pyproject.toml against the module and requirements.txt. The
Docker-backed test is the README's install and start commands on a stock
Debian 12 container (debootstrapped like test_readme_commands.py's, plus
Debian's pipx), as a non-root user, on a ``git clone`` of this working tree:

- ``pipx install .`` (the README's command), then ``local-endpoints --help``;
- ``pip wheel --no-deps -w dist .`` in a fresh virtual environment holding
  only pip and setuptools (so the version is read from the source, without
  importing boto3), the wheel installed in another fresh one, its
  ``local-endpoints --help`` and ``--version``; ``local-endpoints run --help``
  too when the module has the ``run`` subcommand (``run_main``);
- the README's two commands that start the server from the clone, and its
  ``local-endpoints --port 8080``, each asked for ``/health`` through
  ``--health-check``.

Timing on the 2-core machine: the image ~90 s once (kept on the tests' own
engine), the commands ~2 min.
"""

from __future__ import annotations

import ast
import re
import shlex
import time
import tomllib

import local_endpoints
from testlib import REPO_ROOT, USER_ID, snapshot, stock_debian_image

PYPROJECT = REPO_ROOT / "pyproject.toml"
README = REPO_ROOT / "README.md"
INSTALL_COMMAND = "pipx install ."
RUN_SETUP_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt"
RUN_COMMAND = ".venv/bin/python local_endpoints.py --port 8080"
COMMAND_ON_PATH = "local-endpoints --port 8080"
DEBIAN_PIPX_IMAGE = "local-endpoints-test/debian12-pipx:1"   # bump when the recipe changes


def pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


def test_the_package_is_the_one_module_with_a_console_script():
    project, setuptools = pyproject()["project"], pyproject()["tool"]["setuptools"]
    assert project["name"] == "local-endpoints"
    assert setuptools["py-modules"] == ["local_endpoints"]
    assert project["scripts"] == {"local-endpoints": "local_endpoints:main"}
    assert callable(local_endpoints.main)


def test_the_package_depends_on_what_requirements_txt_pins():
    pinned = [re.split(r"[=<>~!\[; ]", line, maxsplit=1)[0].strip().lower()
              for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert sorted(d.lower() for d in pyproject()["project"]["dependencies"]) == sorted(pinned)


def test_the_version_has_one_source_readable_without_importing_the_module():
    """setuptools reads ``attr:`` values from the module's AST when it can: a literal assignment."""
    assert pyproject()["project"]["dynamic"] == ["version"]
    assert pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "local_endpoints.VERSION"}
    tree = ast.parse((REPO_ROOT / "local_endpoints.py").read_text())
    literals = [node.value.value for node in tree.body
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and any(isinstance(t, ast.Name) and t.id == "VERSION" for t in node.targets)]
    assert literals == [local_endpoints.VERSION]


def test_build_output_is_ignored_by_git():
    ignored = (REPO_ROOT / ".gitignore").read_text().split()
    for pattern in ("build/", "dist/", "*.egg-info/"):
        assert pattern in ignored


def test_readme_gives_the_install_and_start_commands():
    readme = README.read_text()
    for command in (INSTALL_COMMAND, COMMAND_ON_PATH, RUN_SETUP_COMMAND, RUN_COMMAND):
        assert command in readme, command


def test_install_and_start_commands_on_stock_debian_12(docker_engine, tmp_path, record_property):
    started = time.monotonic()
    stock_debian_image(docker_engine, DEBIAN_PIPX_IMAGE, ["python3", "python3-venv", "git", "pipx"],
                       tmp_path / "debian")
    built = time.monotonic()
    source = snapshot(tmp_path / "src")
    has_run = hasattr(local_endpoints, "run_main")
    health = "for i in $(seq 50); do {} --health-check && break; sleep 0.2; done; {} --health-check"
    script = "\n".join([
        "set -euxo pipefail",
        "git clone -q /src ~/local-endpoints && cd ~/local-endpoints",
        # pipx puts commands in ~/.local/bin, which a login shell's ~/.profile puts on PATH.
        'export PATH="$HOME/.local/bin:$PATH"',
        INSTALL_COMMAND,
        "local-endpoints --help | grep -q -- --port",
        # The wheel, built without the build package, in a venv with only pip and setuptools.
        "python3 -m venv /tmp/build && /tmp/build/bin/pip wheel -q --no-deps -w /tmp/dist .",
        "python3 -m venv /tmp/app && /tmp/app/bin/pip install -q /tmp/dist/local_endpoints-*.whl",
        "/tmp/app/bin/local-endpoints --help | grep -q -- --port",
        f"test \"$(/tmp/app/bin/local-endpoints --version)\" = 'local-endpoints {local_endpoints.VERSION}'",
        *(["/tmp/app/bin/local-endpoints run --help"] if has_run else []),
        # The README's start commands, from the clone.
        RUN_SETUP_COMMAND + " -q",
        RUN_COMMAND + " & server=$!",
        health.format(*[RUN_COMMAND] * 2),
        "kill $server; wait $server || true",
        COMMAND_ON_PATH + " & server=$!",
        health.format(*[COMMAND_ON_PATH] * 2),
        "kill $server; wait $server || true",
        "echo ALL-DONE",
    ])
    proc = docker_engine.cli(
        "run", "--rm", "--label", docker_engine.label, "-v", f"{source}:/src:ro", DEBIAN_PIPX_IMAGE,
        "bash", "-c", f"useradd -m -u {USER_ID} dev && runuser -u dev -- bash -c {shlex.quote(script)}",
        check=False, timeout=1800)
    output = proc.stdout + proc.stderr
    record_property("debian_image_seconds", round(built - started, 1))
    record_property("install_commands_seconds", round(time.monotonic() - built, 1))
    print(f"\n[figure] Debian image {built - started:.0f} s, install commands {time.monotonic() - built:.0f} s;"
          f" `local-endpoints run --help` {'run' if has_run else 'not run: the module has no run_main yet'}")
    assert proc.returncode == 0 and "ALL-DONE" in output, output[-6000:]
