"""Training traffic for the profile-guided build of the sidecar (`scripts/build-proxy-pgo`).

Sends real traffic through a `pymesh-proxy` built with `-Cprofile-generate`, so that the profile
it writes weighs the paths a deployed sidecar runs: HTTP/1.1 keep-alive, HTTP/2 and gRPC unary
calls, each through one sidecar and through a mutual-TLS sidecar pair (inbound and outbound,
the handshake, HTTP/2 between the proxies), at a low and a high rate, and with small and large
responses (flow control, bodies in many frames). Every proxy exits on SIGTERM at the end of its
block, which is when it writes its profile (to `LLVM_PROFILE_FILE`, which the caller sets).

    LLVM_PROFILE_FILE=/tmp/p/proxy-%p.profraw python3 perf/pgo_train.py --proxy PATH

Takes about a minute. Nothing is measured: bench_engine.py and the harness do that.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench_engine import PROTOCOL_LABELS, backend, load, native_proxy, proxy_pair
from harness.mesh import mesh_ca

# (rate in requests per second, seconds): a sidecar's usual pace, then a busy one.
RATES = ((1000, 2.0), (5000, 2.0))
# Response bytes: a typical API reply, and one that spans many frames and window updates.
SMALL, LARGE = 1024, 256 * 1024
LARGE_RATE, LARGE_SECONDS = 200, 1.0


def train(proxy: str) -> None:
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        ca_dir = workdir / "ca"
        ca_dir.mkdir()
        ca = stack.enter_context(mesh_ca(ca_dir))
        for size in (SMALL, LARGE):
            upstream = stack.enter_context(backend(size))
            single, _ = stack.enter_context(native_proxy(upstream, workdir, None, proxy))
            pair = stack.enter_context(proxy_pair(upstream, workdir, None, ca, proxy))
            for protocol in sorted(PROTOCOL_LABELS):
                args = argparse.Namespace(protocol=protocol, connections=4, response_size=size, load_cpu=None)
                runs = RATES if size == SMALL else ((LARGE_RATE, LARGE_SECONDS),)
                for address in (single, pair.address):
                    for rate, seconds in runs:
                        report = load(address, rate, seconds, 0.2, args, "bench")
                        print(f"{protocol} {size} B {rate} rps via {address}: {report['requests']} requests, "
                              f"{report['errors']} errors", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxy", required=True, help="the instrumented pymesh-proxy")
    args = parser.parse_args()
    if not Path(args.proxy).is_file():
        parser.error(f"--proxy {args.proxy}: no such file")
    train(args.proxy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
