"""The Kubernetes source: Services and EndpointSlices from the Kubernetes API, watched.

- Each Service ``web`` in namespace ``ns`` is the pymesh service ``web.ns.svc.cluster.local``,
  with the authorities ``web.ns.svc``, ``web.ns`` and its cluster IPs. Its settings (timeouts,
  retries, balancer, …: the protobuf JSON mapping of ``pymesh.config.v1.Service``) come from
  the annotation ``config.pymesh.io/service`` (JSON or YAML); extra ``authorities`` there are
  added if they are names in the Service's own namespace (``<x>.<ns>.svc`` or
  ``<x>.<ns>.svc.<cluster-domain>``) that no other Service has as its own name or cluster IP:
  one namespace can never take another's names, and a canonical name always wins. An extra
  authority that cannot be had is dropped and reported; the Service is served without it.
  ExternalName Services are skipped. Its virtual IP is its ClusterIP (the first of
  ``clusterIPs``, else ``clusterIP``); a headless Service (``None``) has none, and the
  annotation cannot set one: Kubernetes allocates them.
- Its endpoints are the ready addresses of its EndpointSlices, on the target port of one
  Service port: the annotation ``config.pymesh.io/port`` names it (name or number), else the
  first port.

An annotation the engine rejects is reported with the Service and field path, and the
Service keeps its last good settings. Watches resume from the last resourceVersion after a
lost connection; when the API server no longer has it (410 Gone), everything is listed again.
Endpoints cannot be registered through the control plane: Kubernetes owns them.

Connection: ``kubernetes`` uses the in-cluster service account; ``kubernetes:KUBECONFIG``
uses a kubeconfig file's current context (token or client certificate; CA or
``insecure-skip-tls-verify``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

import pymesh
from pymesh._proto.pymesh.config.v1 import proxy_pb2

from ..backoff import Backoff
from ..state import Delta, Snapshot
from .base import (
    RegistrationError,
    Sink,
    Source,
    SourceError,
    check_services,
    error_reason,
    service_index,
    strip_path,
    validate_merged,
)

log = logging.getLogger("pymesh.control.kubernetes")

SETTINGS_ANNOTATION = "config.pymesh.io/service"
PORT_ANNOTATION = "config.pymesh.io/port"
SERVICE_LABEL = "kubernetes.io/service-name"
SERVICES_PATH = "/api/v1/services"
SLICES_PATH = "/apis/discovery.k8s.io/v1/endpointslices"
IN_CLUSTER = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: the API server ends a watch after this; it is then resumed
WATCH_SECONDS = 240
#: one watch event larger than this is refused (bounded buffers)
MAX_EVENT_BYTES = 64 * 1024 * 1024
_CONNECTION = "connection"


class _Expired(Exception):
    """The API server no longer has the resourceVersion asked for (410 Gone)."""


@dataclass
class ApiAccess:
    """How to reach an API server: its URL, TLS context and credentials."""

    server: str
    ssl_context: ssl.SSLContext | bool
    token: str | None = None

    @classmethod
    def in_cluster(cls) -> ApiAccess:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ValueError("not in a cluster (KUBERNETES_SERVICE_HOST is unset); use kubernetes:KUBECONFIG")
        context = ssl.create_default_context(cafile=str(IN_CLUSTER / "ca.crt"))
        token = (IN_CLUSTER / "token").read_text().strip()
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", context, token)

    @classmethod
    def from_kubeconfig(cls, path: Path) -> ApiAccess:
        """The current context of a kubeconfig file."""
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read the kubeconfig {path}: {e}") from None
        base = path.parent

        def named(kind: str, name: str) -> dict[str, Any]:
            for entry in config.get(kind + "s") or []:
                if entry.get("name") == name:
                    return entry.get(kind) or {}
            raise ValueError(f"{path}: no {kind} named {name!r}")

        current = config.get("current-context")
        if not current:
            raise ValueError(f"{path}: no current-context")
        context = named("context", current)
        cluster = named("cluster", context.get("cluster", ""))
        user = named("user", context.get("user", "")) if context.get("user") else {}
        server = str(cluster.get("server", "")).rstrip("/")
        if not server.startswith(("https://", "http://")):
            raise ValueError(f"{path}: cluster server {server!r} is not an http(s) URL")
        ssl_context: ssl.SSLContext | bool = True
        if server.startswith("https://"):
            if cluster.get("insecure-skip-tls-verify"):
                ssl_context = False
            else:
                ssl_context = ssl.create_default_context()
                if cluster.get("certificate-authority-data"):
                    ssl_context.load_verify_locations(
                        cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
                elif cluster.get("certificate-authority"):
                    ssl_context.load_verify_locations(cafile=str(base / cluster["certificate-authority"]))
                _load_client_certificate(ssl_context, user, base)
        token = user.get("token")
        if not token and user.get("tokenFile"):
            token = (base / user["tokenFile"]).read_text().strip()
        return cls(server, ssl_context, token)


def _load_client_certificate(context: ssl.SSLContext, user: dict[str, Any], base: Path) -> None:
    if user.get("client-certificate-data") and user.get("client-key-data"):
        # ssl loads certificates from files only: write them to a private temporary file.
        with tempfile.NamedTemporaryFile("wb", suffix=".pem") as pem:
            pem.write(base64.b64decode(user["client-certificate-data"]) + b"\n"
                      + base64.b64decode(user["client-key-data"]))
            pem.flush()
            context.load_cert_chain(pem.name)
    elif user.get("client-certificate") and user.get("client-key"):
        context.load_cert_chain(str(base / user["client-certificate"]), str(base / user["client-key"]))


class KubernetesSource(Source):
    """Services and EndpointSlices of every namespace."""

    def __init__(self, access: ApiAccess, *, name: str = "kubernetes", cluster_domain: str = "cluster.local") -> None:
        self.access = access
        self.name = name
        self.cluster_domain = cluster_domain
        self._session: aiohttp.ClientSession | None = None
        self._versions: dict[str, str] = {}
        #: Kubernetes objects by (namespace, name)
        self._k8s_services: dict[tuple[str, str], dict[str, Any]] = {}
        self._slices: dict[tuple[str, str], dict[str, Any]] = {}
        self._slices_by_owner: dict[tuple[str, str], set[tuple[str, str]]] = {}
        #: what is published, by pymesh service name
        self._services: dict[str, proxy_pb2.Service] = {}
        self._settings: dict[str, dict[str, Any]] = {}
        self._endpoints: dict[str, dict[str, proxy_pb2.Endpoint]] = {}
        self._errors: dict[str, str] = {}
        #: every Service's own names and cluster IPs, and which Service each belongs to
        self._canonical: dict[tuple[str, str], list[str]] = {}
        self._claims: dict[str, tuple[str, str]] = {}

    # -- Source ---------------------------------------------------------------------------

    async def load(self, sink: Sink) -> None:
        try:
            services, services_version = await self._list(SERVICES_PATH)
            slices, slices_version = await self._list(SLICES_PATH)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise SourceError(_CONNECTION, f"cannot list from the Kubernetes API at {self.access.server}: "
                                           f"{error_reason(e)}") from None
        self._versions = {SERVICES_PATH: services_version, SLICES_PATH: slices_version}
        self._k8s_services = {_key(s): s for s in services}
        self._canonical, self._claims = {}, {}
        for key, obj in self._k8s_services.items():
            self._claim(key, obj)
        self._slices, self._slices_by_owner = {}, {}
        for slice_ in slices:
            self._put_slice(slice_)
        self._services, self._settings, self._endpoints = {}, {}, {}
        self._errors = {}
        for key in sorted(self._k8s_services.keys() | {_owner(s) for s in self._slices.values()}):
            self._recompute(key)
        sink.replace(Snapshot(dict(self._services), {n: dict(e) for n, e in self._endpoints.items()}))
        sink.report_errors(self._errors)
        log.info("loaded %d services from %s", len(self._services), self.access.server)

    async def watch(self, sink: Sink) -> None:
        tasks = [asyncio.create_task(self._follow(path, sink)) for path in (SERVICES_PATH, SLICES_PATH)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # an _Expired watch: read everything again
        except _Expired as e:
            log.warning("the Kubernetes API expired %s; listing everything again", e)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def register(self, service: str, endpoint: proxy_pb2.Endpoint, ttl: float | None) -> None:
        raise RegistrationError("FAILED_PRECONDITION",
                                "endpoints come from Kubernetes EndpointSlices; they cannot be registered here")

    async def deregister(self, service: str, address: str, owner: str) -> None:
        raise RegistrationError("FAILED_PRECONDITION",
                                "endpoints come from Kubernetes EndpointSlices; they cannot be deregistered here")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- the API --------------------------------------------------------------------------

    def client(self) -> aiohttp.ClientSession:
        """The session to the API server (lazily made; shared with the identity service's TokenReview)."""
        if self._session is None:
            headers = {"Accept": "application/json"}
            if self.access.token:
                headers["Authorization"] = f"Bearer {self.access.token}"
            self._session = aiohttp.ClientSession(
                self.access.server, headers=headers, connector=aiohttp.TCPConnector(ssl=self.access.ssl_context))
        return self._session

    async def _list(self, path: str) -> tuple[list[dict[str, Any]], str]:
        items: list[dict[str, Any]] = []
        params = {"limit": "500"}
        for _ in range(100_000):  # bounded: one page per 500 objects
            async with self.client().get(path, params=params, timeout=aiohttp.ClientTimeout(total=60)) as response:
                if response.status != 200:
                    raise aiohttp.ClientResponseError(response.request_info, (), status=response.status,
                                                      message=(await response.text())[:500])
                page = await response.json()
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items, page["metadata"]["resourceVersion"]
            params = {"limit": "500", "continue": token}
        raise OSError(f"{path}: too many pages")

    async def _follow(self, path: str, sink: Sink) -> None:
        """Watches ``path`` from the last resourceVersion, for ever (raises _Expired)."""
        backoff = Backoff()
        handle = self._on_service if path == SERVICES_PATH else self._on_slice
        while True:
            try:
                await self._watch_once(path, handle, sink)
                backoff.reset()
                if self._errors.pop(_CONNECTION, None) is not None:
                    sink.report_errors(self._errors)
                continue
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
                self._errors[_CONNECTION] = (f"watching {path} interrupted: {error_reason(e)}; resuming from "
                                             f"resourceVersion {self._versions.get(path)}")
                sink.report_errors(self._errors)
            await backoff.wait()

    async def _watch_once(self, path: str, handle: Callable[[str, dict[str, Any], Sink], None], sink: Sink) -> None:
        params = {"watch": "1", "allowWatchBookmarks": "true", "timeoutSeconds": str(WATCH_SECONDS),
                  "resourceVersion": self._versions[path]}
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=WATCH_SECONDS + 30)
        async with self.client().get(path, params=params, timeout=timeout) as response:
            if response.status == 410:
                raise _Expired(path)
            if response.status != 200:
                raise aiohttp.ClientResponseError(response.request_info, (), status=response.status,
                                                  message=(await response.text())[:500])
            if self._errors.pop(_CONNECTION, None) is not None:
                sink.report_errors(self._errors)
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                if len(buffer) > MAX_EVENT_BYTES:
                    raise ValueError(f"a watch event of {path} is over {MAX_EVENT_BYTES} bytes")
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        self._on_line(path, json.loads(line), handle, sink)

    def _on_line(self, path: str, event: dict[str, Any], handle: Callable[[str, dict[str, Any], Sink], None],
                 sink: Sink) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Expired(path)
            raise ValueError(f"watch error: {obj.get('message', obj)}")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            handle(kind, obj, sink)
        if version:
            self._versions[path] = version

    # -- Kubernetes objects to pymesh -----------------------------------------------------

    def _on_service(self, kind: str, obj: dict[str, Any], sink: Sink) -> None:
        key = _key(obj)
        if kind == "DELETED":
            self._k8s_services.pop(key, None)
            self._claim(key, None)
        else:
            self._k8s_services[key] = obj
            self._claim(key, obj)
        if kind == "DELETED":  # once it is gone, those of its namespace that lost an extra try again
            self._publish(key, sink)
            for other in [k for k in self._canonical if k[0] == key[0] and f"{k[0]}/{k[1]}" in self._errors]:
                self._publish(other, sink)
            return
        # a Service whose extra authority is now another's own name is served without it first
        for other in self._extras_claiming(key):
            self._publish(other, sink)
        self._publish(key, sink)

    def _on_slice(self, kind: str, obj: dict[str, Any], sink: Sink) -> None:
        key = _key(obj)
        old = self._drop_slice(key)
        if kind != "DELETED":
            self._put_slice(obj)
        owners = {_owner(obj)} | ({_owner(old)} if old is not None else set())
        for owner in owners:
            if owner[1]:
                self._publish(owner, sink)

    def _put_slice(self, obj: dict[str, Any]) -> None:
        key = _key(obj)
        self._slices[key] = obj
        self._slices_by_owner.setdefault(_owner(obj), set()).add(key)

    def _drop_slice(self, key: tuple[str, str]) -> dict[str, Any] | None:
        old = self._slices.pop(key, None)
        if old is not None:
            owned = self._slices_by_owner.get(_owner(old))
            if owned is not None:
                owned.discard(key)
                if not owned:
                    del self._slices_by_owner[_owner(old)]
        return old

    def _publish(self, key: tuple[str, str], sink: Sink) -> None:
        name = self.service_name(*key)
        had_error = f"{key[0]}/{key[1]}" in self._errors
        before_service, before_endpoints = self._services.get(name), self._endpoints.get(name, {})
        self._recompute(key)
        delta = Delta()
        after_service = self._services.get(name)
        if after_service != before_service:
            delta.services[name] = after_service
        after_endpoints = self._endpoints.get(name, {})
        if after_endpoints != before_endpoints:
            changes: dict[str, proxy_pb2.Endpoint | None] = {a: None for a in before_endpoints.keys()
                                                             - after_endpoints.keys()}
            changes.update((a, e) for a, e in after_endpoints.items() if before_endpoints.get(a) != e)
            delta.endpoints[name] = changes
        if delta:
            sink.apply(delta)
        if had_error or f"{key[0]}/{key[1]}" in self._errors:
            sink.report_errors(self._errors)

    def _own_names(self, key: tuple[str, str], obj: dict[str, Any]) -> list[str]:
        namespace, name = key
        spec = obj.get("spec") or {}
        names = [f"{name}.{namespace}.svc", f"{name}.{namespace}", self.service_name(namespace, name)]
        return names + [ip for ip in spec.get("clusterIPs") or [spec.get("clusterIP")] if ip and ip != "None"]

    def _claim(self, key: tuple[str, str], obj: dict[str, Any] | None) -> None:
        """Records (or with None forgets) a Service's own names."""
        for old in self._canonical.pop(key, []):
            if self._claims.get(old) == key:
                del self._claims[old]
        if obj is not None and (obj.get("spec") or {}).get("type") != "ExternalName":
            self._canonical[key] = self._own_names(key, obj)
            for own in self._canonical[key]:
                self._claims.setdefault(own, key)

    def _extras_claiming(self, key: tuple[str, str]) -> list[tuple[str, str]]:
        """The other Services published with one of ``key``'s own names as an extra authority."""
        own = set(self._canonical.get(key, []))
        if not own:
            return []
        found = []
        for other, names in self._canonical.items():
            published = self._services.get(self.service_name(*other))
            if other != key and published is not None and own & (set(published.authorities) - set(names)):
                found.append(other)
        return found

    def _extra_problem(self, key: tuple[str, str], extra: Any) -> str:
        """Why an extra authority of ``key`` cannot be had ("" if it can)."""
        namespace = key[0]
        if not isinstance(extra, str):
            return ""  # the engine says what is wrong with it
        host = extra.rsplit(":", 1)[0] if extra.count(":") == 1 else extra
        suffixes = (f".{namespace}.svc", f".{namespace}.svc.{self.cluster_domain}")
        if not host.lower().endswith(suffixes):
            return (f"{extra!r} is not a name in namespace {namespace!r}; extra authorities must end with "
                    f"{suffixes[0]} or {suffixes[1]}")
        owner = self._claims.get(host.lower())
        if owner is not None and owner != key:
            return f"{extra!r} is the own name of Service {owner[0]}/{owner[1]}"
        return ""

    def service_name(self, namespace: str, name: str) -> str:
        return f"{name}.{namespace}.svc.{self.cluster_domain}"

    def _recompute(self, key: tuple[str, str]) -> None:
        """Publishes the pymesh service (and endpoints) of one Kubernetes Service."""
        namespace, name = key
        pymesh_name = self.service_name(namespace, name)
        where = f"{namespace}/{name}"
        obj = self._k8s_services.get(key)
        if obj is None or (obj.get("spec") or {}).get("type") == "ExternalName":
            self._services.pop(pymesh_name, None)
            self._settings.pop(pymesh_name, None)
            self._endpoints.pop(pymesh_name, None)
            self._errors.pop(where, None)
            return
        self._errors.pop(where, None)
        dropped: list[str] = []
        try:
            service, settings = self._settings_of(namespace, name, obj, dropped)
            try:
                self._check_merged(pymesh_name, settings)
            except pymesh.ConfigError as e:
                if set(service.authorities) <= set(self._canonical.get(key, [])):
                    raise  # its own names conflict: no extra to drop
                # an extra authority another Service holds: served without its extras, never dropped
                dropped.append(f"{e.message} (its extra authorities are left out)")
                service, settings = self._settings_of(namespace, name, obj, dropped, extras=False)
                self._check_merged(pymesh_name, settings)
            self._services[pymesh_name] = service
            self._settings[pymesh_name] = settings
            if dropped:
                self._errors[where] = f"metadata.annotations[{SETTINGS_ANNOTATION}].authorities: " + "; ".join(dropped)
        except pymesh.ConfigError as e:
            self._errors[where] = f"{e.path}: {e.message}" if e.path else e.message
        if pymesh_name not in self._services:
            self._endpoints.pop(pymesh_name, None)
            return
        endpoints = self._endpoints_of(key, obj)
        if endpoints:
            self._endpoints[pymesh_name] = endpoints
        else:
            self._endpoints.pop(pymesh_name, None)

    def _settings_of(self, namespace: str, name: str, obj: dict[str, Any], dropped: list[str], *,
                     extras: bool = True) -> tuple[proxy_pb2.Service, dict[str, Any]]:
        """The Service's settings; extra authorities it may not have are left out, and said so
        in ``dropped``."""
        field = f"metadata.annotations[{SETTINGS_ANNOTATION}]"
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        settings: Any = {}
        if SETTINGS_ANNOTATION in annotations:
            try:
                settings = yaml.safe_load(annotations[SETTINGS_ANNOTATION]) or {}
            except yaml.YAMLError as e:
                raise pymesh.ConfigError(field, f"malformed JSON/YAML: {e}") from None
            if not isinstance(settings, dict):
                raise pymesh.ConfigError(field, "expected a mapping of pymesh.config.v1.Service fields")
            for forbidden in ("name", "endpoints", "virtualIp", "virtual_ip"):
                if forbidden in settings:
                    raise pymesh.ConfigError(f"{field}.{forbidden}", "set by Kubernetes; remove it")
        spec = obj.get("spec") or {}
        authorities = [f"{name}.{namespace}.svc", f"{name}.{namespace}"]
        authorities += [ip for ip in spec.get("clusterIPs") or [spec.get("clusterIP")] if ip and ip != "None"]
        for extra in (settings.get("authorities") or []) if extras else []:
            if (problem := self._extra_problem((namespace, name), extra)):
                dropped.append(problem)
            elif extra not in authorities:
                authorities.append(extra)
        document = {**settings, "name": self.service_name(namespace, name), "authorities": authorities}
        if (virtual_ip := _cluster_ip(spec)):
            document["virtualIp"] = virtual_ip
        try:
            services, normalised = check_services([document])
        except pymesh.ConfigError as e:
            raise pymesh.ConfigError(f"{field}.{strip_path(e.path, 'services[0]')}".rstrip("."), e.message) from None
        return services[0], normalised[0]

    def _check_merged(self, pymesh_name: str, settings: dict[str, Any]) -> None:
        others = [s for n, s in sorted(self._settings.items()) if n != pymesh_name]
        try:
            validate_merged([*others, settings])
        except pymesh.ConfigError as e:
            index = service_index(e.path)
            other = others[index].get("name") if index is not None and index < len(others) else None
            raise pymesh.ConfigError(f"metadata.annotations[{SETTINGS_ANNOTATION}].authorities",
                                     f"{e.message}" + (f" (conflicts with {other})" if other else "")) from None

    def _endpoints_of(self, key: tuple[str, str], obj: dict[str, Any]) -> dict[str, proxy_pb2.Endpoint]:
        """Ready addresses of the Service's EndpointSlices, on the chosen port's target port."""
        ports = (obj.get("spec") or {}).get("ports") or []
        wanted = ((obj.get("metadata") or {}).get("annotations") or {}).get(PORT_ANNOTATION)
        chosen = None
        for port in ports:
            if wanted is None or wanted in (port.get("name"), str(port.get("port"))):
                chosen = port
                break
        if chosen is None:
            return {}
        port_name = chosen.get("name") or ""
        endpoints: dict[str, proxy_pb2.Endpoint] = {}
        for slice_key in sorted(self._slices_by_owner.get(key, ())):
            slice_ = self._slices[slice_key]
            if slice_.get("addressType") not in ("IPv4", "IPv6"):
                continue
            number = next((p.get("port") for p in slice_.get("ports") or [] if (p.get("name") or "") == port_name),
                          None)
            if not number:
                continue
            for endpoint in slice_.get("endpoints") or []:
                if (endpoint.get("conditions") or {}).get("ready") is False or not endpoint.get("addresses"):
                    continue
                ip = endpoint["addresses"][0]
                address = f"[{ip}]:{number}" if ":" in ip else f"{ip}:{number}"
                endpoints[address] = proxy_pb2.Endpoint(address=address)
        return endpoints


def _cluster_ip(spec: dict[str, Any]) -> str:
    """A Service's ClusterIP, the address applications dial for it: the first of
    ``clusterIPs`` (the primary family), else ``clusterIP``; "" for a headless Service."""
    ips = spec.get("clusterIPs") or [spec.get("clusterIP")]
    ip = ips[0] if ips and isinstance(ips[0], str) else ""
    return "" if ip in ("", "None") else ip


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace", ""), meta.get("name", "")


def _owner(slice_: dict[str, Any]) -> tuple[str, str]:
    meta = slice_.get("metadata") or {}
    return meta.get("namespace", ""), (meta.get("labels") or {}).get(SERVICE_LABEL, "")



