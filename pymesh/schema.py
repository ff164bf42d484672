"""The proxy configuration as protobuf classes, generated from proto/ (the one schema).

``pymesh.Proxy`` takes a :class:`ProxyConfig` as readily as a dict or a file.
"""

from ._proto.pymesh.config.v1.proxy_pb2 import (
    Admin,
    Direction,
    Endpoint,
    Limits,
    Listener,
    Protocol,
    ProxyConfig,
    Service,
    Timeouts,
)

__all__ = ["Admin", "Direction", "Endpoint", "Limits", "Listener", "Protocol", "ProxyConfig", "Service",
           "Timeouts"]
