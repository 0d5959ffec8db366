"""Benchmark of `run TASKDEF`: a three-container awsvpc task, up and down, against docker-compose.

The task: an init container that must succeed, a server (busybox httpd) with a health check,
and an app that waits for the server to be HEALTHY, fetches its page on localhost, then
sleeps. Its compose equivalent has the same images, commands, health check and dependencies
(``service_completed_successfully``, ``service_healthy``; compose file format 2.4) and the
same number of containers: a pause service whose network namespace the other three join
(``network_mode: service:pause``) and which publishes the server's port, as the awsvpc pause
container does. Both sides stop fast and alike: every container runs under an init process
(``initProcessEnabled`` / ``init: true``), so SIGTERM ends it at once.

Each round measures, on the same engine:

  (a) `python local_endpoints.py run td.json` started -> "task RUNNING" on its stderr
      (the app started, so the server was healthy);
  (b) SIGINT to that process -> the process exits (every container, holder and volume
      removed; checked with docker ps -a / docker volume ls);
  (c) `docker-compose up -d` started -> the app container running and the server healthy.
      Debian's docker-compose is 1.29.2, which has no ``--wait``: after ``up -d`` returns,
      `docker inspect` is polled until both hold;
  (d) `docker-compose down -v` started -> its exit (containers, network, volume removed;
      checked the same way).

Before each down phase (outside its time) the app's output is checked for the server's page,
so each side's app did reach the server on localhost. Rounds alternate which side goes first. Medians, and the ratios run / compose.
The health check's interval (5 s, the ECS minimum) bounds (a) and (c) alike.

Needs root (`run` enters network namespaces) and Debian's docker-compose (installed when
missing).

    python3 bench/run_task.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import benchlib
from benchlib import REPO_ROOT, docker_session

from testlib import SERVER_SCRIPT, SESSION_ID, TEST_LABEL, apt_install, free_port, server_env, wait_for

PAUSE_TAG = "local-endpoints-test/bench-pause:latest"
STOP_TIMEOUT = 2                 # seconds; both sides stop on SIGTERM at once (init processes)
PHASE_TIMEOUT = 120.0
INTERVAL = 5                     # the health check's, in seconds: ECS's minimum


def pause_image(engine, image: str) -> str:
    """The namespace holder's image, made from the busybox image: sleeps until killed."""
    created = engine.cli("create", "--label", engine.label, image).stdout.strip()
    try:
        engine.cli("commit", "--change", 'ENTRYPOINT ["/bin/busybox","sleep","2147483647"]', "--change", "CMD []",
                   created, PAUSE_TAG)
    finally:
        engine.cli("rm", "-f", created, check=False)
    return engine.created_image(PAUSE_TAG)


def commands(port: int) -> dict[str, list[str]]:
    url = f"http://localhost:{port}/"
    return {
        "init": ["sh", "-c", "echo ready > /shared/flag"],
        "web": ["sh", "-c", f"mkdir -p /www && cp /shared/flag /www/index.html && exec httpd -f -p {port} -h /www"],
        "app": ["sh", "-c", f"wget -q -O- {url} && exec sleep 2147483647"],
        "check": ["CMD-SHELL", f"wget -q -O /dev/null {url} || exit 1"],
    }


def task_definition(image: str, port: int, family: str) -> dict:
    run = commands(port)
    common = {"image": image, "stopTimeout": STOP_TIMEOUT, "linuxParameters": {"initProcessEnabled": True},
              "dockerLabels": {TEST_LABEL: SESSION_ID}}
    shared = [{"sourceVolume": "shared", "containerPath": "/shared"}]
    return {
        "family": family,
        "networkMode": "awsvpc",
        "requiresCompatibilities": ["EC2"],
        "cpu": "256", "memory": "512",
        "containerDefinitions": [
            {**common, "name": "init", "essential": False, "command": run["init"], "mountPoints": shared},
            {**common, "name": "web", "command": run["web"], "mountPoints": shared,
             "portMappings": [{"containerPort": port}],
             "healthCheck": {"command": run["check"], "interval": INTERVAL, "timeout": 2, "retries": 3},
             "dependsOn": [{"containerName": "init", "condition": "SUCCESS"}]},
            {**common, "name": "app", "command": run["app"],
             "dependsOn": [{"containerName": "web", "condition": "HEALTHY"}]},
        ],
        "volumes": [{"name": "shared"}],
    }


