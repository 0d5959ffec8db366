"""Benchmark of issue 11: what the audit trail costs on cached credentials, measured with wrk.

Starts moto_server behind conftest's counting proxy, creates a role, and starts
local_endpoints.py servers on it that differ only in logging:

* ``WARNING``: no line per request (the other benchmarks' setting);
* ``INFO``: the audit line, which for credentials routes takes the place of the
  access line (the default);
* ``INFO + ECS_LOCAL_AUDIT_LOG``: that line and a JSON line appended to a file;
* with ``--before PATH``, also that script (e.g. ``git show main:local_endpoints.py``)
  at ``INFO``: its access line, as before the audit trail.

Each is driven by ``wrk`` (keep-alive, fixed connections) on a cached
``/role/{name}`` and ``/creds``, windows interleaved round by round; the table
prints each target's median req/s and its ratio to ``WARNING`` of the same run.
Every answer must be 200 (wrk's non-2xx count is checked).

    python3 bench/audit.py [--connections 8] [--threads 2] [--rounds 3] [--seconds 3] [--before PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import benchlib
from benchlib import SERVER_SCRIPT, apt_install, fetch, free_port, server_env, tcp
from testlib import Moto

ROLE = "le-bench-audit"
PATHS = (f"/role/{ROLE}", "/creds")
BASELINE = "WARNING (no line)"


def wrk(port: int, path: str, connections: int, threads: int, seconds: float) -> float:
    """Requests per second of one wrk window; RuntimeError on any non-2xx answer or socket error."""
    result = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s",
                             f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True,
                            timeout=seconds + 30)
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed: {result.stderr}")
    if re.search(r"Non-2xx or 3xx responses|Socket errors", result.stdout):
        raise RuntimeError(f"wrk saw errors on {path}:\n{result.stdout}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", result.stdout).group(1))


@contextlib.contextmanager
def server(workdir: Path, env: dict, level: str, script: Path):
    port = free_port()
    cmd = [sys.executable, str(script), "--port", str(port), "--bind", "127.0.0.1", "--log-level", level]
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    with benchlib.running(cmd, workdir, port, server_env(home, env)) as running:
        yield running


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one wrk window")
    parser.add_argument("--before", type=Path, help="another local_endpoints.py to run at INFO for comparison")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        apt_install("wrk")

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
                ports = {label: stack.enter_context(server(workdir, *variant)).port
                         for label, variant in variants.items()}
                for port in ports.values():
                    for path in PATHS:
                        fetch(tcp(port), path)   # warm: the cache holds every identity
                moto.reset_counts()
                rates: dict[tuple[str, str], list[float]] = {(l, p): [] for l in variants for p in PATHS}
                for _ in range(args.rounds):
                    for path in PATHS:
                        for label, port in ports.items():
                            rates[label, path].append(wrk(port, path, args.connections, args.threads,
                                                          args.seconds))
            audit_records = len(audit_file.read_text().splitlines())
            sts_calls = moto.count(service="sts")
        finally:
            moto.close()

    print(f"\ncached credentials under wrk -t{args.threads} -c{args.connections}, {args.rounds} x "
          f"{args.seconds:g} s windows per target, interleaved; median req/s, ratio to "
          f"'{BASELINE}' of the same run\n")
    header = f"{'target':<34} {'path':<22} {'req/s':>9} {'min':>9} {'max':>9} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for path in PATHS:
        base = statistics.median(rates[BASELINE, path])
        for label in variants:
            values = rates[label, path]
            median = statistics.median(values)
            print(f"{label:<34} {path:<22} {median:>9.0f} {min(values):>9.0f} {max(values):>9.0f}"
                  f" {median / base:>7.3f}")
    print(f"\n{audit_records} JSON audit records written; {sts_calls} STS call(s) during the windows "
          "(0 expected: every answer came from the cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
