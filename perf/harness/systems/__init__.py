"""The systems under test, one module each, in the order reports list them.

On loopback: `direct` is the floor; `pymesh` (native sidecar), `pymesh-embedded` (the engine
inside a Python process) and `pymesh-mtls` (a client and a server sidecar speaking mutual TLS,
with the control plane as their CA) are this project; `nginx`, `haproxy` and `envoy` are the
peers. Their added latency is over `direct`. `pymesh-tcp` and `haproxy-tcp` are the same pymesh
sidecar and HAProxy as byte relays (an opaque listener, `mode tcp`): nothing parsed, so their
added latency is what one hop through each costs on this machine before any HTTP work, the
floor under the HTTP proxies' figures.

In pods (network namespaces on a bridge with the init step's redirect rules, the load generator
in the client pod, the backend in the server pod; systems/pods.py): `direct-pods` is the floor,
`pymesh-pods` is pymesh's transparent sidecar pair (mutual TLS, its control plane in a pod) and
`linkerd2-proxy` is Linkerd's proxy pair (mutual TLS, with the stand-in control plane of
perf/harness/linkerd2_control.py; only with `--linkerd2-proxy PATH`). Their added latency is
over `direct-pods`, which is selected with them. They need root and nftables.
"""

from __future__ import annotations

from .base import THREADS, Context, Running, System, Unavailable
from .direct import Direct
from .envoy import Envoy
from .haproxy import Haproxy, HaproxyTcp
from .linkerd2 import Linkerd2Proxy
from .nginx import Nginx
from .pods import DirectPods, PymeshPods
from .pymesh_embedded import PymeshEmbedded
from .pymesh_mtls import PymeshMtlsPair
from .pymesh_native import PymeshNative, PymeshTcp

SYSTEMS: dict[str, type[System]] = {
    cls.name: cls
    for cls in (Direct, PymeshNative, PymeshTcp, PymeshEmbedded, PymeshMtlsPair, Nginx, Haproxy, HaproxyTcp, Envoy,
                DirectPods, PymeshPods, Linkerd2Proxy)
}


def select_systems(spec: str) -> list[str]:
    """System names from a comma-separated list (`all` for every one), in the registry's order,
    `direct` always first (the loopback floor) and every selected system's baseline with it
    (`direct-pods` for the systems in pods): added latency is measured from them."""
    words = [w.strip() for w in spec.split(",") if w.strip()]
    names = list(SYSTEMS) if words == ["all"] or not words else words
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {', '.join(unknown)}; valid: all, {', '.join(SYSTEMS)}")
    wanted = {"direct", *names} | {base for n in names if (base := SYSTEMS[n].baseline)}
    return [n for n in SYSTEMS if n in wanted]


__all__ = ["SYSTEMS", "THREADS", "Context", "Running", "System", "Unavailable", "select_systems"]
