"""Fixtures: real backends on loopback, and pymesh proxies as the native binary or
embedded in this process, behind one interface so a test can run against both."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import pymesh

from .backends import EchoBackend, start_echo_backend
from .control_plane import ControlPlane, Etcd, KubeApiServer, StartControl

ROOT = Path(__file__).resolve().parent.parent


def proxy_binary() -> str:
    """The native sidecar: on PATH after scripts/install, else the build tree."""
    found = os.environ.get("PYMESH_PROXY_BIN") or shutil.which("pymesh-proxy")
    if found:
        return found
    built = ROOT / "target" / "release" / "pymesh-proxy"
    if built.exists():
        return str(built)
    pytest.fail("pymesh-proxy is not installed: run scripts/install")


def make_config(services: dict[str, list[str]], *, default_service: str | None = None,
                **extra: Any) -> dict[str, Any]:
    """A one-listener config on free ports routing to ``services`` (name → endpoints)."""
    listener: dict[str, Any] = {"name": "main", "address": "127.0.0.1:0"}
    if default_service:
        listener["defaultService"] = default_service
    config: dict[str, Any] = {
        "admin": {"address": "127.0.0.1:0"},
        "listeners": [listener],
        "services": [
            {"name": name, "endpoints": [{"address": a} for a in endpoints]}
            for name, endpoints in services.items()
        ],
    }
    config.update(extra)
    return config


class RunningProxy(ABC):
    """What tests need from a proxy, whichever front door started it."""

    kind: str

    @abstractmethod
    def address(self, name: str = "main") -> str: ...

    @property
    @abstractmethod
    def admin(self) -> str: ...

    @abstractmethod
    def reload(self, config: dict[str, Any]) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...

    def metrics(self) -> str:
        return httpx.get(f"http://{self.admin}/metrics", timeout=5).text


class EmbeddedProxy(RunningProxy):
    kind = "embedded"

    def __init__(self, config: dict[str, Any]) -> None:
        self.proxy = pymesh.Proxy(config).start()

    def address(self, name: str = "main") -> str:
        return self.proxy.address(name)

    @property
    def admin(self) -> str:
        return self.proxy.admin_address

    def reload(self, config: dict[str, Any]) -> None:
        self.proxy.reload(config)

    def stop(self) -> None:
        self.proxy.stop(grace=2)


def admin_may_change(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``admin.enableMutations`` on unless the test says otherwise: a native
    proxy is reloaded through its admin endpoint, which is read-only by default."""
    admin = {"address": "127.0.0.1:0", **config.get("admin", {})}
    admin.setdefault("enableMutations", True)
    return {**config, "admin": admin}


class NativeProxy(RunningProxy):
    """`pymesh-proxy` in a subprocess; it prints its bound addresses on stdout."""

    kind = "native"

    def __init__(self, config: dict[str, Any], config_path: Path, *args: str) -> None:
        self.config_path = config_path
        config_path.write_text(yaml.safe_dump(admin_may_change(config)))
        # Logs go to a file (a pipe nobody reads would stall a chatty proxy).
        self.log_path = config_path.with_suffix(".log")
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [proxy_binary(), "--config", str(config_path),
                 *([] if "--shutdown-grace" in args else ["--shutdown-grace", "5s"]), *args],
                stdout=subprocess.PIPE, stderr=log, text=True,
            )
        self.addresses: dict[str, str] = {}
        self._admin = ""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            kind, *rest = line.split()
            if kind == "listening":
                self.addresses[rest[0]] = rest[1]
            elif kind == "admin":
                self._admin = rest[0]
                break
        if not self._admin:
            self.process.wait(timeout=5)
            raise RuntimeError(f"pymesh-proxy did not start: {self.log_path.read_text()}")

    def address(self, name: str = "main") -> str:
        if name not in self.addresses:  # a listener added by a reload
            listeners = httpx.get(f"http://{self.admin}/listeners", timeout=5).json()
            self.addresses = {entry["name"]: entry["address"] for entry in listeners}
        return self.addresses[name]

    @property
    def admin(self) -> str:
        return self._admin

    def reload(self, config: dict[str, Any]) -> None:
        """Reloads through the admin API; raises ConfigError as the embedded proxy does."""
        response = httpx.put(f"http://{self.admin}/config", content=yaml.safe_dump(admin_may_change(config)),
                             headers={"content-type": "application/yaml"}, timeout=10)
        if response.status_code != 200:
            error = response.json()["error"]
            raise pymesh.ConfigError(error["path"], error["message"])

    def terminate(self, timeout: float = 10) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    @property
    def logs(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


ProxyFactory = Callable[[dict[str, Any]], RunningProxy]


@pytest.fixture(params=["native", "embedded"])
def start_proxy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProxyFactory]:
    """Starts proxies of the parametrised kind; all are stopped after the test."""
    started: list[RunningProxy] = []

    def start(config: dict[str, Any]) -> RunningProxy:
        if request.param == "native":
            proxy: RunningProxy = NativeProxy(config, tmp_path / f"proxy{len(started)}.yaml")
        else:
            proxy = EmbeddedProxy(config)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def native_proxy(tmp_path: Path) -> Iterator[Callable[..., NativeProxy]]:
    started: list[NativeProxy] = []

    def start(config: dict[str, Any], *args: str) -> NativeProxy:
        proxy = NativeProxy(config, tmp_path / f"native{len(started)}.yaml", *args)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def echo_backend() -> Iterator[EchoBackend]:
    """An aiohttp server: echoes requests as JSON, streams, serves WebSockets."""
    backend = start_echo_backend()
    yield backend
    backend.stop()


def wait_until(check: Callable[[], bool], timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


# -- control planes and a Kubernetes API server, shared by the control-plane tests --------------


@pytest.fixture
def start_control(tmp_path: Path) -> Iterator[StartControl]:
    """Starts `pymesh control run` processes; all are stopped after the test."""
    started: list[ControlPlane] = []

    def start(source: str, *args: str, plaintext: bool = True) -> ControlPlane:
        control = ControlPlane(source, tmp_path / f"control{len(started)}.log", *args, plaintext=plaintext)
        started.append(control)
        control.wait_ready()
        return control

    yield start
    for control in started:
        control.stop()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    """A real etcd (Debian's etcd-server) of the test's own."""
    server = Etcd(tmp_path / "etcd")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeApiServer]:
    directory = tmp_path_factory.mktemp("kube")
    etcd = Etcd(directory / "etcd")
    try:
        api = KubeApiServer(etcd, directory / "apiserver")
        try:
            yield api
        finally:
            api.stop()
    finally:
        etcd.stop()


@pytest.fixture
def kube_control(kube: KubeApiServer, tmp_path: Path) -> Iterator[ControlPlane]:
    """A control plane whose source is the test kube-apiserver, ready to serve."""
    plane = ControlPlane(f"kubernetes:{kube.kubeconfig}", tmp_path / "control.log")
    try:
        plane.wait_ready(timeout=30)
        yield plane
    finally:
        plane.stop()
