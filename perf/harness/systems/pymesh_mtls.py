"""`pymesh-mtls`: a pair of pymesh sidecars (client side → server side) speaking mTLS to each
other, as a mesh deploys them. mTLS is a later issue: until then the system is listed and
reported as skipped."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..scenarios import Scenario
from .base import Running, System, Unavailable


class PymeshMtlsPair(System):
    name = "pymesh-mtls"
    label = "pymesh sidecar pair, mTLS"
    description = "client sidecar → mTLS → server sidecar → backend"

    def check(self) -> None:
        raise Unavailable("mTLS not implemented yet")

    @contextmanager
    def start(self, upstream: str, scenario: Scenario) -> Iterator[Running]:
        raise Unavailable("mTLS not implemented yet")
        yield  # pragma: no cover
