"""Virtual IPs: the address (no port) an application dials for a service, which a transparent
proxy maps back to the service (``Service.virtual_ip``).

The file and etcd sources give every service one from a range (``virtualIpRange``, by default
``10.240.0.0/16``); a service may set ``virtualIp`` itself, and keeps it. A hashed address is
a pure function of the services' names and explicit addresses, so it survives restarts and
every replica computes the same one:

- Each service has a sequence of candidates in the range: a BLAKE2b hash of its name (then of
  its name with a counter), never the range's first (network) or last (broadcast) address.
- Explicit addresses are taken first; hashed ones avoid them.
- Every service tries its first candidate before any tries its second (and so on, for
  :data:`MAX_CANDIDATES` rounds); when two want the same address in a round, the name that
  sorts first gets it. So a service holding its first candidate is never moved by one that
  is on a later one, and a newcomer moves an existing service only when it wants that
  service's address in the same round and its name sorts first.
- After that, the next free address after the service's first candidate (wrapping round).

The Kubernetes source uses each Service's ClusterIP instead (a headless Service has none).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import pymesh

if TYPE_CHECKING:  # imported where used: the settings load this module, and stay light
    from pymesh._proto.pymesh.config.v1 import proxy_pb2

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_RANGE = "10.240.0.0/16"
#: a smaller range would make hashed addresses collide all the time
MIN_RANGE_SIZE = 256
#: hashed candidates tried per service before the next free address is taken
MAX_CANDIDATES = 16
SETTING = "virtualIpRange"
FIELD = "virtualIp"


def parse_range(value: object, key: str = SETTING) -> IpNetwork:
    """A virtual IP range: an IPv4 or IPv6 network of at least :data:`MIN_RANGE_SIZE`
    addresses. Raises :class:`pymesh.ConfigError` naming ``key``."""
    if not isinstance(value, str):
        raise pymesh.ConfigError(key, f"expected a network such as {DEFAULT_RANGE}, found {value!r}")
    try:
        network = ipaddress.ip_network(value.strip())
    except ValueError as e:
        if "host bits set" in str(e):
            meant = ipaddress.ip_network(value.strip(), strict=False)
            raise pymesh.ConfigError(key, f"{value!r} is not a network: it has host bits set; did you mean "
                                          f"{meant}?") from None
        raise pymesh.ConfigError(key, f"{value!r} is not a network; expected for example {DEFAULT_RANGE} or "
                                      "fd00:10:240::/112") from None
    if network.num_addresses < MIN_RANGE_SIZE:
        smallest = "/24" if network.version == 4 else "/120"
        raise pymesh.ConfigError(key, f"{network} is too small: it has {network.num_addresses} addresses, and a "
                                      f"range needs at least {MIN_RANGE_SIZE} (a {smallest} or larger)")
    return network


def check_address(value: str, where: str = FIELD) -> str:
    """An explicit virtual IP in its canonical text (``fd00:0::1`` → ``fd00::1``). Raises
    :class:`pymesh.ConfigError` at ``where`` when it is not a unicast IP address."""
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        raise pymesh.ConfigError(where, f"{value!r} is not an IP address; expected for example 10.240.0.10 "
                                        "(no port)") from None
    if address.is_unspecified or address.is_multicast:
        raise pymesh.ConfigError(where, f"{value!r} cannot be dialed; expected a unicast address")
    return str(address)


def duplicate_message(address: str, other: str, where: str = "") -> str:
    """What to say of a virtual IP that service ``other`` (defined at ``where``) already has."""
    return f"{address} is already the virtual IP of service {other!r}{f' ({where})' if where else ''}; " \
           "each service needs its own"


class Allocator:
    """Hashed virtual IPs in one range (see the module's documentation for the rules)."""

    def __init__(self, network: IpNetwork) -> None:
        self.network = network
        #: offsets 1 .. size-2: neither the network nor the broadcast address
        self.usable = network.num_addresses - 2
        self._first: dict[str, int] = {}

    def candidate(self, name: str, round_: int) -> int:
        """The offset in the range of ``name``'s candidate of round ``round_``."""
        if round_ == 0 and (cached := self._first.get(name)) is not None:
            return cached
        digest = hashlib.blake2b(round_.to_bytes(4, "big") + name.encode(), digest_size=16,
                                 person=b"pymesh-vip").digest()
        offset = 1 + int.from_bytes(digest, "big") % self.usable
        if round_ == 0:
            if len(self._first) > 1_000_000:  # bounded: names come and go
                self._first.clear()
            self._first[name] = offset
        return offset

    def left_out(self, explicit: Mapping[str, str]) -> list[str]:
        """The services :meth:`assign` would leave without a virtual IP (the range is full)."""
        pending = sorted(name for name, address in explicit.items() if not address)
        return pending[self._room(self._reserved(a for a in explicit.values() if a)):]

    def _reserved(self, addresses: Iterable[str]) -> set[int]:
        """The offsets of explicit addresses that are in the range."""
        base = int(self.network.network_address)
        taken: set[int] = set()
        for address in addresses:
            ip = ipaddress.ip_address(address)
            if ip.version == self.network.version and ip in self.network:
                taken.add(int(ip) - base)
        return taken

    def _room(self, taken: set[int]) -> int:
        """How many hashed addresses are left besides ``taken`` (the network and broadcast
        addresses are never handed out, taken or not)."""
        return self.usable - len(taken - {0, self.usable + 1})

    def assign(self, explicit: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
        """Every service's virtual IP from ``explicit`` (name → its explicit address, ``""``
        for none): (name → address, names left without one because the range is full).
        Explicit addresses must be unique."""
        result = {name: address for name, address in explicit.items() if address}
        taken = self._reserved(result.values())
        pending = sorted(name for name, address in explicit.items() if not address)
        left_out = pending[self._room(taken):]
        pending = pending[:len(pending) - len(left_out)]
        offsets: dict[str, int] = {}
        for round_ in range(MAX_CANDIDATES):
            if not pending:
                break
            waiting = []
            for name in pending:
                offset = self.candidate(name, round_)
                if offset in taken:
                    waiting.append(name)
                else:
                    taken.add(offset)
                    offsets[name] = offset
            pending = waiting
        for name in pending:  # the range is nearly full: the next free address, wrapping round
            offset = self.candidate(name, 0)
            while offset in taken:
                offset = offset % self.usable + 1
            taken.add(offset)
            offsets[name] = offset
        for name, offset in offsets.items():
            result[name] = str(self.network.network_address + offset)
        return result, left_out


def with_virtual_ip(service: proxy_pb2.Service, address: str) -> proxy_pb2.Service:
    """``service`` with ``address`` as its virtual IP (a copy if that changes it: services are
    shared, immutable by convention)."""
    from pymesh._proto.pymesh.config.v1 import proxy_pb2

    if service.virtual_ip == address:
        return service
    copy = proxy_pb2.Service()
    copy.CopyFrom(service)
    copy.virtual_ip = address
    return copy
