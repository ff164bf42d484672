"""`pymesh bench`: the perf harness from the command line (run, list, compare).

The harness lives in the checkout's `perf/harness/` and is not installed with the package:
these commands add the repository root to `sys.path` when `pymesh` runs from a checkout
(an editable install, as scripts/install makes), and say so clearly otherwise.

`run` measures in a fresh Python process that loads this file alone, never the engine
extension: the `pymesh` CLI process has `pymesh._engine` mapped, and a rebuild that rewrites
that file in place during a run of several minutes would crash it (the proxies measured are
snapshots; see perf/harness/tools.py).
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parent.parent
HARNESS = REPO_ROOT / "perf" / "harness"

bench_app = typer.Typer(
    help="Benchmark pymesh side by side with direct connections, nginx, HAProxy, Envoy and linkerd2-proxy.",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True, soft_wrap=True)  # messages unwrapped: greppable, copyable

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]

ISOLATED = "PYMESH_BENCH_ISOLATED"
# Runs this file's typer app in a process that imports neither `pymesh` nor its engine.
STANDALONE = """\
import importlib.util, sys
spec = importlib.util.spec_from_file_location("pymesh_bench", sys.argv.pop(1))
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.bench_app(prog_name="pymesh bench")
"""
STOP_WAIT_S = 60


def _run_isolated() -> None:
    """Re-run `pymesh bench run …` in a standalone process, when this is the `pymesh` CLI; exits with its
    status. Ctrl-C reaches both processes: this one then waits for the other to stop what it started."""
    if os.environ.get(ISOLATED) == "1" or sys.argv[1:3] != ["bench", "run"]:
        return
    process = subprocess.Popen([sys.executable, "-c", STANDALONE, __file__, *sys.argv[2:]],
                               env={**os.environ, ISOLATED: "1"})
    try:
        code = process.wait()
    except KeyboardInterrupt:
        try:
            code = process.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
    raise typer.Exit(code)


def harness() -> ModuleType:
    """The `perf.harness` package of this checkout (exits with a clear message outside one)."""
    if not (HARNESS / "__init__.py").is_file():
        err.print("[red]pymesh bench needs a source checkout:[/red] the perf harness (perf/harness/) is not "
                  f"installed with the package, and {HARNESS} does not exist. Clone the repository and install "
                  "it from there (scripts/install makes an editable install), then run `pymesh bench` again.")
        raise typer.Exit(2)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    module = importlib.import_module("perf.harness")
    if not str(Path(module.__file__ or "").resolve()).startswith(str(HARNESS)):
        err.print(f"[red]pymesh bench:[/red] `perf.harness` resolved to {module.__file__}, not {HARNESS}; "
                  "another installed package named `perf` shadows the checkout's.")
        raise typer.Exit(2)
    return module


@bench_app.command("run")
def run(
    scenarios: Annotated[str, typer.Option(help="Comma-separated scenario sets or names (see `pymesh bench list`), "
                                                "e.g. smoke, full, http1,idle.")] = "smoke",
    systems: Annotated[str, typer.Option(help="Comma-separated systems, or all. direct is always added "
                                              "(the floor).")] = "all",
    out: Annotated[Path | None, typer.Option(help="Directory for result.json, report.md and the PNG plots "
                                                  "(default: perf/results/bench-TIMESTAMP).",
                                             file_okay=False)] = None,
    rounds: Annotated[int, typer.Option(help="Rounds per scenario; figures are medians over rounds.",
                                        min=1, max=100)] = 1,
    pin: Annotated[bool, typer.Option(help="Pin the proxy to CPU 0 and the load generator to CPU 1 "
                                           "(taskset).")] = False,
    duration: Annotated[float | None, typer.Option(help="Override every load scenario's measured seconds.",
                                                   min=0.5, max=600)] = None,
    warmup: Annotated[float | None, typer.Option(help="Override every load scenario's warm-up seconds.",
                                                 min=0, max=60)] = None,
    linkerd2_proxy: Annotated[Path | None, typer.Option("--linkerd2-proxy", help="A linkerd2-proxy binary to "
                                                        "include: a sidecar pair in pods with a stand-in control "
                                                        "plane (root, nftables, linkerd2-proxy-api's protos).",
                                                        dir_okay=False)] = None,
    as_json: JsonOption = False,
) -> None:
    """Start every system, run the scenarios against each (interleaved), and write the reports."""
    h = harness()
    try:
        plan = h.Plan(scenarios=h.select_scenarios(scenarios), systems=h.select_systems(systems), rounds=rounds,
                      pin=pin, duration=duration, warmup=warmup, linkerd2_proxy=linkerd2_proxy,
                      command=shlex.join(["pymesh", "bench", *sys.argv[sys.argv.index("run"):]])
                      if "run" in sys.argv else "pymesh bench run",
                      scenario_spec=scenarios, system_spec=systems)
    except ValueError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from e
    _run_isolated()
    from perf.harness import report
    from perf.harness.tools import ToolMissing

    target = out or REPO_ROOT / "perf" / "results" / f"bench-{datetime.now():%Y%m%d-%H%M%S}"
    try:
        result = h.run(plan, err)
    except (ValueError, ToolMissing) as e:
        err.print(f"[red]cannot run:[/red] {escape(str(e))}")
        raise typer.Exit(1) from e
    paths = report.write(result, target)
    if as_json:
        console.print_json(json.dumps({"out": str(target), "files": {k: str(v) for k, v in paths.items()},
                                       "outcomes": [o.__dict__ for o in result.outcomes]}))
        return
    console.print(paths["markdown"].read_text().split("## Plots")[0].rstrip(), markup=False, highlight=False,
                  soft_wrap=True)
    console.print(f"\nwritten: {paths['json']}, {paths['markdown']}, {len(paths) - 2} plot(s) in {target}")


@bench_app.command("list")
def list_(as_json: JsonOption = False) -> None:
    """The scenarios and sets, and the systems with whether each can run here (and which scenarios
    a system cannot serve, and why)."""
    h = harness()
    from perf.harness.loadgen import Capabilities
    from perf.harness.systems import Context, Unavailable
    from perf.harness.tools import RELEASE, ToolMissing, rust_tool

    try:
        capabilities = Capabilities.of(rust_tool("pymesh-loadgen", build=False))
    except ToolMissing:
        capabilities = None
    scenario_rows: list[dict[str, Any]] = []
    for s in h.SCENARIOS:
        reason = capabilities.unsupported(s) if capabilities else f"pymesh-loadgen not built in {RELEASE}"
        sets = [name for name, members in h.SETS.items() if s.name in members]
        scenario_rows.append({**s.to_dict(), "sets": sets, "runnable": reason is None, "reason": reason or ""})
    context = Context(Path("."), build=False)  # listing never builds
    system_rows = []
    for name, cls in h.SYSTEMS.items():
        system = cls(context)
        try:
            system.check()
            status, reason = "available", ""
        except Unavailable as e:
            status, reason = "skipped", str(e)
        # Scenarios this system would skip (System.unsupported), by scenario name: the reason.
        unsupported = {s.name: why for s in h.SCENARIOS if (why := system.unsupported(s))}
        system_rows.append({"name": name, "label": system.label, "description": system.description,
                            "status": status, "reason": reason, "unsupported": unsupported})
    if as_json:
        console.print_json(json.dumps({"scenarios": scenario_rows, "sets": h.SETS, "systems": system_rows}))
        return
    table = Table(title="scenarios", title_justify="left")
    for column in ("name", "sets", "proto", "rate", "response", "body", "conns", "s", "runs here"):
        table.add_column(column)
    skipped: dict[str, list[str]] = {}
    for s in scenario_rows:
        rate = "closed" if s["kind"] == "max" else ("idle" if s["kind"] == "idle" else f"{s['rate']:,.0f}")
        conns = s["idle_connections"] if s["kind"] == "idle" else s["connections"]
        seconds = s["idle_hold"] if s["kind"] == "idle" else s["duration"]
        if s["reason"]:
            skipped.setdefault(s["reason"], []).append(s["name"])
        table.add_row(s["name"], ",".join(x for x in s["sets"] if x != "full"), s["protocol"], rate,
                      _size(s["response_size"]), _size(s["body_size"]), f"{conns:,}", f"{seconds:g}",
                      "[green]yes[/green]" if s["runnable"] else "[yellow]skipped[/yellow]")
    console.print(table)
    for reason, names in skipped.items():
        console.print(f"[yellow]skipped[/yellow] {', '.join(names)}: {escape(reason)}")
    console.print(f"sets: {', '.join(h.SETS)} (full = every scenario but smoke)\n")
    systems_table = Table(title="systems", title_justify="left")
    for column in ("name", "status", "scenarios", "what"):
        systems_table.add_column(column)
    for r in system_rows:
        status = ("[green]available[/green]" if r["status"] == "available"
                  else f"[yellow]skipped[/yellow]: {escape(r['reason'])}")
        serves = (f"all but {len(r['unsupported'])}" if r["unsupported"] else "all") if r["status"] == "available" \
            else "–"
        systems_table.add_row(r["name"], status, serves, r["description"])
    console.print(systems_table)
    for r in system_rows:
        by_reason: dict[str, list[str]] = {}
        for scenario, why in r["unsupported"].items():
            by_reason.setdefault(why, []).append(scenario)
        for why, names in by_reason.items():
            console.print(f"[yellow]{r['name']} skips[/yellow] {', '.join(names)}: {escape(why)}")


def _size(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 else f"{n} B"


@bench_app.command("compare")
def compare(
    old: Annotated[Path, typer.Argument(help="The earlier result.json.", exists=True, dir_okay=False)],
    new: Annotated[Path, typer.Argument(help="The later result.json.", exists=True, dir_okay=False)],
    as_json: JsonOption = False,
) -> None:
    """Per system and scenario: how each figure changed from OLD to NEW."""
    harness()
    from perf.harness import compare as compare_module

    try:
        rows = compare_module.compare_files(old, new)
    except compare_module.CompareError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(1) from e
    if as_json:
        console.print_json(json.dumps(compare_module.as_json(rows)))
        return
    compare_module.render(rows, console, str(old), str(new))
