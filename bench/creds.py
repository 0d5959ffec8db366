"""Benchmark: cached /creds and /role/{name} against a bare ThreadingHTTPServer.

Starts moto_server behind conftest's counting proxy (STS and IAM), creates a
role, starts local_endpoints.py pointed at it once per log level (WARNING: no
line per request; INFO, the default: the audit line of every answer), captures
its /creds and /role/{name} responses, and starts bench/bare_server.py replaying
exactly those bytes. All are then driven by wrk (1 thread, 8 keep-alive
connections), windows alternated. The proxy counts the STS (and IAM) calls that
really happened.

Targets: at WARNING, throughput >= 0.9x the bare server's and p50 <= 1.2x; at
INFO, with the audit line, throughput >= 0.8x; and at most one STS call per
identity per refresh window per server (the whole run fits in one window: an
entry is reused until 30 minutes are left of its hour).

    python3 bench/creds.py [--connections 8] [--rounds 3] [--seconds 4] [--levels WARNING,INFO]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
from pathlib import Path

import benchlib
from benchlib import Measurement, Server, compare, fetch, free_port, table, tcp, verdict, wrk
from testlib import Moto, http_request

ROLE = "le-bench-app"
PATHS = ("/creds", f"/role/{ROLE}")
MIN_THROUGHPUT_RATIO = {"WARNING": 0.9, "INFO": 0.8}   # INFO writes an audit line per answer
MAX_P50_RATIO = 1.2   # at WARNING


def capture(server: Server, path: str) -> dict:
    status, headers, body = http_request(server.url, path=path)
    if status != 200:
        raise RuntimeError(f"GET {path} answered {status}: {body[:300]!r}")
    return {"status": status, "reason": "OK", "headers": list(headers.items()), "body": body.decode()}


def bare_server(workdir: Path, responses: dict):
    """bench/bare_server.py replaying ``responses``; see ``benchlib.running``."""
    responses_path = workdir / "responses.json"
    responses_path.write_text(json.dumps(responses))
    port = free_port()
    return benchlib.running([sys.executable, str(Path(__file__).with_name("bare_server.py")),
                             str(port), str(responses_path)], workdir, port)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=8, help="wrk's keep-alive connections")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one window")
    parser.add_argument("--levels", default="WARNING,INFO", help="log levels of the servers under test")
    args = parser.parse_args()
    levels = args.levels.split(",")

    with tempfile.TemporaryDirectory(prefix="le-bench-creds-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        moto = Moto(workdir / "moto.log")
        moto.start()
        try:
            moto.create_role(ROLE)
            moto.reset_counts()
            servers = {level: stack.enter_context(benchlib.endpoints(workdir, {
                    **moto.env, "STS_ENDPOINT": moto.url, "IAM_ENDPOINT": moto.url,
                    # No Docker needed here: metadata routes are not benchmarked.
                    "DOCKER_HOST": f"unix://{workdir}/no-docker.sock"}, level=level)) for level in levels}
            responses = {path: capture(servers[levels[0]], path) for path in PATHS}
            for level in levels[1:]:
                for path in PATHS:
                    capture(servers[level], path)   # warm: each server has its own cache
            with bare_server(workdir, responses) as bare:
                if fetch(tcp(bare.port), "/creds").decode() != responses["/creds"]["body"]:
                    raise RuntimeError("the bare server does not replay the captured /creds body")
                targets = {}
                for path in PATHS:
                    targets[f"bare server {path}"] = functools.partial(
                        wrk, bare.port, path, connections=args.connections)
                    for level, server in servers.items():
                        targets[f"local_endpoints {level} {path}"] = functools.partial(
                            wrk, server.port, path, connections=args.connections)
                load = benchlib.load_note()
                results = compare(targets, args.rounds, args.seconds)
            failures = benchlib.errors_of(results)
            for path in PATHS:
                if fetch(tcp(servers[levels[0]].port), path).decode() != responses[path]["body"]:
                    failures.append(f"{path}: credentials changed during the run (cache not used)")
            # At least the requests local_endpoints answered: the windows' completed
            # requests, the capture and the check above.
            served = {path: sum(results[f"local_endpoints {level} {path}"].requests for level in levels) + 2
                      for path in PATHS}
            sts = {"/creds": moto.count("GetSessionToken"), PATHS[1]: moto.count("AssumeRole")}
            get_role = moto.count("GetRole")
        finally:
            moto.close()

    rows: list[tuple[str, int, Measurement, Measurement | None]] = []
    for path in PATHS:
        base = results[f"bare server {path}"]
        rows.append((f"bare server {path}", args.connections, base, None))
        for level in levels:
            label = f"local_endpoints {level} {path}"
            rows.append((label, args.connections, results[label], base))
    print(f"\ncached credentials, wrk -t1 -c{args.connections}, {args.rounds} x {args.seconds:g} s windows per "
          f"target, alternated (ratios: local_endpoints / bare server); {load}\n")
    print(table(rows))
    print()
    for path in PATHS:
        print(f"{path}: {sts[path]} STS call(s) for >= {served[path]} requests = <= "
              f"{sts[path] * 1000 / served[path]:.4f} per 1000 requests ({len(levels)} servers)")
    print(f"{PATHS[1]}: {get_role} IAM GetRole call(s)")
    print()
    for path in PATHS:
        base = results[f"bare server {path}"]
        for level in levels:
            mine = results[f"local_endpoints {level} {path}"]
            target = MIN_THROUGHPUT_RATIO.get(level, MIN_THROUGHPUT_RATIO["INFO"])
            verdict(mine.rps >= target * base.rps,
                    f"{path} at {level} throughput {mine.rps / base.rps:.2f}x the bare server's (target >= {target}x)")
            if level == "WARNING":
                verdict(mine.p50 <= MAX_P50_RATIO * base.p50,
                        f"{path} at {level} p50 {mine.p50 / base.p50:.2f}x the bare server's "
                        f"(target <= {MAX_P50_RATIO}x)")
    for path in PATHS:
        verdict(sts[path] <= len(levels), f"{path}: {sts[path]} STS call(s) for one identity in one refresh "
                                          f"window on {len(levels)} servers (target <= {len(levels)})")
    verdict(get_role <= len(levels), f"{PATHS[1]}: {get_role} GetRole call(s) (target <= {len(levels)}, cached)")
    for failure in failures:
        print(f"FAILED  {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
