"""`pymesh-embedded`: the same engine inside Python: a separate Python subprocess running
`pymesh proxy run --config` (the `pymesh.Proxy` extension), measured as that Python process."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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
        if importlib.util.find_spec("pymesh") is None or importlib.util.find_spec("pymesh._engine") is None:
            raise Unavailable("the pymesh Python package with its engine extension is not installed "
                              "(scripts/install)")

    def version(self) -> str | None:
        import pymesh

        return f"pymesh {pymesh.__version__} (Python {sys.version.split()[0]})"

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
        env = dict(os.environ)
        if self.context.snapshot.pythonpath:  # the run's copy of the package, not the checkout's
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.context.snapshot.pythonpath),
                                                              env.get("PYTHONPATH")]))
        with supervised(Child(self.name, command, workdir / "proxy.log", env=env)) as child:
            address = child.wait_for_line(LISTENING).group(1)
            child.wait_for_line(ADMIN)
            yield Running(address=address, child=child, config_name="pymesh-embedded.json",
                          config_text=path.read_text())
