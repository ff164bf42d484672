"""The perf harness: pymesh side by side with direct connections and its peers.

Runs the same scenarios (HTTP/1.1, HTTP/2, gRPC, large bodies, new connections, idle
connections) against every system under test in one run, interleaved round by round, with
the project's own load generator (`pymesh-loadgen`: open loop, coordinated omission
corrected) and test backend (`pymesh-backend`), and writes JSON, Markdown and PNG reports.

Modules, one concern each:

    scenarios   what load to offer (small dataclasses, named sets such as `smoke` and `full`)
    systems/    one module per system under test: how to start, configure and stop it
    tools       where the harness's binaries are (and building the Rust perf tools if missing)
    procs       child processes: start with logs, wait for readiness, stop; free ports
    loadgen     driving `pymesh-loadgen` and reading what it can do
    idle        the asyncio client that holds many idle connections open
    measure     CPU seconds and RSS of a process tree from /proc
    results     the result model: runs, medians, added latency over direct
    runner      the run itself: start systems per scenario, interleave, measure, progress bars
    smp         the Service Mesh Performance (SMP) view of a result
    report      JSON and Markdown reports
    plots       PNG plots (matplotlib)
    compare     per system/scenario deltas between two result files

Entry points are `pymesh bench run|list|compare` (pymesh/bench.py).
"""

from __future__ import annotations

from .compare import compare_files
from .results import BenchResult
from .runner import Plan, run
from .scenarios import SCENARIOS, SETS, Scenario, select_scenarios
from .systems import SYSTEMS, select_systems

__all__ = [
    "SCENARIOS", "SETS", "SYSTEMS", "BenchResult", "Plan", "Scenario", "compare_files", "run",
    "select_scenarios", "select_systems",
]
