"""The control plane's state directory: private files written whole (never half a key), and
one lock so that two processes starting together (``control run``, ``control token``,
``control ca-bundle``) generate the CA and the token secret once, not twice."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pymesh

LOCK_FILE = ".lock"


@contextmanager
def state_lock(directory: Path, setting: str = "stateDir") -> Iterator[None]:
    """Creates ``directory`` (mode 0700) and holds its lock (an flock, released on exit)."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise pymesh.ConfigError(setting, f"cannot use {directory} as the state directory: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Replaces ``path`` with ``data`` atomically (a new file with ``mode``, then a rename),
    so a reader sees the old content or the new, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as file:
        os.fchmod(file.fileno(), mode)  # whatever the umask
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def write_private(path: Path, data: bytes) -> None:
    """A secret (a key, the token secret): mode 0600."""
    write_file(path, data, 0o600)


def read_setting_file(path: Path, setting: str) -> bytes:
    """A file named by a setting; an error names the setting and the file."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise pymesh.ConfigError(setting, f"cannot read {path}: {e.strerror}") from None
