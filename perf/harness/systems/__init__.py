"""The systems under test, one module each, in the order reports list them.

`direct` is the floor; `pymesh` (native sidecar), `pymesh-embedded` (the engine inside a
Python process) and `pymesh-mtls` (a client and a server sidecar speaking mutual TLS, with the
control plane as their CA) are this project; `nginx`, `haproxy`, `envoy` and `linkerd2-proxy`
are the peers.
"""

from __future__ import annotations

from .base import THREADS, Context, Running, System, Unavailable
from .direct import Direct
from .envoy import Envoy
from .haproxy import Haproxy
from .linkerd2 import Linkerd2Proxy
from .nginx import Nginx
from .pymesh_embedded import PymeshEmbedded
from .pymesh_mtls import PymeshMtlsPair
from .pymesh_native import PymeshNative

SYSTEMS: dict[str, type[System]] = {
    cls.name: cls
    for cls in (Direct, PymeshNative, PymeshEmbedded, PymeshMtlsPair, Nginx, Haproxy, Envoy, Linkerd2Proxy)
}


def select_systems(spec: str) -> list[str]:
    """System names from a comma-separated list (`all` for every one), `direct` always first:
    it is the floor that added latency is measured from."""
    words = [w.strip() for w in spec.split(",") if w.strip()]
    names = list(SYSTEMS) if words == ["all"] or not words else words
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {', '.join(unknown)}; valid: all, {', '.join(SYSTEMS)}")
    ordered = [n for n in SYSTEMS if n in names]
    return ordered if "direct" in ordered else ["direct", *ordered]


__all__ = ["SYSTEMS", "THREADS", "Context", "Running", "System", "Unavailable", "select_systems"]
