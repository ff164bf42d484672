"""The wheels install pymesh without this checkout: scripts/build-wheels builds them, they go into
a fresh virtual environment, and everything runs from a directory outside the repository with a
PATH that holds only that environment and the system's tools."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import venv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from .conftest import ROOT


@dataclass
class Installed:
    bin: Path
    cwd: Path
    env: dict[str, str]

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin / argv[0]), *argv[1:]], cwd=self.cwd, env=self.env,
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    base = tmp_path_factory.mktemp("wheel")
    dist = base / "dist"
    build = subprocess.run([str(ROOT / "scripts" / "build-wheels"), str(dist)], capture_output=True, text=True,
                           timeout=1200)
    assert build.returncode == 0, build.stderr[-3000:]
    wheels = sorted(dist.glob("*.whl"))
    assert [w.name.split("-")[0] for w in wheels] == ["pymesh", "pymesh_control"], wheels
    env_dir = base / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    pip = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          *map(str, wheels)], capture_output=True, text=True, timeout=900, cwd=base)
    assert pip.returncode == 0, pip.stderr[-3000:]
    outside = base / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYMESH_", "VIRTUAL_ENV"))}
    env["PATH"] = f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin"
    env["HOME"] = str(base / "home")
    yield Installed(bin_dir, outside, env)


def test_pymesh_alone_runs_without_the_control_plane(installed: Installed) -> None:
    """A sidecar or an embedding application installs pymesh without pymesh-control."""
    wheel = next((installed.cwd.parent / "dist").glob("pymesh-*.whl"))
    alone = installed.cwd.parent / "alone"
    venv.create(alone, with_pip=True)
    pip = subprocess.run([str(alone / "bin" / "python"), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", str(wheel)], capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    env = {**installed.env, "PATH": f"{alone / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin"}
    check = subprocess.run([str(alone / "bin" / "pymesh-proxy"), "--version"], capture_output=True, text=True,
                           env=env, cwd=installed.cwd, timeout=60)
    assert check.returncode == 0, check.stderr
    embedded = subprocess.run([str(alone / "bin" / "python"), "-c", "import pymesh; print(pymesh.__version__)"],
                              capture_output=True, text=True, env=env, cwd=installed.cwd, timeout=60)
    assert embedded.returncode == 0, embedded.stderr
    control = subprocess.run([str(alone / "bin" / "pymesh"), "control", "run"], capture_output=True, text=True,
                             env=env, cwd=installed.cwd, timeout=60)
    assert control.returncode == 2
    assert "pymesh-control" in control.stderr


def test_the_packages_come_from_the_environment_not_the_checkout(installed: Installed) -> None:
    probe = installed.run("python", "-c", "import json, pymesh, pymesh.control, pymesh._proto, pymesh.control.cli; "
                          "print(json.dumps([pymesh.__file__, pymesh.control.__file__, pymesh._proto.__file__]))")
    assert probe.returncode == 0, probe.stderr
    venv_root = installed.bin.parent.resolve()
    for path in json.loads(probe.stdout):
        assert Path(path).resolve().is_relative_to(venv_root), path
        assert not Path(path).resolve().is_relative_to(ROOT), path


def test_demo_runs_from_the_installed_wheels(installed: Installed) -> None:
    result = installed.run("pymesh", "demo", "--requests", "10", "--json", timeout=180)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["statuses"]["200"] == 10
    assert sum(summary["by_instance"].values()) == 10
    client_id = "spiffe://cluster.local/ns/demo/sa/client"
    server = summary["proxies"]["server"]
    inbound = [r for r in server["responses"] if r["direction"] == "inbound" and r["status_code"] == "200"]
    assert inbound and all(r["tls"] == "true" and r["client_id"] == client_id for r in inbound)


def test_the_sidecar_is_a_command_of_the_environment(installed: Installed) -> None:
    version = installed.run("pymesh-proxy", "--version")
    assert version.returncode == 0 and version.stdout.split()[0] == "pymesh-proxy", version
    dry = installed.run("pymesh-proxy", "init", "--dry-run")
    assert dry.returncode == 0 and "redirect to :4140" in dry.stdout, dry


def test_control_plane_commands(installed: Installed) -> None:
    state = installed.cwd / "state"
    bundle = installed.run("pymesh", "control", "ca-bundle", "--state-dir", str(state))
    assert bundle.returncode == 0, bundle.stderr
    assert bundle.stdout.startswith("-----BEGIN CERTIFICATE-----")
    token = installed.run("pymesh", "control", "token", "--namespace", "shop", "--service-account", "web",
                          "--state-dir", str(state))
    assert token.returncode == 0, token.stderr
    assert len(token.stdout.split()) == 1 and "." in token.stdout  # one token (its format is the CA's)
    for argv in (["control", "run", "--help"], ["check", "--help"]):
        assert installed.run("pymesh", *argv).returncode == 0, argv


def test_bench_says_it_is_a_repository_tool(installed: Installed) -> None:
    result = installed.run("pymesh", "bench", "list")
    assert result.returncode == 2
    assert "checkout" in " ".join(result.stderr.split())


def test_proxy_run_serves_its_admin_port(installed: Installed, tmp_path: Path) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text(yaml.safe_dump({"admin": {"address": "127.0.0.1:0"},
                                      "listeners": [{"name": "main", "address": "127.0.0.1:0"}]}))
    proc = subprocess.Popen([str(installed.bin / "pymesh"), "proxy", "run", "--config", str(config)],
                            cwd=installed.cwd, env=installed.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        admin = None
        for _ in range(10):
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("admin "):
                admin = line.split()[1]
                break
        assert admin, proc.stderr.read() if proc.poll() is not None and proc.stderr else "no admin line"
        deadline = time.monotonic() + 20
        status = 0
        while time.monotonic() < deadline:
            try:
                status = httpx.get(f"http://{admin}/ready", timeout=2).status_code
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert status == 200
        assert httpx.get(f"http://{admin}/metrics", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
