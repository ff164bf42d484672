"""The one exception hierarchy of pymesh; the engine raises these too."""

from __future__ import annotations


class MeshError(Exception):
    """Base of every error pymesh raises."""


class ConfigError(MeshError):
    """A configuration was rejected. ``path`` names the field, e.g.
    ``services[2].endpoints[0].address`` (empty when the whole document is at fault)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class ProxyNotRunning(MeshError):
    """An operation needs a running proxy."""
