"""The file source: a directory of YAML (or JSON) files, each holding ``services:``, a list of
``pymesh.config.v1.Service`` in the protobuf JSON mapping (endpoints included), and maybe
``authorization:``, the mesh-wide ``pymesh.config.v1.Authorization`` (at most one file holds
it; each policy's ``servers`` say which proxies apply it).

The directory is polled (every ``poll_interval``, 200 ms by default): a file whose mtime,
size or inode changed is read again. Each file is validated by the engine; a file that is
malformed or invalid is reported with its name and the field path, and its last good
content keeps being served. Across files, a service defined twice, an authority claimed by
two services (the engine catches that once the files are merged) or a second
``authorization:`` is a conflict: the file that changed is reported and its previous content
kept.

Every service gets a virtual IP (see :mod:`pymesh.control.virtual_ip`): its own ``virtualIp``,
else one hashed from its name in the range. A ``virtualIp`` that is not an IP address, or one
two services give (in one file or across files), is reported like any other bad input, and so
is a range with no address left for a file's new services.

Endpoints registered through the Discovery API live in this process only (they are not
written to the files) and are lost on restart; use the etcd source to share them. A file's
endpoint always wins over a registration of the same address, and cannot be deregistered.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import pymesh
from pymesh._proto.pymesh.config.v1 import proxy_pb2

from ..policy import check_authorization
from ..state import Delta, Snapshot, split_endpoints
from ..virtual_ip import (
    DEFAULT_RANGE,
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
    not_the_owner,
    validate_merged,
)

log = logging.getLogger("pymesh.control.file")

_SUFFIXES = (".yaml", ".yml", ".json")
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Bounds: a directory bigger than this is refused rather than read forever.
MAX_FILES = 100_000
MAX_FILE_BYTES = 64 * 1024 * 1024


@dataclass
class _Content:
    """What one file defines, validated."""

    #: services with their endpoints
    services: list[proxy_pb2.Service] = field(default_factory=list)
    #: the same, as the engine normalised them, without endpoints (for merged validation)
    normalised: list[dict[str, Any]] = field(default_factory=list)
    authorization: proxy_pb2.Authorization | None = None


@dataclass
class _File:
    """One file's latest reading, and what of it is being served."""

    key: tuple[int, int, int]
    #: the latest content that parsed and validated
    parsed: _Content | None = None
    #: the content in the state being served
    accepted: _Content | None = None
    error: str | None = None


