"""The one interface every source of truth implements, and the engine-backed validation
they share.

A source loads the whole state into a :class:`Sink` (the mesh state), then watches for
changes and writes them there, reporting its errors as it goes. A source with dynamic
registration (``Register``/``Deregister``) stores them where its replicas share them (etcd),
or in this process (the file source).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Protocol

from google.protobuf import json_format

import pymesh
from pymesh._proto.pymesh.config.v1 import proxy_pb2

from ..state import Delta, Snapshot

#: The listeners the engine needs to judge a config that is only services.
_VALIDATION_LISTENERS = [{"address": "127.0.0.1:0"}]


class SourceError(pymesh.MeshError):
    """The source cannot be read at all (the directory is gone, etcd is unreachable).
    ``where`` names the part at fault (a file, a key, or the connection)."""

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)


class RegistrationError(pymesh.MeshError):
    """A Register/Deregister call was refused; ``code`` is the gRPC status name to answer with
    (``INVALID_ARGUMENT``, ``NOT_FOUND``, ``FAILED_PRECONDITION``, ``UNAVAILABLE``)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


class Sink(Protocol):
    """Where a source writes: :class:`pymesh.control.state.MeshState`."""

    def replace(self, snapshot: Snapshot) -> bool: ...

    def apply(self, delta: Delta) -> bool: ...

    def report_errors(self, errors: Mapping[str, str]) -> None: ...


class Source(ABC):
    """A source of truth for services and endpoints."""

    #: How the source is named in Status and logs: ``file:<dir>``, ``etcd:<endpoints>``.
    name: str

    @abstractmethod
    async def load(self, sink: Sink) -> None:
        """Reads the whole state into ``sink`` (``replace``) and reports the errors found.
        Raises :class:`SourceError` if the source cannot be read at all."""

    @abstractmethod
    async def watch(self, sink: Sink) -> None:
        """Writes every later change to ``sink`` until cancelled, reporting errors as they come
        and go. Returns (or raises :class:`SourceError`) when a fresh :meth:`load` is needed."""

    @abstractmethod
    async def register(self, service: str, endpoint: proxy_pb2.Endpoint, ttl: float | None) -> None:
        """Adds (or refreshes) an endpoint registered by ``endpoint.identity`` (its owner); with
        a ``ttl`` in seconds it expires unless registered again. Never overrides an endpoint the
        source itself defines, nor another owner's registration. Raises
        :class:`RegistrationError`."""

    @abstractmethod
    async def deregister(self, service: str, address: str, owner: str) -> None:
        """Removes an endpoint ``owner`` registered (never one the source defines). Raises
        :class:`RegistrationError`."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Releases connections; the default has none."""


def validate_services(services: list[Any]) -> list[proxy_pb2.Service]:
    """Checks services (protobuf JSON mapping) with the engine, the one judge of a valid
    config, and returns them as messages. Raises :class:`pymesh.ConfigError` whose path
    starts at ``services[i]``."""
    return check_services(services)[0]


def check_services(services: list[Any]) -> tuple[list[proxy_pb2.Service], list[dict[str, Any]]]:
    """Like :func:`validate_services`, also returning the engine's normalised JSON mapping."""
    normalised = pymesh.validate({"listeners": _VALIDATION_LISTENERS, "services": services})
    checked = normalised.get("services", [])
    return [json_format.ParseDict(s, proxy_pb2.Service()) for s in checked], checked


def validate_merged(services: list[Any]) -> None:
    """The engine's verdict on services taken together (names and authorities unique).
    Raises :class:`pymesh.ConfigError` whose path starts at ``services[i]``."""
    pymesh.validate({"listeners": _VALIDATION_LISTENERS, "services": services})


def validate_endpoint(service: str, endpoint: Any) -> proxy_pb2.Endpoint:
    """Checks one endpoint of ``service`` with the engine. Raises :class:`pymesh.ConfigError`
    whose path is relative to the endpoint (``address``)."""
    try:
        checked = validate_services([{"name": service, "endpoints": [endpoint]}])
    except pymesh.ConfigError as e:
        raise pymesh.ConfigError(strip_path(e.path, "services[0].endpoints[0]"), e.message) from None
    return checked[0].endpoints[0]


def strip_path(path: str, prefix: str) -> str:
    """``services[0].timeouts.connect`` less ``services[0]`` is ``timeouts.connect``."""
    if path == prefix:
        return ""
    if path.startswith(prefix + "."):
        return path[len(prefix) + 1:]
    return path


def defined_by_source(service: str, address: str) -> RegistrationError:
    return RegistrationError("FAILED_PRECONDITION", f"{address} of service {service!r} is defined by the "
                                                    "source; a registration never replaces or removes it")


def not_the_owner(service: str, address: str, owner: str, registrant: str) -> RegistrationError:
    return RegistrationError("PERMISSION_DENIED", f"{address} of service {service!r} is registered by "
                                                  f"{owner or 'a plaintext caller'}, not by "
                                                  f"{registrant or 'a plaintext caller'}")


def endpoint_json(endpoint: proxy_pb2.Endpoint) -> str:
    """An endpoint in the protobuf JSON mapping, compact."""
    return json.dumps(json_format.MessageToDict(endpoint), separators=(",", ":"))


def service_json(service: proxy_pb2.Service) -> str:
    """A service in the protobuf JSON mapping, compact."""
    return json.dumps(json_format.MessageToDict(service), separators=(",", ":"))


def service_index(path: str) -> int | None:
    """The service an engine error's field path points at: ``services[3].x`` → 3."""
    if not path.startswith("services["):
        return None
    try:
        return int(path[len("services["):path.index("]")])
    except ValueError:
        return None


def error_reason(error: BaseException) -> str:
    """The first line of an error, for one-line log and status messages."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
