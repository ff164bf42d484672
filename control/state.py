"""The mesh state: services with their settings, the endpoints of each service, the
mesh-wide authorization, their versions, the source's health, and the change notification
every watcher subscribes to.

Everything here runs on the event loop's thread and never awaits, so a change and the
notifications it causes are one atomic step.

Versions are content hashes (an XOR of 64-bit BLAKE2b digests of the items), so they are
cheap to update item by item, and replicas that see the same source compute the same
versions: a proxy that moves to another replica sees no spurious change.

Per watcher, pending updates are kept in a bounded queue. A watcher that falls more than
``max_pending`` updates behind is switched to "resync": its queue is dropped and it is sent
a fresh full state when it next writes, so a slow watcher costs memory bounded by the limit
and never blocks the others.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pymesh._proto.pymesh.config.v1 import proxy_pb2
from pymesh._proto.pymesh.mesh.v1 import discovery_pb2

from .metrics import ControlMetrics
from .policy import applicable_policies, describe

log = logging.getLogger("pymesh.control")

Service = proxy_pb2.Service
Endpoint = proxy_pb2.Endpoint
Authorization = proxy_pb2.Authorization


class Keep(enum.Enum):
    """In a :class:`Delta`, the authorization is left as it is (``None`` removes it)."""

    KEEP = "keep"


KEEP = Keep.KEEP

#: Updates a watcher may have queued before it is resynchronised with a full state.
DEFAULT_MAX_PENDING = 64
#: per-identity configs kept (all dropped beyond, and rebuilt as asked)
MAX_IDENTITY_PAYLOADS = 10_000


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _service_digest(service: Service) -> int:
    return _digest(service.SerializeToString(deterministic=True))


def _endpoint_digest(endpoint: Endpoint) -> int:
    return _digest(endpoint.SerializeToString(deterministic=True))


def _authorization_digest(authorization: Authorization | None) -> int:
    """0 when there is none; a prefix keeps it apart from any service's digest, and an empty
    authorization (which allows everyone) apart from none (the proxy keeps its own)."""
    if authorization is None:
        return 0
    return _digest(b"authorization\0" + authorization.SerializeToString(deterministic=True))


def _version(value: int) -> str:
    return f"{value:016x}"


@dataclass
class Snapshot:
    """A whole state as a source sees it. ``services`` carry no endpoints; endpoints are
    keyed by service, then by address (a service may have endpoints before it is defined).
    ``authorization`` is the mesh-wide policy, or None: proxies then keep their own."""

    services: dict[str, Service] = field(default_factory=dict)
    endpoints: dict[str, dict[str, Endpoint]] = field(default_factory=dict)
    authorization: Authorization | None = None


@dataclass
class Delta:
    """Changes to apply: ``None`` removes a service, an endpoint or the authorization;
    ``KEEP`` leaves the authorization as it is."""

    services: dict[str, Service | None] = field(default_factory=dict)
    endpoints: dict[str, dict[str, Endpoint | None]] = field(default_factory=dict)
    authorization: Authorization | None | Keep = KEEP

    def __bool__(self) -> bool:
        return bool(self.services or self.endpoints) or self.authorization is not KEEP


class ConfigWatch:
    """One WatchConfig stream: wakes up when the config changes; always sends the latest."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.sent_version = ""
        #: monotonic time of the oldest change not yet sent (for the push latency)
        self.since: float | None = None

    def notify(self, when: float) -> None:
        if self.since is None:
            self.since = when
        self.event.set()


class EndpointsWatch:
    """One WatchEndpoints stream: a bounded queue of serialized incremental updates, or a
    flag saying the next message must be the full set."""

    def __init__(self, service: str, max_pending: int) -> None:
        self.service = service
        self.max_pending = max_pending
        self.pending: deque[tuple[bytes, float]] = deque()
        self.needs_full = True
        self.full_since: float | None = time.monotonic()
        self.event = asyncio.Event()
        self.event.set()
        self.resyncs = 0

    def push(self, payload: bytes, when: float) -> bool:
        """Queues an update; returns False if the watcher fell behind and will resync."""
        if self.needs_full:
            return True  # the full state sent next covers this change
        if len(self.pending) >= self.max_pending:
            self.full_since = self.pending[0][1]
            self.pending.clear()
            self.needs_full = True
            self.resyncs += 1
            self.event.set()
            return False
        self.pending.append((payload, when))
        self.event.set()
        return True