class FileSource(Source):
    """A directory of YAML files, polled for changes."""

    def __init__(self, directory: Path, *, poll_interval: float = 0.2,
                 virtual_ip_range: IpNetwork | None = None) -> None:
        self.directory = directory
        self._virtual_ips = Allocator(virtual_ip_range or parse_range(DEFAULT_RANGE))
        self.name = f"file:{directory}"
        self.poll_interval = poll_interval
        self._files: dict[str, _File] = {}
        self._conflicts: dict[str, str] = {}
        self._dir_error: str | None = None
        self._file_snapshot = Snapshot()
        self._registered: dict[str, dict[str, proxy_pb2.Endpoint]] = {}
        self._expiry: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._sink: Sink | None = None

    # -- Source ---------------------------------------------------------------------------

    async def load(self, sink: Sink) -> None:
        if not self.directory.is_dir():
            raise SourceError("", f"{self.directory} is not a directory")
        await asyncio.to_thread(self._scan, force=True)
        sink.replace(self._compose())
        sink.report_errors(self.errors())

    async def watch(self, sink: Sink) -> None:
        self._sink = sink
        try:
            while True:
                await asyncio.sleep(self.poll_interval)
                if await asyncio.to_thread(self._scan):
                    sink.replace(self._compose())
                    sink.report_errors(self.errors())
        finally:
            self._sink = None

    async def register(self, service: str, endpoint: proxy_pb2.Endpoint, ttl: float | None) -> None:
        if endpoint.address in self._file_snapshot.endpoints.get(service, {}):
            raise defined_by_source(service, endpoint.address)
        current = self._registered.get(service, {}).get(endpoint.address)
        if current is not None and current.identity != endpoint.identity:
            raise not_the_owner(service, endpoint.address, current.identity, endpoint.identity)
        self._registered.setdefault(service, {})[endpoint.address] = endpoint
        key = (service, endpoint.address)
        old = self._expiry.pop(key, None)
        if old is not None:
            old.cancel()
        if ttl:
            loop = asyncio.get_running_loop()
            self._expiry[key] = loop.call_later(ttl, self._expire, service, endpoint.address)
        self._publish_endpoint(service, endpoint.address)

    async def deregister(self, service: str, address: str, owner: str) -> None:
        current = self._registered.get(service, {}).get(address)
        if current is None:
            if address in self._file_snapshot.endpoints.get(service, {}):
                raise defined_by_source(service, address)
            raise RegistrationError("NOT_FOUND", f"no endpoint {address} is registered for service {service!r}")
        if current.identity != owner:
            raise not_the_owner(service, address, current.identity, owner)
        self._unregister(service, address)

    async def close(self) -> None:
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()

    def errors(self) -> dict[str, str]:
        """Current errors: file name → what is wrong (the directory itself under "")."""
        errors = {name: f.error for name, f in self._files.items() if f.error}
        errors.update(self._conflicts)
        if self._dir_error:
            errors[""] = self._dir_error
        return errors

    # -- registrations --------------------------------------------------------------------

    def _expire(self, service: str, address: str) -> None:
        self._expiry.pop((service, address), None)
        log.info("registration expired: %s %s", service, address)
        self._unregister(service, address)

    def _unregister(self, service: str, address: str) -> None:
        registered = self._registered.get(service, {})
        registered.pop(address, None)
        if not registered:
            self._registered.pop(service, None)
        handle = self._expiry.pop((service, address), None)
        if handle is not None:
            handle.cancel()
        self._publish_endpoint(service, address)

    def _publish_endpoint(self, service: str, address: str) -> None:
        """Tells the sink what (service, address) is now: registered, from a file, or gone."""
        if self._sink is None:
            return
        endpoint = self._file_snapshot.endpoints.get(service, {}).get(address)
        if endpoint is None:  # what the files define always wins
            endpoint = self._registered.get(service, {}).get(address)
        self._sink.apply(Delta(endpoints={service: {address: endpoint}}))

    def _compose(self) -> Snapshot:
        """The files' state with the registrations beside it (a file's endpoint wins)."""
        files = self._file_snapshot
        if not self._registered:
            return files
        endpoints = dict(files.endpoints)
        for service, registered in self._registered.items():
            endpoints[service] = {**registered, **files.endpoints.get(service, {})}
        return Snapshot(files.services, endpoints, files.authorization)

    # -- reading files (on a worker thread) -----------------------------------------------

    def _scan(self, force: bool = False) -> bool:
        """Reads what changed; returns whether the served state or the errors may have."""
        try:
            listing = self._list()
        except OSError as e:
            message = f"cannot read the directory {self.directory}: {e.strerror or e}"
            changed = message != self._dir_error
            self._dir_error = message
            return changed
        changed = self._dir_error is not None or force
        self._dir_error = None
        for name in list(self._files):
            if name not in listing:
                del self._files[name]
                changed = True
        for name, key in listing.items():
            current = self._files.get(name)
            if current is not None and current.key == key:
                continue
            self._read(name, key, current)
            changed = True
        if changed:
            self._merge()
        return changed

    def _list(self) -> dict[str, tuple[int, int, int]]:
        listing: dict[str, tuple[int, int, int]] = {}
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.name.endswith(_SUFFIXES):
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                if not entry.is_file():
                    continue
                listing[entry.name] = (st.st_mtime_ns, st.st_size, st.st_ino)
                if len(listing) > MAX_FILES:
                    raise OSError(f"more than {MAX_FILES} files")
        return listing

    def _read(self, name: str, key: tuple[int, int, int], previous: _File | None) -> None:
        entry = previous if previous is not None else _File(key)
        entry.key = key
        self._files[name] = entry
        try:
            services, authorization = self._parse(self.directory / name)
            checked, normalised = check_services(services)
            _check_virtual_ips(checked)
            policy = check_authorization(authorization) if authorization is not None else None
        except _FileError as e:
            entry.error = str(e)
            return
        except pymesh.ConfigError as e:
            entry.error = _describe(e.path, e.message, services)
            return
        entry.parsed = _Content(checked, [_settings(s) for s in normalised], policy)
        entry.error = None

    def _parse(self, path: Path) -> tuple[list[Any], Any]:
        """The file's services (a list) and its ``authorization:`` (None when absent)."""
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise _FileError(f"the file is {size} bytes; at most {MAX_FILE_BYTES} are read")
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise _FileError(f"cannot read: {e}") from None
        try:
            document = yaml.load(text, Loader=_Loader)  # noqa: S506 (a safe loader)
        except yaml.YAMLError as e:
            raise _FileError(_yaml_error(e)) from None
        if document is None:
            return [], None
        if not isinstance(document, dict):
            raise _FileError(f"expected a mapping with `services:` or `authorization:`, found "
                             f"{type(document).__name__}")
        unknown = sorted(str(k) for k in document if k not in ("services", "authorization"))
        if unknown:
            raise _FileError(f"{unknown[0]}: unknown key; a source file holds only `services:` and `authorization:`")
        services = document.get("services")
        if services is None:
            services = []
        if not isinstance(services, list):
            raise _FileError(f"services: expected a list of services, found {type(services).__name__}")
        return services, document.get("authorization")

    def _merge(self) -> None:
        """Merges the files' latest good content; on a conflict, the file that changed keeps
        its previous content and is reported."""
        self._conflicts = {}
        candidates: dict[str, _Content] = {}
        for name, entry in sorted(self._files.items()):
            if entry.parsed is not None:
                candidates[name] = entry.parsed
        for _ in range(2 * len(candidates) + 1):
            conflict = self._find_conflict(candidates)
            if conflict is None:
                break
            blamed, message = conflict
            self._conflicts[blamed] = message
            entry = self._files[blamed]
            if entry.accepted is not None and entry.accepted is not candidates[blamed]:
                candidates[blamed] = entry.accepted
            else:
                del candidates[blamed]
        else:  # unreachable in practice: every round removes or reverts a file
            return
        for name, entry in self._files.items():
            entry.accepted = candidates.get(name)
        snapshot = split_endpoints(s for content in candidates.values() for s in content.services)
        assigned, _ = self._virtual_ips.assign({n: s.virtual_ip for n, s in snapshot.services.items()})
        snapshot.services = {n: with_virtual_ip(s, assigned.get(n, "")) for n, s in snapshot.services.items()}
        self._file_snapshot = snapshot
        self._file_snapshot.authorization = next(
            (c.authorization for c in candidates.values() if c.authorization is not None), None)

    def _find_conflict(self, candidates: dict[str, _Content]) -> tuple[str, str] | None:
        """The first conflict across files, as (file to blame, message), or None."""
        authorized = [name for name, content in candidates.items() if content.authorization is not None]
        if len(authorized) > 1:
            blamed, other = self._blame(authorized[0], authorized[1])
            return blamed, (f"authorization: already defined in {other}; at most one file of the directory "
                            "may define it")
        owners: dict[str, tuple[str, int]] = {}
        merged: list[dict[str, Any]] = []
        origin: list[tuple[str, int]] = []
        for name, content in candidates.items():
            services, normalised = content.services, content.normalised
            for index, service in enumerate(services):
                first = owners.get(service.name)
                if first is not None:
                    blamed, other = self._blame(name, first[0])
                    where = (name, index) if blamed == name else first
                    elsewhere = first if blamed == name else (name, index)
                    return blamed, (f"services[{where[1]}].name: service {service.name!r} is already defined in "
                                    f"{elsewhere[0]} (services[{elsewhere[1]}])")
                owners[service.name] = (name, index)
            merged.extend(normalised)
            origin.extend((name, i) for i in range(len(normalised)))
        if (conflict := self._virtual_ip_conflict(candidates)) is not None:
            return conflict
        try:
            validate_merged(merged)
        except pymesh.ConfigError as e:
            index, rest = _split_index(e.path)
            if index is None or index >= len(origin):
                return next(iter(candidates), ""), f"{e.path}: {e.message}"
            name, local = origin[index]
            other_service = _quoted_service(e.message)
            other = owners.get(other_service) if other_service else None
            blamed = self._blame(name, other[0])[0] if other else name
            if blamed != name and other is not None:
                return blamed, (f"services[{other[1]}]: conflicts with {name} services[{local}]"
                                f"{'.' + rest if rest else ''}: {e.message}")
            suffix = f" (with {other[0]} services[{other[1]}])" if other else ""
            return name, f"services[{local}]{'.' + rest if rest else ''}: {e.message}{suffix}"
        return None

    def _virtual_ip_conflict(self, candidates: dict[str, _Content]) -> tuple[str, str] | None:
        """A virtual IP two files' services both give, or a range too small for the services
        that need one hashed, as (file to blame, message); None when there is neither."""
        owners: dict[str, tuple[str, int, str]] = {}
        for name, content in candidates.items():
            for index, service in enumerate(content.services):
                if not service.virtual_ip:
                    continue
                first = owners.setdefault(service.virtual_ip, (name, index, service.name))
                if first[0] == name:
                    continue  # one file's own duplicates are refused when it is read
                blamed, _ = self._blame(name, first[0])
                here, there = ((name, index, service.name), first) if blamed == name else \
                    (first, (name, index, service.name))
                message = duplicate_message(service.virtual_ip, there[2], f"{there[0]} services[{there[1]}]")
                return blamed, f"services[{here[1]}].virtualIp: {message} (service {here[2]!r})"
        explicit = {s.name: s.virtual_ip for content in candidates.values() for s in content.services}
        left_out = self._virtual_ips.left_out(explicit)
        if not left_out:
            return None
        changed = [n for n, c in candidates.items() if self._files[n].accepted is not c]
        blamed = changed[-1] if changed else next(reversed(candidates))
        return blamed, (f"services: no virtual IP is left in {self._virtual_ips.network} for {len(left_out)} "
                        f"service(s) ({', '.join(repr(n) for n in left_out[:3])}{', …' if len(left_out) > 3 else ''});"
                        " make virtualIpRange larger")

    def _blame(self, a: str, b: str) -> tuple[str, str]:
        """Of two files in conflict, the one whose content changed (else the later name)."""
        a_changed = self._files[a].accepted is not self._files[a].parsed
        b_changed = self._files[b].accepted is not self._files[b].parsed
        if a_changed != b_changed:
            return (a, b) if a_changed else (b, a)
        return (a, b) if a > b else (b, a)