def compose_file(image: str, pause: str, port: int) -> dict:
    run = commands(port)
    common = {"image": image, "init": True, "stop_grace_period": f"{STOP_TIMEOUT}s",
              "labels": {TEST_LABEL: SESSION_ID}, "network_mode": "service:pause"}
    shared = ["shared:/shared"]
    return {
        "version": "2.4",
        "services": {
            "pause": {"image": pause, "init": True, "stop_grace_period": "0s", "labels": {TEST_LABEL: SESSION_ID},
                      "ports": [f"127.0.0.1:{port}:{port}"]},
            "init": {**common, "command": run["init"], "volumes": shared, "depends_on": ["pause"]},
            "web": {**common, "command": run["web"], "volumes": shared,
                    "healthcheck": {"test": run["check"], "interval": f"{INTERVAL}s", "timeout": "2s", "retries": 3},
                    "depends_on": {"pause": {"condition": "service_started"},
                                   "init": {"condition": "service_completed_successfully"}}},
            "app": {**common, "command": run["app"],
                    "depends_on": {"pause": {"condition": "service_started"},
                                   "web": {"condition": "service_healthy"}}},
        },
        "volumes": {"shared": {}},
    }


def leftovers(engine, label_filter: str, volume_filter: str) -> list[str]:
    """Containers (any state) and volumes still there."""
    names = engine.cli("ps", "-a", "--filter", label_filter, "--format", "{{.Names}}").stdout.split()
    volumes = engine.cli("volume", "ls", "-q", "--filter", volume_filter).stdout.split()
    return names + volumes


