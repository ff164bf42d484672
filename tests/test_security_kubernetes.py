"""Security regression tests of the control plane's Kubernetes side (issue 10, items 2 and 4),
against the real kube-apiserver the Kubernetes tests use: ServiceAccount tokens must be meant
for the control plane (TokenReview with ``spec.audiences``), and one namespace can no longer
take another's service names."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from .control_plane import ControlPlane, KubeApiServer, wait_for
from .security import MeshClient, spiffe

SETTINGS = "config.pymesh.io/service"


def namespace(kube: KubeApiServer, name: str) -> None:
    response = kube.client.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace",
                                                            "metadata": {"name": name}})
    assert response.status_code in (201, 409), response.text


def service(name: str, ns: str, authorities: list[str] | None = None) -> dict[str, Any]:
    annotations = {SETTINGS: json.dumps({"authorities": authorities})} if authorities else {}
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "annotations": annotations},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}


def service_account_token(kube: KubeApiServer, ns: str, name: str, audiences: list[str] | None) -> str:
    created = kube.client.post(f"/api/v1/namespaces/{ns}/serviceaccounts",
                               json={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})
    assert created.status_code in (201, 409), created.text
    spec: dict[str, Any] = {"expirationSeconds": 3600}
    if audiences is not None:
        spec["audiences"] = audiences
    response = kube.client.post(f"/api/v1/namespaces/{ns}/serviceaccounts/{name}/token",
                                json={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
    assert response.status_code == 201, response.text
    return response.json()["status"]["token"]


def test_service_account_tokens_must_be_meant_for_the_control_plane(kube: KubeApiServer, tmp_path: Path) -> None:
    control = ControlPlane(f"kubernetes:{kube.kubeconfig}", tmp_path / "control.log", plaintext=False)
    try:
        control.wait_ready(timeout=30)
        client = MeshClient(control, (tmp_path / "control.state" / "trust-anchor.pem").read_bytes())
        web = spiffe("default", "web")
        # The pod's own API credentials (the API server's audience) are refused, so a proxy
        # never needs to hand them over.
        own = service_account_token(kube, "default", "web", None)
        with pytest.raises(grpc.RpcError) as refused:
            client.certify(web, own)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert '"pymesh-control"' in refused.value.details(), refused.value.details()
        # A projected token for the control plane's audience proves the identity...
        projected = service_account_token(kube, "default", "web", ["pymesh-control"])
        client.certify(web, projected)
        # ...and is worth nothing to the API server: whoever reads it gets no API access.
        answer = httpx.get(f"{kube.server}/api/v1/namespaces/default/pods", verify=False, timeout=10,
                           headers={"Authorization": f"Bearer {projected}"})
        assert answer.status_code == 401
        client.close()
    finally:
        control.stop()


def authorities_of(control: ControlPlane, names: list[str]) -> dict[str, list[str]]:
    """The authorities of ``names`` once all are served (waits a bounded time)."""
    watch = control.watch_config(proxy_id=f"w{time.monotonic_ns()}")
    update = watch.next(timeout=10)
    for _ in range(100):
        served = {s.name: list(s.authorities) for s in update.config.services}
        if all(n in served for n in names):
            return served
        update = watch.next(timeout=10)
    raise AssertionError(f"{names} not all served")


def test_a_namespace_cannot_take_another_namespaces_names(kube: KubeApiServer, tmp_path: Path) -> None:
    for ns in ("prod", "aaa-evil"):
        namespace(kube, ns)
    payments = kube.apply(service("payments", "prod"))
    ip = payments["spec"]["clusterIP"]
    # The review's attack: a namespace sorted first claims the victim's names and cluster IP.
    kube.apply(service("x", "aaa-evil", ["payments.prod.svc.cluster.local", "payments.prod.svc", "payments.prod",
                                         ip, "api.stripe.com", "x-alias.aaa-evil.svc"]))
    victim, thief = "payments.prod.svc.cluster.local", "x.aaa-evil.svc.cluster.local"
    for restart in range(2):  # the same on every restart (Services load in sorted order)
        control = ControlPlane(f"kubernetes:{kube.kubeconfig}", tmp_path / f"control{restart}.log")
        try:
            control.wait_ready(timeout=30)
            served = authorities_of(control, [victim, thief])
            assert served[victim] == ["payments.prod.svc", "payments.prod", ip]
            assert served[thief][:2] == ["x.aaa-evil.svc", "x.aaa-evil"] and served[thief][-1] == "x-alias.aaa-evil.svc"
            assert not {"payments.prod.svc.cluster.local", "payments.prod.svc", "payments.prod", ip,
                        "api.stripe.com"} & set(served[thief])
            error = control.status().source_error
            assert "aaa-evil/x:" in error and "is not a name in namespace 'aaa-evil'" in error, error
        finally:
            control.stop()

    # Within a namespace: an extra authority claimed first never keeps the Service whose own
    # name it is from being served; the extra is dropped, not the Service.
    control = ControlPlane(f"kubernetes:{kube.kubeconfig}", tmp_path / "control-late.log")
    try:
        control.wait_ready(timeout=30)
        kube.apply(service("early", "prod", ["late.prod.svc"]))
        assert "late.prod.svc" in authorities_of(control, ["early.prod.svc.cluster.local"])[
            "early.prod.svc.cluster.local"]
        kube.apply(service("late", "prod"))
        for _ in range(100):
            served = authorities_of(control, ["early.prod.svc.cluster.local"])
            if "late.prod.svc.cluster.local" in served:
                break
            time.sleep(0.1)
        assert served["late.prod.svc.cluster.local"][:2] == ["late.prod.svc", "late.prod"]
        assert "late.prod.svc" not in served["early.prod.svc.cluster.local"]
        # Once the Service whose name it is goes, the extra authority is served again.
        kube.delete("Service", "prod", "late")
        for _ in range(100):
            served = authorities_of(control, ["early.prod.svc.cluster.local"])
            if "late.prod.svc" in served["early.prod.svc.cluster.local"]:
                break
            time.sleep(0.1)
        assert "late.prod.svc" in served["early.prod.svc.cluster.local"]
    finally:
        control.stop()
        for ns, name in (("prod", "early"), ("prod", "payments"), ("aaa-evil", "x")):
            kube.delete("Service", ns, name)


def test_the_shipped_rbac_is_all_the_control_plane_needs(kube: KubeApiServer, tmp_path: Path) -> None:
    """The control plane runs as its own ServiceAccount under deploy/kubernetes/control-plane-rbac.yaml,
    applied piece by piece: each missing grant is a clear error, and the file grants enough."""
    manifest = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "control-plane-rbac.yaml"
    objects = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(manifest.read_text())}
    kube.apply(objects["Namespace", "pymesh-system"])
    kube.apply(objects["ServiceAccount", "pymesh-control"])
    # The account's own API credentials (the API server's audience), as a pod would have them.
    token = service_account_token(kube, "pymesh-system", "pymesh-control", None)
    kubeconfig = kube.kubeconfig_for("pymesh-control", token, tmp_path / "control.kubeconfig")
    control = ControlPlane(f"kubernetes:{kubeconfig}", tmp_path / "control.log", plaintext=False)
    try:
        # No role yet: the source cannot list Services, says so, and the control plane is not ready.
        assert wait_for(lambda: "403" in control.logs and "services" in control.logs, timeout=30), control.logs
        assert httpx.get(f"http://{control.admin}/ready", timeout=5).status_code == 503
        kube.apply(objects["ClusterRole", "pymesh-control"])
        kube.apply(objects["ClusterRoleBinding", "pymesh-control"])
        control.wait_ready(timeout=60)

        # Reading the mesh is not checking tokens: without system:auth-delegator, TokenReview is
        # refused and so is the certificate, as unavailable (the proof could not be checked).
        client = MeshClient(control, (tmp_path / "control.state" / "trust-anchor.pem").read_bytes())
        web = spiffe("default", "web")
        projected = service_account_token(kube, "default", "web", ["pymesh-control"])
        with pytest.raises(grpc.RpcError) as refused:
            client.certify(web, projected)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
        assert "TokenReview" in refused.value.details() and "403" in refused.value.details(), \
            refused.value.details()

        kube.apply(objects["ClusterRoleBinding", "pymesh-control-auth-delegator"])

        def certified() -> bool:
            try:
                client.certify(web, projected)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e  # until the binding is in force
                return False
            return True

        assert wait_for(certified, timeout=30, interval=0.5), control.logs
        client.close()
    finally:
        control.stop()
