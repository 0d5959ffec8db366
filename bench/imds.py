"""Benchmark: warm IMDS credentials against warm /creds, driven by wrk.

Starts moto_server behind testlib's counting proxy (STS), starts
local_endpoints.py pointed at it, takes one IMDSv2 session token, warms both
routes, then runs ``wrk`` against each, windows alternating round by round:
``GET /latest/meta-data/iam/security-credentials/local-endpoints`` with the
token header, and ``GET /creds``. Both hand out the same cached credentials;
the IMDS route also checks the token and writes another document, so the ratio
is what IMDS costs over the ECS route.

Target: IMDS throughput at least 0.8x that of /creds.

    python3 bench/imds.py [--connections 8] [--rounds 3] [--seconds 4]
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path

import benchlib
from benchlib import compare, table, verdict, wrk
from testlib import Moto, http_request

IMDS_PATH = "/latest/meta-data/iam/security-credentials/local-endpoints"
MIN_THROUGHPUT_RATIO = 0.8


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=8, help="wrk's keep-alive connections")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one window")
    args = parser.parse_args()

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
                paths = {"IMDS credentials": (IMDS_PATH, {"X-aws-ec2-metadata-token": token.decode()}),
                         "/creds": ("/creds", {})}
                for path, headers in paths.values():   # warm: the one STS call happens here
                    status, _, body = http_request(server.url, path=path, headers=headers)
                    if status != 200:
                        raise RuntimeError(f"GET {path} answered {status}: {body[:300]!r}")
                load = benchlib.load_note()
                results = compare({label: functools.partial(wrk, server.port, path, connections=args.connections,
                                                            headers=headers)
                                   for label, (path, headers) in paths.items()}, args.rounds, args.seconds)
            sts = moto.count("GetSessionToken")
        finally:
            moto.close()

    imds, creds = results["IMDS credentials"], results["/creds"]
    print(f"\nwarm credentials, wrk -t1 -c{args.connections}, {args.rounds} x {args.seconds:g} s windows per "
          f"target, alternated (ratios: IMDS / /creds); {load}\n")
    print(table([("/creds", args.connections, creds, None), ("IMDS credentials", args.connections, imds, creds)]))
    print(f"\n{sts} GetSessionToken call(s) in the whole run\n")
    verdict(imds.rps >= MIN_THROUGHPUT_RATIO * creds.rps,
            f"IMDS throughput {imds.rps / creds.rps:.2f}x that of /creds (target >= {MIN_THROUGHPUT_RATIO}x)")
    failures = benchlib.errors_of(results)
    for failure in failures:
        print(f"FAILED  {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