class RunSide:
    """`local_endpoints.py run` as a subprocess: started, watched for "task RUNNING", stopped by SIGINT."""

    def __init__(self, engine, workdir: Path, definition: dict):
        self.engine = engine
        self.workdir = workdir
        self.family = definition["family"]
        self.path = workdir / "td.json"
        self.path.write_text(json.dumps(definition))
        home = workdir / "home"
        home.mkdir(exist_ok=True)
        self.env = server_env(home, {"DOCKER_HOST": engine.host})
        self.proc: subprocess.Popen | None = None
        self.seen_running = 0.0

    def up(self) -> float:
        running = threading.Event()
        started = time.monotonic()
        with open(self.workdir / "run.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, str(SERVER_SCRIPT), "run", str(self.path),
                                          "--pause-image", PAUSE_TAG], cwd=REPO_ROOT, env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.PIPE)
        threading.Thread(target=self._read, args=(self.proc.stderr, running), daemon=True).start()
        while not running.wait(0.5):
            if self.proc.poll() is not None:
                raise RuntimeError(f"run exited ({self.proc.returncode}) before the task was RUNNING")
            if time.monotonic() > started + PHASE_TIMEOUT:
                raise RuntimeError("the task was not RUNNING in time")
        return self.seen_running - started

    def _read(self, stream, running: threading.Event) -> None:
        """The runner's stderr, kept in run.err; the moment "task RUNNING" arrives is noted."""
        with open(self.workdir / "run.err", "ab") as err:
            for line in stream:
                if b"task RUNNING" in line and not running.is_set():
                    self.seen_running = time.monotonic()
                    running.set()
                err.write(line)

    def served(self) -> bool:
        """The app fetched the server's page on localhost (its output, relayed on run's stdout)."""
        return "app | ready" in (self.workdir / "run.log").read_text()

    def down(self) -> float:
        if not wait_for(self.served, 10):
            raise RuntimeError("run's app did not print the server's page")
        started = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(PHASE_TIMEOUT)
        elapsed = time.monotonic() - started
        self.proc = None
        if code != 130:
            raise RuntimeError(f"run exited with {code} on SIGINT, not 130")
        left = leftovers(self.engine, f"label=com.amazonaws.ecs.task-definition-family={self.family}",
                         f"name=ecs-{self.family}-")
        if left:
            raise RuntimeError(f"run left {left} behind")
        return elapsed

    def abandon(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class ComposeSide:
    """docker-compose 1.29 up -d, then docker inspect polled until the app runs and the server is healthy."""

    def __init__(self, engine, workdir: Path, document: dict, project: str):
        self.engine = engine
        self.project = project
        self.path = workdir / "docker-compose.yml"
        self.path.write_text(json.dumps(document, indent=1))
        self.compose = [shutil.which("docker-compose"), "-p", project, "-f", str(self.path)]
        self.env = {**engine.env(), "COMPOSE_INTERACTIVE_NO_CLI": "1"}

    def _compose(self, *args: str) -> None:
        done = subprocess.run([*self.compose, *args], env=self.env, capture_output=True, text=True,
                              timeout=PHASE_TIMEOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"docker-compose {' '.join(args)}: {done.stderr[-2000:]}")

    def _states(self) -> dict[str, dict]:
        project = f"label=com.docker.compose.project={self.project}"
        ids = self.engine.cli("ps", "-aq", "--filter", project).stdout.split()
        if not ids:
            return {}
        inspected = json.loads(self.engine.cli("inspect", *ids).stdout)
        return {c["Config"]["Labels"]["com.docker.compose.service"]: c["State"] for c in inspected}

    def up(self) -> float:
        started = time.monotonic()
        self._compose("up", "-d")
        while time.monotonic() < started + PHASE_TIMEOUT:
            states = self._states()
            if (states.get("app", {}).get("Running")
                    and (states.get("web", {}).get("Health") or {}).get("Status") == "healthy"):
                return time.monotonic() - started
            time.sleep(0.02)
        raise RuntimeError("the compose project was not up in time")

    def served(self) -> bool:
        app = self.engine.cli("ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}",
                              "--filter", "label=com.docker.compose.service=app").stdout.split()
        return bool(app) and "ready" in self.engine.cli("logs", app[0]).stdout

    def down(self) -> float:
        if not wait_for(self.served, 10):
            raise RuntimeError("compose's app did not print the server's page")
        started = time.monotonic()
        self._compose("down", "-v")
        elapsed = time.monotonic() - started
        left = leftovers(self.engine, f"label=com.docker.compose.project={self.project}",
                         f"label=com.docker.compose.project={self.project}")
        if left:
            raise RuntimeError(f"docker-compose down left {left} behind")
        return elapsed

    def abandon(self) -> None:
        subprocess.run([*self.compose, "down", "-v", "-t", "0"], env=self.env, capture_output=True,
                       timeout=PHASE_TIMEOUT, stdin=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/run_task.py needs root: `run` enters the task's network namespaces", file=sys.stderr)
        return 2
    if not shutil.which("docker-compose"):
        apt_install("docker-compose")
    version = subprocess.run(["docker-compose", "version", "--short"], capture_output=True, text=True).stdout.strip()

    figures: dict[str, list[float]] = {"run up": [], "run down": [], "compose up": [], "compose down": []}
    with tempfile.TemporaryDirectory(prefix="le-bench-run-") as tmp, \
            docker_session() as (engine, image, containers):
        pause_image(engine, image)
        port = free_port()
        suffix = secrets.token_hex(3)
        run_side = RunSide(engine, Path(tmp), task_definition(image, port, f"le-bench-{suffix}"))
        compose_side = ComposeSide(engine, Path(tmp), compose_file(image, PAUSE_TAG, port), f"le-bench-{suffix}")
        try:
            # One round of each first, not counted: page cache, the compose client's imports.
            run_side.up(), run_side.down(), compose_side.up(), compose_side.down()
            load = benchlib.load_note()
            for number in range(args.rounds):
                sides = [("run", run_side), ("compose", compose_side)]
                for label, side in (sides if number % 2 == 0 else sides[::-1]):
                    figures[f"{label} up"].append(side.up())
                    figures[f"{label} down"].append(side.down())
                print(f"round {number + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in figures.items()),
                      flush=True)
        except BaseException:
            run_err = Path(tmp) / "run.err"
            if run_err.exists():
                print(f"--- run's stderr ---\n{run_err.read_text()[-3000:]}", file=sys.stderr)
            raise
        finally:
            run_side.abandon()
            compose_side.abandon()

    median = {k: statistics.median(v) for k, v in figures.items()}
    print(f"\nthree-container awsvpc task (init SUCCESS -> web HEALTHY -> app; health check every {INTERVAL} s) "
          f"and its compose equivalent (4 containers each side), {args.rounds} rounds after one warm-up; "
          f"docker-compose {version} has no --wait: `up -d`, then docker inspect polled every 20 ms "
          f"until app running and web healthy; {load}\n")
    header = f"{'phase':<44} {'run s':>8} {'compose s':>10} {'run/compose':>12}"
    print(header)
    print("-" * len(header))
    for phase, what in (("up", "start -> task RUNNING / app up, web healthy"),
                        ("down", "SIGINT -> exit / docker-compose down -v")):
        run_median, compose_median = median[f"run {phase}"], median[f"compose {phase}"]
        print(f"{what:<44} {run_median:>8.2f} {compose_median:>10.2f} "
              f"{benchlib.ratio(run_median / compose_median):>12}")
    print()
    for key, values in figures.items():
        print(f"{key:<13} " + " ".join(f"{v:6.2f}" for v in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
