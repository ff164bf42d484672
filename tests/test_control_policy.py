"""The control plane streams the mesh-wide authorization (``ConfigUpdate.config.authorization``)
from its source: a real `pymesh control run` on a directory of YAML files, and on etcd from
Debian's package, read with a real gRPC client. No mocks."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from pymesh._proto.pymesh.config.v1 import proxy_pb2
from pymesh._proto.pymesh.mesh.v1 import discovery_pb2
from pymesh.control.metrics import ControlMetrics
from pymesh.control.state import Delta, MeshState, Snapshot

from .control_plane import ControlPlane, Etcd, StartControl, wait_for, write_services

#: a change in a source must reach watchers within this (the file source polls every 200 ms)
PUSH_TIMEOUT = 10.0  # a deadline to wait for a push, not a speed claim

WEB = {"name": "web", "authorities": ["web.local"], "endpoints": [{"address": "127.0.0.1:8080"}]}
NO_WRITES = {"name": "ops-read-only", "action": "DENY", "servers": ["spiffe://cluster.local/ns/shop/*"],
             "identities": ["spiffe://cluster.local/ns/ops/*"], "methods": ["POST", "PUT"]}
HEALTH = {"name": "public-health", "unauthenticated": True, "paths": ["/healthz"], "servers": ["*"]}
POLICY = {"defaultPolicy": "ALL_AUTHENTICATED", "policies": [NO_WRITES, HEALTH]}

@pytest.fixture
def source_dir(tmp_path: Path) -> Path:
    """services in a.yaml, the authorization in policy.yaml."""
    directory = tmp_path / "source"
    directory.mkdir()
    write_services(directory / "a.yaml", [WEB])
    write(directory / "policy.yaml", {"authorization": POLICY})
    return directory


def write(path: Path, document: dict[str, Any]) -> None:
    write_services(path, yaml.safe_dump(document, sort_keys=False))


def policy_names(update: discovery_pb2.ConfigUpdate) -> list[str]:
    return [p.name for p in update.config.authorization.policies]


def unhealthy(control: ControlPlane, needle: str) -> discovery_pb2.StatusResponse:
    """The Status once its source error mentions ``needle``."""
    status = wait_for(lambda: needle in (s := control.status()).source_error and s, timeout=PUSH_TIMEOUT)
    assert status, f"{needle!r} was not reported: {control.status().source_error!r}"
    assert not status.source_healthy
    return status


# -- the file source ----------------------------------------------------------------------


def test_a_file_policy_is_streamed_and_its_changes_pushed(start_control: StartControl, source_dir: Path) -> None:
    control = start_control(f"file:{source_dir}")
    watch = control.watch_config()
    first = watch.next()
    assert first.config.HasField("authorization")
    authorization = first.config.authorization
    assert authorization.default_policy == proxy_pb2.Authorization.ALL_AUTHENTICATED
    assert policy_names(first) == ["ops-read-only", "public-health"]
    deny = authorization.policies[0]
    assert deny.action == proxy_pb2.AuthorizationPolicy.DENY
    assert list(deny.servers) == ["spiffe://cluster.local/ns/shop/*"]
    assert list(deny.identities) == ["spiffe://cluster.local/ns/ops/*"] and list(deny.methods) == ["POST", "PUT"]
    assert authorization.policies[1].unauthenticated and list(authorization.policies[1].paths) == ["/healthz"]
    assert [s.name for s in first.config.services] == ["web"]
    assert control.status().config_version == first.version

    # A policy changes: every watcher gets the new config, with a new version.
    other = control.watch_config(proxy_id="other")
    assert other.next().version == first.version
    changed = {**POLICY, "policies": [{**NO_WRITES, "methods": ["POST", "PUT", "DELETE"]}, HEALTH]}
    write(source_dir / "policy.yaml", {"authorization": changed})
    second = watch.next(timeout=PUSH_TIMEOUT)
    assert second.version != first.version
    assert list(second.config.authorization.policies[0].methods) == ["POST", "PUT", "DELETE"]
    assert other.next(timeout=PUSH_TIMEOUT).version == second.version

    # The same policy written again, or an endpoint change, pushes no config.
    write(source_dir / "policy.yaml", {"authorization": changed})
    write_services(source_dir / "a.yaml", [{**WEB, "endpoints": [{"address": "127.0.0.1:8081"}]}])
    watch.nothing_within(0.6)
    # A service change keeps the policy in the new config.
    write_services(source_dir / "a.yaml", [{**WEB, "authorities": ["web.example"]}])
    third = watch.next(timeout=PUSH_TIMEOUT)
    assert policy_names(third) == ["ops-read-only", "public-health"] and third.version != second.version

    # Removing `authorization:` removes it from the stream; the version is the services' alone.
    (source_dir / "policy.yaml").unlink()
    gone = watch.next(timeout=PUSH_TIMEOUT)
    assert not gone.config.HasField("authorization") and [s.name for s in gone.config.services] == ["web"]
    write(source_dir / "policy.yaml", {"authorization": changed})
    assert watch.next(timeout=PUSH_TIMEOUT).version == third.version
    write(source_dir / "policy.yaml", {"authorization": None})
    assert watch.next(timeout=PUSH_TIMEOUT).version == gone.version

    # An empty authorization is not none: it allows everyone, replacing the proxy's own.
    write(source_dir / "policy.yaml", {"authorization": {}})
    empty = watch.next(timeout=PUSH_TIMEOUT)
    assert empty.config.HasField("authorization") and not empty.config.authorization.policies
    assert empty.version != gone.version
    assert control.status().source_healthy


BAD = [
    ({"policies": [NO_WRITES, {**HEALTH, "name": "ops-read-only"}]},
     "policy.yaml: authorization.policies[1].name: duplicate policy name 'ops-read-only' (also policies[0])"),
    ({"policies": [{**NO_WRITES, "identities": ["spiffe://x/ns/*/sa"]}]},
     "policy.yaml: authorization.policies[0].identities[0]: 'spiffe://x/ns/*/sa' is not an identity pattern; "
     "expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>, "
     "spiffe://<trust-domain>/ns/<namespace>/*, spiffe://<trust-domain>/* or * (policy 'ops-read-only')"),
    ({"policies": [{**NO_WRITES, "servers": ["spiffe://cluster.local/ns/shop"]}]},
     "policy.yaml: authorization.policies[0].servers[0]: 'spiffe://cluster.local/ns/shop' is not a workload "
     "identity; expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> (policy 'ops-read-only')"),
    ({"policies": [{**HEALTH, "paths": ["healthz"]}]},
     "policy.yaml: authorization.policies[0].paths[0]: 'healthz' is not a path; expected /exact or /prefix/* "
     "(policy 'public-health')"),
    ({"policies": [{**NO_WRITES, "methods": ["PO ST"]}]},
     "policy.yaml: authorization.policies[0].methods[0]: 'PO ST' is not an HTTP method (a token, e.g. GET) "
     "(policy 'ops-read-only')"),
    ({"policies": [{"action": "DENY"}]},
     "policy.yaml: authorization.policies[0].name: is required; policies are named in metrics and in denied "
     "answers"),
    ({"defaultPolicy": "ALLOW"},
     "policy.yaml: authorization.default_policy: 'ALLOW' is not one of ALL_UNAUTHENTICATED, ALL_AUTHENTICATED, "
     "DENY"),
    ({"policies": [{**HEALTH, "server": ["*"]}]},
     "policy.yaml: authorization.policies[0].server: unknown field; expected one of name, action, listeners, "
     "identities, unauthenticated, paths, ignoreCase, ignoreTrailingSlash, methods, servers"),
]


def test_a_bad_policy_is_reported_and_the_last_good_kept(start_control: StartControl, source_dir: Path) -> None:
    control = start_control(f"file:{source_dir}")
    watch = control.watch_config()
    good = watch.next()
    for authorization, expected in BAD:
        write(source_dir / "policy.yaml", {"authorization": authorization})
        status = unhealthy(control, expected)
        assert status.source_error == expected
        assert status.config_version == good.version
    watch.nothing_within(0.3)
    # A proxy connecting now is served the last good policy.
    late = control.watch_config(proxy_id="late").next()
    assert late.version == good.version and policy_names(late) == ["ops-read-only", "public-health"]
    # One log line per error.
    assert control.logs.count("duplicate policy name") == 1, control.logs

    # Fixed: pushed, and healthy again.
    write(source_dir / "policy.yaml", {"authorization": {"policies": [HEALTH]}})
    assert policy_names(watch.next(timeout=PUSH_TIMEOUT)) == ["public-health"]
    assert wait_for(lambda: control.status().source_healthy, timeout=PUSH_TIMEOUT), control.status().source_error


def test_a_second_file_defining_authorization_is_a_conflict(start_control: StartControl, source_dir: Path) -> None:
    control = start_control(f"file:{source_dir}")
    watch = control.watch_config()
    good = watch.next()

    # The file that changed is blamed, and its previous content (none) kept.
    write(source_dir / "b.yaml", {"services": [{"name": "db"}], "authorization": {"policies": [HEALTH]}})
    status = unhealthy(control, "b.yaml")
    assert status.source_error == ("b.yaml: authorization: already defined in policy.yaml; at most one file of "
                                   "the directory may define it"), status.source_error
    watch.nothing_within(0.3)
    assert control.watch_config(proxy_id="late").next().version == good.version

    # Once policy.yaml gives it up, b.yaml's is served (and its service).
    write(source_dir / "policy.yaml", {"services": []})
    update = watch.next(timeout=PUSH_TIMEOUT)
    assert policy_names(update) == ["public-health"] and [s.name for s in update.config.services] == ["db", "web"]
    assert wait_for(lambda: control.status().source_healthy, timeout=PUSH_TIMEOUT), control.status().source_error


def test_conflicting_files_at_start_keep_the_first(start_control: StartControl, source_dir: Path) -> None:
    write(source_dir / "z.yaml", {"authorization": {"policies": [HEALTH]}})
    control = start_control(f"file:{source_dir}")
    assert policy_names(control.watch_config().next()) == ["ops-read-only", "public-health"]
    assert control.status().source_error == (
        "z.yaml: authorization: already defined in policy.yaml; at most one file of the directory may define it")


# -- etcd ---------------------------------------------------------------------------------


def test_etcd_authorization_key(start_control: StartControl, etcd: Etcd) -> None:
    etcd.put("/pymesh/services/web", {})
    etcd.put("/pymesh/authorization", POLICY)
    control = start_control(f"etcd:{etcd.endpoint}")
    watch = control.watch_config()
    first = watch.next()
    assert policy_names(first) == ["ops-read-only", "public-health"]

    etcd.put("/pymesh/authorization", {"policies": [{**HEALTH, "paths": ["healthz"]}]})
    status = unhealthy(control, "/pymesh/authorization")
    assert status.source_error == ("/pymesh/authorization: policies[0].paths[0]: 'healthz' is not a path; "
                                   "expected /exact or /prefix/* (policy 'public-health')")
    watch.nothing_within(0.3)

    etcd.put("/pymesh/authorization", {"policies": [HEALTH]})
    assert policy_names(watch.next(timeout=PUSH_TIMEOUT)) == ["public-health"]
    assert wait_for(lambda: control.status().source_healthy, timeout=PUSH_TIMEOUT)
    etcd.delete("/pymesh/authorization")
    assert not watch.next(timeout=PUSH_TIMEOUT).config.HasField("authorization")


# -- the state, on its own ----------------------------------------------------------------


def test_the_authorization_is_part_of_the_config_version() -> None:
    async def scenario() -> None:
        state = MeshState("test", ControlMetrics())
        state.replace(Snapshot({"web": proxy_pb2.Service(name="web")}))
        bare = state.config_version
        watch = state.subscribe_config()
        assert state.take_config(watch) is not None
        policy = proxy_pb2.Authorization(policies=[proxy_pb2.AuthorizationPolicy(name="p", servers=["*"])])

        assert state.apply(Delta(authorization=policy))
        payload, _ = state.take_config(watch) or (b"", 0.0)
        update = discovery_pb2.ConfigUpdate.FromString(payload)
        assert update.version != bare and update.config.authorization == policy
        # Unchanged: no notification; replaced by the same content from a snapshot: none either.
        assert not state.apply(Delta(authorization=proxy_pb2.Authorization(policies=list(policy.policies))))
        assert not state.replace(state.snapshot()) and state.take_config(watch) is None
        assert not Delta()  # the authorization is kept unless a delta says otherwise
        # Empty is not none.
        assert state.apply(Delta(authorization=proxy_pb2.Authorization()))
        assert state.config_version not in (bare, update.version)
        assert state.apply(Delta(authorization=None)) and state.config_version == bare
        assert not discovery_pb2.ConfigUpdate.FromString(state.config_payload()).config.HasField("authorization")

    asyncio.run(scenario())
