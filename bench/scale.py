"""Benchmark: 20, 100 and 200 containers in one compose project.

Starts busybox ``sleep`` containers labelled as one compose project (the labels
docker compose sets), growing the project to each count in turn. At each count:

1. local_endpoints.py with eager stats (the default) starts; once it has been up
   for 5 s, its first ``/v4/{name}/task/stats`` answer is taken: how many of the
   task's containers have stats in it, and how long it took. Then its idle cost
   is read from /proc over ``--idle`` seconds with no requests: threads, RSS, CPU
   (and dockerd's CPU, which serves the stats streams). Then wrk (1 thread, 8
   keep-alive connections) drives ``/v4/{name}``, ``/v4/{name}/stats``,
   ``/v4/{name}/task`` and ``/v4/{name}/task/stats``, windows alternated with
   Docker's own ``GET /containers/json`` and ``GET /containers/{id}/stats?stream=false``
   on its socket. wrk cannot reach a Unix socket and a TCP relay would add its own
   cost, so Docker is driven by 8 ``http.client`` threads of this process, each
   with a keep-alive connection: a Docker call costs milliseconds (a second or
   more for stats), the client tens of microseconds.
2. The same server with ``ECS_LOCAL_STATS=on-demand``: idle cost before any
   request, then its first task stats answer, for comparison.

Targets: per-container routes flat (p50 at the largest count within 1.5x of the
p50 at the smallest); the eager server's first task stats answer complete at
every count. The containers are removed at the end (exactly those started here).

    python3 bench/scale.py [--counts 20,100,200] [--rounds 2] [--seconds 4] [--idle 10]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import benchlib
from benchlib import Measurement, Server, compare, docker_session, fetch, python_window, tcp, unix, verdict, wrk

ROUTES = ("/v4/{name}", "/v4/{name}/stats", "/v4/{name}/task", "/v4/{name}/task/stats")
PER_CONTAINER = ("/v4/{name}", "/v4/{name}/stats")
DOCKER_LIST = "docker /containers/json"
DOCKER_STATS = "docker /containers/{id}/stats?stream=false"
BASELINE = {"/v4/{name}": DOCKER_LIST, "/v4/{name}/task": DOCKER_LIST,
            "/v4/{name}/stats": DOCKER_STATS, "/v4/{name}/task/stats": DOCKER_STATS}
CONNECTIONS = 8
UP_SECONDS = 5.0
MAX_FLAT_RATIO = 1.5
MIB = 1024 * 1024


@dataclass
class Idle:
    """A process's cost while nobody asks it anything."""
    collectors: int
    threads: int
    rss_mib: float
    cpu_percent: float           # of one core
    dockerd_cpu_percent: float   # of one core, same window


@dataclass
class FirstAnswer:
    members: int
    with_stats: int
    seconds: float


@dataclass
class AtCount:
    eager_first: FirstAnswer
    eager_idle: Idle
    on_demand_idle: Idle
    on_demand_first: FirstAnswer
    measured: dict[str, Measurement]


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle(server: Server, dockerd_pid: int, seconds: float) -> Idle:
    """Threads, RSS and CPU of the server (and dockerd's CPU) over ``seconds`` without requests."""
    collectors = json.loads(fetch(tcp(server.port), "/health"))["statsCollectors"]
    start, server_cpu, dockerd_cpu = time.monotonic(), cpu_seconds(server.proc.pid), cpu_seconds(dockerd_pid)
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    status = proc_status(server.proc.pid)
    return Idle(collectors, int(status["Threads"]), int(status["VmRSS"].split()[0]) * 1024 / MIB,
                100 * (cpu_seconds(server.proc.pid) - server_cpu) / elapsed,
                100 * (cpu_seconds(dockerd_pid) - dockerd_cpu) / elapsed)


def first_task_stats(server: Server, name: str, up_at: float) -> FirstAnswer:
    """The server's first task stats answer, asked once it has been up for UP_SECONDS."""
    time.sleep(max(0.0, up_at + UP_SECONDS - time.monotonic()))
    start = time.monotonic()
    answer = json.loads(fetch(tcp(server.port), f"/v4/{name}/task/stats"))
    return FirstAnswer(len(answer), sum(1 for stats in answer.values() if stats), time.monotonic() - start)


@contextlib.contextmanager
def server_up(workdir: Path, env: dict):
    """local_endpoints.py (see benchlib.endpoints) and the moment it first answered."""
    with benchlib.endpoints(workdir, env) as server:
        yield server, time.monotonic()


def measure_count(workdir: Path, engine, name: str, container_id: str, args: argparse.Namespace) -> AtCount:
    dockerd_pid = int((Path(engine.socket).parent / "dockerd.pid").read_text())
    env = {"DOCKER_HOST": engine.host}
    with server_up(workdir, env) as (server, up_at):
        eager_first = first_task_stats(server, name, up_at)
        time.sleep(2)   # the first answer's work done
        eager_idle = idle(server, dockerd_pid, args.idle)
        targets = {route: functools.partial(wrk, server.port, route.format(name=name), connections=CONNECTIONS)
                   for route in ROUTES}
        targets[DOCKER_LIST] = functools.partial(python_window, unix(engine.socket), "/containers/json",
                                                 CONNECTIONS)
        targets[DOCKER_STATS] = functools.partial(python_window, unix(engine.socket),
                                                  f"/containers/{container_id}/stats?stream=false", CONNECTIONS)
        measured = compare(targets, args.rounds, args.seconds)
    with server_up(workdir, {**env, "ECS_LOCAL_STATS": "on-demand"}) as (server, up_at):
        time.sleep(max(0.0, up_at + UP_SECONDS - time.monotonic()))
        on_demand_idle = idle(server, dockerd_pid, args.idle)
        on_demand_first = first_task_stats(server, name, up_at)
    return AtCount(eager_first, eager_idle, on_demand_idle, on_demand_first, measured)


