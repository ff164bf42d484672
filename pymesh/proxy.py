"""`pymesh.Proxy`: the engine embedded in this Python process.

The engine is Rust and runs on its own threads; this class only hands it a
configuration and relays calls. Nothing here is on the request path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Union

from . import _engine
from .errors import ProxyNotRunning


class _ProtoMessage(Protocol):
    def SerializeToString(self) -> bytes: ...  # noqa: N802 (protobuf's name)


ConfigSource = Union[Mapping[str, Any], str, "os.PathLike[str]", _ProtoMessage]


def config_text(config: ConfigSource) -> tuple[str, str | None]:
    """The config as text for the engine, and where it came from (for errors).

    Accepts a mapping (the protobuf JSON mapping of ``ProxyConfig``), a path to a
    YAML/JSON file, or a generated ``ProxyConfig`` protobuf message.
    """
    if isinstance(config, Mapping):
        return json.dumps(config), None
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        return path.read_text(encoding="utf-8"), str(path)
    if hasattr(config, "SerializeToString"):
        from google.protobuf import json_format

        return json_format.MessageToJson(config), None  # type: ignore[arg-type]
    raise TypeError(
        f"config must be a mapping, a file path or a ProxyConfig message, not {type(config).__name__}"
    )


def validate(config: ConfigSource) -> dict[str, Any]:
    """Checks a config without starting anything; returns it normalised.

    Raises :class:`pymesh.ConfigError` naming the field at fault.
    """
    text, origin = config_text(config)
    return json.loads(_engine.validate(text, origin))


class Proxy:
    """A pymesh proxy running inside this process.

    >>> with Proxy({"listeners": [{"address": "127.0.0.1:0"}], "admin": {"address": "127.0.0.1:0"}}) as p:
    ...     p.listeners  # doctest: +SKIP
    """

    def __init__(self, config: ConfigSource, *, threads: int = 1) -> None:
        self._config = config
        self._threads = threads
        self._engine: _engine.Engine | None = None

    def start(self) -> Proxy:
        """Binds the listeners and starts serving. Raises ConfigError on a bad config."""
        if self._engine is not None and self._engine.running:
            return self
        text, origin = config_text(self._config)
        self._engine = _engine.Engine(text, self._threads, origin)
        return self

    def stop(self, grace: float = 5.0) -> bool:
        """Stops accepting, lets in-flight requests finish for up to ``grace`` seconds."""
        if self._engine is None:
            return True
        drained = self._engine.stop(grace)
        self._engine = None
        return drained

    def reload(self, config: ConfigSource) -> None:
        """Replaces the running config without dropping connections. On error the
        running config stays and ConfigError says which field was wrong."""
        text, origin = config_text(config)
        self._running().reload(text, origin)
        self._config = config

    def metrics(self) -> str:
        """The proxy's metrics in the Prometheus text format."""
        return self._running().metrics()

    def config(self) -> dict[str, Any]:
        """The running config (protobuf JSON mapping)."""
        return json.loads(self._running().config())

    @property
    def running(self) -> bool:
        return self._engine is not None and self._engine.running

    @property
    def admin_address(self) -> str:
        return self._running().admin_address

    @property
    def listeners(self) -> dict[str, str]:
        """Listener name → bound ``IP:port``."""
        return dict(self._running().listeners)

    def address(self, name: str | None = None) -> str:
        """The bound address of the listener called ``name`` (or of the only one)."""
        listeners = self.listeners
        if name is None:
            if len(listeners) != 1:
                raise ValueError(f"the proxy has {len(listeners)} listeners; name one of {sorted(listeners)}")
            return next(iter(listeners.values()))
        return listeners[name]

    def _running(self) -> _engine.Engine:
        if self._engine is None or not self._engine.running:
            raise ProxyNotRunning("the proxy is not running; call start() first")
        return self._engine

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
