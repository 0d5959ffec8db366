"""Shared pytest fixtures for the Local Container Endpoints test-suite.

The infrastructure itself (engines, images, moto, the server launcher) lives in
``testlib.py``, which ``bench/`` uses too; this file wraps it in fixtures:

``docker_engine``  (session)  the contributor's Docker Engine (DOCKER_HOST, else
                              /var/run/docker.sock), or the tests' own dockerd at
                              /run/le-docker when none answers.
``private_engine`` (function) the same engine, for tests that stop and restart it:
                              skipped unless it is the tests' own.
``busybox_image``  (session)  tag of a tiny image imported from busybox-static.
``containers``     (function) runs labelled containers/networks, removed after.
``moto``           (session)  moto_server + counting reverse proxy.
``start_server``   (function) launches local_endpoints.py subprocesses.
``secrets``        (session)  values that must never appear in server logs.

Every server and `run` process is checked at the end for a refused outbound call (a call its
route or background job did not declare): the whole suite is a check that the declarations
are complete.

Docker-backed tests are skipped with a one-line reason (what is missing and how
to get it) when no engine can be had, except under CI (env ``CI`` set) where
that is a hard failure: a Docker test silently skipped in CI is a defect, not a
pass. When Docker-backed tests were skipped, the run's last line says so.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
from collections import Counter

import pytest

from testlib import (
    SECRET_ENV_VARS, SERVER_SCRIPT, SESSION_ID, DockerEngine, EngineUnavailable, Moto, SecretRegistry, Server,
    engine_session, free_port, server_env, unavailable,
)
import testlib

# =============================================================================
# Markers and the run's summary
# =============================================================================

DOCKER_FIXTURES = {"docker_engine", "private_engine", "busybox_image", "containers"}
DOCKER_SKIPPED = "Docker-backed skipped"   # the summary line's word for them
REFUSED_CALL = re.compile(r"outbound call \S+ refused: .*")   # local_endpoints.outbound's ERROR line


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "docker: the test needs a Docker Engine (added automatically to tests using "
        "docker_engine/private_engine/busybox_image/containers; deselect with -m 'not docker')",
    )


def pytest_collection_modifyitems(config, items):
    """Mark Docker-backed tests so ``-m 'not docker'`` gives a quick run."""
    for item in items:
        if DOCKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.docker)


def pytest_report_teststatus(report, config):
    """Count skipped Docker-backed tests apart, so the final line names them
    (and is not green: pytest colours an unknown category yellow)."""
    if report.skipped and "docker" in report.keywords and not hasattr(report, "wasxfail"):
        return DOCKER_SKIPPED, "s", "SKIPPED (Docker)"
    return None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say plainly, with the reasons, that Docker-backed tests did not run."""
    skipped = terminalreporter.stats.get(DOCKER_SKIPPED, [])
    if not skipped:
        return
    reasons = Counter(report.longrepr[2].removeprefix("Skipped: ") if isinstance(report.longrepr, tuple)
                      else str(report.longrepr) for report in skipped)
    terminalreporter.write_sep("=", f"{len(skipped)} Docker-backed tests were SKIPPED", yellow=True)
    for reason, count in reasons.most_common():
        terminalreporter.write_line(f"{count:4d} x {reason}")


# =============================================================================
# Docker Engine
# =============================================================================

@pytest.fixture(scope="session")
def docker_engine():
    """The Docker Engine for this session (see ``testlib.engine_session``).

    The contributor's engine when one answers (only this session's labelled
    objects are created and removed there), else the tests' own dockerd, started
    here and left as it was found.
    """
    with contextlib.ExitStack() as stack:
        try:
            engine = stack.enter_context(engine_session())
        except EngineUnavailable as e:
            unavailable(str(e))
        yield engine


@pytest.fixture
def private_engine(docker_engine):
    """The engine, for a test that stops and restarts it: only the tests' own engine."""
    if not docker_engine.private:
        unavailable(f"stops and restarts the Docker Engine, so it runs only on the tests' own "
                    f"engine, not on {docker_engine.description} (unset DOCKER_HOST and stop "
                    "your engine to run it)")
    return docker_engine


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item, nextitem):
    """Bring the private engine back if a test stopped it and failed before restarting it.

    Runs before fixture teardown, so the ``containers`` cleanup and the
    session-end restore both find a live engine.
    """
    engine = getattr(item, "funcargs", {}).get("docker_engine")
    if isinstance(engine, DockerEngine) and not engine.closed:
        engine.ensure_running()


@pytest.fixture(scope="session")
def busybox_image(docker_engine) -> str:
    """Tag of a tiny image built from Debian's busybox-static (``testlib.busybox_image``)."""
    try:
        return testlib.busybox_image(docker_engine)
    except EngineUnavailable as e:
        unavailable(str(e))


@pytest.fixture
def containers(docker_engine):
    """Factory for test containers/networks that are always removed afterwards."""
    c = testlib.Containers(docker_engine)
    try:
        yield c
    finally:
        c.cleanup()


# =============================================================================
# moto_server behind a counting proxy
# =============================================================================

