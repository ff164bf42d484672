"""The result model: one record per measured run (load or idle), what was skipped or failed
and why, and the per system × scenario outcome: medians over rounds, latency added over the
system's baseline in the same run (`direct`; `direct-pods` for the systems measured in pods),
errors, CPU per 10k requests, peak RSS, and warnings on figures that should not be trusted
(rate not reached, generator lag, errors, a floor whose own tail moved between rounds).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

PERCENTILES = ("p50", "p90", "p99", "p999", "max")
GENERATOR_LAG_US = 1000  # send delay p99 above this: the load generator itself fell behind
# A floor (direct) whose own p99 moves more than this factor between rounds ran on a machine busy
# with something else: the added p99 of every system measured over it is partly that noise.
NOISY_FLOOR_SPREAD = 2.0


@dataclass
class Run:
    """One load-generator run of one system in one scenario and round."""

    system: str
    scenario: str
    round: int
    start_time: str
    end_time: str
    requested_rps: float
    achieved_rps: float
    requests: int
    responses: int
    errors: int
    latency_us: dict[str, float]
    send_delay_us: dict[str, float]
    status_counts: dict[str, int]
    error_counts: dict[str, int]
    histogram: list[list[float]]  # [percentile, latency_us] pairs from the load generator
    proxy_cpu_s: float | None = None  # CPU of the proxy's process tree during the run (warm-up included)
    proxy_cpu_s_per_10k: float | None = None
    rss_kib: int | None = None  # after the run
    peak_rss_kib: int | None = None  # VmHWM, summed over the process tree
    private_kib: int | None = None  # RssAnon after the run, summed: RSS less code and other file pages


@dataclass
class IdleRun:
    """One idle-connections measurement of one system."""

    system: str
    scenario: str
    round: int
    start_time: str
    end_time: str
    requested: int
    opened: int
    held: int
    failures: dict[str, int]
    rss_before_kib: int | None = None
    rss_held_kib: int | None = None
    peak_rss_kib: int | None = None
    per_connection_kib: float | None = None


@dataclass
class Problem:
    """A system or scenario that was skipped (cannot run here) or failed (tried, went wrong)."""

    system: str  # "*" for every system
    scenario: str  # "*" for every scenario
    status: str  # "skipped" | "failed"
    reason: str
    round: int | None = None


@dataclass
class Outcome:
    """One system in one scenario, summarised over rounds."""

    system: str
    scenario: str
    kind: str
    status: str  # "ok" | "skipped" | "failed"
    reason: str = ""
    rounds: int = 0
    latency_us: dict[str, float] = field(default_factory=dict)
    added_latency_us: dict[str, float] = field(default_factory=dict)  # over `baseline` in the same run
    baseline: str | None = None  # the system added latency is measured from (None: a floor itself)
    requested_rps: float | None = None
    achieved_rps: float | None = None
    requests: int = 0
    errors: int = 0
    cpu_s_per_10k: float | None = None
    peak_rss_kib: int | None = None
    private_kib: int | None = None  # the largest of the rounds' anonymous (private) memory after the run
    idle: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class BenchResult:
    """Everything one `pymesh bench run` measured."""

    id: str
    start_time: str
    end_time: str
    command: str
    environment: dict[str, Any]
    options: dict[str, Any]
    systems: list[dict[str, Any]]
    scenarios: list[dict[str, Any]]
    runs: list[Run] = field(default_factory=list)
    idle_runs: list[IdleRun] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    configs: dict[str, str] = field(default_factory=dict)  # generated config files, by file name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchResult:
        """A result read back from its `result.json` (outcomes left to `summarise`)."""
        return cls(
            id=data["id"], start_time=data["start_time"], end_time=data["end_time"], command=data["command"],
            environment=data["environment"], options=data["options"], systems=data["systems"],
            scenarios=data["scenarios"], runs=[Run(**r) for r in data.get("runs", [])],
            idle_runs=[IdleRun(**r) for r in data.get("idle_runs", [])],
            problems=[Problem(**p) for p in data.get("problems", [])], configs=data.get("configs", {}),
        )


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(result: BenchResult) -> list[Outcome]:
    """Outcomes for every selected system × scenario, in the order they were selected, with the
    latency each adds over its baseline (`direct`, or `direct-pods` for the systems in pods)."""
    outcomes: list[Outcome] = []
    # A result written before systems named their baseline: everything but direct is over direct.
    baselines = {s["name"]: s.get("baseline", None if s["name"] == "direct" else "direct") for s in result.systems}
    floors: dict[tuple[str, str], dict[str, float]] = {}
    for scenario in result.scenarios:
        for system in result.systems:
            outcome = _outcome(result, system["name"], scenario)
            outcome.baseline = baselines[system["name"]]
            if outcome.status == "ok":
                floors[(system["name"], scenario["name"])] = outcome.latency_us
            outcomes.append(outcome)
    for outcome in outcomes:
        floor = floors.get((outcome.baseline, outcome.scenario)) if outcome.baseline else None
        if outcome.status == "ok" and outcome.latency_us and floor:
            outcome.added_latency_us = {k: outcome.latency_us[k] - floor[k] for k in PERCENTILES}
        if outcome.baseline is None and outcome.status == "ok" and outcome.kind != "idle":
            outcome.warnings.extend(_noisy_floor(result, outcome))
    return outcomes


def _noisy_floor(result: BenchResult, floor: Outcome) -> list[str]:
    """A warning when a floor's own p99 moved by more than NOISY_FLOOR_SPREAD× between rounds."""
    p99s = [r.latency_us["p99"] for r in result.runs if r.system == floor.system and r.scenario == floor.scenario]
    if len(p99s) < 2 or min(p99s) <= 0 or max(p99s) <= NOISY_FLOOR_SPREAD * min(p99s):
        return []
    return [f"its own p99 moved from {min(p99s):,.0f} to {max(p99s):,.0f} µs between rounds: the machine was busy "
            "with something else, and the added p99 of every system in this scenario carries that noise "
            "(compare p50s, or run again)"]


