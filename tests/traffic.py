"""Background traffic for tests that change things under load: bounded in count and time."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx


@dataclass
class Traffic:
    """Clients sending requests until stopped (or their bounds are reached)."""

    address: str
    host: str
    path: str = "/echo"
    clients: int = 4
    max_requests: int = 20_000
    max_seconds: float = 60
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    bodies: Counter[str] = field(default_factory=Counter)
    #: clients that stopped on their own bounds, not because the test stopped them
    exhausted: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Traffic:
        for i in range(self.clients):
            # Half the clients keep connections alive; half open one per request.
            thread = threading.Thread(target=self._run, args=(i % 2 == 0,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.max_seconds + 10)

    @property
    def sent(self) -> int:
        with self._lock:
            return sum(self.statuses.values()) + len(self.errors)

    def wait_for(self, requests: int, timeout: float = 30) -> None:
        """Waits until ``requests`` were sent in all; fails the test if they were not in time
        (a silent return would let a test pass with no traffic behind its claim)."""
        deadline = time.monotonic() + timeout
        while self.sent < requests:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.sent} of {requests} requests sent within {timeout} s "
                                     f"({self.exhausted} clients stopped on their bounds)")
            time.sleep(0.02)

    def _run(self, keep_alive: bool) -> None:
        deadline = time.monotonic() + self.max_seconds
        limits = httpx.Limits(max_keepalive_connections=1 if keep_alive else 0)
        with httpx.Client(base_url=f"http://{self.address}", headers={"host": self.host},
                          limits=limits, timeout=10) as client:
            for _ in range(self.max_requests // self.clients):
                if self._stop.is_set():
                    return
                if time.monotonic() > deadline:
                    break
                try:
                    response = client.get(self.path)
                    with self._lock:
                        self.statuses[response.status_code] += 1
                        self.bodies[response.headers.get("x-served-by", "")] += 1
                except httpx.HTTPError as e:
                    with self._lock:
                        self.errors.append(f"{type(e).__name__}: {e}")
        if not self._stop.is_set():
            with self._lock:
                self.exhausted += 1