class _FileError(Exception):
    """A file that is not a valid source file, with a message saying where."""


def _check_virtual_ips(services: list[proxy_pb2.Service]) -> None:
    """Explicit virtual IPs are IP addresses (written back canonical), each given once in the
    file. Raises :class:`pymesh.ConfigError` at the field."""
    owners: dict[str, int] = {}
    for index, service in enumerate(services):
        if not service.virtual_ip:
            continue
        service.virtual_ip = check_address(service.virtual_ip, f"services[{index}].virtualIp")
        first = owners.setdefault(service.virtual_ip, index)
        if first != index:
            raise pymesh.ConfigError(f"services[{index}].virtualIp", duplicate_message(
                service.virtual_ip, services[first].name, f"services[{first}]"))


def _settings(service: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in service.items() if k != "endpoints"}


def _split_index(path: str) -> tuple[int | None, str]:
    """``services[3].authorities[0]`` → (3, ``authorities[0]``)."""
    if not path.startswith("services["):
        return None, path
    close = path.find("]")
    try:
        index = int(path[len("services["):close])
    except ValueError:
        return None, path
    return index, path[close + 2:] if len(path) > close + 1 else ""


def _quoted_service(message: str) -> str | None:
    """The service an engine message names (``… already routes to service "a"``)."""
    marker = 'service "'
    at = message.rfind(marker)
    if at < 0:
        return None
    end = message.find('"', at + len(marker))
    return message[at + len(marker):end] if end > 0 else None


def _describe(path: str, message: str, services: list[Any]) -> str:
    """An engine error as ``services[2].endpoints[0].address: … (service "web")``."""
    index, _ = _split_index(path)
    name = ""
    if index is not None and index < len(services) and isinstance(services[index], dict):
        name = str(services[index].get("name", ""))
    where = f"{path}: " if path else ""
    return f"{where}{message}" + (f" (service {name!r})" if name else "")


def _yaml_error(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}malformed YAML: {problem}" + (f" ({context})" if context else "")

