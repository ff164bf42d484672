"""The etcd source (etcd v3 API, through the ``aetcd`` asyncio client).

Keys, under a prefix (``/pymesh/`` by default):

- ``/pymesh/services/<name>``: a ``pymesh.config.v1.Service`` in the protobuf JSON mapping,
  without endpoints;
- ``/pymesh/endpoints/<service>/<address>``: a ``pymesh.config.v1.Endpoint`` (``{}`` is
  enough: the address comes from the key), defined by the operator;
- ``/pymesh/registrations/<service>/<address>``: an endpoint written by ``Register`` (its
  ``identity`` is its registrant's). One with a ttl is attached to an etcd lease, so etcd
  expires it, whichever replica wrote it. An operator's endpoint of the same address always
  wins, and ``Deregister`` deletes registrations only, never an operator's key;
- ``/pymesh/authorization``: the mesh-wide ``pymesh.config.v1.Authorization`` (optional).

Every service gets a virtual IP (see :mod:`pymesh.control.virtual_ip`): its own ``virtualIp``,
else one hashed from its name in the range, the same on every replica. A ``virtualIp`` that
is not an IP address or that another service already has is reported with the key, and the
key's last good value is kept.

Several control-plane replicas on one etcd share this state; each watches the prefix and
serves any proxy. A key whose value is invalid (the engine judges services and endpoints) is
reported with the key and field path, and its last good value is kept. After a lost
connection the watch resumes from the last revision applied (another endpoint of the list is
tried on each attempt); if etcd compacted that revision away, the whole prefix is read again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

import aetcd
import aetcd.exceptions

import pymesh
from pymesh._proto.pymesh.config.v1 import proxy_pb2

from ..backoff import Backoff
from ..policy import check_authorization
from ..state import Delta, Snapshot
from ..virtual_ip import (
    DEFAULT_RANGE,
    FIELD,
    Allocator,
    IpNetwork,
    check_address,
    duplicate_message,
    parse_range,
    with_virtual_ip,
)
from .base import (
    RegistrationError,
    Sink,
    Source,
    SourceError,
    check_services,
    defined_by_source,
    endpoint_json,
    error_reason,
    not_the_owner,
    service_index,
    strip_path,
    validate_endpoint,
    validate_merged,
)

log = logging.getLogger("pymesh.control.etcd")

#: keepalive pings detect a dead etcd even when no change is flowing (etcd allows one per 5 s)
_CHANNEL_OPTIONS = {
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.max_receive_message_length": 256 * 1024 * 1024,
}
#: how long Register/Deregister wait for their own change to come back through the watch
APPLY_WAIT = 5.0
_CONNECTION = "connection"


class EtcdSource(Source):
    """State shared through etcd."""

    def __init__(self, endpoints: list[tuple[str, int]], *, prefix: str = "/pymesh/", timeout: float = 5.0,
                 virtual_ip_range: IpNetwork | None = None) -> None:
        if not prefix.endswith("/"):
            prefix += "/"
        self.endpoints = endpoints
        self.prefix = prefix
        self.timeout = timeout
        self.name = "etcd:" + ",".join(f"{h}:{p}" for h, p in endpoints)
        self._next = 0
        self._client: aetcd.Client | None = None
        self._revision = 0
        self._applied = asyncio.Condition()
        #: services as etcd defines them (an explicit virtual IP or none)
        self._services: dict[str, proxy_pb2.Service] = {}
        #: as served: every one with its virtual IP
        self._published: dict[str, proxy_pb2.Service] = {}
        self._virtual_ips = Allocator(virtual_ip_range or parse_range(DEFAULT_RANGE))
        self._settings: dict[str, dict[str, Any]] = {}
        self._endpoints: dict[str, dict[str, proxy_pb2.Endpoint]] = {}
        self._registrations: dict[str, dict[str, proxy_pb2.Endpoint]] = {}
        self._authorization: proxy_pb2.Authorization | None = None
        self._errors: dict[str, str] = {}

    # -- Source ---------------------------------------------------------------------------

    async def load(self, sink: Sink) -> None:
        client = await self._connected()
        try:
            result = await client.get_prefix(self.prefix.encode())
        except Exception as e:  # noqa: BLE001 (any client failure is a connection problem)
            await self._drop(e)
            raise SourceError(_CONNECTION, f"cannot read {self.prefix} from etcd: {error_reason(e)}") from None
        self._errors.pop(_CONNECTION, None)
        self._load([(kv.key.decode(), kv.value) for kv in result])
        await self._advance(result.header.revision)
        endpoints: dict[str, dict[str, proxy_pb2.Endpoint]] = {}
        for service in self._endpoints.keys() | self._registrations.keys():
            endpoints[service] = {**self._registrations.get(service, {}), **self._endpoints.get(service, {})}
        sink.replace(Snapshot(dict(self._published), endpoints, self._authorization))
        sink.report_errors(self._errors)
        log.info("loaded %d services and %d endpoints from %s at revision %d", len(self._services),
                 sum(len(e) for e in self._endpoints.values()), self.name, self._revision)

    async def watch(self, sink: Sink) -> None:
        backoff = Backoff()
        while True:
            try:
                client = await self._connected()
                # From the last revision applied, inclusive: applying an event twice is harmless.
                stream = await client.watch_prefix(self.prefix.encode(), start_revision=self._revision)
                if self._errors.pop(_CONNECTION, None) is not None:
                    sink.report_errors(self._errors)
                backoff.reset()
                async for event in stream:
                    self._on_event(event, sink)
                    await self._advance(event.kv.mod_revision)
            except aetcd.exceptions.RevisionCompactedError as e:
                log.warning("etcd compacted revision %d away (%s); reading everything again", self._revision, e)
                return
            except SourceError as e:
                self._errors[_CONNECTION] = e.message
                sink.report_errors(self._errors)
            except Exception as e:  # noqa: BLE001 (the stream broke: reconnect and resume)
                await self._drop(e)
                self._errors[_CONNECTION] = (
                    f"watch interrupted: {error_reason(e)}; resuming from revision {self._revision}")
                sink.report_errors(self._errors)
            await backoff.wait()

    async def register(self, service: str, endpoint: proxy_pb2.Endpoint, ttl: float | None) -> None:
        if endpoint.address in self._endpoints.get(service, {}):
            raise defined_by_source(service, endpoint.address)
        current = self._registrations.get(service, {}).get(endpoint.address)
        if current is not None and current.identity != endpoint.identity:
            raise not_the_owner(service, endpoint.address, current.identity, endpoint.identity)
        key = self._registration_key(service, endpoint.address).encode()
        try:
            client = await self._connected()
            lease = await client.lease(max(1, math.ceil(ttl))) if ttl else None
            result = await client.put(key, endpoint_json(endpoint).encode(), lease=lease)
        except SourceError as e:
            raise RegistrationError("UNAVAILABLE", e.message) from None
        except aetcd.exceptions.ClientError as e:
            await self._drop(e)
            raise RegistrationError("UNAVAILABLE", f"etcd refused the registration: {error_reason(e)}") from None
        await self._wait_applied(result.header.revision)

    async def deregister(self, service: str, address: str, owner: str) -> None:
        current = self._registrations.get(service, {}).get(address)
        if current is None:
            if address in self._endpoints.get(service, {}):
                raise defined_by_source(service, address)
            raise RegistrationError("NOT_FOUND", f"no endpoint {address} is registered for service {service!r}")
        if current.identity != owner:
            raise not_the_owner(service, address, current.identity, owner)
        key = self._registration_key(service, address).encode()
        try:
            client = await self._connected()
            result = await client.delete(key)
        except SourceError as e:
            raise RegistrationError("UNAVAILABLE", e.message) from None
        except aetcd.exceptions.ClientError as e:
            await self._drop(e)
            raise RegistrationError("UNAVAILABLE", f"etcd refused the deregistration: {error_reason(e)}") from None
        if result is None:
            raise RegistrationError("NOT_FOUND", f"no endpoint {address} is registered for service {service!r}")
        await self._wait_applied(result.header.revision)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await asyncio.wait_for(client.close(), self.timeout)
            except Exception as e:  # noqa: BLE001 (closing: nothing left to do)
                log.debug("closing the etcd client: %s", e)

    # -- the connection -------------------------------------------------------------------

    async def _connected(self) -> aetcd.Client:
        """The current client, or one connected to the first endpoint that answers."""
        if self._client is not None:
            return self._client
        reasons = []
        for _ in range(len(self.endpoints)):
            host, port = self.endpoints[self._next]
            self._next = (self._next + 1) % len(self.endpoints)
            client = aetcd.Client(host=host, port=port, timeout=self.timeout, options=_CHANNEL_OPTIONS)
            try:
                await asyncio.wait_for(client.status(), self.timeout)
            except Exception as e:  # noqa: BLE001 (try the next endpoint)
                reasons.append(f"{host}:{port}: {error_reason(e)}")
                await _close_quietly(client)
                continue
            self._client = client
            log.info("connected to etcd at %s:%d", host, port)
            return client
        raise SourceError(_CONNECTION, "cannot reach etcd (" + "; ".join(reasons) + ")")

    async def _drop(self, error: BaseException) -> None:
        client, self._client = self._client, None
        if client is not None:
            log.warning("etcd connection lost: %s", error_reason(error))
            await _close_quietly(client)

    async def _advance(self, revision: int) -> None:
        async with self._applied:
            if revision > self._revision:
                self._revision = revision
                self._applied.notify_all()

    async def _wait_applied(self, revision: int) -> None:
        """Waits until this replica's watch has applied ``revision`` (read your writes)."""
        async with self._applied:
            try:
                await asyncio.wait_for(self._applied.wait_for(lambda: self._revision >= revision), APPLY_WAIT)
            except TimeoutError:
                log.warning("revision %d not seen through the watch within %.0f s", revision, APPLY_WAIT)

    # -- keys and values ------------------------------------------------------------------

    def _registration_key(self, service: str, address: str) -> str:
        return f"{self.prefix}registrations/{service}/{address}"

    def _served(self, service: str, address: str) -> proxy_pb2.Endpoint | None:
        """What (service, address) is: the operator's endpoint, else a registration."""
        endpoint = self._endpoints.get(service, {}).get(address)
        return endpoint if endpoint is not None else self._registrations.get(service, {}).get(address)

    def _parse_key(self, key: str) -> tuple[str, str, str] | None:
        """``/pymesh/services/web`` → ("services", "web", ""); ``/pymesh/endpoints/web/1.2.3.4:80``
        → ("endpoints", "web", "1.2.3.4:80"); ``/pymesh/authorization`` → ("authorization", "", "");
        anything else → None."""
        rest = key[len(self.prefix):] if key.startswith(self.prefix) else None
        if rest is None:
            return None
        if rest == "authorization":
            return rest, "", ""
        kind, _, tail = rest.partition("/")
        if kind == "services" and tail and "/" not in tail:
            return kind, tail, ""
        if kind in ("endpoints", "registrations"):
            service, _, address = tail.partition("/")
            if service and address:
                return kind, service, address
        return None

    def _load(self, items: list[tuple[str, bytes]]) -> None:
        """The whole prefix: services validated one by one, then merged (a conflicting one
        is left out and reported); endpoints validated per service."""
        self._services, self._settings, self._endpoints, self._authorization = {}, {}, {}, None
        self._registrations = {}
        self._errors = {k: v for k, v in self._errors.items() if k == _CONNECTION}
        candidates: dict[str, tuple[str, proxy_pb2.Service, dict[str, Any]]] = {}
        endpoint_values: dict[str, dict[str, dict[str, tuple[str, Any]]]] = {"endpoints": {}, "registrations": {}}
        for key, value in items:
            parsed = self._parse_key(key)
            if parsed is None:
                continue
            kind, service, address = parsed
            try:
                document = _json(value)
                if kind == "services":
                    checked, settings = self._check_service(service, document)
                    candidates[service] = (key, checked, settings)
                elif kind == "authorization":
                    self._authorization = check_authorization(document, "")
                else:
                    endpoint_values[kind].setdefault(service, {})[address] = (key,
                                                                              self._check_address(address, document))
            except pymesh.ConfigError as e:
                self._errors[key] = str(e)
        self._drop_virtual_ip_conflicts(candidates)
        for _ in range(len(candidates) + 1):
            names = sorted(candidates)
            try:
                validate_merged([candidates[n][2] for n in names])
                break
            except pymesh.ConfigError as e:
                index = service_index(e.path)
                if index is None or index >= len(names):
                    raise
                key = candidates.pop(names[index])[0]
                self._errors[key] = f"{strip_path(e.path, f'services[{index}]')}: {e.message}"
        for name, (_, service, settings) in candidates.items():
            self._services[name] = service
            self._settings[name] = settings
        self._published = {}
        self._republish()
        for kind, table in (("endpoints", self._endpoints), ("registrations", self._registrations)):
            for service, values in endpoint_values[kind].items():
                for address, (key, document) in values.items():
                    try:
                        table.setdefault(service, {})[address] = validate_endpoint(service, document)
                    except pymesh.ConfigError as e:
                        self._errors[key] = str(e)

    def _on_event(self, event: aetcd.rtypes.Event, sink: Sink) -> None:
        key = event.kv.key.decode()
        parsed = self._parse_key(key)
        if parsed is None:
            return
        kind, service, address = parsed
        had_error = self._errors.pop(key, None) is not None
        delta = Delta()
        table = self._endpoints if kind == "endpoints" else self._registrations
        before = self._served(service, address) if kind in ("endpoints", "registrations") else None
        if event.kind == "DELETE":
            if kind == "services":
                if self._services.pop(service, None) is not None:
                    self._settings.pop(service, None)
                    delta.services.update(self._republish())
            elif kind == "authorization":
                if self._authorization is not None:
                    self._authorization = delta.authorization = None
            else:
                table.get(service, {}).pop(address, None)
        else:
            try:
                document = _json(event.kv.value)
                if kind == "services":
                    checked, settings = self._check_service(service, document)
                    self._check_virtual_ip(service, checked)
                    self._check_merged(service, settings)
                    self._services[service] = checked
                    self._settings[service] = settings
                    delta.services.update(self._republish())
                elif kind == "authorization":
                    self._authorization = delta.authorization = check_authorization(document, "")
                else:
                    endpoint = validate_endpoint(service, self._check_address(address, document))
                    table.setdefault(service, {})[address] = endpoint
            except pymesh.ConfigError as e:
                self._errors[key] = str(e)
                had_error = True
        if kind in ("endpoints", "registrations") and (after := self._served(service, address)) != before:
            delta.endpoints[service] = {address: after}
        if delta:
            sink.apply(delta)
        if had_error:
            sink.report_errors(self._errors)

    def _check_service(self, name: str, document: Any) -> tuple[proxy_pb2.Service, dict[str, Any]]:
        if not isinstance(document, dict):
            raise pymesh.ConfigError("", f"expected a Service object, found {type(document).__name__}")
        if document.get("endpoints"):
            raise pymesh.ConfigError("endpoints", f"endpoints belong under {self.prefix}endpoints/{name}/<address>")
        given = document.get("name", name)
        if given != name:
            raise pymesh.ConfigError("name", f"{given!r} differs from the key's name {name!r}")
        try:
            services, normalised = check_services([{**document, "name": name}])
        except pymesh.ConfigError as e:
            raise pymesh.ConfigError(strip_path(e.path, "services[0]"), e.message) from None
        if services[0].virtual_ip:
            services[0].virtual_ip = check_address(services[0].virtual_ip)
        return services[0], normalised[0]

    def _check_virtual_ip(self, name: str, service: proxy_pb2.Service) -> None:
        """A changed service's virtual IP is no other service's, and the range has room for it.
        Raises :class:`pymesh.ConfigError` at ``virtualIp``."""
        explicit = {n: s.virtual_ip for n, s in self._services.items() if n != name}
        if service.virtual_ip:
            other = next((n for n, address in sorted(explicit.items()) if address == service.virtual_ip), None)
            if other is not None:
                raise pymesh.ConfigError(FIELD, duplicate_message(service.virtual_ip, other,
                                                                   f"{self.prefix}services/{other}"))
        if self._virtual_ips.left_out({**explicit, name: service.virtual_ip}):
            raise pymesh.ConfigError(FIELD, f"no virtual IP is left in {self._virtual_ips.network} for this "
                                            "service; make virtualIpRange larger")

    def _drop_virtual_ip_conflicts(self, candidates: dict[str, tuple[str, proxy_pb2.Service, dict[str, Any]]]) -> None:
        """On a full read: of two services with the same virtual IP the one whose name sorts
        first is kept, and services the range has no room for are left out; each one left
        out is reported at its key."""
        owners: dict[str, str] = {}
        for name in sorted(candidates):
            key, service, _ = candidates[name]
            if not service.virtual_ip:
                continue
            other = owners.setdefault(service.virtual_ip, name)
            if other != name:
                del candidates[name]
                where = f"{self.prefix}services/{other}"
                self._errors[key] = f"{FIELD}: {duplicate_message(service.virtual_ip, other, where)}"
        for name in self._virtual_ips.left_out({n: c[1].virtual_ip for n, c in candidates.items()}):
            key = candidates.pop(name)[0]
            self._errors[key] = (f"{FIELD}: no virtual IP is left in {self._virtual_ips.network} for this "
                                 "service; make virtualIpRange larger")

    def _republish(self) -> dict[str, proxy_pb2.Service | None]:
        """Gives every service its virtual IP; returns the served services that changed (None:
        removed). One service's change may move another's hashed address (a collision)."""
        assigned, _ = self._virtual_ips.assign({n: s.virtual_ip for n, s in self._services.items()})
        changes: dict[str, proxy_pb2.Service | None] = {n: None for n in self._published.keys()
                                                         - self._services.keys()}
        for name, service in self._services.items():
            published = with_virtual_ip(service, assigned.get(name, ""))
            if self._published.get(name) != published:
                changes[name] = published
        for name, published in changes.items():
            if published is None:
                del self._published[name]
            else:
                self._published[name] = published
        return changes

    def _check_merged(self, name: str, settings: dict[str, Any]) -> None:
        """The engine's verdict on every service together with this one (authorities unique)."""
        others = [s for n, s in sorted(self._settings.items()) if n != name]
        try:
            validate_merged([*others, settings])
        except pymesh.ConfigError as e:
            index = service_index(e.path)
            if index is not None and index < len(others):
                raise pymesh.ConfigError("", f"conflicts with service {others[index].get('name')!r}: "
                                             f"{e.message}") from None
            raise pymesh.ConfigError(strip_path(e.path, f"services[{len(others)}]"), e.message) from None

    @staticmethod
    def _check_address(address: str, document: Any) -> Any:
        if document is None or document == "":
            return {"address": address}
        if not isinstance(document, dict):
            raise pymesh.ConfigError("", f"expected an Endpoint object, found {type(document).__name__}")
        given = document.get("address", address)
        if given != address:
            raise pymesh.ConfigError("address", f"{given!r} differs from the key's address {address!r}")
        return {**document, "address": address}


def _json(value: bytes) -> Any:
    if not value.strip():
        return None
    try:
        return json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise pymesh.ConfigError("", f"malformed JSON: {e}") from None








async def _close_quietly(client: aetcd.Client) -> None:
    try:
        await asyncio.wait_for(client.close(), 2)
    except Exception as e:  # noqa: BLE001 (closing a broken client)
        log.debug("closing an etcd client: %s", e)
