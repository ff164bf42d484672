"""The Service Mesh Performance (SMP, Meshery's spec) view of a result: the messages of the
spec's `service_mesh_performance.proto` filled where they fit — `EnvironmentConfig` (the
node), `ServiceMeshConfig` per system (build, concurrency, mTLS), `PerformanceTestConfig` per
scenario (load generator, protocol, connections, rps, duration) and `PerformanceTestResult`
per system × scenario (start/end time, latencies in ms, actual QPS, ids linking the others).
Field names are the spec's; everything else stays in the harness's own structure.
"""

from __future__ import annotations

from typing import Any

from .results import BenchResult, Outcome

SPEC = "Service Mesh Performance (smp-spec.io), service_mesh_performance.proto"


def _protocol(protocol: str) -> str:
    return "grpc" if protocol == "grpc" else "http"


def _latencies_ms(result: BenchResult, outcome: Outcome) -> dict[str, float]:
    runs = [r for r in result.runs if r.system == outcome.system and r.scenario == outcome.scenario]
    minimum = min((r.histogram[0][1] for r in runs if r.histogram and r.histogram[0][0] == 0), default=None)
    latency = outcome.latency_us
    values = {"average": latency.get("mean"), "p50": latency.get("p50"), "p90": latency.get("p90"),
              "p99": latency.get("p99"), "max": latency.get("max")}
    if minimum is not None:
        values = {"min": minimum, **values}
    return {k: round(v / 1000, 4) for k, v in values.items() if v is not None}


def smp(result: BenchResult) -> dict[str, Any]:
    env = result.environment
    env_id = f"{result.id}/env"
    systems = {s["name"]: s for s in result.systems}
    scenarios = {s["name"]: s for s in result.scenarios}
    mesh_configs = [{
        "id": f"{result.id}/{s['name']}",
        "labels": {"system": s["name"], "status": s["status"]},
        "mtls_enabled": False,
        "proxy_concurrency": env.get("proxy_threads", 1) if s["name"] not in ("direct", "direct-pods") else 0,
        "proxy_build": s.get("version") or "",
        "mesh_build": s.get("version") or "",
        "profile": s["name"],
    } for s in result.systems]
    test_configs = [{
        "id": f"{result.id}/{s['name']}",
        "name": s["name"],
        "labels": {"kind": s["kind"], "protocol": s["protocol"], "family": s["family"]},
        "clients": [{
            "internal": True,
            "load_generator": "pymesh-bench idle client" if s["kind"] == "idle" else "pymesh-loadgen",
            "protocol": _protocol(s["protocol"]),
            "connections": s["idle_connections"] or s["connections"],
            "rps": int(s["rate"]),
            "body": f"{s['body_size']} bytes" if s["body_size"] else "",
        }],
        "duration": f"{s['idle_hold'] if s['kind'] == 'idle' else s['duration']:g}s",
    } for s in result.scenarios]
    test_results = []
    for outcome in result.outcomes:
        if outcome.status != "ok" or outcome.kind == "idle":
            continue
        runs = [r for r in result.runs if r.system == outcome.system and r.scenario == outcome.scenario]
        test_results.append({
            "id": f"{result.id}/{outcome.system}/{outcome.scenario}",
            "labels": {"system": outcome.system, "scenario": outcome.scenario,
                       "requested_rps": str(scenarios[outcome.scenario]["rate"]),
                       "errors": str(outcome.errors), "rounds": str(outcome.rounds)},
            "start_time": min(r.start_time for r in runs),
            "end_time": max(r.end_time for r in runs),
            "latencies_ms": _latencies_ms(result, outcome),
            "actual_QPS": outcome.achieved_rps,
            "testId": f"{result.id}/{outcome.scenario}",
            "meshConfigId": f"{result.id}/{outcome.system}" if outcome.system in systems else "",
            "envId": env_id,
        })
    return {
        "spec": SPEC,
        "environment_config": {
            "id": env_id,
            "labels": {"kernel": env.get("kernel", ""), "os": env.get("os", ""), "pinning": env.get("pinning", "")},
            "node": [{"type": f"{env.get('machine', '')} {env.get('cpu_model', '')}".strip(),
                      "cores": env.get("cpus"), "mem_mb": env.get("mem_mb")}],
        },
        "mesh_configs": mesh_configs,
        "performance_test_configs": test_configs,
        "performance_test_results": test_results,
    }
