"""The transparent path's cost: an application in one pod calling one in another, through the
init rules and both native sidecars (app → redirected outbound → mutual TLS → redirected inbound
→ app), against the same two pods without the mesh, in one run.

The pods are the end-to-end test's (tests/test_transparent.py): network namespaces on a bridge,
the control plane in its own. The server pod runs the harness's backend twice, on 8080 (meshed:
the init rules send it through the sidecar) and 8081 (a skipped inbound port); the client pod
runs the load generator, as itself (redirected) against 10.251.0.3:8080, and as the proxy user
(which the rules skip) against 10.251.0.3:8081. Rounds alternate the two; medians are reported.
Then load continues through the mesh until the sidecars have served 100,000 requests, and their
resident memory is read.

    python3 perf/bench_transparent.py                       # 3 rounds of 10 s at 1,000 rps
    python3 perf/bench_transparent.py --rounds 5 --json out.json

Measured here, never asserted in tests. Needs root (namespaces) and scripts/install --test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # a repository tool: the pods come from the end-to-end test

from tests.test_init import PROXY_UID  # noqa: E402
from tests.test_transparent import SERVER1, Cluster, cluster_up  # noqa: E402

MESHED_PORT, DIRECT_PORT = 8080, 8081
TOTAL_REQUESTS = 100_000


def tool(name: str) -> str:
    built = ROOT / "target" / "release" / name
    if not built.exists():
        sys.exit(f"{name} is not built: run scripts/install --test")
    return str(built)


def start_pods(cluster: Cluster) -> None:
    backend = cluster.work / "pymesh-backend"
    shutil.copy2(tool("pymesh-backend"), backend)
    shutil.copy2(tool("pymesh-loadgen"), cluster.work / "pymesh-loadgen")
    for port in (MESHED_PORT, DIRECT_PORT):
        proc = subprocess.Popen(["ip", "netns", "exec", cluster.ns("server1"), str(backend), "--listen",
                                 f"0.0.0.0:{port}"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        cluster.apps[f"backend-{port}"] = proc
        assert proc.stdout is not None
        proc.stdout.readline()  # its bound address: it is listening
    cluster.init("server1", "--skip-inbound-ports", str(DIRECT_PORT))
    cluster.init("client")
    cluster.start_sidecar("server1", "hello")
    cluster.start_sidecar("client", "client")
    for pod in ("server1", "client"):
        cluster.wait_ready(pod)


def load(cluster: Cluster, meshed: bool, rate: int, seconds: float) -> dict[str, Any]:
    port = MESHED_PORT if meshed else DIRECT_PORT
    as_user = [] if meshed else ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups", "--"]
    out = cluster.exec("client", *as_user, str(cluster.work / "pymesh-loadgen"), "--url",
                       f"http://{SERVER1}:{port}/", "--rate", str(rate), "--duration", str(seconds),
                       "--warmup", "1", "--connections", "4", "--json").stdout
    return json.loads(out)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--total", type=int, default=TOTAL_REQUESTS,
                        help="meshed requests before the sidecars' memory is read")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, cluster_up(Path(tmp), "pmbench") as cluster:
        start_pods(cluster)
        rounds: dict[str, list[dict[str, Any]]] = {"direct": [], "meshed": []}
        served = 0
        for _ in range(args.rounds):
            for name, meshed in (("direct", False), ("meshed", True)):
                report = load(cluster, meshed, args.rate, args.duration)
                rounds[name].append({k: report[k] for k in ("requests", "errors", "achieved_rps", "latency_us")})
                served += report["requests"] if meshed else 0
        idle = {pod: rss_kib(cluster.sidecars[pod].pid) for pod in ("client", "server1")}
        while served < args.total:
            report = load(cluster, True, 4 * args.rate, min(20.0, (args.total - served) / (4 * args.rate) + 1))
            served += report["requests"]
        after = {pod: rss_kib(cluster.sidecars[pod].pid) for pod in ("client", "server1")}

    def median(name: str, key: str) -> float:
        return statistics.median(r["latency_us"][key] for r in rounds[name])

    summary = {
        "rate": args.rate, "duration_s": args.duration, "rounds": args.rounds,
        "p50_us": {name: median(name, "p50") for name in rounds},
        "p99_us": {name: median(name, "p99") for name in rounds},
        "added_p50_us": median("meshed", "p50") - median("direct", "p50"),
        "added_p99_us": median("meshed", "p99") - median("direct", "p99"),
        "errors": {name: sum(r["errors"] for r in rounds[name]) for name in rounds},
        "sidecar_rss_kib_after_rounds": idle, "sidecar_rss_kib_after_100k": after,
        "meshed_requests": served, "per_round": rounds,
    }
    print(f"{'':8} {'p50 µs':>8} {'p99 µs':>8}   ({args.rounds} rounds of {args.duration:g} s at {args.rate} rps)")
    for name in rounds:
        print(f"{name:8} {summary['p50_us'][name]:>8.0f} {summary['p99_us'][name]:>8.0f}")
    print(f"added    {summary['added_p50_us']:>8.0f} {summary['added_p99_us']:>8.0f}")
    print(f"errors {summary['errors']}; sidecar RSS KiB after {served} meshed requests: {after}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
