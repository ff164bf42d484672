"""Real control planes and a real etcd for tests: `pymesh control run` as a subprocess, etcd
from Debian's `etcd-server` on free ports with a temporary data directory, and a gRPC
client that reads watch streams on threads so tests can wait with timeouts.

Reusable by the end-to-end tests that connect proxies to a control plane.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from pymesh._proto.pymesh.mesh.v1 import discovery_pb2, discovery_pb2_grpc


def free_port() -> int:
    """A port the OS just handed out (for servers, like etcd, that cannot report theirs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_services(path: Path, services: list[dict[str, Any]] | str) -> None:
    """Replaces a source file atomically (write, then rename), as careful tools do."""
    text = services if isinstance(services, str) else yaml.safe_dump({"services": services}, sort_keys=False)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


class ControlPlane:
    """`pymesh control run` in a subprocess; it prints its bound addresses on stdout.

    ``plaintext`` (the default until proxies speak TLS to the control plane) starts it with
    ``--plaintext --allow-register``, so the plaintext client here and proxies reach it; with
    ``plaintext=False`` it serves TLS and tests bring their own TLS clients."""

    def __init__(self, source: str, log_path: Path, *args: str, plaintext: bool = True) -> None:
        self.source = source
        self.log_path = log_path
        # The CA's generated files go beside the log, never to the user's state directory
        # (a --state-dir in args wins).
        env = {**os.environ, "PYMESH_CONTROL_STATE_DIR": str(log_path.with_suffix(".state"))}
        with log_path.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from pymesh.cli import main; main()", "control", "run",
                 "--source", source, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                 *(["--plaintext", "--allow-register"] if plaintext else []), *args],
                stdout=subprocess.PIPE, stderr=log, text=True, env=env,
            )
        self.address = ""
        self.admin = ""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            kind, _, rest = line.strip().partition(" ")
            if kind == "listening":
                self.address = rest
            elif kind == "admin":
                self.admin = rest
                break
        if not self.address or not self.admin:
            self.process.wait(timeout=10)
            raise RuntimeError(f"the control plane did not start: {self.logs}")
        self.channel = grpc.insecure_channel(self.address)
        self.stub = discovery_pb2_grpc.DiscoveryStub(self.channel)
        self._watches: list[Watch] = []

    @property
    def logs(self) -> str:
        return self.log_path.read_text()

    def status(self) -> discovery_pb2.StatusResponse:
        return self.stub.Status(discovery_pb2.StatusRequest(), timeout=5)

    def wait_ready(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://{self.admin}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the control plane did not become ready: {self.logs}")

    def watch_config(self, proxy_id: str = "test-proxy", **identity: str) -> Watch:
        call = self.stub.WatchConfig(discovery_pb2.WatchConfigRequest(
            identity=discovery_pb2.ProxyIdentity(proxy_id=proxy_id, **identity)))
        return self._track(Watch(call))

    def watch_endpoints(self, service: str, proxy_id: str = "test-proxy") -> Watch:
        call = self.stub.WatchEndpoints(discovery_pb2.WatchEndpointsRequest(
            service=service, identity=discovery_pb2.ProxyIdentity(proxy_id=proxy_id)))
        return self._track(Watch(call))

    def register(self, service: str, address: str, weight: int = 0, ttl: float | None = None) -> None:
        request = discovery_pb2.RegisterRequest(service=service)
        request.endpoint.address = address
        request.endpoint.weight = weight
        if ttl is not None:
            request.ttl.FromNanoseconds(int(ttl * 1e9))
        self.stub.Register(request, timeout=10)

    def deregister(self, service: str, address: str) -> None:
        self.stub.Deregister(discovery_pb2.DeregisterRequest(service=service, address=address), timeout=10)

    def _track(self, watch: Watch) -> Watch:
        self._watches.append(watch)
        return watch

    def kill(self) -> None:
        """SIGKILL: the control plane dies without a goodbye."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        for watch in self._watches:
            watch.cancel()
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


class Watch:
    """A server stream read on a thread into a queue, so a test waits with a timeout."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.messages: queue.Queue[Any] = queue.Queue()
        self.error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self.messages.put(message)
        except grpc.RpcError as e:
            self.error = e

    def next(self, timeout: float = 5.0) -> Any:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no update within {timeout} s (stream error: {self.error})") from None

    def nothing_within(self, seconds: float) -> bool:
        try:
            message = self.messages.get(timeout=seconds)
        except queue.Empty:
            return True
        raise AssertionError(f"unexpected update: {message}")

    def cancel(self) -> None:
        self.call.cancel()
        self._thread.join(timeout=5)


class Etcd:
    """etcd from Debian's etcd-server, on free ports, with a temporary data directory."""

    def __init__(self, data_dir: Path) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            pytest.fail("etcd is not installed: run `scripts/install --test` (Debian package etcd-server)")
        self.binary = binary
        self.data_dir = data_dir
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.with_suffix(".log")
        self.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                [self.binary, "--name", "test", "--data-dir", str(self.data_dir),
                 "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"test={peer}", "--log-level", "warn", "--logger", "zap"],
                stdout=log, stderr=log,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).json().get("health") == "true":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"etcd did not become healthy: {self.log_path.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    # The v3 JSON gateway: enough for tests to write and read keys without an async client.

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = httpx.post(f"{self.url}/v3/{path}", json=body, timeout=5)
        response.raise_for_status()
        return response.json()

    def put(self, key: str, value: str | dict[str, Any]) -> None:
        text = value if isinstance(value, str) else json.dumps(value)
        self._post("kv/put", {"key": _b64(key), "value": _b64(text)})

    def delete(self, key: str) -> None:
        self._post("kv/deleterange", {"key": _b64(key)})

    def get(self, key: str) -> dict[str, Any] | None:
        kvs = self._post("kv/range", {"key": _b64(key)}).get("kvs", [])
        if not kvs:
            return None
        kv = kvs[0]
        return {"value": base64.b64decode(kv.get("value", "")).decode(), "lease": int(kv.get("lease", 0))}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.05) -> Any:
    """Polls ``predicate`` until it returns something truthy; returns that."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def kube_apiserver_binary() -> str:
    """kube-apiserver: $PYMESH_KUBE_APISERVER, on PATH, or where `scripts/install --test` puts it."""
    import os

    candidates = [os.environ.get("PYMESH_KUBE_APISERVER"), shutil.which("kube-apiserver")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail("kube-apiserver is not installed: run `scripts/install --test` (it builds one with Go)")


class KubeApiServer:
    """A real kube-apiserver on a free port, storing into ``etcd``, with RBAC on, a static admin
    token (``system:masters``) and a kubeconfig for it. Nothing else of Kubernetes runs: objects
    are written by tests."""

    TOKEN = "pymesh-test-token"

    def __init__(self, etcd: Etcd, directory: Path) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (directory / "sa.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
        (directory / "tokens.csv").write_text(f"{self.TOKEN},admin,admin,system:masters\n")
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        self.log_path = directory / "kube-apiserver.log"
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [kube_apiserver_binary(), "--etcd-servers", etcd.url, "--bind-address", "127.0.0.1",
                 "--advertise-address", "127.0.0.1", "--secure-port", str(self.port),
                 "--cert-dir", str(directory / "certs"), "--service-account-key-file", str(directory / "sa.key"),
                 "--service-account-signing-key-file", str(directory / "sa.key"),
                 "--service-account-issuer", "https://kubernetes.default.svc",
                 "--token-auth-file", str(directory / "tokens.csv"), "--authorization-mode", "RBAC",
                 "--service-cluster-ip-range", "10.96.0.0/16", "--endpoint-reconciler-type", "none"],
                stdout=log, stderr=log,
            )
        self.client = httpx.Client(base_url=self.server, verify=False, timeout=10,
                                   headers={"Authorization": f"Bearer {self.TOKEN}"})
        deadline = time.monotonic() + 90
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"kube-apiserver exited: {self.log_path.read_text()[-3000:]}")
            try:
                if self.client.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"kube-apiserver did not become ready: {self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        self.kubeconfig = directory / "kubeconfig.yaml"
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {
                "server": self.server, "certificate-authority": str(directory / "certs" / "apiserver.crt")}}],
            "users": [{"name": "admin", "user": {"token": self.TOKEN}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
        }))

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Creates or replaces an object (of a kind `_path` knows)."""
        path = self._path(obj)
        name = obj["metadata"]["name"]
        current = self.client.get(f"{path}/{name}")
        if current.status_code == 200:
            obj = {**obj, "metadata": {**obj["metadata"],
                                       "resourceVersion": current.json()["metadata"]["resourceVersion"]}}
            if obj["kind"] == "Service":  # the allocated cluster IP is immutable
                spec = current.json()["spec"]
                obj["spec"] = {**obj["spec"], "clusterIP": spec["clusterIP"], "clusterIPs": spec["clusterIPs"]}
            response = self.client.put(f"{path}/{name}", json=obj)
        else:
            response = self.client.post(path, json=obj)
        if response.status_code >= 300:
            raise AssertionError(f"kube-apiserver refused {obj['kind']} {name}: {response.text}")
        return response.json()

    def delete(self, kind: str, namespace: str, name: str) -> None:
        path = self._path({"kind": kind, "metadata": {"namespace": namespace}})
        response = self.client.delete(f"{path}/{name}")
        if response.status_code >= 300:
            raise AssertionError(f"kube-apiserver refused to delete {kind} {name}: {response.text}")

    def kubeconfig_for(self, user: str, token: str, path: Path) -> Path:
        """A kubeconfig at ``path`` that talks to this API server as ``token``."""
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": user,
            "clusters": [{"name": "test", "cluster": {
                "server": self.server, "certificate-authority": str(self.directory / "certs" / "apiserver.crt")}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": user, "context": {"cluster": "test", "user": user}}],
        }))
        return path

    @staticmethod
    def _path(obj: dict[str, Any]) -> str:
        namespace = obj["metadata"].get("namespace", "default")
        paths = {
            "Service": f"/api/v1/namespaces/{namespace}/services",
            "ServiceAccount": f"/api/v1/namespaces/{namespace}/serviceaccounts",
            "EndpointSlice": f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
            "Namespace": "/api/v1/namespaces",
            "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
            "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        }
        if obj["kind"] not in paths:
            raise ValueError(f"no API path known for kind {obj['kind']}")
        return paths[obj["kind"]]

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


#: what the `start_control` fixture (tests/conftest.py) hands a test
StartControl = Callable[..., ControlPlane]
