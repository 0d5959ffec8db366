"""Benchmark: what the audit trail costs on cached credentials, measured with wrk.

Starts moto_server behind testlib's counting proxy, creates a role, and starts
local_endpoints.py servers on it that differ only in logging:

* ``WARNING``: no line per request (the other benchmarks' setting);
* ``INFO``: the audit line, which for credentials routes takes the place of the
  access line (the default);
* ``INFO + ECS_LOCAL_AUDIT_LOG``: that line and a JSON line appended to a file;
* with ``--before PATH``, also that script (e.g. ``git show main:local_endpoints.py``)
  at ``INFO``: its access line, as before the audit trail.

Each is driven by ``wrk`` (keep-alive, fixed connections) on a cached
``/role/{name}`` and ``/creds``, windows alternated round by round; ratios are
to ``WARNING`` of the same run. Every answer must be 200.

    python3 bench/audit.py [--connections 8] [--rounds 3] [--seconds 3] [--before PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import tempfile
from pathlib import Path

import benchlib
from benchlib import SERVER_SCRIPT, compare, fetch, table, tcp, wrk
from testlib import Moto

ROLE = "le-bench-audit"
PATHS = (f"/role/{ROLE}", "/creds")
BASELINE = "WARNING (no line)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=8, help="wrk's keep-alive connections")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one window")
    parser.add_argument("--before", type=Path, help="another local_endpoints.py to run at INFO for comparison")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="le-bench-audit-") as tmp:
        workdir = Path(tmp)
        moto = Moto(workdir / "moto.log")
        moto.start()
        try:
            moto.create_role(ROLE)
            env = {**moto.env, "STS_ENDPOINT": moto.url, "IAM_ENDPOINT": moto.url,
                   "DOCKER_HOST": f"unix://{workdir}/no-docker.sock"}
            audit_file = workdir / "audit.jsonl"
            variants = {
                BASELINE: (env, "WARNING", SERVER_SCRIPT),
                "INFO (audit line)": (env, "INFO", SERVER_SCRIPT),
                "INFO + ECS_LOCAL_AUDIT_LOG": ({**env, "ECS_LOCAL_AUDIT_LOG": str(audit_file)}, "INFO",
                                               SERVER_SCRIPT),
            }
            if args.before:
                variants[f"{args.before.name} at INFO"] = (env, "INFO", args.before.resolve())
            with contextlib.ExitStack() as stack:
                ports = {label: stack.enter_context(benchlib.endpoints(workdir, *variant)).port
                         for label, variant in variants.items()}
                for port in ports.values():
                    for path in PATHS:
                        fetch(tcp(port), path)   # warm: the cache holds every identity
                moto.reset_counts()
                load = benchlib.load_note()
                results = compare({(label, path): functools.partial(wrk, port, path, connections=args.connections)
                                   for path in PATHS for label, port in ports.items()}, args.rounds, args.seconds)
            audit_records = len(audit_file.read_text().splitlines())
            sts_calls = moto.count(service="sts")
        finally:
            moto.close()

    print(f"\ncached credentials, wrk -t1 -c{args.connections}, {args.rounds} x {args.seconds:g} s windows per "
          f"target, alternated (ratios: to '{BASELINE}' of the same run); {load}\n")
    print(table([(f"{label} {path}", args.connections, results[label, path],
                  None if label == BASELINE else results[BASELINE, path])
                 for path in PATHS for label in variants]))
    print(f"\n{audit_records} JSON audit records written; {sts_calls} STS call(s) during the windows "
          "(0 expected: every answer came from the cache)")
    failures = benchlib.errors_of({f"{label} {path}": m for (label, path), m in results.items()})
    for failure in failures:
        print(f"FAILED  {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
