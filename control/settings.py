"""The control plane's own settings: command-line flags over an optional YAML file.

```yaml
source: file:/etc/pymesh/services      # or etcd:10.0.0.1:2379,10.0.0.2:2379
listen: 127.0.0.1:4200                 # the Discovery gRPC service
admin: 127.0.0.1:4290                  # /metrics /live /ready
pollInterval: 200ms                    # the file source's directory polling
maxPendingUpdates: 64                  # per watcher, before it is resynchronised
etcdPrefix: /pymesh/
shutdownGrace: 1s
logLevel: info
```
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

import pymesh

DEFAULT_LISTEN = "127.0.0.1:4200"
DEFAULT_ADMIN = "127.0.0.1:4290"


@dataclass(frozen=True)
class ControlSettings:
    """Everything ``pymesh control run`` needs."""

    source: str = ""
    listen: str = DEFAULT_LISTEN
    admin: str = DEFAULT_ADMIN
    poll_interval: float = 0.2
    max_pending_updates: int = 64
    etcd_prefix: str = "/pymesh/"
    shutdown_grace: float = 1.0
    log_level: str = "info"

    def merged(self, **overrides: Any) -> ControlSettings:
        """These settings with every override that is not None."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


_KEYS = {"".join(w.capitalize() if i else w for i, w in enumerate(f.name.split("_"))): f.name
         for f in fields(ControlSettings)}
_DURATIONS = {"poll_interval", "shutdown_grace"}


def parse_duration(value: Any, key: str) -> float:
    """``0.2``, ``"200ms"`` or ``"1.5s"`` → seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.endswith("ms"):
        seconds = _number(value[:-2], key) / 1000
    elif isinstance(value, str) and value.endswith("s"):
        seconds = _number(value[:-1], key)
    else:
        raise pymesh.ConfigError(key, f"{value!r} is not a duration; expected for example 200ms or 1s")
    if seconds <= 0:
        raise pymesh.ConfigError(key, "must be positive")
    return seconds


def _number(text: str, key: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise pymesh.ConfigError(key, f"{text!r} is not a number") from None


def load_settings(path: Path | None) -> ControlSettings:
    """Settings from a YAML file (camelCase keys, as above), or the defaults."""
    if path is None:
        return ControlSettings()
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise pymesh.ConfigError("", f"{path}: {e}") from None
    if not isinstance(document, dict):
        raise pymesh.ConfigError("", f"{path}: expected a mapping of settings")
    values: dict[str, Any] = {}
    for key, value in document.items():
        name = _KEYS.get(str(key))
        if name is None:
            raise pymesh.ConfigError(str(key), f"unknown setting; expected one of {', '.join(sorted(_KEYS))}")
        if name in _DURATIONS:
            value = parse_duration(value, str(key))
        elif name == "max_pending_updates":
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1_000_000:
                raise pymesh.ConfigError(str(key), "expected a whole number from 1 to 1000000")
        elif not isinstance(value, str):
            raise pymesh.ConfigError(str(key), f"expected a string, found {type(value).__name__}")
        values[name] = value
    return ControlSettings(**values)
