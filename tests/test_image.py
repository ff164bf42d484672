"""The container images (deploy/Containerfile, built by scripts/build-image with buildah, FROM
scratch): the sidecar runs under podman (runc) as UID 2102 with host networking, takes its
services from a plaintext control plane on the host, and proxies to a test backend; the init
image installs and removes the redirect rules in a network namespace this test makes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from pymesh.metrics import total

from .backends import EchoBackend, start_echo_backend
from .conftest import ROOT
from .control_plane import ControlPlane, write_services

TAG = "test"
PROXY_IMAGE, INIT_IMAGE = f"localhost/pymesh-proxy:{TAG}", f"localhost/pymesh-init:{TAG}"
# The sidecar image's target; the init image also carries nft and iptables with their libraries.
MAX_IMAGE_BYTES = {PROXY_IMAGE: 15_000_000, INIT_IMAGE: 20_000_000}
PODMAN = ["podman", "--runtime", "runc"]
# The image's sidecar is the profile-guided build: two release builds and a training run, about
# 8 minutes on 2 cores from nothing.
BUILD_TIMEOUT_S = 1800
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S + 600)


def podman(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PODMAN, *argv], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def images() -> dict[str, int]:
    for tool in ("buildah", "podman", "runc", "nft", "ip"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing: run scripts/install --test")
    # Its own process group: if the build overruns, cargo and the training traffic stop with it.
    build = subprocess.Popen([str(ROOT / "scripts" / "build-image"), TAG], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = build.communicate(timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(build.pid, signal.SIGKILL)
        build.communicate()
        pytest.fail(f"scripts/build-image took over {BUILD_TIMEOUT_S} s")
    assert build.returncode == 0, stderr[-3000:]
    sizes = {}
    for line in stdout.splitlines():
        name, size = line.split()
        sizes[name] = int(size)
    assert set(sizes) == {PROXY_IMAGE, INIT_IMAGE}, stdout
    return sizes


def test_images_are_small_and_the_sidecar_is_not_root(images: dict[str, int]) -> None:
    for name, size in images.items():
        assert size <= MAX_IMAGE_BYTES[name], (name, size)
    inspect = podman("image", "inspect", PROXY_IMAGE)
    assert inspect.returncode == 0, inspect.stderr
    config = json.loads(inspect.stdout)[0]["Config"]
    assert config["User"] == "2102:2102"
    whoami = podman("run", "--rm", "--network", "host", "--entrypoint", "/usr/bin/pymesh-proxy", PROXY_IMAGE,
                    "--version")
    assert whoami.returncode == 0 and whoami.stdout.split()[0] == "pymesh-proxy", whoami.stderr


@pytest.fixture
def backend() -> Iterator[EchoBackend]:
    server = start_echo_backend()
    yield server
    server.stop()


def test_the_sidecar_container_proxies_with_services_from_the_control_plane(
        images: dict[str, int], tmp_path: Path, backend: EchoBackend) -> None:
    source = tmp_path / "mesh"
    source.mkdir()
    write_services(source / "hello.yaml", [{"name": "hello", "endpoints": [{"address": backend.address}]}])
    control = ControlPlane(f"file:{source}", tmp_path / "control.log")
    config = tmp_path / "proxy.yaml"
    config.write_text(yaml.safe_dump({
        "admin": {"address": "127.0.0.1:0"},
        "listeners": [{"name": "outbound", "address": "127.0.0.1:0"}],
        "controlPlane": {"addresses": [control.address], "namespace": "default", "serviceAccount": "hello",
                         "plaintext": True},
    }))
    config.chmod(0o644)
    name = f"pymesh-test-{os.getpid()}"
    proc = subprocess.Popen([*PODMAN, "run", "--rm", "--name", name, "--network", "host",
                             "-v", f"{config}:/etc/pymesh/proxy.yaml:ro", PROXY_IMAGE],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        addresses: dict[str, str] = {}
        for _ in range(10):
            line = proc.stdout.readline()
            if not line:
                break
            words = line.split()
            if words[:1] == ["listening"]:
                addresses[words[1]] = words[2]
            elif words[:1] == ["admin"]:
                addresses["admin"] = words[1]
                break
        assert "admin" in addresses and "outbound" in addresses, (
            addresses, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        admin, outbound = addresses["admin"], addresses["outbound"]
        status, deadline = 0, time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                answer = httpx.get(f"http://{outbound}/echo", headers={"host": "hello"}, timeout=2)
                # The backend's own echo, not an answer the proxy made (no pymesh-reason).
                status = answer.status_code if answer.json().get("path") == "/echo" else 0
            except (httpx.TransportError, ValueError):
                status = 0
            if status == 200:
                break
            time.sleep(0.1)
        assert status == 200, (status, podman("logs", name).stderr[-3000:])
        assert httpx.get(f"http://{admin}/ready", timeout=5).status_code == 200
        metrics = httpx.get(f"http://{admin}/metrics", timeout=5)
        assert metrics.status_code == 200
        assert total(metrics.text, "response_total", dst_service="hello", status_code="200") >= 1
        # The process in the container is the proxy user, not root.
        top = podman("top", name, "user")
        assert top.returncode == 0, top.stderr
        assert top.stdout.split()[1:] in (["2102"], ["pymesh"]), top.stdout
    finally:
        podman("stop", "-t", "10", name, timeout=60)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        control.stop()


@pytest.mark.parametrize("backend_name, caps", [("nftables", ["NET_ADMIN"]),
                                                ("iptables-legacy", ["NET_ADMIN", "NET_RAW"])])
def test_the_init_container_installs_and_removes_the_rules(
        images: dict[str, int], backend_name: str, caps: list[str]) -> None:
    ns = f"pmimg{os.getpid()}-{backend_name}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    try:
        def rules() -> str:
            out = []
            for argv in (["nft", "list", "ruleset"], ["iptables-legacy-save"], ["ip6tables-legacy-save"]):
                text = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                                      check=True, timeout=30).stdout
                out.append("\n".join(line for line in text.splitlines() if not line.startswith("#")))
            return "\n".join(out)

        def init(*flags: str) -> subprocess.CompletedProcess[str]:
            cap_flags = [f for cap in caps for f in ("--cap-add", cap)]
            return podman("run", "--rm", *cap_flags, "--network", f"ns:/run/netns/{ns}", INIT_IMAGE,
                          "--backend", backend_name, *flags)

        before = rules()
        installed = init()
        assert installed.returncode == 0, installed.stderr
        assert installed.stdout.split()[-1] == "installed"
        assert rules() != before
        assert init().stdout.split()[-1] == "unchanged"
        removed = init("--uninstall")
        assert removed.returncode == 0, removed.stderr
        assert removed.stdout.split()[-1] == "removed"
        after = rules()
        # Legacy iptables leaves its (empty) nat table instantiated once used; nothing of ours stays.
        assert "pymesh" not in after.lower() and "4140" not in after
        if backend_name == "nftables":
            assert after == before
    finally:
        subprocess.run(["ip", "netns", "del", ns], timeout=30)
