"""Maximum throughput of the native sidecar with 1 and 2 engine worker threads, in one run.

Closed-loop HTTP/1.1 keep-alive load (1 KiB responses) from `pymesh-loadgen` through a
`pymesh-proxy --threads N` to the test backend; rounds alternate 1 and 2 threads. On a machine
this small the load generator and the backend compete with the proxy for the same cores, so
every process's CPU share over the measured run is reported beside the rate: a second worker
can only help as far as there is a core for it.

    python3 perf/bench_threads.py                  # 3 rounds of 8 s, 16 connections
    python3 perf/bench_threads.py --rounds 5 --json out.json

Measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench_engine import backend_process, cpu_seconds, load, native_proxy


def reaped_children_cpu() -> float:
    """CPU seconds of the children waited for so far (the load generator's runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()

    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        upstream, backend_pid = stack.enter_context(backend_process(1024))
        proxies = {}
        for threads in (1, 2):
            address, pid = stack.enter_context(native_proxy(upstream, Path(tmp), None, threads=threads))
            proxies[threads] = (address, pid)
        for round_ in range(args.rounds):
            for threads, (address, pid) in proxies.items():
                proxy_before, backend_before = cpu_seconds(pid), cpu_seconds(backend_pid)
                loadgen_before = reaped_children_cpu()
                report = load(f"http://{address}/", 0, args.duration, 1, args.connections, "bench", None)
                loadgen = reaped_children_cpu() - loadgen_before
                seconds = args.duration + 1  # the warm-up's requests are served (and used CPU) too
                run = {
                    "threads": threads, "round": round_, "rps": report["achieved_rps"],
                    "errors": report["errors"], "latency_us": report["latency_us"],
                    "proxy_cpu_share": (cpu_seconds(pid) - proxy_before) / seconds,
                    "backend_cpu_share": (cpu_seconds(backend_pid) - backend_before) / seconds,
                    "loadgen_cpu_share": loadgen / seconds,
                }
                runs.append(run)
                print(f"round {round_ + 1}/{args.rounds} threads {threads}: {run['rps']:,.0f} rps, "
                      f"proxy {run['proxy_cpu_share']:.2f} CPU, backend {run['backend_cpu_share']:.2f}, "
                      f"load generator {run['loadgen_cpu_share']:.2f}",
                      file=sys.stderr)

    summary = {}
    for threads in (1, 2):
        mine = [r for r in runs if r["threads"] == threads]
        summary[threads] = {
            "rps": statistics.median(r["rps"] for r in mine),
            "p99_us": statistics.median(r["latency_us"]["p99"] for r in mine),
            "proxy_cpu_share": statistics.median(r["proxy_cpu_share"] for r in mine),
            "backend_cpu_share": statistics.median(r["backend_cpu_share"] for r in mine),
            "loadgen_cpu_share": statistics.median(r["loadgen_cpu_share"] for r in mine),
            "errors": sum(r["errors"] for r in mine),
        }
    one, two = summary[1], summary[2]
    print("| threads | max rps | p99 µs | proxy CPU | backend CPU | load generator CPU | errors |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for threads, s in summary.items():
        print(f"| {threads} | {s['rps']:,.0f} | {s['p99_us']:,.0f} | {s['proxy_cpu_share']:.2f} | "
              f"{s['backend_cpu_share']:.2f} | {s['loadgen_cpu_share']:.2f} | {s['errors']} |")
    print(f"2 threads / 1 thread: {two['rps'] / one['rps']:.2f}× the rate (CPU shares are cores: 1.00 is "
          "one core busy for the whole run)")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