@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    """A real moto_server (STS, IAM, ...) behind a counting proxy; see ``testlib.Moto``."""
    m = Moto(tmp_path_factory.mktemp("moto") / "moto_server.log")
    try:
        m.start()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield m
    finally:
        m.close()


# =============================================================================
# Secrets that must never be logged
# =============================================================================

@pytest.fixture(scope="session")
def secrets() -> SecretRegistry:
    """Register secret values here; ``start_server`` checks its logs for them."""
    return SecretRegistry()


# =============================================================================
# The server under test
# =============================================================================

@pytest.fixture
def start_server(tmp_path, secrets, request):
    """Factory: ``start_server(env=None, args=(), wait=True) -> Server``.

    Runs ``python3 local_endpoints.py --port P --bind 127.0.0.1 --log-level
    DEBUG *args`` from the repo root (stdout+stderr to a log file), waits for
    ``GET /health`` unless ``wait=False``. At teardown every server is stopped
    and its log is checked for registered secrets (values of
    AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN passed in ``env`` are registered
    automatically). The logs, redacted, are attached to the test report.
    """
    started: list[Server] = []
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)

    def start(env: dict | None = None, args=(), wait: bool = True) -> Server:
        for var, kind in SECRET_ENV_VARS.items():
            if env and env.get(var):
                secrets.add(env[var], kind)
        port = free_port()
        server = Server.launch(port, tmp_path / f"server-{len(started)}-{port}.log",
                               server_env(home, env), args)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start

    for server in started:
        if server.proc.poll() is None:
            server.proc.terminate()
            try:
                server.proc.wait(testlib.SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
    leaked, refused = [], []
    for i, server in enumerate(started):
        text = server.log()
        request.node.add_report_section("teardown", f"server {i} log (port {server.port})",
                                        secrets.redact(text))
        for kind in secrets.leaks(text):
            leaked.append(f"{kind} in log of server {i} (port {server.port})")
        refused += REFUSED_CALL.findall(text)
    if leaked:
        pytest.fail("registered secret(s) leaked into server logs: " + "; ".join(leaked),
                    pytrace=False)
    assert not refused, f"undeclared outbound calls: {refused}"


# =============================================================================
# `run TASKDEF`: the pause image, moto where task containers reach it, the process
# =============================================================================

@pytest.fixture(scope="session")
def pause_image(docker_engine) -> str:
    return testlib.pause_image(docker_engine)


@pytest.fixture(scope="module")
def task_moto(docker_engine, tmp_path_factory):
    """moto behind the counting proxy on the bridge gateway: reached by the runner on the host and
    by the AWS CLI inside a task container alike."""
    m = Moto(tmp_path_factory.mktemp("moto") / "moto_server.log", host=testlib.bridge_gateway(docker_engine))
    m.start()
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def run_task(docker_engine, busybox_image, pause_image, task_moto, tmp_path, request):
    """Factory: run_task(definition, *args, env=None) -> TaskProcess, started (not waited for).

    The definition's family gets this test's name and session, its images "busybox" the
    test image; at the end every process is ended and nothing of its task may be left.
    """
    started: list[testlib.TaskProcess] = []
    home = tmp_path / "home"
    home.mkdir()

    def start(definition: dict | str, *args: str, env: dict | None = None) -> testlib.TaskProcess:
        """definition: a task definition (written to a file), or a name to read from ECS."""
        if isinstance(definition, str):
            path, family = definition, definition.split(":")[0]
        else:
            family = re.sub(r"[^A-Za-z0-9-]", "-", f"le-run-{request.node.name[:40]}-{SESSION_ID}-{len(started)}")
            definition = json.loads(json.dumps(definition).replace('"busybox"', json.dumps(busybox_image)))
            definition["family"] = family
            definition.setdefault("memory", "512")   # ECS refuses an EC2 task definition without memory
            path = tmp_path / f"{family}.json"
            path.write_text(json.dumps(definition))
        out, err = tmp_path / f"{family}.out", tmp_path / f"{family}.err"
        environment = server_env(home, {**task_moto.env, "AWS_ENDPOINT_URL": task_moto.url,
                                        "DOCKER_HOST": docker_engine.host, **(env or {})})
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            proc = subprocess.Popen([sys.executable, str(SERVER_SCRIPT), "run", str(path), "--pause-image",
                                     pause_image, *args], stdin=subprocess.DEVNULL, stdout=stdout,
                                    stderr=stderr, env=environment, cwd=tmp_path)
        task = testlib.TaskProcess(proc, out, err, family, docker_engine)
        started.append(task)
        return task

    yield start
    refused = []
    for task in started:
        if task.proc.poll() is None:
            task.proc.send_signal(signal.SIGINT)
            try:
                task.proc.wait(60)
            except subprocess.TimeoutExpired:
                task.proc.kill()
        refused += REFUSED_CALL.findall(task.stderr)
        left = task.left_behind()
        for container in left.get("containers", []):
            docker_engine.cli("rm", "-f", "-v", container, check=False)
        for volume in left.get("volumes", []):
            docker_engine.cli("volume", "rm", volume, check=False)
        assert not left, f"the task left {left} behind:\n{task.stderr}"
    assert not refused, f"undeclared outbound calls: {refused}"