def print_tables(results: dict[int, AtCount], args: argparse.Namespace, load: str) -> None:
    print(f"\nscale: one compose project of busybox `sleep` containers; wrk -t1 -c{CONNECTIONS} on local_endpoints, "
          f"{CONNECTIONS} http.client threads on Docker's socket; {args.rounds} x {args.seconds:g} s windows per "
          f"target, alternated; {load}\n")
    header = (f"{'containers':>10} {'target':<44} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} "
              f"{'x req/s':>8} {'x p50':>7}")
    print(header + "\n" + "-" * len(header))
    for count, at in results.items():
        for label, m in at.measured.items():
            line = f"{count:>10} {label:<44} {m.rps:>9.1f} {m.p50 * 1000:>9.2f} {m.p99 * 1000:>9.2f}"
            base = at.measured.get(BASELINE.get(label, ""))
            if base is not None:
                line += f" {benchlib.ratio(m.rps / base.rps):>8} {benchlib.ratio(m.p50 / base.p50):>7}"
            print(line)
    print("\n(x: local_endpoints / the Docker call it replaces: the list for metadata, stats?stream=false for stats)")

    smallest = min(results)
    print(f"\np50 relative to {smallest} containers\n")
    header = f"{'route':<24}" + "".join(f" {count:>8}" for count in results)
    print(header + "\n" + "-" * len(header))
    for route in ROUTES:
        base = results[smallest].measured[route].p50
        print(f"{route:<24}" + "".join(f" {at.measured[route].p50 / base:>7.2f}x" for at in results.values()))

    print(f"\nfirst /v4/{{name}}/task/stats answer, server up for {UP_SECONDS:g} s\n")
    header = f"{'containers':>10} {'mode':<10} {'with stats':>12} {'seconds':>8}"
    print(header + "\n" + "-" * len(header))
    for count, at in results.items():
        for mode, first in (("eager", at.eager_first), ("on-demand", at.on_demand_first)):
            print(f"{count:>10} {mode:<10} {f'{first.with_stats}/{first.members}':>12} {first.seconds:>8.2f}")

    print(f"\nidle cost over {args.idle:g} s without requests (CPU in % of one core)\n")
    header = (f"{'containers':>10} {'mode':<10} {'collectors':>10} {'threads':>8} {'RSS MiB':>8} {'CPU %':>6} "
              f"{'dockerd CPU %':>14}")
    print(header + "\n" + "-" * len(header))
    for count, at in results.items():
        for mode, cost in (("eager", at.eager_idle), ("on-demand", at.on_demand_idle)):
            print(f"{count:>10} {mode:<10} {cost.collectors:>10} {cost.threads:>8} {cost.rss_mib:>8.1f} "
                  f"{cost.cpu_percent:>6.1f} {cost.dockerd_cpu_percent:>14.1f}")
    largest = max(results)
    eager, lazy = results[largest].eager_idle, results[largest].on_demand_idle
    print(f"\neager stats cost per container at {largest} (eager - on-demand) / {largest}: "
          f"{(eager.threads - lazy.threads) / largest:.2f} thread, "
          f"{(eager.rss_mib - lazy.rss_mib) * 1024 / largest:.0f} KiB RSS, "
          f"{(eager.cpu_percent - lazy.cpu_percent) / largest:.3f}% of a core; "
          f"dockerd {(eager.dockerd_cpu_percent - lazy.dockerd_cpu_percent) / largest:.3f}% of a core\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="20,100,200", help="container counts, ascending")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one window")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle measurement")
    args = parser.parse_args()
    counts = sorted(int(part) for part in args.counts.split(","))

    benchlib.ensure_wrk()
    results: dict[int, AtCount] = {}
    with tempfile.TemporaryDirectory(prefix="le-bench-scale-") as tmp, \
            docker_session() as (engine, image, containers):
        load = benchlib.load_note()
        names, ids = benchlib.compose_project(containers, image, counts[0])
        project = names[0].rsplit("-app", 1)[0]
        for count in counts:
            more_names, more_ids = benchlib.compose_project(containers, image, count - len(names), project,
                                                            first=len(names))
            names, ids = names + more_names, ids + more_ids
            print(f"{count} containers running; measuring", file=sys.stderr, flush=True)
            results[count] = measure_count(Path(tmp), engine, names[0], ids[0], args)
        load += f"; at the end {benchlib.load_note().split(', ', 1)[1]}"

    print_tables(results, args, load)
    failures = [error for at in results.values() for error in benchlib.errors_of(at.measured)]
    smallest, largest = counts[0], counts[-1]
    for route in PER_CONTAINER:
        flat = results[largest].measured[route].p50 / results[smallest].measured[route].p50
        verdict(flat <= MAX_FLAT_RATIO, f"{route} p50 at {largest} containers {flat:.2f}x the p50 at {smallest} "
                                        f"(target <= {MAX_FLAT_RATIO}x)")
    for count, at in results.items():
        first = at.eager_first
        verdict(first.with_stats == first.members == count,
                f"first task stats at {count} containers: {first.with_stats} of {first.members} with stats "
                f"(target: all {count})")
    for failure in failures:
        print(f"FAILED  {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
