"""Driving `pymesh-loadgen`: what it can do (read from its `--help`), the command line for a
scenario, and one bounded run that returns its `--json` report; and the command line of the
backend (`pymesh-backend`) it loads.

A scenario the load generator cannot offer is reported as skipped with the reason (gRPC, a new
connection per request) rather than approximated with something else: its `--help` must list
`grpc` (unary) or `grpc-stream` among the `--protocol` values, or the
`--new-connection-per-request` flag.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .procs import pinned
from .scenarios import Scenario

# What the load generator's --help must offer for these scenarios.
GRPC_PROTOCOL = "grpc"
GRPC_STREAM_PROTOCOL = "grpc-stream"
NEW_CONNECTION_FLAG = "--new-connection-per-request"
EXIT_GRACE_S = 30.0


class LoadgenError(Exception):
    """The load generator failed or returned something unreadable."""


@dataclass(frozen=True)
class Capabilities:
    """Which scenario features this build of the load generator supports."""

    grpc: bool
    new_connection: bool
    help_text: str = ""
    grpc_stream: bool = False

    @classmethod
    def of(cls, binary: Path) -> Capabilities:
        result = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=20)
        text = result.stdout
        protocols = text.split("--protocol", 1)[1].split("\n      --", 1)[0] if "--protocol" in text else ""

        def offers(protocol: str) -> bool:
            return f"- {protocol}:" in protocols or f"{protocol} =" in protocols

        return cls(grpc=offers(GRPC_PROTOCOL), grpc_stream=offers(GRPC_STREAM_PROTOCOL),
                   new_connection=NEW_CONNECTION_FLAG in text, help_text=text)

    def unsupported(self, scenario: Scenario) -> str | None:
        """Why the load generator cannot offer `scenario`, or None if it can."""
        if scenario.kind == "idle":
            return None  # the harness's own asyncio client holds idle connections
        if scenario.protocol == GRPC_PROTOCOL and not self.grpc:
            return ("pymesh-loadgen cannot speak gRPC (its --protocol offers no grpc); "
                    "gRPC unary is not faked with plain HTTP/2")
        if scenario.protocol == GRPC_STREAM_PROTOCOL and not self.grpc_stream:
            return ("pymesh-loadgen cannot stream gRPC (its --protocol offers no grpc-stream); "
                    "gRPC streaming is not faked with unary calls")
        if scenario.new_connection_per_request and not self.new_connection:
            return ("pymesh-loadgen has no new-connection-per-request mode (it always reuses keep-alive "
                    f"connections; the harness would pass {NEW_CONNECTION_FLAG})")
        return None


def command(binary: Path, address: str, scenario: Scenario, *, cpu: int | None = None,
            duration: float | None = None, warmup: float | None = None, rate: float | None = None) -> list[str]:
    """The command line that offers `scenario` to `address` (host:port; the overrides serve
    short probes). gRPC: the load generator sets `content-type: application/grpc` and
    `te: trailers` itself, and the path names a gRPC method."""
    args = [
        str(binary), "--url", f"http://{address}{scenario.path}", "--json",
        "--rate", f"{scenario.rate if rate is None else rate:g}",
        "--duration", f"{scenario.duration if duration is None else duration:g}",
        "--warmup", f"{scenario.warmup if warmup is None else warmup:g}",
        "--connections", str(scenario.connections),
        "--protocol", scenario.protocol,
        "--method", scenario.method,
        "--body-size", str(scenario.body_size),
    ]
    if scenario.inflight is not None:
        args += ["--inflight", str(scenario.inflight)]
    if scenario.new_connection_per_request:
        args.append(NEW_CONNECTION_FLAG)
    return pinned(args, cpu)


def backend_command(binary: Path, scenario: Scenario, listen: str = "127.0.0.1:0") -> list[str]:
    """The test backend for `scenario` on `listen` (it prints `listening on ADDRESS`): one thread,
    the scenario's response size. The runner's, and the one the systems in pods run in theirs."""
    return [str(binary), "--listen", listen, "--response-size", str(scenario.response_size), "--threads", "1"]


def run(args: list[str], expected_s: float, on_tick: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Run one load-generator command to completion (at most `expected_s` + a grace period),
    calling `on_tick(elapsed_seconds)` a few times a second, and return its JSON report."""
    # Files, not pipes: nothing the generator prints can fill a pipe and stall it.
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(args, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, text=True)
        start = time.monotonic()
        deadline = start + expected_s + EXIT_GRACE_S
        try:
            while process.poll() is None:
                if time.monotonic() > deadline:
                    raise LoadgenError(f"pymesh-loadgen ran past {expected_s + EXIT_GRACE_S:.0f} s; killed")
                if on_tick:
                    on_tick(time.monotonic() - start)
                time.sleep(0.1)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    if process.returncode != 0:
        raise LoadgenError(f"pymesh-loadgen exited with {process.returncode}: {err.strip()[-1500:]}")
    try:
        report: dict[str, Any] = json.loads(out)
    except json.JSONDecodeError as e:
        raise LoadgenError(f"pymesh-loadgen printed no JSON: {out[-500:]!r} {err[-500:]!r}") from e
    return report


def expected_seconds(scenario: Scenario, duration: float | None = None, warmup: float | None = None) -> float:
    """How long a run of `scenario` should take: warm-up + measured window + drain."""
    return (scenario.warmup if warmup is None else warmup) + (scenario.duration if duration is None else duration) + 1
