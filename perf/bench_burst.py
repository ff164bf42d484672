"""Memory through a burst of connections: a proxy's resident memory idle, while it holds a burst
of slow-header clients (each sends a request head and never finishes it, as slowhttptest
does), and at set times after every one of them has closed. Each system runs in front of
the harness's backend with the harness's configuration (perf/harness/systems), one worker,
in the same run, fresh processes every round; medians of the rounds are reported.

What it answers: how much a pending connection costs (peak − idle, per held connection),
and whether what a burst took is handed back to the operating system once it is over.
Measured here, never asserted in tests (tests/test_memory.py checks only that freed
memory is returned).

    python3 perf/bench_burst.py                                  # pymesh, nginx, haproxy; 3,000 clients
    python3 perf/bench_burst.py --systems pymesh --rounds 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

# The harness's systems and process helpers: this script runs with perf/ on sys.path.
from harness.measure import memory, process_tree
from harness.procs import Child
from harness.scenarios import SMOKE
from harness.systems import SYSTEMS
from harness.systems.base import Context, Running, Unavailable, supervised
from harness.tools import rust_tool

HEAD = b"GET / HTTP/1.1\r\nhost: bench\r\nx-slow: 1\r\n"  # never finished: no blank line
CONNECT_TIMEOUT_S = 5.0


def rss_kib(running: Running) -> int:
    return memory(process_tree(*running.pids)).rss_kib


def open_slow_clients(address: str, count: int, max_seconds: float) -> tuple[list[socket.socket], int]:
    """Up to `count` slow-header clients within `max_seconds`; returns them and how many
    connects failed."""
    host, _, port = address.rpartition(":")
    clients: list[socket.socket] = []
    failed = 0
    deadline = time.monotonic() + max_seconds
    while len(clients) + failed < count and time.monotonic() < deadline:
        try:
            client = socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S)
            client.sendall(HEAD)
            clients.append(client)
        except OSError:
            failed += 1
    return clients, failed


def still_open(client: socket.socket) -> bool:
    """The proxy has neither closed nor answered this client (a peek that would block)."""
    client.setblocking(False)
    try:
        return client.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def one_round(system_name: str, context: Context, backend: Path, args: argparse.Namespace,
              workdir: Path) -> dict[str, Any]:
    system = SYSTEMS[system_name](context)
    with ExitStack() as stack:
        command = [str(backend), "--listen", "127.0.0.1:0", "--response-size", "1024", "--threads", "1"]
        child = stack.enter_context(supervised(Child("pymesh-backend", command, workdir / "backend.log")))
        upstream = child.wait_for_line(r"listening on (\S+)").group(1)
        running = stack.enter_context(system.start(upstream, SMOKE))
        time.sleep(0.5)
        idle = rss_kib(running)
        clients, failed = open_slow_clients(running.address, args.connections, args.max_seconds)
        try:
            peak = idle
            settle = time.monotonic() + args.hold
            while time.monotonic() < settle:  # the peak, while every client is held
                peak = max(peak, rss_kib(running))
                time.sleep(0.1)
            held = sum(still_open(c) for c in clients)
        finally:
            for client in clients:
                client.close()
        closed_at = time.monotonic()
        after: dict[str, int] = {}
        for offset in args.after:
            time.sleep(max(0.0, closed_at + offset - time.monotonic()))
            after[f"{offset:g}s"] = rss_kib(running)
        died = running.died()
    return {"idle_kib": idle, "peak_kib": peak, "held": held, "connect_failures": failed,
            "per_held_connection_kib": round((peak - idle) / held, 1) if held else None,
            "after_close_kib": after, "died": died}


def median_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return round(statistics.median(present), 1) if present else None

    offsets = rounds[0]["after_close_kib"].keys()
    summary: dict[str, Any] = {key: med([r[key] for r in rounds])
                               for key in ("idle_kib", "peak_kib", "held", "per_held_connection_kib")}
    summary["after_close_kib"] = {o: med([r["after_close_kib"][o] for r in rounds]) for o in offsets}
    idle = summary["idle_kib"]
    summary["back_within_2x_idle"] = {o: v is not None and idle is not None and v <= 2 * idle
                                      for o, v in summary["after_close_kib"].items()}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default="pymesh,nginx,haproxy", help="comma-separated harness system names")
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hold", type=float, default=2.0, help="seconds the burst is held while the peak is sampled")
    parser.add_argument("--after", type=lambda s: [float(x) for x in s.split(",")], default=[1, 5, 10, 30],
                        help="seconds after the burst closed at which RSS is read (comma-separated)")
    parser.add_argument("--max-seconds", type=float, default=60, help="the most opening the burst may take")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = [n for n in names if n not in SYSTEMS or n == "direct"]
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}; valid: {', '.join(n for n in SYSTEMS if n != 'direct')}")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * args.connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))

    result: dict[str, Any] = {"settings": vars(args) | {"json": str(args.json) if args.json else None},
                              "systems": {}, "skipped": {}}
    with tempfile.TemporaryDirectory(prefix="pymesh-burst-") as scratch:
        context = Context(workdir=Path(scratch))
        backend = rust_tool("pymesh-backend")
        available = []
        for name in names:
            try:
                SYSTEMS[name](context).check()
                available.append(name)
            except Unavailable as e:
                result["skipped"][name] = str(e)
        rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in available}
        for round_ in range(args.rounds):  # interleaved: every system once per round
            for name in available:
                workdir = Path(scratch) / f"{name}-{round_}"
                workdir.mkdir()
                outcome = one_round(name, Context(workdir=workdir), backend, args, workdir)
                rounds[name].append(outcome)
                print(f"round {round_ + 1} {name}: idle {outcome['idle_kib'] / 1024:.1f} MiB, "
                      f"peak {outcome['peak_kib'] / 1024:.1f} MiB with {outcome['held']:,} held, after close "
                      + ", ".join(f"{o} {v / 1024:.1f}" for o, v in outcome["after_close_kib"].items()) + " MiB",
                      file=sys.stderr)
        for name, runs in rounds.items():
            result["systems"][name] = {"median": median_of(runs), "rounds": runs}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["died"] is None for runs in rounds.values() for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
