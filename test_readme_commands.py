"""The README's two development commands work on a stock Debian 12.

Debian's system Python refuses ``pip install`` (PEP 668), so the commands
create a virtual environment themselves; ``.ci/run`` runs the same two lines.
The proof is a fresh Debian bookworm container with only python3,
python3-venv and git (made with debootstrap like test_image.py's base image:
no image registry is reachable), a non-root user in it, a ``git clone`` of
this working tree, and the README's commands, verbatim.

The nested run is the pure selection (``-m 'not docker'``): a Docker-backed run
inside the container would need the docker CLI, root and the host's PID
namespace (the tests enter containers' network namespaces), and would double
the suite's time. Timings on the 2-core machine: the Debian image ~60 s
(once on the tests' own engine, where it is kept), the commands ~4 min.
"""

from __future__ import annotations

import shlex
import time

from testlib import REPO_ROOT, USER_ID, snapshot, stock_debian_image

README = REPO_ROOT / "README.md"
CI_RUN = REPO_ROOT / ".ci/run"
SETUP_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -r requirements-dev.txt"
TEST_COMMAND = ".venv/bin/python -m pytest"
DEBIAN_IMAGE = "local-endpoints-test/debian12-venv:1"   # bump when the recipe changes
def test_readme_and_ci_give_the_same_commands():
    readme, ci = README.read_text(), CI_RUN.read_text()
    assert SETUP_COMMAND in readme and TEST_COMMAND in readme
    assert SETUP_COMMAND in ci and TEST_COMMAND in ci


def test_readme_commands_on_stock_debian_12(docker_engine, tmp_path, record_property):
    started = time.monotonic()
    stock_debian_image(docker_engine, DEBIAN_IMAGE, ["python3", "python3-venv", "git"], tmp_path / "debian")
    built = time.monotonic()
    source = snapshot(tmp_path / "src")
    script = " && ".join([
        "git clone -q /src ~/local-endpoints", "cd ~/local-endpoints",
        SETUP_COMMAND + " -q", TEST_COMMAND + " -m 'not docker' -q -rs -p no:cacheprovider"])
    proc = docker_engine.cli(
        "run", "--rm", "--label", docker_engine.label, "-v", f"{source}:/src:ro", DEBIAN_IMAGE, "bash", "-c",
        f"useradd -m -u {USER_ID} dev && runuser -u dev -- bash -c {shlex.quote(script)}",
        check=False, timeout=1800)
    output = proc.stdout + proc.stderr
    record_property("debian_image_seconds", round(built - started, 1))
    record_property("readme_commands_seconds", round(time.monotonic() - built, 1))
    print(f"\n[figure] Debian image {built - started:.0f} s, README commands {time.monotonic() - built:.0f} s")
    assert proc.returncode == 0, output[-6000:]
    last = output.strip().splitlines()[-1]
    print(f"[figure] the nested run: {last}")
    assert " passed" in last and "failed" not in last and "error" not in last, last
