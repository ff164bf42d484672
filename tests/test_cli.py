"""The `pymesh` CLI: version, validate, the demo, and running a proxy in-process."""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import yaml

import pymesh

from .backends import EchoBackend
from .conftest import make_config
from .console import plain_env


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["pymesh", *args], capture_output=True, text=True, timeout=timeout, env=plain_env())


def test_version() -> None:
    result = run("version", "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"version": pymesh.__version__}


def test_validate(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(make_config({"web": ["127.0.0.1:8080"]})))
    result = run("proxy", "validate", str(good), "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["valid"] is True

    bad = tmp_path / "bad.yaml"
    bad.write_text("listeners: [{address: '127.0.0.1:0', protocol: SMOKE}]\n")
    result = run("proxy", "validate", str(bad), "--json")
    assert result.returncode == 1
    verdict = json.loads(result.stdout)
    assert verdict["valid"] is False and verdict["path"] == "listeners[0].protocol"


def test_demo_runs_with_no_setup() -> None:
    """The demo starts its own control plane (the mesh CA) and two proxies: the hop between
    them is mutual TLS with both SPIFFE identities, and the user handled no certificate."""
    states_before = set(Path(tempfile.gettempdir()).glob("pymesh-demo-*"))
    result = run("demo", "--requests", "20", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["sent"] == 22
    assert summary["statuses"] == {"200": 20, "404": 1, "502": 1}
    assert sum(summary["by_instance"].values()) == 20 and len(summary["by_instance"]) == 2

    client_id, server_id = "spiffe://cluster.local/ns/demo/sa/client", "spiffe://cluster.local/ns/demo/sa/hello"
    client, server = summary["proxies"]["client"], summary["proxies"]["server"]
    assert (client["identity"], server["identity"]) == (client_id, server_id)
    inbound = [r for r in server["responses"] if r["direction"] == "inbound" and r["status_code"] == "200"]
    assert inbound and all(r["tls"] == "true" and r["client_id"] == client_id for r in inbound), server
    assert sum(r["count"] for r in inbound) == 20
    outbound = [r for r in client["responses"] if r.get("dst_service") == "hello"]
    assert outbound and all(r["tls"] == "true" and r["server_id"] == server_id for r in outbound), client
    assert sum(r["count"] for r in outbound) == 20
    for proxy in (client, server):
        assert proxy["cert_expires"] > time.time()

    table = run("demo", "--requests", "5")
    assert table.returncode == 0, table.stderr
    text = table.stdout  # a console wide enough that no cell wraps (tests/console.py)
    # Rows of the response_total table, not its footnote (which also starts "tls=true").
    assert f"tls=true client_id={client_id}" in text and f"tls=true server_id={server_id}" in text
    assert "hello-0" in text and "hello-1" in text
    # The demo's temporary state (the CA, tokens, the control plane's log) is gone.
    assert set(Path(tempfile.gettempdir()).glob("pymesh-demo-*")) <= states_before


def test_proxy_run_serves_until_sigterm(tmp_path: Path, echo_backend: EchoBackend) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text(yaml.safe_dump(make_config({"web": [echo_backend.address]})))
    process = subprocess.Popen(["pymesh", "proxy", "run", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline().split() for _ in range(2)]
        address = dict((line[1], line[2]) for line in lines if line[0] == "listening")["main"]
        assert httpx.get(f"http://{address}/echo", headers={"host": "web"}, timeout=5).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=5)
