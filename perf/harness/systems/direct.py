"""`direct`: the load generator talks to the backend itself. The floor every proxy is
compared with ("added latency" is a system's figure minus direct's in the same run)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..scenarios import Scenario
from .base import Running, System


class Direct(System):
    name = "direct"
    label = "direct (no proxy)"
    description = "client → backend, no proxy: the floor"
    baseline = None

    def check(self) -> None:
        return None

    def settings(self) -> dict[str, Any]:
        return {"proxy": None}

    @contextmanager
    def start(self, upstream: str, scenario: Scenario) -> Iterator[Running]:
        yield Running(address=upstream)
