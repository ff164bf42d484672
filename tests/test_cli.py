"""The `pymesh` CLI: version, validate, the demo, and running a proxy in-process."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import httpx
import yaml

import pymesh

from .backends import EchoBackend
from .conftest import make_config


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["pymesh", *args], capture_output=True, text=True, timeout=timeout)


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
    result = run("demo", "--requests", "20", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["sent"] == 22
    assert summary["statuses"] == {"200": 20, "404": 1, "502": 1}
    assert sum(summary["by_instance"].values()) == 20 and len(summary["by_instance"]) == 2

    table = run("demo", "--requests", "5")
    assert table.returncode == 0
    assert "golden metrics" in table.stdout and "request_total" in table.stdout


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
