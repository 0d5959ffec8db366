"""Benchmark of issue 10: warm IMDS credentials against warm /creds, driven by wrk.

Starts moto_server behind conftest's counting proxy (STS), starts
local_endpoints.py pointed at it, takes one IMDSv2 session token, warms both
routes, then runs ``wrk`` against each in turn, windows alternating round by
round: ``GET /latest/meta-data/iam/security-credentials/local-endpoints`` with
the token header, and ``GET /creds``. Both hand out the same cached
credentials; the IMDS route also checks the token and writes another document,
so the ratio is what IMDS costs over the ECS route.

Target: IMDS throughput at least 0.8x that of /creds.

    python3 bench/imds.py [--connections 8] [--threads 2] [--rounds 6] [--seconds 2]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import benchlib
from benchlib import verdict
from testlib import Moto, apt_install, http_request

IMDS_PATH = "/latest/meta-data/iam/security-credentials/local-endpoints"
MIN_THROUGHPUT_RATIO = 0.8
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


@dataclass
class Windows:
    """What wrk reported for one target, summed over its windows."""
    requests: int = 0
    seconds: float = 0.0
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk(url: str, headers: dict[str, str], args: argparse.Namespace) -> tuple[int, float, float, float]:
    """One wrk window: (requests, seconds, p50 ms, p99 ms); RuntimeError on any non-2xx answer."""
    command = ["wrk", "--latency", "-t", str(args.threads), "-c", str(args.connections),
               "-d", f"{args.seconds}s"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    out = subprocess.run(command + [url], capture_output=True, text=True, check=True, timeout=60).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk {url}: errors:\n{out}")
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s)", out)
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))

    def ms(text: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
        return float(number) * UNITS[unit]
    return (int(done.group(1)), ms(done.group(2) + done.group(3)) / 1000,
            ms(percentiles["50"]), ms(percentiles["99"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=2, help="length of one window")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        apt_install("wrk")

    with tempfile.TemporaryDirectory(prefix="le-bench-imds-") as tmp:
        workdir = Path(tmp)
        moto = Moto(workdir / "moto.log")
        moto.start()
        try:
            with benchlib.endpoints(workdir, {
                    **moto.env, "STS_ENDPOINT": moto.url,
                    # No Docker needed here: metadata routes are not benchmarked.
                    "DOCKER_HOST": f"unix://{workdir}/no-docker.sock"}) as server:
                status, _, token = http_request(server.url, "PUT", "/latest/api/token",
                                                {"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
                if status != 200:
                    raise RuntimeError(f"PUT /latest/api/token answered {status}: {token[:300]!r}")
                targets = {"IMDS credentials": (IMDS_PATH, {"X-aws-ec2-metadata-token": token.decode()}),
                           "/creds": ("/creds", {})}
                for path, headers in targets.values():
                    status, _, body = http_request(server.url, path=path, headers=headers)
                    if status != 200:
                        raise RuntimeError(f"GET {path} answered {status}: {body[:300]!r}")
                results = {label: Windows() for label in targets}
                for _ in range(args.rounds):
                    for label, (path, headers) in targets.items():
                        requests, seconds, p50, p99 = wrk(server.url + path, headers, args)
                        windows = results[label]
                        windows.requests += requests
                        windows.seconds += seconds
                        windows.p50_ms.append(p50)
                        windows.p99_ms.append(p99)
            sts = moto.count("GetSessionToken")
        finally:
            moto.close()

    imds, creds = results["IMDS credentials"], results["/creds"]
    print(f"\nwarm credentials, wrk -t{args.threads} -c{args.connections}, {args.rounds} x {args.seconds} s "
          "windows per target, alternating (p50/p99: median over the windows of wrk's figures)\n")
    print(f"{'target':<20} {'requests':>9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for label, windows in results.items():
        p50 = sorted(windows.p50_ms)[len(windows.p50_ms) // 2]
        p99 = sorted(windows.p99_ms)[len(windows.p99_ms) // 2]
        print(f"{label:<20} {windows.requests:>9} {windows.rps:>9.1f} {p50:>8.2f} {p99:>8.2f}")
    ratio = imds.rps / creds.rps
    print(f"\nIMDS / /creds throughput: {ratio:.2f}x; {sts} GetSessionToken call(s) in the whole run\n")
    verdict(ratio >= MIN_THROUGHPUT_RATIO,
            f"IMDS throughput {ratio:.2f}x that of /creds (target >= {MIN_THROUGHPUT_RATIO}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
