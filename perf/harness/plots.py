"""PNG plots of a result (matplotlib, headless Agg backend), drawn from its JSON form:

    latency-<scenario>.png   latency by percentile, one curve per system, from the load
                             generator's `histogram` field (the round with the median p99)
    added-p99-vs-rate.png    p99 added over the baseline (direct, direct-pods) against the requested rate,
                             per protocol family
    rss.png                  peak RSS per system under load, and while holding idle connections
    max-throughput.png       closed-loop throughput per system (when a `max` scenario ran)
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

PERCENTILE_TICKS = [0, 50, 90, 99, 99.9, 99.99, 99.999]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _nines(percentile: float) -> float:
    """Percentile → x position on a log "nines" axis (50 → 2, 99 → 100, 99.9 → 1000)."""
    return 1.0 / (1.0 - percentile / 100.0)


def _colours(data: dict[str, Any]) -> dict[str, str]:
    """One colour per system, the same in every plot (matplotlib's cycle, by report order)."""
    return {s["name"]: f"C{i % 10}" for i, s in enumerate(data["systems"])}


def _ok(data: dict[str, Any], kind: str | None = None) -> list[dict[str, Any]]:
    return [o for o in data["outcomes"] if o["status"] == "ok" and (kind is None or o["kind"] == kind)]


def latency_curves(data: dict[str, Any], scenario: str, path: Path) -> bool:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = _colours(data)
    drawn, top = False, 0.0
    for outcome in _ok(data):
        if outcome["scenario"] != scenario or outcome["kind"] == "idle":
            continue
        runs = [r for r in data["runs"] if r["system"] == outcome["system"] and r["scenario"] == scenario]
        runs = [r for r in runs if r["histogram"]]
        if not runs:
            continue
        median_p99 = statistics.median_low(r["latency_us"]["p99"] for r in runs)
        run = next(r for r in runs if r["latency_us"]["p99"] == median_p99)
        points = [(p, v) for p, v in run["histogram"] if p < 100]
        if not points:
            continue
        ax.plot([_nines(p) for p, _ in points], [max(v, 1) for _, v in points], marker=".", label=outcome["system"],
                color=colours.get(outcome["system"]))
        drawn, top = True, max(top, points[-1][0])
    if drawn:
        ticks = [p for p in PERCENTILE_TICKS if p <= top] or PERCENTILE_TICKS[:2]
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([_nines(p) for p in ticks])
        ax.set_xticklabels([f"{p:g}%" for p in ticks])
        ax.minorticks_off()
        ax.set_xlim(0.9, _nines(top) * 1.2)
        ax.set_xlabel("percentile")
        ax.set_ylabel("latency, µs (from intended send time)")
        ax.set_title(f"Latency by percentile — {scenario}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def added_p99_vs_rate(data: dict[str, Any], path: Path) -> bool:
    plt = _pyplot()
    scenarios = {s["name"]: s for s in data["scenarios"]}
    families: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for o in _ok(data, "rate"):
        if o["system"] == "direct" or "p99" not in o["added_latency_us"]:
            continue
        family = scenarios[o["scenario"]]["family"]
        families.setdefault(family, {}).setdefault(o["system"], []).append(
            (o["requested_rps"], o["added_latency_us"]["p99"]))
    if not families:
        return False
    colours = _colours(data)
    fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4.5), squeeze=False)
    for ax, (family, systems) in zip(axes[0], sorted(families.items()), strict=True):
        for system, points in systems.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=system,
                    color=colours.get(system))
        ax.set_title(family)
        ax.set_yscale("symlog", linthresh=100)  # µs to seconds on one axis, negatives (noise) too
        ax.set_xlabel("requested rate, requests/s")
        ax.set_ylabel("added p99 over its baseline, µs (symlog)")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("p99 latency added by each proxy, against the request rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def rss(data: dict[str, Any], path: Path) -> bool:
    plt = _pyplot()
    under_load: dict[str, float] = {}
    idle: dict[str, float] = {}
    for o in _ok(data):
        if o["system"] == "direct" or o["peak_rss_kib"] is None:
            continue
        if o["kind"] == "idle":
            if o["idle"].get("rss_held_kib") is not None:
                idle[o["system"]] = o["idle"]["rss_held_kib"] / 1024
        else:
            under_load[o["system"]] = max(under_load.get(o["system"], 0.0), o["peak_rss_kib"] / 1024)
    systems = [s["name"] for s in data["systems"] if s["name"] in under_load or s["name"] in idle]
    if not systems:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(systems)), 4.5))
    width = 0.4 if idle else 0.6
    xs = range(len(systems))
    ax.bar([x - (width / 2 if idle else 0) for x in xs], [under_load.get(s, 0) for s in systems], width,
           label="peak RSS under load (VmHWM)", color="C0")
    if idle:
        ax.bar([x + width / 2 for x in xs], [idle.get(s, 0) for s in systems], width,
               label=f"RSS holding {_idle_count(data)} idle connections", color="C1")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(systems, rotation=15)
    ax.set_ylabel("MiB (summed over the proxy's processes)")
    ax.set_title("Proxy memory")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _idle_count(data: dict[str, Any]) -> str:
    counts = {s["idle_connections"] for s in data["scenarios"] if s["kind"] == "idle"}
    return f"{counts.pop():,}" if len(counts) == 1 else "the"


def max_throughput(data: dict[str, Any], path: Path) -> bool:
    plt = _pyplot()
    rows = _ok(data, "max")
    if not rows:
        return False
    scenarios = sorted({o["scenario"] for o in rows})
    systems = [s["name"] for s in data["systems"] if any(o["system"] == s["name"] for o in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(systems)), 4.5))
    width = 0.8 / len(scenarios)
    for i, scenario in enumerate(scenarios):
        values = {o["system"]: o["achieved_rps"] for o in rows if o["scenario"] == scenario}
        ax.bar([x + i * width - 0.4 + width / 2 for x in range(len(systems))], [values.get(s, 0) for s in systems],
               width, label=scenario)
    ax.set_xticks(list(range(len(systems))))
    ax.set_xticklabels(systems, rotation=15)
    ax.set_ylabel("requests/s (closed loop)")
    ax.set_title("Maximum throughput")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(data: dict[str, Any], out: Path) -> dict[str, Path]:
    """Draw every plot the data supports into `out`; return their paths by name."""
    paths: dict[str, Path] = {}
    load_scenarios = [s["name"] for s in data["scenarios"] if s["kind"] != "idle"]
    for scenario in load_scenarios:
        path = out / f"latency-{scenario}.png"
        if latency_curves(data, scenario, path):
            paths[f"latency {scenario}"] = path
    for name, draw in (("added-p99-vs-rate", added_p99_vs_rate), ("rss", rss), ("max-throughput", max_throughput)):
        path = out / f"{name}.png"
        if draw(data, path):
            paths[name] = path
    return paths
