"""Compare two result files: for every system × scenario in either, the change of each
headline figure (latency percentiles, added p99, achieved rate, errors, CPU per 10k
requests, peak RSS, idle memory per connection), as old → new, delta and percentage.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# (label, path into an outcome, lower is better)
METRICS: list[tuple[str, tuple[str, ...], bool]] = [
    ("p50 µs", ("latency_us", "p50"), True),
    ("p99 µs", ("latency_us", "p99"), True),
    ("p99.9 µs", ("latency_us", "p999"), True),
    ("added p99 µs", ("added_latency_us", "p99"), True),
    ("achieved rps", ("achieved_rps",), False),
    ("errors", ("errors",), True),
    ("CPU s/10k", ("cpu_s_per_10k",), True),
    ("peak RSS KiB", ("peak_rss_kib",), True),
    ("private KiB", ("private_kib",), True),
    ("idle KiB/conn", ("idle", "per_connection_kib"), True),
]


class CompareError(Exception):
    """A file is missing or is not a `pymesh bench` result."""


@dataclass
class Delta:
    metric: str
    old: float | None
    new: float | None
    change: float | None
    percent: float | None
    better: bool | None  # None: no change or not comparable


@dataclass
class Row:
    system: str
    scenario: str
    old_status: str
    new_status: str
    deltas: list[Delta] = field(default_factory=list)


def load(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"{path}: cannot read a result: {e}") from e
    if not str(data.get("format", "")).startswith("pymesh-bench/") or "outcomes" not in data:
        raise CompareError(f"{path}: not a pymesh bench result (expected a result.json from `pymesh bench run`)")
    return data


def _get(outcome: dict[str, Any] | None, path: tuple[str, ...]) -> float | None:
    value: Any = outcome
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return float(value) if isinstance(value, int | float) else None


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[Row]:
    def index(data: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(o["system"], o["scenario"]): o for o in data["outcomes"]}

    before, after = index(old), index(new)
    keys = list(before) + [k for k in after if k not in before]
    rows = []
    for key in keys:
        o, n = before.get(key), after.get(key)
        row = Row(key[0], key[1], o["status"] if o else "absent", n["status"] if n else "absent")
        rows.append(row)
        if row.old_status != "ok" or row.new_status != "ok":
            continue  # nothing comparable: the table shows the statuses
        for label, path, lower_better in METRICS:
            a, b = _get(o, path), _get(n, path)
            if a is None and b is None:
                continue
            change = None if a is None or b is None else b - a
            percent = None if change is None or not a else change / abs(a) * 100
            better = None if not change else (change < 0) == lower_better
            row.deltas.append(Delta(label, a, b, change, percent, better))
    return rows


def compare_files(old: Path, new: Path) -> list[Row]:
    return compare(load(old), load(new))


def as_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.3f}" if abs(value) < 10 and value != int(value) else f"{value:,.0f}"


def render(rows: list[Row], console: Console, old_name: str, new_name: str) -> None:
    """One table per scenario: rows are system × metric, old → new with the change coloured."""
    scenarios = list(dict.fromkeys(r.scenario for r in rows))
    for scenario in scenarios:
        table = Table(title=f"{scenario}: {old_name} → {new_name}", title_justify="left")
        for column, justify in (("system", "left"), ("metric", "left"), ("old", "right"), ("new", "right"),
                                ("Δ", "right"), ("Δ %", "right")):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        for row in (r for r in rows if r.scenario == scenario):
            if row.old_status != "ok" or row.new_status != "ok":
                table.add_row(row.system, "status", row.old_status, row.new_status, "", "")
            for d in row.deltas:
                colour = "" if d.better is None else ("green" if d.better else "red")
                change = _fmt(d.change) if d.change is None else f"{d.change:+,.3f}".rstrip("0").rstrip(".")
                percent = "–" if d.percent is None else f"{d.percent:+.1f}%"
                table.add_row(row.system, d.metric, _fmt(d.old), _fmt(d.new),
                              f"[{colour}]{change}[/]" if colour else change,
                              f"[{colour}]{percent}[/]" if colour else percent)
        console.print(table)