def _problem(result: BenchResult, system: str, scenario: str) -> Problem | None:
    for problem in result.problems:
        if problem.round is None and problem.system in (system, "*") and problem.scenario in (scenario, "*"):
            return problem
    return None


def _outcome(result: BenchResult, system: str, scenario: dict[str, Any]) -> Outcome:
    name, kind = scenario["name"], scenario["kind"]
    problem = _problem(result, system, name)
    if problem:
        return Outcome(system, name, kind, problem.status, problem.reason)
    failed = [p for p in result.problems if p.system == system and p.scenario == name]
    if kind == "idle":
        return _idle_outcome(result, system, name, failed)
    runs = [r for r in result.runs if r.system == system and r.scenario == name]
    if not runs:
        reason = "; ".join(p.reason for p in failed) or "no run completed"
        return Outcome(system, name, kind, "failed", reason)
    latency = {k: statistics.median(r.latency_us[k] for r in runs) for k in (*PERCENTILES, "mean")}
    outcome = Outcome(
        system, name, kind, "ok", rounds=len(runs), latency_us=latency,
        requested_rps=runs[0].requested_rps,
        achieved_rps=statistics.median(r.achieved_rps for r in runs),
        requests=sum(r.requests for r in runs), errors=sum(r.errors for r in runs),
        cpu_s_per_10k=_median([r.proxy_cpu_s_per_10k for r in runs if r.proxy_cpu_s_per_10k is not None]),
        peak_rss_kib=max((r.peak_rss_kib for r in runs if r.peak_rss_kib is not None), default=None),
        private_kib=max((r.private_kib for r in runs if r.private_kib is not None), default=None),
    )
    if failed:
        outcome.warnings.append(f"{len(failed)} round(s) failed: {failed[0].reason}")
    if outcome.errors:
        outcome.warnings.append(f"{outcome.errors} errors ({_error_kinds(runs)})")
    requested, achieved = outcome.requested_rps or 0.0, outcome.achieved_rps or 0.0
    if kind == "rate" and achieved < 0.95 * requested:
        outcome.warnings.append(f"achieved {achieved:,.0f} of {requested:,.0f} rps requested")
    lag = statistics.median(r.send_delay_us.get("p99", 0) for r in runs)
    if kind == "rate" and lag > GENERATOR_LAG_US:
        outcome.warnings.append(f"load generator lagged (send delay p99 {lag:,.0f} µs)")
    return outcome


def _error_kinds(runs: list[Run]) -> str:
    kinds: dict[str, int] = {}
    for run in runs:
        for code, count in run.status_counts.items():
            if not code.startswith("2"):
                kinds[f"status {code}"] = kinds.get(f"status {code}", 0) + count
        for cause, count in run.error_counts.items():
            if count:
                kinds[cause] = kinds.get(cause, 0) + count
    return ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))


def _idle_outcome(result: BenchResult, system: str, name: str, failed: list[Problem]) -> Outcome:
    runs = [r for r in result.idle_runs if r.system == system and r.scenario == name]
    if not runs:
        reason = "; ".join(p.reason for p in failed) or "no run completed"
        return Outcome(system, name, "idle", "failed", reason)
    idle = {
        "requested": runs[0].requested,
        "opened": min(r.opened for r in runs),
        "held": min(r.held for r in runs),
        "rss_before_kib": _median([r.rss_before_kib for r in runs if r.rss_before_kib is not None]),
        "rss_held_kib": _median([r.rss_held_kib for r in runs if r.rss_held_kib is not None]),
        "per_connection_kib": _median([r.per_connection_kib for r in runs if r.per_connection_kib is not None]),
    }
    outcome = Outcome(system, name, "idle", "ok", rounds=len(runs), idle=idle,
                      peak_rss_kib=max((r.peak_rss_kib for r in runs if r.peak_rss_kib is not None), default=None),
                      errors=sum(r.requested - r.held for r in runs))
    if outcome.errors:
        failures: dict[str, int] = {}
        for r in runs:
            for k, v in r.failures.items():
                failures[k] = failures.get(k, 0) + v
        outcome.warnings.append(f"{outcome.errors} connection(s) not held" +
                                (f" ({', '.join(f'{k}: {v}' for k, v in failures.items())})" if failures else ""))
    return outcome
