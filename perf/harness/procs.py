"""Child processes of the harness: start one with its output in a log file (optionally pinned
to a CPU with taskset), wait until it is ready, and always stop it; plus free loopback ports.

Every wait here is bounded by a deadline; a process that does not come up in time is stopped
and the error carries the tail of its log. Children run in their own session (a Ctrl-C meant
for the harness does not hit them mid-measurement; the harness stops them itself) and, where
util-linux's `setpriv` is available, with a parent-death signal, so that even a harness that
dies without cleaning up (SIGKILL, a crash) leaves no proxy behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


class StartError(Exception):
    """A child process exited or did not become ready; the message has its log's tail."""


def free_port() -> int:
    """A port on 127.0.0.1 that the OS just handed out (for configs that need a fixed number)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(command: list[str], cpu: int | None) -> list[str]:
    """`command` under `taskset -c CPU` when a CPU is given (taskset execs: same pid)."""
    return command if cpu is None else ["taskset", "-c", str(cpu), *command]


def _orphan_proof(command: list[str]) -> list[str]:
    """`command` under `setpriv --pdeathsig TERM` (SIGTERM when the harness dies) if available."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *command] if setpriv else command


class Child:
    """One started process whose stdout and stderr go to `log`."""

    def __init__(self, name: str, command: list[str], log: Path, *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.command = command
        self.log = log
        self._log_file = log.open("wb")
        try:
            self.process = subprocess.Popen(
                _orphan_proof(command), stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=None if env is None else dict(env), cwd=cwd, start_new_session=True,
            )
        except OSError as e:
            self._log_file.close()
            raise StartError(f"{name}: cannot run {command[0]}: {e}") from e

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def fail(self, why: str) -> StartError:
        """Stop the process and describe why it did not come up."""
        self.stop()
        tail = self.tail()
        return StartError(f"{self.name} {why}" + (f"; its log ends:\n{tail}" if tail else ""))

    def wait_for(self, ready: Callable[[], bool], what: str, timeout: float = START_TIMEOUT_S) -> None:
        """Poll `ready` until it holds; raise StartError if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise self.fail(f"exited with status {self.process.returncode} while waiting to {what}")
            if ready():
                return
            time.sleep(0.05)
        raise self.fail(f"did not {what} within {timeout:.0f} s")

    def wait_for_line(self, pattern: str, timeout: float = START_TIMEOUT_S) -> re.Match[str]:
        """The first match of `pattern` in the log, waiting for it to appear."""
        regex = re.compile(pattern, re.MULTILINE)
        found: list[re.Match[str]] = []

        def seen() -> bool:
            match = regex.search(self.log.read_text(errors="replace"))
            if match:
                found.append(match)
            return match is not None

        self.wait_for(seen, f"print {pattern!r}", timeout)
        return found[0]

    def wait_for_port(self, address: str, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until a TCP connection to `address` (host:port) succeeds."""
        self.wait_for(lambda: port_open(address), f"accept connections on {address}", timeout)

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL it if it has not exited in time."""
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=STOP_TIMEOUT_S)
        # Workers left behind (nginx's, if its master died first) go with the group.
        _signal_group(self.process.pid, signal.SIGKILL)
        if not self._log_file.closed:
            self._log_file.close()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def port_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def http_ok(url: str) -> bool:
    """Whether a GET of `url` answers 200 (an admin `/ready`, say) within a second."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False
