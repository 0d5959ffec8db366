"""Benchmark: warm /v4/{name} and /v4/{name}/task against the original's floor.

The original listed every container on each metadata request, so a direct
``GET /containers/json`` on the same Docker socket is the least any request of
it cost. This runs 20 busybox containers in one compose project (labels),
starts local_endpoints.py on the shared dockerd, warms it, and drives its two
routes with wrk and Docker's list with http.client threads (wrk cannot reach a
Unix socket; a Docker call costs milliseconds, the client microseconds), windows
alternated, first with 1 connection (latency of a lone caller) then with 8.

Target: warm p50 at most one third of the direct Docker call's p50.

    python3 bench/metadata.py [--containers 20] [--rounds 3] [--seconds 4]
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
MAX_P50_RATIO = 1 / 3
DOCKER = "docker GET /containers/json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one window")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="le-bench-metadata-") as tmp, \
            docker_session() as (engine, image, containers):
        names, _ = benchlib.compose_project(containers, image, args.containers)
        with benchlib.endpoints(Path(tmp), {"DOCKER_HOST": engine.host}) as server:
            name = names[0]
            task = json.loads(fetch(tcp(server.port), f"/v4/{name}/task"))
            if len(task["Containers"]) != args.containers:
                raise RuntimeError(f"/v4/{name}/task lists {len(task['Containers'])} containers, "
                                   f"expected {args.containers}")
            load = benchlib.load_note()
            results = {}
            for clients in CLIENT_COUNTS:
                targets = {
                    DOCKER: functools.partial(python_window, unix(engine.socket), "/containers/json", clients),
                    "local_endpoints /v4/{name}": functools.partial(wrk, server.port, f"/v4/{name}",
                                                                    connections=clients),
                    "local_endpoints /v4/{name}/task": functools.partial(wrk, server.port, f"/v4/{name}/task",
                                                                         connections=clients)}
                results[clients] = compare(targets, args.rounds, args.seconds)

    rows: list[tuple[str, int, Measurement, Measurement | None]] = []
    for clients, measured in results.items():
        for label, m in measured.items():
            rows.append((label, clients, m, None if label == DOCKER else measured[DOCKER]))
    print(f"\nwarm metadata, {args.containers} running containers, {args.rounds} x {args.seconds:g} s "
          f"windows per target and connection count (ratios: local_endpoints / direct Docker call); {load}\n")
    print(table(rows))
    print()
    failures = []
    for clients, measured in results.items():
        failures += benchlib.errors_of(measured)
        docker = measured[DOCKER]
        for label, m in measured.items():
            if label != DOCKER:
                verdict(m.p50 <= MAX_P50_RATIO * docker.p50,
                        f"{label} with {clients} connection(s): p50 {m.p50 / docker.p50:.3f}x the direct "
                        f"Docker call's (target <= {MAX_P50_RATIO:.3f}x)")
    for failure in failures:
        print(f"FAILED  {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
