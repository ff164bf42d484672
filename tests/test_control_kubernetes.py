"""The control plane's Kubernetes source against a real kube-apiserver (built from the Kubernetes
Go module by `scripts/install --test`) on a real etcd. No controllers run: the tests write the
Services and EndpointSlices themselves. The API server refuses loopback addresses in
EndpointSlices, so endpoints here are addresses from a private range; no traffic is sent to
them."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from .control_plane import ControlPlane, KubeApiServer, wait_for

PUSH_TIMEOUT = 10.0  # a deadline to wait for a push, not a speed claim


def service(name: str, *, annotations: dict[str, str] | None = None, ports: list[dict[str, Any]] | None = None,
            namespace: str = "default") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "annotations": annotations or {}},
            "spec": {"ports": ports or [{"name": "http", "port": 80, "targetPort": 8080}]}}


def endpoint_slice(name: str, service_name: str, ips: dict[str, bool], port: int = 8080,
                   port_name: str = "http") -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}} for ip, ready in ips.items()]}


def by_name(update: Any) -> dict[str, Any]:
    return {s.name: s for s in update.config.services}


def test_services_and_endpoint_slices_are_streamed(kube: KubeApiServer, kube_control: ControlPlane) -> None:
    created = kube.apply(service("web", annotations={
        "config.pymesh.io/service": json.dumps({"timeouts": {"connect": "0.5s"}, "authorities": ["www.default.svc"]})}))
    kube.apply(endpoint_slice("web-1", "web", {"10.1.0.1": True, "10.1.0.2": True, "10.1.0.3": False}))
    name = "web.default.svc.cluster.local"

    config_watch = kube_control.watch_config()
    first = config_watch.next()
    while name not in by_name(first):
        first = config_watch.next(timeout=PUSH_TIMEOUT)
    web = by_name(first)[name]
    assert list(web.authorities) == ["web.default.svc", "web.default", created["spec"]["clusterIP"],
                                     "www.default.svc"]
    assert web.timeouts.connect.ToMilliseconds() == 500 and not web.endpoints

    endpoints = kube_control.watch_endpoints(name)
    full = endpoints.next()
    while {e.address for e in full.added} != {"10.1.0.1:8080", "10.1.0.2:8080"}:
        full = endpoints.next(timeout=PUSH_TIMEOUT)  # the first state may predate the slice

    # An endpoint turns ready, another goes away: one incremental update.
    kube.apply(endpoint_slice("web-1", "web", {"10.1.0.2": True, "10.1.0.3": True}))
    change = endpoints.next(timeout=PUSH_TIMEOUT)
    assert not change.full
    assert [e.address for e in change.added] == ["10.1.0.3:8080"] and list(change.removed) == ["10.1.0.1:8080"]
    # A second slice adds to the set.
    kube.apply(endpoint_slice("web-2", "web", {"10.1.0.9": True}))
    assert [e.address for e in endpoints.next(timeout=PUSH_TIMEOUT).added] == ["10.1.0.9:8080"]

    # Deleting the Service removes it from every proxy's config.
    kube.delete("Service", "default", "web")
    update = config_watch.next(timeout=PUSH_TIMEOUT)
    assert name not in by_name(update)
    kube.delete("EndpointSlice", "default", "web-1")
    kube.delete("EndpointSlice", "default", "web-2")


def test_port_annotation_picks_the_target_port(kube: KubeApiServer, kube_control: ControlPlane) -> None:
    kube.apply(service("multi", annotations={"config.pymesh.io/port": "grpc"},
                       ports=[{"name": "http", "port": 80, "targetPort": 8080},
                              {"name": "grpc", "port": 90, "targetPort": 9090}]))
    slice_ = endpoint_slice("multi-1", "multi", {"10.2.0.1": True})
    slice_["ports"] = [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "grpc", "port": 9090,
                                                                          "protocol": "TCP"}]
    kube.apply(slice_)
    endpoints = kube_control.watch_endpoints("multi.default.svc.cluster.local")
    update = endpoints.next()
    while not update.added:
        update = endpoints.next(timeout=PUSH_TIMEOUT)
    assert [e.address for e in update.added] == ["10.2.0.1:9090"]
    kube.delete("Service", "default", "multi")
    kube.delete("EndpointSlice", "default", "multi-1")


def test_a_bad_annotation_is_reported_and_the_last_good_kept(kube: KubeApiServer, kube_control: ControlPlane) -> None:
    kube.apply(service("api", annotations={"config.pymesh.io/service": '{"timeouts": {"connect": "1s"}}'}))
    name = "api.default.svc.cluster.local"
    config_watch = kube_control.watch_config()
    update = config_watch.next()
    while name not in by_name(update):
        update = config_watch.next(timeout=PUSH_TIMEOUT)

    kube.apply(service("api", annotations={"config.pymesh.io/service": '{"timeouts": {"connect": "soon"}}'}))
    status = wait_for(lambda: "default/api" in (s := kube_control.status()).source_error and s, timeout=PUSH_TIMEOUT)
    assert status and not status.source_healthy
    assert status.source_error.startswith(
        "default/api: metadata.annotations[config.pymesh.io/service].timeouts.connect:"), status.source_error
    config_watch.nothing_within(0.3)
    assert by_name(kube_control.watch_config(proxy_id="late").next())[name].timeouts.connect.seconds == 1

    kube.apply(service("api", annotations={"config.pymesh.io/service": '{"timeouts": {"connect": "2s"}}'}))
    assert by_name(config_watch.next(timeout=PUSH_TIMEOUT))[name].timeouts.connect.seconds == 2
    assert wait_for(lambda: kube_control.status().source_healthy, timeout=PUSH_TIMEOUT)
    kube.delete("Service", "default", "api")


def test_endpoints_cannot_be_registered(kube_control: ControlPlane, kube: KubeApiServer) -> None:
    kube.apply(service("reg"))
    wait_for(lambda: "reg.default.svc.cluster.local" in by_name(kube_control.watch_config(proxy_id="w").next()),
             timeout=PUSH_TIMEOUT)
    with pytest.raises(grpc.RpcError) as refused:
        kube_control.register("reg.default.svc.cluster.local", "10.3.0.1:80")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    kube.delete("Service", "default", "reg")
