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
# The mesh's CA (see pymesh.control.identity). Without the three files, a trust anchor and an
# issuer are generated into stateDir on first start and reused after.
trustDomain: cluster.local
stateDir: ~/.local/state/pymesh/control  # $XDG_STATE_HOME/pymesh/control when that is set
trustAnchorFile: /etc/pymesh/trust-anchors.pem   # PEM, one or more anchors (old + new while rotating)
issuerCertFile: /etc/pymesh/issuer.pem           # PEM, the issuer first (then any intermediates)
issuerKeyFile: /etc/pymesh/issuer.key            # PEM, unencrypted
certLifetime: 24h                      # of a workload's leaf certificate
certRateLimit: 200                     # certificates a second from the whole CA (its ceiling)
certRateBurst: 400                     # saved up; a quarter of it is kept for renewals
tokenSecretFile: /etc/pymesh/token-secret        # default: stateDir/token-secret, generated
# The control plane's own transport and identity (see pymesh.control.tls).
identity: spiffe://cluster.local/ns/pymesh-system/sa/pymesh-control  # default: in trustDomain
plaintext: false                       # true: no TLS, for local development only (logged as a warning)
allowRegister: false                   # true: Register/Deregister are served (mutual TLS only)
tokenAudience: pymesh-control          # what tokens (and Kubernetes ServiceAccount tokens) must name
# Where the file and etcd sources take each service's virtual IP from (see
# pymesh.control.virtual_ip); IPv4 or IPv6, at least 256 addresses. Kubernetes uses ClusterIPs.
virtualIpRange: 10.240.0.0/16
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

import pymesh

from .identity.limits import GLOBAL_BURST, GLOBAL_RATE
from .virtual_ip import DEFAULT_RANGE, parse_range

DEFAULT_LISTEN = "127.0.0.1:4200"
DEFAULT_ADMIN = "127.0.0.1:4290"
DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_CERT_LIFETIME = 24 * 3600.0
#: the CA's overall ceiling (certificates a second, and how many may be saved up): the limiter's
DEFAULT_CERT_RATE_LIMIT = GLOBAL_RATE
DEFAULT_CERT_RATE_BURST = GLOBAL_BURST
MIN_CERT_RATE_BURST = 4.0
#: the control plane's own identity is this service account in this namespace of its trust domain
CONTROL_NAMESPACE = "pymesh-system"
CONTROL_SERVICE_ACCOUNT = "pymesh-control"
#: the audience tokens must name: ``pymesh control token``'s, and a projected ServiceAccount token's
DEFAULT_TOKEN_AUDIENCE = "pymesh-control"


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
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    state_dir: str = ""
    trust_anchor_file: str = ""
    issuer_cert_file: str = ""
    issuer_key_file: str = ""
    cert_lifetime: float = DEFAULT_CERT_LIFETIME
    cert_rate_limit: float = DEFAULT_CERT_RATE_LIMIT
    cert_rate_burst: float = DEFAULT_CERT_RATE_BURST
    token_secret_file: str = ""
    identity: str = ""
    plaintext: bool = False
    allow_register: bool = False
    token_audience: str = DEFAULT_TOKEN_AUDIENCE
    virtual_ip_range: str = DEFAULT_RANGE

    def merged(self, **overrides: Any) -> ControlSettings:
        """These settings with every override that is not None."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def state_path(self) -> Path:
        """Where generated CA files and the token secret live: ``stateDir``, else
        ``$XDG_STATE_HOME/pymesh/control`` (``~/.local/state/pymesh/control``)."""
        if self.state_dir:
            return Path(self.state_dir).expanduser()
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "pymesh" / "control"

    @property
    def control_identity(self) -> str:
        """The control plane's SPIFFE id: ``identity``, else
        ``spiffe://<trustDomain>/ns/pymesh-system/sa/pymesh-control``."""
        return self.identity or (f"spiffe://{self.trust_domain}/ns/{CONTROL_NAMESPACE}/sa/"
                                 f"{CONTROL_SERVICE_ACCOUNT}")


_KEYS = {"".join(w.capitalize() if i else w for i, w in enumerate(f.name.split("_"))): f.name
         for f in fields(ControlSettings)}
_DURATIONS = {"poll_interval", "shutdown_grace", "cert_lifetime"}
_BOOLEANS = {"plaintext", "allow_register"}
_RATES = {"cert_rate_limit", "cert_rate_burst"}
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any, key: str) -> float:
    """``0.2``, ``"200ms"``, ``"1.5s"``, ``"10m"``, ``"24h"`` or ``"30d"`` → seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (unit := next((u for u in _UNITS if value.endswith(u)), None)):
        seconds = _number(value[:-len(unit)], key) * _UNITS[unit]
    else:
        raise pymesh.ConfigError(key, f"{value!r} is not a duration; expected for example 200ms, 1s, 10m or 24h")
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
        elif name in _RATES:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1_000_000:
                raise pymesh.ConfigError(str(key), f"expected a positive number up to 1000000, found {value!r}")
            value = float(value)
            if name == "cert_rate_burst" and value < MIN_CERT_RATE_BURST:
                raise pymesh.ConfigError(str(key), f"expected at least {MIN_CERT_RATE_BURST:g}: a quarter of "
                                                   "the burst is kept for renewals, and first certificates "
                                                   "need the rest")
        elif name == "max_pending_updates":
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1_000_000:
                raise pymesh.ConfigError(str(key), "expected a whole number from 1 to 1000000")
        elif name in _BOOLEANS:
            if not isinstance(value, bool):
                raise pymesh.ConfigError(str(key), f"expected true or false, found {value!r}")
        elif name == "virtual_ip_range":
            value = str(parse_range(value, str(key)))  # refused here, before anything starts
        elif not isinstance(value, str):
            raise pymesh.ConfigError(str(key), f"expected a string, found {type(value).__name__}")
        values[name] = value
    return ControlSettings(**values)
