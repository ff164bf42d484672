"""The sidecar's memory under overload: 200 keep-alive clients sending back to back against a
service limited to 20 concurrent requests on a backend that holds each one 100 ms (10×
overload), while /proc/<pid>/status is sampled. Reports what was shed and admitted and the
peak resident memory (VmRSS sampled, VmHWM from the kernel). Measured here, never asserted
in tests (tests/test_reliability.py checks only that the excess is shed).

    python3 perf/bench_overload.py                        # 50,000 requests, at most 60 s
    python3 perf/bench_overload.py --requests 200000 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web

# One sidecar starter for all benchmarks: this script runs with perf/ on sys.path.
from bench_engine import memory_kib, start_sidecar

REASON = "pymesh-reason"


def slow_backend(latency: float) -> tuple[str, asyncio.AbstractEventLoop]:
    """An aiohttp server on its own loop thread that answers every request after ``latency``."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def work(request: web.Request) -> web.Response:
        await asyncio.sleep(latency)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/work", work)
    runner = web.AppRunner(app, access_log=None)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))

    async def start() -> None:
        await runner.setup()
        await web.SockSite(runner, sock).start()

    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    return f"127.0.0.1:{sock.getsockname()[1]}", loop


async def overload(address: str, clients: int, requests: int, max_seconds: float) -> dict[str, Any]:
    """Bare HTTP/1.1 clients on keep-alive connections (httpx cannot offer this load)."""
    statuses: Counter[int] = Counter()
    reasons: Counter[str] = Counter()
    errors: list[str] = []
    remaining = [requests]
    deadline = time.monotonic() + max_seconds
    host, port = address.rsplit(":", 1)
    request = b"GET /work HTTP/1.1\r\nHost: bench\r\n\r\n"

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while remaining[0] > 0 and time.monotonic() < deadline:
                remaining[0] -= 1
                writer.write(request)
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                lines = head[:-4].split("\r\n")
                status = int(lines[0].split(" ", 2)[1])
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
                await reader.readexactly(int(headers.get("content-length", "0")))
                statuses[status] += 1
                if status != 200:
                    reasons[headers.get(REASON, "")] += 1
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return {"seconds": round(time.monotonic() - started, 2), "statuses": dict(statuses),
            "reasons": dict(reasons), "errors": len(errors), "first_errors": errors[:3]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--max-seconds", type=float, default=60)
    parser.add_argument("--max-concurrent", type=int, default=20)
    parser.add_argument("--latency", type=float, default=0.1, help="seconds the backend holds each request")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()

    upstream, loop = slow_backend(args.latency)
    config = {
        "admin": {"address": "127.0.0.1:0"},
        "listeners": [{"name": "main", "address": "127.0.0.1:0"}],
        "services": [{"name": "bench", "endpoints": [{"address": upstream}],
                      "limits": {"maxConcurrent": args.max_concurrent}}],
    }
    with tempfile.TemporaryDirectory(prefix="pymesh-overload-") as workdir:
        process, addresses = start_sidecar(config, Path(workdir), None)
        try:
            before = memory_kib(process.pid)
            peak = [before.get("VmRSS", 0)]
            sampling = threading.Event()

            def sample() -> None:
                while not sampling.wait(0.02):
                    peak[0] = max(peak[0], memory_kib(process.pid).get("VmRSS", 0))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                outcome = asyncio.run(overload(addresses["main"], args.clients, args.requests, args.max_seconds))
            finally:
                sampling.set()
                sampler.join(timeout=5)
            after = memory_kib(process.pid)
            alive = process.poll() is None
        finally:
            process.terminate()
            process.wait(timeout=30)
    loop.call_soon_threadsafe(loop.stop)

    result = {**outcome, "proxy_alive": alive, "rss_kib_before": before.get("VmRSS"),
              "rss_kib_peak_sampled": peak[0], "rss_kib_hwm": after.get("VmHWM"),
              "settings": vars(args) | {"json": str(args.json) if args.json else None}}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
