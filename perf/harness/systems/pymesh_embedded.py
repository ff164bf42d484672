"""`pymesh-embedded`: the same engine inside Python: a separate Python subprocess running
`pymesh proxy run --config` (the `pymesh.Proxy` extension), measured as that Python process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..procs import Child, pinned
from ..scenarios import Scenario
from .base import THREADS, Running, System, Unavailable, supervised
from .pymesh_native import ADMIN, LISTENING, proxy_config

# `pymesh proxy run …` with this interpreter (no reliance on the console script or a pyenv shim).
RUN_CLI = "import sys; from pymesh.cli import main; sys.argv[0] = 'pymesh'; main()"


class PymeshEmbedded(System):
    name = "pymesh-embedded"
    label = "pymesh (embedded in Python)"
    description = "`pymesh proxy run` in its own Python process: the engine as a Python extension"

    def check(self) -> None:
        # Found without importing it: the harness process itself stays free of the engine extension.
        spec = importlib.util.find_spec("pymesh")
        locations = list(spec.submodule_search_locations or []) if spec else []
        if not any(Path(p).glob("_engine*.so") for p in locations):
            raise Unavailable("the pymesh Python package with its engine extension is not installed "
                              "(scripts/install)")

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.context.snapshot.pythonpath:  # the run's copy of the package, not the checkout's
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.context.snapshot.pythonpath),
                                                              env.get("PYTHONPATH")]))
        return env

    def version(self) -> str | None:
        try:
            result = subprocess.run([sys.executable, "-c", "import pymesh; print(pymesh.__version__)"],
                                    capture_output=True, text=True, timeout=30, env=self._env())
        except (OSError, subprocess.TimeoutExpired):
            return None
        found = result.stdout.strip()
        return f"pymesh {found} (Python {sys.version.split()[0]})" if found else None

    def settings(self) -> dict[str, Any]:
        build = self.context.snapshot.builds.get("pymesh._engine")
        return {"threads": THREADS, "python": sys.executable, "upstream": "as pymesh (same engine)",
                "build": build.describe() if build else "the installed pymesh package"}

    @contextmanager
    def start(self, upstream: str, scenario: Scenario) -> Iterator[Running]:
        workdir = self.scratch(scenario)
        path = workdir / "proxy.json"
        path.write_text(json.dumps(proxy_config(upstream), indent=2))
        command = pinned([sys.executable, "-c", RUN_CLI, "proxy", "run", "--config", str(path), "--log", "warn",
                          "--threads", str(THREADS), "--grace", "1"], self.context.proxy_cpu)
        with supervised(Child(self.name, command, workdir / "proxy.log", env=self._env())) as child:
            address = child.wait_for_line(LISTENING).group(1)
            child.wait_for_line(ADMIN)
            yield Running(address=address, child=child, config_name="pymesh-embedded.json",
                          config_text=path.read_text())
