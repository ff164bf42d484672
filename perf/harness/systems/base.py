"""What every system under test offers the runner: whether it is available here (else a reason,
and it is reported as skipped), its version and configuration summary, and a context manager
that starts it in front of a backend for one scenario and always stops it.

Every proxy is given the same resources: one worker thread (`THREADS`), 127.0.0.1 ports from
the OS, upstream keep-alive/pooling, no access log, and the scenario's protocol on both sides
where it can speak it upstream.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..procs import Child
from ..scenarios import Scenario
from ..tools import Snapshot

THREADS = 1  # pymesh's default engine thread count; every peer is matched to it


class Unavailable(Exception):
    """The system cannot run here; the message says why (it is reported as skipped)."""


@dataclass
class Context:
    """What the runner gives every system: a scratch directory, pinning, extra paths."""

    workdir: Path
    proxy_cpu: int | None = None  # taskset CPU for the proxy, when pinning
    linkerd2_proxy: Path | None = None
    snapshot: Snapshot = field(default_factory=Snapshot)  # the copies of this project's builds to measure
    build: bool = True  # may a missing workspace binary be built with cargo


@dataclass
class Running:
    """A started system: where to send load, and its process (the root of the tree to measure;
    None for direct). A system of several proxies (a sidecar pair) names the others in
    `companions`: their trees are measured with `child`'s, CPU and memory summed."""

    address: str
    child: Child | None = None
    config_name: str = ""  # file name for the generated config in the report directory
    config_text: str = ""
    notes: list[str] = field(default_factory=list)
    companions: list[Child] = field(default_factory=list)
    more_configs: dict[str, str] = field(default_factory=dict)  # further generated configs, by file name
    # What the load generator's command line runs under: `ip netns exec POD` (and a user) for the
    # systems in pods, whose load starts in the client pod; nothing for the loopback systems.
    load_prefix: list[str] = field(default_factory=list)
    # The network namespace the harness's own clients (the idle-connection scenario's) start
    # in: the client pod's for the systems in pods; the harness's own for the loopback systems.
    netns: str | None = None

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    @property
    def pids(self) -> list[int]:
        """The roots of every process tree to measure (none for direct)."""
        return [c.pid for c in ([self.child] if self.child else []) + self.companions]

    @property
    def configs(self) -> dict[str, str]:
        """Every generated config, by file name for the report directory."""
        return ({self.config_name: self.config_text} if self.config_name else {}) | self.more_configs

    def died(self) -> str | None:
        """Why a process is gone (exit status and log tail), or None while they all run."""
        for child in ([self.child] if self.child else []) + self.companions:
            if child.alive():
                continue
            tail = child.tail()
            who = "" if child is self.child else f"({child.name}) "
            return f"{who}exited with status {child.process.returncode} during the run" + (
                f"; its log ends:\n{tail}" if tail else "")
        return None


class System(ABC):
    """One system under test."""

    name: ClassVar[str]
    label: ClassVar[str]
    description: ClassVar[str]
    # The system whose figures this one's "added" latency is measured from, in the same run
    # (None: it is a floor itself). Selecting a system selects its baseline too.
    baseline: ClassVar[str | None] = "direct"
    # This workspace's binaries it runs, besides the load generator and the backend (the run
    # snapshots them: `context.snapshot`).
    binaries: ClassVar[tuple[str, ...]] = ()

    def __init__(self, context: Context) -> None:
        self.context = context

    @abstractmethod
    def check(self) -> None:
        """Raise Unavailable when the system cannot run here."""

    def version(self) -> str | None:
        return None

    def settings(self) -> dict[str, Any]:
        """How the system is configured for the benchmark (for the report)."""
        return {"threads": THREADS}

    def unsupported(self, scenario: Scenario) -> str | None:
        """Why this system cannot serve `scenario` (it is then reported as skipped, not
        failed), or None if it can."""
        return None

    @abstractmethod
    def start(self, upstream: str, scenario: Scenario) -> AbstractContextManager[Running]:
        """Start in front of `upstream` (host:port of the backend) for `scenario`."""

    def scratch(self, scenario: Scenario) -> Path:
        path = self.context.workdir / scenario.name / self.name
        path.mkdir(parents=True, exist_ok=True)
        return path


@contextmanager
def supervised(child: Child) -> Iterator[Child]:
    """Stop `child` however the block ends."""
    try:
        yield child
    finally:
        child.stop()


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class DebianPackageSystem(System):
    """A peer installed from a Debian package: found on PATH, versioned with `-v`."""

    executable: ClassVar[str]
    package: ClassVar[str]

    def binary(self) -> Path:
        from ..tools import system_binary

        path = system_binary(self.executable)
        if path is None:
            raise Unavailable(f"{self.executable} is not installed (apt-get install {self.package}; "
                              "scripts/install --test)")
        return path

    def check(self) -> None:
        self.binary()

    def version(self) -> str | None:
        from ..tools import version_of

        return version_of([str(self.binary()), "-v"])

