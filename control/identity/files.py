"""The control plane's state directory: private files written whole (never half a key), and
one lock so that two processes starting together (``control run``, ``control token``,
``control ca-bundle``) generate the CA and the token secret once, not twice.

The directory is kept at mode 0700 (an existing one is tightened: it holds keys), and files
are created with ``O_EXCL | O_NOFOLLOW`` under random names, so a symlink or file planted in
the directory is never written through."""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
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
        _tighten(directory)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise pymesh.ConfigError(setting, f"cannot use {directory} as the state directory: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _tighten(directory: Path) -> None:
    """An existing state directory readable or writable by others is set to 0700 (it holds
    keys); one that is not a real directory of ours is refused."""
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(0, f"{directory} is not a directory (a symlink is not accepted)")
    if st.st_uid != os.getuid():
        raise OSError(0, f"{directory} belongs to user {st.st_uid}, not to this one ({os.getuid()})")
    if st.st_mode & 0o077:
        os.chmod(directory, 0o700)


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Replaces ``path`` with ``data`` atomically (a new file with ``mode``, then a rename),
    so a reader sees the old content or the new, never a part. The new file has a random
    name and is created exclusively, never through a symlink."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    with os.fdopen(os.open(tmp, flags, mode), "wb") as file:
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
