"""The run: snapshot the binaries to measure, then for every scenario start the backend and
every available system in front of it, probe each, measure them interleaved round by round
(the order rotates every round, so drift on a shared machine hits every system alike), stop
everything, and summarise. The idle-connection scenario starts fresh processes every round,
so each round's memory figures start from a clean heap.

The systems in pods start their own backend (same arguments) in their server pod and have the
load generator run in their client pod (`Running.load_prefix`).

Systems that cannot run here, scenarios the load generator cannot offer and scenarios a system
cannot serve (`System.unsupported`, e.g. a protocol it cannot proxy) are recorded as skipped
with the reason; a system that fails to start or to serve the probe is recorded as failed for
that scenario. rich progress bars show the whole run and the current load run.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from . import loadgen, measure
from .idle import hold_idle
from .procs import Child, StartError
from .results import BenchResult, IdleRun, Problem, Run, summarise
from .scenarios import Scenario
from .systems import SYSTEMS, THREADS, Context, Running, System, Unavailable
from .tools import rust_tool, snapshot, version_of

IDLE_WARMUP_CONNECTIONS = 20  # answered and closed before the idle scenario's "before" reading

PROXY_CPU, LOAD_CPU = 0, 1
PROBE_RATE, PROBE_SECONDS, PROBE_ATTEMPTS = 200.0, 0.3, 3


@dataclass
class Plan:
    """What to run: scenarios × systems × rounds, and how."""

    scenarios: list[Scenario]
    systems: list[str]
    rounds: int = 1
    pin: bool = False
    duration: float | None = None  # overrides every load scenario's measured seconds
    warmup: float | None = None
    linkerd2_proxy: Path | None = None
    command: str = ""
    scenario_spec: str = ""
    system_spec: str = ""


@dataclass
class _Active:
    system: System
    running: Running
    notes: list[str] = field(default_factory=list)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def pinning(pin: bool) -> str:
    if not pin:
        return f"not pinned: the OS scheduled every process on any of the {os.cpu_count()} CPUs"
    return (f"proxy on CPU {PROXY_CPU} (taskset -c {PROXY_CPU}; its threads and worker processes inherit it), "
            f"load generator on CPU {LOAD_CPU} (taskset -c {LOAD_CPU}); the backend and the idle-connection "
            "client unpinned")


def environment(pin: bool, tools: dict[str, str | None]) -> dict[str, Any]:
    """The machine and software the run happened on."""
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    distro = ""
    try:
        distro = next((line.split("=", 1)[1].strip('"') for line in Path("/etc/os-release").read_text().splitlines()
                       if line.startswith("PRETTY_NAME=")), "")
    except OSError:
        pass
    mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    return {
        "machine": platform.machine(), "cpu_model": model, "cpus": os.cpu_count(), "mem_mb": mem_mb,
        "kernel": platform.release(), "os": distro, "python": platform.python_version(),
        "pinned": pin, "pinning": pinning(pin), "proxy_threads": THREADS, "tools": tools,
        "network": "loopback (127.0.0.1)", "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


class Runner:
    """One `pymesh bench run`, from plan to result."""

    def __init__(self, plan: Plan, console: Console) -> None:
        if plan.pin and ((os.cpu_count() or 1) < 2 or shutil.which("taskset") is None):
            raise ValueError("--pin needs taskset (util-linux) and at least 2 CPUs")
        self.plan = plan
        self.console = console
        self.loadgen = rust_tool("pymesh-loadgen")
        self.backend = rust_tool("pymesh-backend")
        self.capabilities = loadgen.Capabilities.of(self.loadgen)
        self.load_cpu = LOAD_CPU if plan.pin else None
        self.scenarios = [s.with_timing(plan.duration, plan.warmup) for s in plan.scenarios]

    def run(self) -> BenchResult:
        plan = self.plan
        tools = {"pymesh-loadgen": version_of([str(self.loadgen), "--version"]),
                 "pymesh-backend": version_of([str(self.backend), "--version"])}
        result = BenchResult(
            id=str(uuid.uuid4()), start_time=now(), end_time="", command=plan.command,
            environment=environment(plan.pin, tools),
            options={"rounds": plan.rounds, "pin": plan.pin, "duration_override_s": plan.duration,
                     "warmup_override_s": plan.warmup, "scenarios": plan.scenario_spec, "systems": plan.system_spec,
                     "linkerd2_proxy": str(plan.linkerd2_proxy) if plan.linkerd2_proxy else None},
            systems=[], scenarios=[s.to_dict() for s in self.scenarios],
        )
        if any(SYSTEMS[name].baseline == "direct-pods" or name == "direct-pods" for name in plan.systems):
            result.environment["network"] += ("; the systems in pods: network namespaces on a bridge (veth pairs), "
                                              "10.251.0.0/24, nftables redirect rules")
        with tempfile.TemporaryDirectory(prefix="pymesh-bench-") as tmp:
            # Traversable (not listable) by others: the systems in pods run their proxies, and the
            # direct-pods load, as the proxy user, from the snapshot and scratch directories below.
            os.chmod(tmp, 0o711)
            wanted = {b for name in plan.systems for b in SYSTEMS[name].binaries}
            binaries = ["pymesh-loadgen", "pymesh-backend", *sorted(wanted)]
            snap = snapshot(Path(tmp), binaries, pymesh_package="pymesh-embedded" in plan.systems)
            self.loadgen = snap.path("pymesh-loadgen") or self.loadgen
            self.backend = snap.path("pymesh-backend") or self.backend
            result.environment["builds"] = {name: b.describe() for name, b in snap.builds.items()}
            context = Context(Path(tmp), PROXY_CPU if plan.pin else None, plan.linkerd2_proxy, snap)
            available = self._systems(context, result)
            runnable = []
            for scenario in self.scenarios:
                reason = self.capabilities.unsupported(scenario)
                if reason:
                    result.problems.append(Problem("*", scenario.name, "skipped", reason))
                else:
                    runnable.append(scenario)
            total = sum(plan.rounds * len(available) for _ in runnable)
            with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=self.console, transient=False) as progress:
                overall = progress.add_task("runs", total=total)
                current = progress.add_task("", total=1, visible=False)
                for scenario in runnable:
                    if scenario.kind == "idle":  # memory: every round on freshly started processes
                        for round_ in range(plan.rounds):
                            self._scenario(scenario, available, Path(tmp), result, progress, overall, current,
                                           [round_])
                    else:
                        self._scenario(scenario, available, Path(tmp), result, progress, overall, current,
                                       list(range(plan.rounds)))
        result.end_time = now()
        result.environment["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        result.outcomes = summarise(result)
        return result

    def _systems(self, context: Context, result: BenchResult) -> list[System]:
        available = []
        for name in self.plan.systems:
            system = SYSTEMS[name](context)
            entry: dict[str, Any] = {"name": name, "label": system.label, "description": system.description}
            try:
                system.check()
                entry.update(status="available", version=system.version(), settings=system.settings(),
                             baseline=system.baseline)
                available.append(system)
            except Unavailable as e:
                entry.update(status="skipped", reason=str(e))
                result.problems.append(Problem(name, "*", "skipped", str(e)))
            result.systems.append(entry)
        return available

    def _backend(self, scenario: Scenario, workdir: Path, stack: ExitStack) -> str:
        command = loadgen.backend_command(self.backend, scenario)
        child = Child("pymesh-backend", command, workdir / f"backend-{scenario.name}.log")
        stack.callback(child.stop)
        return child.wait_for_line(r"listening on (\S+)").group(1)

    def _scenario(self, scenario: Scenario, systems: list[System], workdir: Path, result: BenchResult,
                  progress: Progress, overall: TaskID, current: TaskID, rounds: list[int]) -> None:
        """Start the backend and every system for `scenario`, measure `rounds`, stop them all."""
        with ExitStack() as stack:
            progress.update(current, description=f"{scenario.name}: starting", visible=True, total=1, completed=0)
            try:
                upstream = self._backend(scenario, workdir, stack)
            except StartError as e:
                for system in systems:
                    result.problems.append(Problem(system.name, scenario.name, "failed", f"backend: {e}",
                                                   None if len(rounds) == self.plan.rounds else rounds[0]))
                progress.advance(overall, len(rounds) * len(systems))
                return
            active: list[_Active] = []
            for system in systems:
                reason = system.unsupported(scenario)
                if reason:
                    if not any(p.system == system.name and p.scenario == scenario.name for p in result.problems):
                        result.problems.append(Problem(system.name, scenario.name, "skipped", reason))
                    progress.console.print(f"{scenario.name} · {system.name}: skipped: {escape(reason)}")
                    progress.advance(overall, len(rounds))
                    continue
                own = ExitStack()  # stops this system at once if it fails its probe
                try:
                    running = own.enter_context(system.start(upstream, scenario))
                    self._probe(scenario, running)
                except (StartError, Unavailable, loadgen.LoadgenError) as e:
                    own.close()
                    every = len(rounds) == self.plan.rounds  # else this start served one round only
                    result.problems.append(Problem(system.name, scenario.name, "failed", str(e),
                                                   None if every else rounds[0]))
                    progress.console.print(f"{scenario.name} · {system.name}: failed to start: {escape(str(e))}")
                    progress.advance(overall, len(rounds))
                    continue
                stack.enter_context(own)
                result.configs.update(running.configs)
                if running.notes:  # what the system checked or did at start (e.g. mTLS verified), per scenario
                    entry = next(s for s in result.systems if s["name"] == system.name)
                    entry.setdefault("notes", {})[scenario.name] = running.notes
                active.append(_Active(system, running))
            for round_ in rounds:
                shift = round_ % max(1, len(active))
                for item in active[shift:] + active[:shift]:
                    label = f"{scenario.name} · {item.system.name} · round {round_ + 1}/{self.plan.rounds}"
                    gone = item.running.died()
                    if gone:  # died in an earlier round: nothing left to measure
                        progress.advance(overall)
                        continue
                    try:
                        self._measure(scenario, item, round_, label, result, progress, current)
                    except (loadgen.LoadgenError, OSError) as e:
                        result.problems.append(Problem(item.system.name, scenario.name, "failed", str(e), round_))
                        progress.console.print(f"{label}: failed: {escape(str(e))}")
                    gone = item.running.died()
                    if gone:
                        result.problems.append(Problem(item.system.name, scenario.name, "failed",
                                                       f"{item.system.name} {gone}", round_))
                        progress.console.print(f"{label}: [red]{item.system.name} {escape(gone)}[/red]")
                    progress.advance(overall)
            progress.update(current, description=f"{scenario.name}: stopping", total=1, completed=1)

    def _measure(self, scenario: Scenario, item: _Active, round_: int, label: str, result: BenchResult,
                 progress: Progress, current: TaskID) -> None:
        """One measured run of one system, recorded in `result` and logged above the progress bars."""
        if scenario.kind == "idle":
            progress.update(current, description=label, total=1, completed=0)
            idle = self._idle(scenario, item, round_)
            result.idle_runs.append(idle)
            rss = "–" if idle.rss_held_kib is None else f"{idle.rss_held_kib / 1024:.1f} MiB"
            progress.console.print(f"{label}: held {idle.held:,}/{idle.requested:,}, RSS {rss}")
            return
        progress.update(current, description=label, total=loadgen.expected_seconds(scenario), completed=0)
        run = self._load(scenario, item, round_, lambda t: progress.update(current, completed=t))
        if not run.responses:  # nothing answered: a failure, not a latency figure
            raise loadgen.LoadgenError(f"no responses to {run.requests:,} requests ({run.error_counts})")
        result.runs.append(run)
        progress.console.print(f"{label}: p50 {run.latency_us['p50']:,.0f} µs, p99 {run.latency_us['p99']:,.0f} µs, "
                               f"{run.achieved_rps:,.0f} rps, {run.errors} errors")

    def _probe(self, scenario: Scenario, running: Running) -> None:
        """A short load through the system, so no measured run meets a system that cannot serve."""
        rate = min(scenario.rate or PROBE_RATE, PROBE_RATE)
        args = running.load_prefix + loadgen.command(self.loadgen, running.address, scenario, rate=rate,
                                                     duration=PROBE_SECONDS, warmup=0)
        report: dict[str, Any] = {}
        for _ in range(PROBE_ATTEMPTS):
            report = loadgen.run(args, PROBE_SECONDS + 1)
            if report["responses"] and not report["errors"]:
                return
        raise loadgen.LoadgenError(f"probe through the system failed: {report['errors']} of {report['requests']} "
                                   f"requests, status {report['status_counts']}, {report['error_counts']}")

    def _load(self, scenario: Scenario, item: _Active, round_: int, tick: Callable[[float], None]) -> Run:
        args = item.running.load_prefix + loadgen.command(self.loadgen, item.running.address, scenario,
                                                          cpu=self.load_cpu)
        pids = item.running.pids
        sampler = measure.TreeSampler(*pids) if pids else None
        start = now()
        if sampler:
            sampler.start()
        report = loadgen.run(args, loadgen.expected_seconds(scenario), tick)
        run = Run(
            system=item.system.name, scenario=scenario.name, round=round_, start_time=start, end_time=now(),
            requested_rps=float(report["requested_rps"]), achieved_rps=float(report["achieved_rps"]),
            requests=int(report["requests"]), responses=int(report["responses"]), errors=int(report["errors"]),
            latency_us={k: float(v) for k, v in report["latency_us"].items()},
            send_delay_us={k: float(v) for k, v in report["send_delay_us"].items()},
            status_counts=dict(report["status_counts"]), error_counts=dict(report["error_counts"]),
            histogram=[[float(p), float(v)] for p, v in report["histogram"]],
        )
        if sampler:
            run.proxy_cpu_s = round(sampler.stop(), 3)
            # Requests the proxy served while sampled: the measured ones plus the warm-up's.
            served = report["responses"] + report["achieved_rps"] * scenario.warmup
            if served:
                run.proxy_cpu_s_per_10k = round(run.proxy_cpu_s / served * 10_000, 4)
            memory = sampler.memory()
            run.rss_kib, run.peak_rss_kib, run.private_kib = memory.rss_kib, memory.peak_kib, memory.anon_kib
        return run

    def _idle(self, scenario: Scenario, item: _Active, round_: int) -> IdleRun:
        pids = item.running.pids
        tree: Callable[[], measure.Memory | None] = (lambda: measure.memory(measure.process_tree(*pids))) if pids \
            else (lambda: None)
        # A few connections first, opened, answered and closed, so that "before" already holds
        # each proxy's request-path code and its first upstream connection: the per-connection
        # figure is then what the idle connections themselves cost, not code paged in by them.
        netns = item.running.netns
        http2 = scenario.http2
        hold_idle(item.running.address, IDLE_WARMUP_CONNECTIONS, 0.0, lambda: None, netns=netns, http2=http2)
        before = tree()
        start = now()
        outcome = hold_idle(item.running.address, scenario.idle_connections, scenario.idle_hold, tree, netns=netns,
                            http2=http2)
        run = IdleRun(system=item.system.name, scenario=scenario.name, round=round_, start_time=start, end_time=now(),
                      requested=outcome.requested, opened=outcome.opened, held=outcome.held, failures=outcome.failures)
        held: measure.Memory | None = outcome.measured
        if before is not None and held is not None:
            run.rss_before_kib, run.rss_held_kib, run.peak_rss_kib = before.rss_kib, held.rss_kib, held.peak_kib
            if outcome.held:
                run.per_connection_kib = round((held.rss_kib - before.rss_kib) / outcome.held, 2)
        return run


def run(plan: Plan, console: Console) -> BenchResult:
    """Run `plan`, showing progress on `console`."""
    return Runner(plan, console).run()