class MeshState:
    """The one place that holds the mesh's state and that watchers subscribe to.

    Sources write through :meth:`replace` (a whole snapshot, diffed here), :meth:`apply`
    (a delta) and :meth:`report_errors`; the Discovery server reads and subscribes.
    """

    def __init__(self, source_name: str, metrics: ControlMetrics, *,
                 max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.source_name = source_name
        self.metrics = metrics
        self.max_pending = max_pending
        self.services: dict[str, Service] = {}
        self.endpoints: dict[str, dict[str, Endpoint]] = {}
        self.authorization: Authorization | None = None
        self.loaded = asyncio.Event()
        self.source_errors: dict[str, str] = {}
        self._service_digests: dict[str, int] = {}
        self._authorization_digest = 0
        self._config_digest = 0
        self._endpoint_digests: dict[str, int] = {}
        self._config_payload: bytes | None = None
        #: per proxy identity, the config with only the policies that apply to it
        self._identity_payloads: dict[str, bytes] = {}
        self._full_payloads: dict[str, bytes] = {}
        self._config_watches: set[ConfigWatch] = set()
        self._endpoint_watches: dict[str, set[EndpointsWatch]] = {}
        self._endpoint_count = 0

    # -- reading --------------------------------------------------------------------------

    @property
    def config_version(self) -> str:
        return _version(self._config_digest)

    def endpoints_version(self, service: str) -> str:
        return _version(self._endpoint_digests.get(service, 0))

    @property
    def healthy(self) -> bool:
        return not self.source_errors

    @property
    def source_error(self) -> str:
        """Every current source error, one per line, sorted by where it is."""
        return "\n".join(f"{where}: {message}" if where else message
                         for where, message in sorted(self.source_errors.items()))

    def config_payload(self) -> bytes:
        """The serialized ``ConfigUpdate`` for the current state (built once per change)."""
        if self._config_payload is None:
            config = proxy_pb2.ProxyConfig()
            config.services.extend(self.services[name] for name in sorted(self.services))
            if self.authorization is not None:
                config.authorization.CopyFrom(self.authorization)
            update = discovery_pb2.ConfigUpdate(config=config, version=self.config_version)
            self._config_payload = update.SerializeToString()
        return self._config_payload

    def config_payload_for(self, identity: str | None) -> bytes:
        """The config for a proxy of ``identity`` (None: one that has none, in plaintext
        development mode: everything): the mesh-wide policies whose ``servers`` name it, not
        the others (nobody learns another workload's rules). Built once per change and
        identity; the version is the same for every proxy."""
        if identity is None or self.authorization is None:
            return self.config_payload()
        payload = self._identity_payloads.get(identity)
        if payload is None:
            if len(self._identity_payloads) >= MAX_IDENTITY_PAYLOADS:
                self._identity_payloads.clear()
            config = proxy_pb2.ProxyConfig()
            config.services.extend(self.services[name] for name in sorted(self.services))
            config.authorization.CopyFrom(applicable_policies(self.authorization, identity))
            update = discovery_pb2.ConfigUpdate(config=config, version=self.config_version)
            payload = self._identity_payloads[identity] = update.SerializeToString()
        return payload

    def full_endpoints_payload(self, service: str) -> bytes:
        """The serialized full ``EndpointsUpdate`` of a service (built once per change)."""
        payload = self._full_payloads.get(service)
        if payload is None:
            current = self.endpoints.get(service, {})
            update = discovery_pb2.EndpointsUpdate(full=True, version=self.endpoints_version(service))
            update.added.extend(current[address] for address in sorted(current))
            payload = update.SerializeToString()
            self._full_payloads[service] = payload
        return payload

    def snapshot(self) -> Snapshot:
        """A copy of the current state (services, endpoints and the authorization are shared,
        immutable by convention)."""
        return Snapshot(dict(self.services), {name: dict(eps) for name, eps in self.endpoints.items()},
                        self.authorization)

    # -- subscribing ----------------------------------------------------------------------

    def subscribe_config(self) -> ConfigWatch:
        watch = ConfigWatch()
        watch.notify(time.monotonic())
        self._config_watches.add(watch)
        self.metrics.watches.labels("config").inc()
        return watch

    def unsubscribe_config(self, watch: ConfigWatch) -> None:
        if watch in self._config_watches:
            self._config_watches.discard(watch)
            self.metrics.watches.labels("config").dec()

    def take_config(self, watch: ConfigWatch, identity: str | None = None) -> tuple[bytes, float] | None:
        """The config to send to ``watch`` (a proxy of ``identity``) if it has not got the
        current one yet."""
        since, watch.since = watch.since, None
        if watch.sent_version == self.config_version:
            return None
        watch.sent_version = self.config_version
        return self.config_payload_for(identity), since if since is not None else time.monotonic()

    def subscribe_endpoints(self, service: str) -> EndpointsWatch:
        watch = EndpointsWatch(service, self.max_pending)
        self._endpoint_watches.setdefault(service, set()).add(watch)
        self.metrics.watches.labels("endpoints").inc()
        return watch

    def unsubscribe_endpoints(self, watch: EndpointsWatch) -> None:
        watches = self._endpoint_watches.get(watch.service)
        if watches is not None and watch in watches:
            watches.discard(watch)
            if not watches:
                del self._endpoint_watches[watch.service]
            self.metrics.watches.labels("endpoints").dec()

    def take_endpoints(self, watch: EndpointsWatch) -> tuple[bytes, float, bool] | None:
        """The next message for ``watch``: (payload, oldest change time, full?), or None."""
        if watch.needs_full:
            watch.needs_full = False
            watch.pending.clear()
            since = watch.full_since if watch.full_since is not None else time.monotonic()
            watch.full_since = None
            return self.full_endpoints_payload(watch.service), since, True
        if watch.pending:
            payload, since = watch.pending.popleft()
            return payload, since, False
        return None

    # -- writing (sources) ----------------------------------------------------------------

    def mark_loaded(self) -> None:
        if not self.loaded.is_set():
            self.loaded.set()
            self.metrics.ready.set(1)

    def replace(self, snapshot: Snapshot) -> bool:
        """Makes the state equal to ``snapshot``, notifying only what changed."""
        delta = Delta()
        if snapshot.authorization != self.authorization:
            delta.authorization = snapshot.authorization
        for name in self.services.keys() - snapshot.services.keys():
            delta.services[name] = None
        for name, service in snapshot.services.items():
            if self.services.get(name) != service:
                delta.services[name] = service
        for name in self.endpoints.keys() | snapshot.endpoints.keys():
            old = self.endpoints.get(name, {})
            new = snapshot.endpoints.get(name, {})
            if old == new:
                continue
            changes: dict[str, Endpoint | None] = {a: None for a in old.keys() - new.keys()}
            changes.update((a, e) for a, e in new.items() if old.get(a) != e)
            delta.endpoints[name] = changes
        return self.apply(delta)

    def apply(self, delta: Delta) -> bool:
        """Applies a delta; returns whether anything changed. Watchers are notified once."""
        now = time.monotonic()
        config_changed = self._apply_services(delta.services)
        if delta.authorization is not KEEP and self._apply_authorization(delta.authorization):
            config_changed = True
        endpoints_changed = False
        for service, changes in delta.endpoints.items():
            if self._apply_endpoints(service, changes, now):
                endpoints_changed = True
        if config_changed:
            self._config_payload = None
            self._identity_payloads.clear()
            for watch in self._config_watches:
                watch.notify(now)
        if config_changed or endpoints_changed:
            self.metrics.services.set(len(self.services))
            self.metrics.endpoints.set(self._endpoint_count)
        return config_changed or endpoints_changed

    def _apply_services(self, changes: Mapping[str, Service | None]) -> bool:
        changed = False
        for name, service in changes.items():
            old_digest = self._service_digests.get(name)
            if service is None:
                if old_digest is None:
                    continue
                del self.services[name]
                del self._service_digests[name]
                self._config_digest ^= old_digest
                changed = True
                continue
            if service.endpoints:
                service = _without_endpoints(service)
            if service.name != name:
                service = _renamed(service, name)
            digest = _service_digest(service)
            if digest == old_digest:
                continue
            if old_digest is not None:
                self._config_digest ^= old_digest
            self._config_digest ^= digest
            self._service_digests[name] = digest
            self.services[name] = service
            changed = True
        return changed

    def _apply_authorization(self, authorization: Authorization | None) -> bool:
        digest = _authorization_digest(authorization)
        if digest == self._authorization_digest:
            return False
        self._config_digest ^= self._authorization_digest ^ digest
        self._authorization_digest = digest
        self.authorization = authorization
        log.info("authorization from %s: %s", self.source_name, describe(authorization))
        return True

    def _apply_endpoints(self, service: str, changes: Mapping[str, Endpoint | None], now: float) -> bool:
        current = self.endpoints.get(service)
        digest = self._endpoint_digests.get(service, 0)
        added: list[Endpoint] = []
        removed: list[str] = []
        for address, endpoint in changes.items():
            old = current.get(address) if current is not None else None
            if endpoint is None:
                if old is None:
                    continue
                del current[address]  # type: ignore[index]
                digest ^= _endpoint_digest(old)
                removed.append(address)
                self._endpoint_count -= 1
                continue
            if endpoint.address != address:
                endpoint = Endpoint(address=address, weight=endpoint.weight, identity=endpoint.identity)
            if old == endpoint:
                continue
            if current is None:
                current = self.endpoints[service] = {}
            if old is not None:
                digest ^= _endpoint_digest(old)
            else:
                self._endpoint_count += 1
            digest ^= _endpoint_digest(endpoint)
            current[address] = endpoint
            added.append(endpoint)
        if not added and not removed:
            return False
        if current is not None and not current:
            del self.endpoints[service]
        if digest:
            self._endpoint_digests[service] = digest
        else:
            self._endpoint_digests.pop(service, None)
        self._full_payloads.pop(service, None)
        watches = self._endpoint_watches.get(service)
        if watches:
            update = discovery_pb2.EndpointsUpdate(full=False, version=_version(digest))
            update.added.extend(sorted(added, key=lambda e: e.address))
            update.removed.extend(sorted(removed))
            payload = update.SerializeToString()
            for watch in watches:
                if not watch.push(payload, now):
                    self.metrics.resyncs.inc()
        return True

    def report_errors(self, errors: Mapping[str, str]) -> None:
        """Sets the source's current errors (``where`` → message; empty when healthy). Each new
        error is logged as one line and counted; a cleared one is logged too."""
        errors = dict(errors)
        for where, message in sorted(errors.items()):
            if self.source_errors.get(where) != message:
                self.metrics.source_errors.inc()
                log.error("source error: %s: %s%s", self.source_name, f"{where}: " if where else "", message)
        for where in sorted(self.source_errors.keys() - errors.keys()):
            log.info("source error cleared: %s: %s", self.source_name, where or "source")
        self.source_errors = errors
        self.metrics.source_healthy.set(0 if errors else 1)


def _without_endpoints(service: Service) -> Service:
    copy = Service()
    copy.CopyFrom(service)
    del copy.endpoints[:]
    return copy


def _renamed(service: Service, name: str) -> Service:
    copy = Service()
    copy.CopyFrom(service)
    copy.name = name
    return copy


def split_endpoints(services: Iterable[Service]) -> Snapshot:
    """A snapshot from services that carry their endpoints (as a file defines them)."""
    snapshot = Snapshot()
    for service in services:
        if service.endpoints:
            snapshot.endpoints[service.name] = {e.address: e for e in service.endpoints}
            service = _without_endpoints(service)
        snapshot.services[service.name] = service
    return snapshot
