"""Benchmark: warm /v4/{name}/stats and /v4/{name}/task/stats against a direct stats call.

Docker's ``GET /containers/{id}/stats?stream=false`` waits for a second
sample, about one second, and the original made that call for each stats
request. This runs 10 busybox containers in one compose project (labels),
starts local_endpoints.py on the shared dockerd, waits for its collectors
(eager by default), then alternates, round by round, wrk windows of the two
routes (1 connection, then 8) with a window of direct Docker calls on the same
socket from one http.client connection (wrk cannot reach a Unix socket; each
call takes a second).

Target: warm p50 at least 50x faster than the direct call's p50.

    python3 bench/stats.py [--containers 10] [--rounds 3] [--seconds 4]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path

import benchlib
from benchlib import Measurement, compare, docker_session, fetch, python_window, table, tcp, unix, verdict, wrk

CLIENT_COUNTS = (1, 8)
MIN_SPEEDUP = 50
DOCKER = "docker GET stats?stream=false"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one window")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="le-bench-stats-") as tmp, \
            docker_session() as (engine, image, containers):
        names, ids = benchlib.compose_project(containers, image, args.containers)
        with benchlib.endpoints(Path(tmp), {"DOCKER_HOST": engine.host}) as server:
            name = names[0]
            task_stats = json.loads(fetch(tcp(server.port), f"/v4/{name}/task/stats"))
            if sorted(k for k, v in task_stats.items() if v) != sorted(ids):
                raise RuntimeError(f"/v4/{name}/task/stats has stats for {sum(map(bool, task_stats.values()))}"
                                   f" of its {args.containers} containers after warm-up")
            load = benchlib.load_note()
            routes = {"local_endpoints /v4/{name}/stats": f"/v4/{name}/stats",
                      "local_endpoints /v4/{name}/task/stats": f"/v4/{name}/task/stats"}
            targets = {(label, clients): functools.partial(wrk, server.port, path, connections=clients)
                       for clients in CLIENT_COUNTS for label, path in routes.items()}
            targets[DOCKER] = functools.partial(python_window, unix(engine.socket),
                                                f"/containers/{ids[0]}/stats?stream=false", 1)
            measured = compare(targets, args.rounds, args.seconds)
            direct = measured.pop(DOCKER)
            results = {clients: {label: measured[label, clients] for label in routes} for clients in CLIENT_COUNTS}

    rows: list[tuple[str, int, Measurement, Measurement | None]] = [(DOCKER, 1, direct, None)]
    for clients, measured in results.items():
        rows += [(label, clients, m, direct) for label, m in measured.items()]
    print(f"\nwarm stats, {args.containers} containers in one compose project, {args.rounds} x "
          f"{args.seconds:g} s windows per route and connection count, {direct.requests} direct calls "
          f"(ratios: local_endpoints / direct Docker call); {load}\n")
    print(table(rows))
    print()
    failures = benchlib.errors_of({DOCKER: direct})
    for clients, by_label in results.items():
        failures += benchlib.errors_of(by_label)
        for label, m in by_label.items():
            verdict(direct.p50 >= MIN_SPEEDUP * m.p50,
                    f"{label} with {clients} connection(s): p50 {direct.p50 / m.p50:.0f}x faster than the direct "
                    f"call (target >= {MIN_SPEEDUP}x)")
    for failure in failures:
        print(f"FAILED  {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
