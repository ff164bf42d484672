"""Reports of a run, written into the output directory:

    result.json   everything measured (runs, outcomes, problems, environment, generated configs)
                  plus an `smp` section in the Service Mesh Performance spec's field names
    report.md     Markdown: the load table, the idle-connection memory table, max throughput,
                  what was skipped or failed and why, warnings, the plots
    *.png         plots (see plots.py)
    configs/      the config files the harness generated for each proxy
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .plots import write_plots
from .results import BenchResult
from .smp import smp

FORMAT = "pymesh-bench/1"


def to_json(result: BenchResult) -> dict[str, Any]:
    return {"format": FORMAT, **result.to_dict(), "smp": smp(result)}


def write(result: BenchResult, out: Path) -> dict[str, Path]:
    """Write every report into `out`; return their paths by kind (`json`, `markdown`, plot names)."""
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    data = to_json(result)
    paths["json"] = out / "result.json"
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    if result.configs:
        configs = out / "configs"
        configs.mkdir(exist_ok=True)
        for name, text in result.configs.items():
            (configs / name).write_text(text)
    plots = write_plots(data, out)
    paths.update(plots)
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text(markdown(data, {k: p.name for k, p in plots.items()}))
    return paths


def _num(value: float | None, fmt: str = ",.0f", signed: bool = False) -> str:
    if value is None:
        return "–"
    return format(value, ("+" if signed else "") + fmt)


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ⏎ ")


def _mib(kib: float | None) -> str:
    return "–" if kib is None else f"{kib / 1024:.1f}"


def load_table(data: dict[str, Any]) -> str:
    """One row per system × load scenario (open and closed loop)."""
    skipped_scenarios = {p["scenario"]: p for p in data["problems"] if p["system"] == "*"}
    lines = [
        "| scenario | system | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | added p50 | added p99 | added p99.9 "
        "| rps requested → achieved | errors | proxy CPU s / 10k req | peak RSS MiB | private MiB after |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for o in data["outcomes"]:
        if o["kind"] == "idle":
            continue
        if o["scenario"] in skipped_scenarios:  # one row for the scenario, not one per system
            if o["system"] == "direct":
                lines.append(f"| {o['scenario']} | all | skipped: {o['reason']} | | | | | | | | | | | | |")
            continue
        if o["status"] == "skipped":  # a system skipped everywhere: in the systems table and the list below
            continue
        if o["status"] != "ok":
            lines.append(f"| {o['scenario']} | {o['system']} | {o['status']}: {_cell(o['reason'])} "
                         "| | | | | | | | | | | | |")
            continue
        lat, add = o["latency_us"], o["added_latency_us"]
        requested = "closed loop" if o["kind"] == "max" else _num(o["requested_rps"])
        lines.append(
            f"| {o['scenario']} | {o['system']} | {_num(lat['p50'])} | {_num(lat['p90'])} | {_num(lat['p99'])} "
            f"| {_num(lat['p999'])} | {_num(lat['max'])} | {_num(add.get('p50'), signed=True)} "
            f"| {_num(add.get('p99'), signed=True)} | {_num(add.get('p999'), signed=True)} "
            f"| {requested} → {_num(o['achieved_rps'])} | {o['errors']} | {_num(o['cpu_s_per_10k'], '.3f')} "
            f"| {_mib(o['peak_rss_kib'])} | {_mib(o.get('private_kib'))} |")
    return "\n".join(lines)


def idle_table(data: dict[str, Any]) -> str:
    rows = [o for o in data["outcomes"] if o["kind"] == "idle"]
    if not rows:
        return ""
    lines = ["| scenario | system | connections held | RSS before MiB | RSS holding MiB | per connection KiB "
             "| peak RSS MiB |", "|---|---|--:|--:|--:|--:|--:|"]
    for o in rows:
        if o["status"] == "skipped":
            continue
        if o["status"] != "ok":
            lines.append(f"| {o['scenario']} | {o['system']} | {o['status']}: {_cell(o['reason'])} | | | | |")
            continue
        i = o["idle"]
        lines.append(f"| {o['scenario']} | {o['system']} | {i['held']:,} of {i['requested']:,} "
                     f"| {_mib(i['rss_before_kib'])} | {_mib(i['rss_held_kib'])} "
                     f"| {_num(i['per_connection_kib'], '.1f')} | {_mib(o['peak_rss_kib'])} |")
    return "\n".join(lines)


def max_table(data: dict[str, Any]) -> str:
    rows = [o for o in data["outcomes"] if o["kind"] == "max" and o["status"] == "ok"]
    if not rows:
        return ""
    floors = {(o["system"], o["scenario"]): o["achieved_rps"] for o in rows}
    lines = ["| scenario | system | max rps | of its baseline | proxy CPU s / 10k req |", "|---|---|--:|--:|--:|"]
    for o in rows:
        # A floor (direct, direct-pods) is its own baseline; results older than `baseline` used direct.
        baseline = o.get("baseline", None if o["system"] == "direct" else "direct") or o["system"]
        floor = floors.get((baseline, o["scenario"]))
        share = f"{o['achieved_rps'] / floor:.0%}" if floor else "–"
        lines.append(f"| {o['scenario']} | {o['system']} | {_num(o['achieved_rps'])} | {share} "
                     f"| {_num(o['cpu_s_per_10k'], '.3f')} |")
    return "\n".join(lines)


def problems_list(data: dict[str, Any]) -> str:
    lines = []
    for p in data["problems"]:
        who = "every system" if p["system"] == "*" else p["system"]
        what = "every scenario" if p["scenario"] == "*" else p["scenario"]
        when = f" (round {p['round'] + 1})" if p.get("round") is not None else ""
        reason = _cell(p["reason"])
        lines.append(f"- **{p['status']}** — {who}, {what}{when}: {reason}")
    return "\n".join(lines)


def markdown(data: dict[str, Any], plots: dict[str, str]) -> str:
    env = data["environment"]
    systems = "\n".join(
        f"| {s['name']} | {s['status']} | {_cell(s.get('version') or s.get('reason', ''))} "
        f"| {_cell(str(s.get('settings', {}).get('upstream', '')))} | {s.get('baseline') or '–'} |"
        for s in data["systems"])
    load = ""
    if env.get("loadavg_start") and env.get("loadavg_end"):
        load = (f" Load average (1/5/15 min) at start {'/'.join(map(str, env['loadavg_start']))}, at end "
                f"{'/'.join(map(str, env['loadavg_end']))}: on {env['cpus']} CPUs, anything else running skews "
                "the figures.")
    warnings = "\n".join(f"- {o['system']}, {o['scenario']}: {w}" for o in data["outcomes"] for w in o["warnings"])
    parts = [
        f"# pymesh bench — {data['start_time']}",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Machine: {env['cpus']} × {env['cpu_model'] or env['machine']}, {env['mem_mb']:,} MiB, {env['os']}, "
        f"Linux {env['kernel']}; traffic on {env['network']}. Every proxy runs {env['proxy_threads']} worker "
        f"thread(s), matched to pymesh's default. Pinning: {env['pinning']}. Rounds: {data['options']['rounds']} "
        "(figures are medians over rounds; systems interleaved within a scenario, order rotating per round). "
        "Latency is from each request's intended send time (coordinated omission corrected); *added* is the "
        "system's figure minus its baseline's in the same run: direct's, or for the systems measured in pods "
        "(network namespaces on a bridge, the redirect rules, the load generator in the client pod) direct-pods'. "
        "Proxy CPU includes the warm-up's requests; for a sidecar pair it is both proxies' (RSS too). *Private* "
        "is the proxy's anonymous memory after the run (RssAnon: heap and stacks), RSS without the code and other "
        "file pages it maps, which every process mapping the same file shares." + load,
        "",
        "| system | status | version / reason | upstream hop | added over |",
        "|---|---|---|---|---|",
        systems,
        "",
        "## Load",
        "",
        load_table(data),
    ]
    for title, table in (("## Max throughput (closed loop)", max_table(data)),
                         ("## Idle connections (memory)", idle_table(data))):
        if table:
            parts += ["", title, "", table]
    notes = "\n".join(f"- {s['name']}, {scenario}: {_cell(note)}" for s in data["systems"]
                      for scenario, items in s.get("notes", {}).items() for note in items)
    if notes:
        parts += ["", "## Notes", "", notes]
    listed = problems_list(data)
    if listed:
        parts += ["", "## Skipped and failed", "", listed]
    if warnings:
        parts += ["", "## Warnings", "", warnings]
    if plots:
        parts += ["", "## Plots", ""] + [f"![{kind}]({name})" for kind, name in plots.items()]
    return "\n".join(parts) + "\n"
