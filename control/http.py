"""The admin HTTP endpoint (aiohttp): ``/metrics`` (Prometheus text format), ``/live`` (the
process answers) and ``/ready`` (the source has loaded once), on a port of its own."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .metrics import ControlMetrics
from .state import MeshState


class AdminServer:
    """Serves the admin endpoint until :meth:`stop`."""

    def __init__(self, state: MeshState, metrics: ControlMetrics) -> None:
        self.state = state
        self.metrics = metrics
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/live", self._live)
        app.router.add_get("/ready", self._ready)
        return app

    async def start(self, address: str) -> str:
        """Binds ``address`` (``IP:port``, port 0 for a free one); returns the bound ``IP:port``."""
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{address!r} is not IP:PORT")
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_port=False)
        await site.start()
        self._runner = runner
        bound = runner.addresses[0]
        bound_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        return f"{bound_host}:{bound[1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _live(self, _request: web.Request) -> web.Response:
        return web.Response(text="live\n")

    async def _ready(self, _request: web.Request) -> web.Response:
        if self.state.loaded.is_set():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready: the source has not loaded yet\n")
