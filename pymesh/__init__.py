"""pymesh: a service mesh whose data plane is a Rust engine, driven from Python.

``pymesh.Proxy`` embeds the engine in this process; ``pymesh-proxy`` is the same
engine as a native sidecar binary.
"""

from ._engine import __version__
from ._engine import init_logging as enable_logging
from .errors import ConfigError, MeshError, ProxyNotRunning
from .proxy import Proxy, validate

__all__ = [
    "ConfigError", "MeshError", "Proxy", "ProxyNotRunning", "__version__", "enable_logging", "validate",
]
