"""The ``pymesh.mesh.v1.Discovery`` gRPC service (grpcio's asyncio server).

- ``WatchConfig``: the full ``ProxyConfig`` (services, no endpoints) at once, then a new full
  one after every change; ``version`` changes with it.
- ``WatchEndpoints``: one service's endpoints, the full set first (``full``), then changes
  (``added`` are new or changed endpoints, ``removed`` addresses). Every new stream, so every
  reconnecting watcher, starts with the full set.
- ``Register``/``Deregister``: write through the source (shared by replicas with etcd); off
  unless ``allowRegister``. A caller registers only endpoints of its own identity (its client
  certificate's), never one the source defines, and deregisters only its own.
- ``Status``: the control plane, its source's health, and (to the control plane's own
  identity only) the source's errors and the connected proxies.

Over TLS (the default) every call needs a client certificate of the mesh (see
:mod:`pymesh.control.tls`); the caller's identity replaces what it claims in
``ProxyIdentity``, and its config carries only the policies that apply to it. In plaintext
(development only) nobody has an identity and everything is served as it is.

Updates are pushed: each stream waits on its own event, set by the state when something it
watches changes. Each update is serialized once and the same bytes are written to every
watcher. Streams are independent tasks, so a slow watcher only delays itself; its queue is
bounded (see :mod:`pymesh.control.state`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from google.protobuf import json_format

import pymesh
from pymesh._proto.pymesh.mesh.v1 import discovery_pb2

from .identity.spiffe import SpiffeId
from .metrics import ControlMetrics
from .sources import RegistrationError, Source, validate_endpoint
from .state import MeshState
from .tls import PeerVerifier

log = logging.getLogger("pymesh.control.server")

SERVICE_NAME = "pymesh.mesh.v1.Discovery"

#: Keepalive: the server pings idle connections to find dead proxies, and lets proxies ping
#: it every 5 s. SO_REUSEPORT is off so that two control planes never share a port. gRPC core
#: cancels calls beyond 1,000 waiting to be picked up by the (one) Python server loop; when a
#: thousand proxies reconnect at once (a control plane restart) each opens several streams,
#: so the queue may hold more: allow it.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.so_reuseport", 0),
    ("grpc.server.max_pending_requests", 10_000),
    ("grpc.server.max_pending_requests_hard_limit", 20_000),
]


def _identity(payload: bytes) -> bytes:
    return payload


@dataclass
class ConnectedProxy:
    """What the server knows of one proxy (by ``proxy_id``, else by its connection)."""

    identity: discovery_pb2.ProxyIdentity
    config_version: str = ""
    config_watches: int = 0
    endpoint_watches: int = 0

    @property
    def streams(self) -> int:
        return self.config_watches + self.endpoint_watches


class DiscoveryServer:
    """Serves the mesh state to proxies."""

    def __init__(self, state: MeshState, source: Source, metrics: ControlMetrics, peers: PeerVerifier, *,
                 allow_register: bool = False, control_identity: str = "") -> None:
        self.state = state
        self.source = source
        self.metrics = metrics
        self.peers = peers
        self.allow_register = allow_register
        self.control_identity = control_identity
        self.proxies: dict[str, ConnectedProxy] = {}
        self._server: grpc.aio.Server | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        """The Discovery methods; streaming responses are pre-serialized bytes."""
        pb = discovery_pb2
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "WatchConfig": grpc.unary_stream_rpc_method_handler(
                self.watch_config, request_deserializer=pb.WatchConfigRequest.FromString,
                response_serializer=_identity),
            "WatchEndpoints": grpc.unary_stream_rpc_method_handler(
                self.watch_endpoints, request_deserializer=pb.WatchEndpointsRequest.FromString,
                response_serializer=_identity),
            "Register": grpc.unary_unary_rpc_method_handler(
                self.register, request_deserializer=pb.RegisterRequest.FromString,
                response_serializer=pb.RegisterResponse.SerializeToString),
            "Deregister": grpc.unary_unary_rpc_method_handler(
                self.deregister, request_deserializer=pb.DeregisterRequest.FromString,
                response_serializer=pb.DeregisterResponse.SerializeToString),
            "Status": grpc.unary_unary_rpc_method_handler(
                self.status, request_deserializer=pb.StatusRequest.FromString,
                response_serializer=pb.StatusResponse.SerializeToString),
        })

    async def start(self, address: str, *others: grpc.GenericRpcHandler) -> str:
        """Binds ``address`` (``IP:port``, port 0 for a free one; plaintext: TLS is the front's,
        see :mod:`pymesh.control.tls`); returns the bound ``IP:port``. ``others`` are services
        served on the same server (Identity)."""
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{address!r} is not IP:PORT")
        server = grpc.aio.server(options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((self.handler(), *others))
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {address}: {e}") from None
        if not bound:
            raise OSError(f"cannot listen on {address}")
        await server.start()
        self._server = server
        return f"{host}:{bound}"

    async def stop(self, grace: float = 1.0) -> None:
        """Closes every stream (proxies keep their last state and reconnect elsewhere)."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    # -- proxies --------------------------------------------------------------------------

    async def _caller(self, context: grpc.aio.ServicerContext) -> SpiffeId | None:
        """The caller's verified identity over TLS (the call is aborted without one); None in
        plaintext."""
        if self.peers.front is None:
            return None
        return await self.peers.require(context)

    def _attach(self, identity: discovery_pb2.ProxyIdentity, context: grpc.aio.ServicerContext,
                kind: str, caller: SpiffeId | None) -> tuple[str, ConnectedProxy]:
        key = identity.proxy_id or f"peer:{context.peer()}"
        if caller is not None:  # one identity cannot pose as (or merge into) another's proxy
            key = f"{caller}|{key}"
        proxy = self.proxies.get(key)
        if proxy is None:
            proxy = self.proxies[key] = ConnectedProxy(discovery_pb2.ProxyIdentity())
            proxy.identity.CopyFrom(identity)
            if not identity.proxy_id:
                proxy.identity.proxy_id = key
            if caller is not None:  # what the certificate says, not what the proxy claims
                proxy.identity.namespace = caller.namespace
                proxy.identity.service_account = caller.service_account
            log.info("proxy connected: %s", _describe(proxy.identity))
        if kind == "config":
            proxy.config_watches += 1
        else:
            proxy.endpoint_watches += 1
        self.metrics.connected_proxies.set(len(self.proxies))
        return key, proxy

    def _detach(self, key: str, proxy: ConnectedProxy, kind: str) -> None:
        if kind == "config":
            proxy.config_watches -= 1
        else:
            proxy.endpoint_watches -= 1
        if proxy.streams <= 0 and self.proxies.get(key) is proxy:
            del self.proxies[key]
            log.info("proxy disconnected: %s", _describe(proxy.identity))
        self.metrics.connected_proxies.set(len(self.proxies))

    # -- RPCs -----------------------------------------------------------------------------

    async def watch_config(self, request: discovery_pb2.WatchConfigRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        caller = await self._caller(context)
        key, proxy = self._attach(request.identity, context, "config", caller)
        own = None if caller is None else str(caller)
        watch = self.state.subscribe_config()
        latency = self.metrics.push_latency.labels("config")
        pushes = self.metrics.pushes.labels("config", "true")
        try:
            await self.state.loaded.wait()
            while True:
                await watch.event.wait()
                watch.event.clear()
                update = self.state.take_config(watch, own)
                if update is None:
                    continue
                payload, since = update
                yield payload
                proxy.config_version = watch.sent_version
                pushes.inc()
                latency.observe(time.monotonic() - since)
        finally:
            self.state.unsubscribe_config(watch)
            self._detach(key, proxy, "config")

    async def watch_endpoints(self, request: discovery_pb2.WatchEndpointsRequest,
                              context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        if not request.service:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "service: required; name the service to watch")
        caller = await self._caller(context)
        key, proxy = self._attach(request.identity, context, "endpoints", caller)
        watch = self.state.subscribe_endpoints(request.service)
        latency = self.metrics.push_latency.labels("endpoints")
        full_pushes = self.metrics.pushes.labels("endpoints", "true")
        delta_pushes = self.metrics.pushes.labels("endpoints", "false")
        try:
            await self.state.loaded.wait()
            while True:
                await watch.event.wait()
                watch.event.clear()
                while (update := self.state.take_endpoints(watch)) is not None:
                    payload, since, full = update
                    yield payload
                    (full_pushes if full else delta_pushes).inc()
                    latency.observe(time.monotonic() - since)
        finally:
            self.state.unsubscribe_endpoints(watch)
            self._detach(key, proxy, "endpoints")

    async def _registrant(self, context: grpc.aio.ServicerContext, operation: str) -> str:
        """The identity a registration is made by: the caller's certificate's, or "" (nobody)
        on a plaintext development server. Refuses when registration is off."""
        if not self.allow_register:
            await self._refuse(context, operation, "FAILED_PRECONDITION",
                               "registration is off on this control plane (start it with --allow-register, "
                               "or define endpoints in its source)")
        caller = await self._caller(context)
        return "" if caller is None else str(caller)

    async def register(self, request: discovery_pb2.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> discovery_pb2.RegisterResponse:
        owner = await self._registrant(context, "register")
        service = request.service
        if not service:
            await self._refuse(context, "register", "INVALID_ARGUMENT", "service: required")
        if not request.endpoint.identity:
            request.endpoint.identity = owner  # a registered endpoint is reached as its registrant
        if request.endpoint.identity != owner:
            await self._refuse(context, "register", "PERMISSION_DENIED",
                               f"endpoint.identity: {request.endpoint.identity[:300]} is not the caller's "
                               f"identity ({owner or 'none: this control plane runs in plaintext'}); a caller "
                               "registers only endpoints of its own identity")
        try:
            endpoint = validate_endpoint(service, json_format.MessageToDict(request.endpoint))
        except pymesh.ConfigError as e:
            await self._refuse(context, "register", "INVALID_ARGUMENT",
                               f"endpoint.{e.path}: {e.message}" if e.path else f"endpoint: {e.message}")
        ttl = request.ttl.ToTimedelta().total_seconds() if request.HasField("ttl") else 0.0
        if ttl < 0:
            await self._refuse(context, "register", "INVALID_ARGUMENT", "ttl: must not be negative")
        await self._known(context, "register", service)
        try:
            await self.source.register(service, endpoint, ttl or None)
        except RegistrationError as e:
            await self._refuse(context, "register", e.code, e.message)
        self.metrics.registrations.labels("register", "ok").inc()
        log.info("registered %s for %s by %s%s", endpoint.address, service, owner or "a plaintext caller",
                 f" (ttl {ttl:g}s)" if ttl else "")
        return discovery_pb2.RegisterResponse()

    async def deregister(self, request: discovery_pb2.DeregisterRequest,
                         context: grpc.aio.ServicerContext) -> discovery_pb2.DeregisterResponse:
        owner = await self._registrant(context, "deregister")
        if not request.service or not request.address:
            await self._refuse(context, "deregister", "INVALID_ARGUMENT", "service and address are required")
        try:
            await self.source.deregister(request.service, request.address, owner)
        except RegistrationError as e:
            await self._refuse(context, "deregister", e.code, e.message)
        self.metrics.registrations.labels("deregister", "ok").inc()
        log.info("deregistered %s from %s", request.address, request.service)
        return discovery_pb2.DeregisterResponse()

    async def status(self, request: discovery_pb2.StatusRequest,
                     context: grpc.aio.ServicerContext) -> discovery_pb2.StatusResponse:
        caller = await self._caller(context)
        state = self.state
        response = discovery_pb2.StatusResponse(
            version=pymesh.__version__, source=self.source.name,
            source_healthy=state.loaded.is_set() and state.healthy,
            source_error=state.source_error if state.loaded.is_set() or state.source_errors
            else "the source has not loaded yet",
            config_version=state.config_version)
        if caller is not None and str(caller) != self.control_identity:
            # which workloads run where, and what is wrong with the source (names of other
            # namespaces' Services, file paths), is the operator's business only
            response.source_error = "" if response.source_healthy else "see the control plane's log"
            return response
        for _, proxy in sorted(self.proxies.items()):
            response.proxies.add(identity=proxy.identity, config_version=proxy.config_version,
                                 endpoint_watches=proxy.endpoint_watches)
        return response

    async def _known(self, context: grpc.aio.ServicerContext, operation: str, service: str) -> None:
        if service not in self.state.services:
            await self._refuse(context, operation, "NOT_FOUND",
                               f"service: unknown service {service!r}; define it in {self.source.name} first")

    async def _refuse(self, context: grpc.aio.ServicerContext, operation: str, code: str, message: str) -> None:
        self.metrics.registrations.labels(operation, code.lower()).inc()
        await context.abort(grpc.StatusCode[code], message)


def _describe(identity: discovery_pb2.ProxyIdentity) -> str:
    parts = [identity.proxy_id]
    if identity.workload:
        parts.append(f"workload={identity.workload}")
    if identity.namespace:
        parts.append(f"namespace={identity.namespace}")
    if identity.service_account:
        parts.append(f"serviceAccount={identity.service_account}")
    return " ".join(parts)
