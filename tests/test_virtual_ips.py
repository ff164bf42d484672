"""Virtual IPs from the control plane: hashed from a service's name in a range (file and etcd
sources), explicit ones kept, ClusterIPs from Kubernetes; all seen by a real Discovery
client of real `pymesh control run` processes, on real etcd and a real kube-apiserver."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .console import plain_env
from .control_plane import ControlPlane, Etcd, KubeApiServer, StartControl, wait_for, write_services

#: the file source polls every 200 ms; this is a deadline, not a measure of speed
PUSH_TIMEOUT = 10.0
DEFAULT_RANGE = ipaddress.ip_network("10.240.0.0/16")

WEB = {"name": "web", "authorities": ["web.local"], "endpoints": [{"address": "127.0.0.1:8080"}]}
DB = {"name": "db", "endpoints": [{"address": "127.0.0.1:5432"}]}
API = {"name": "api"}


def virtual_ips(update: Any) -> dict[str, str]:
    """Service name → virtual IP, from a ConfigUpdate."""
    return {s.name: s.virtual_ip for s in update.config.services}


def assert_hashed(ips: dict[str, str], network: ipaddress.IPv4Network | ipaddress.IPv6Network = DEFAULT_RANGE,
                  ) -> None:
    """Each address is in ``network``, neither its network nor its broadcast address, and
    no two services share one."""
    for name, ip in ips.items():
        address = ipaddress.ip_address(ip)
        assert address in network, (name, ip)
        assert address not in (network.network_address, network.broadcast_address), (name, ip)
    assert len(set(ips.values())) == len(ips), ips


def error_at(control: ControlPlane, where: str) -> str:
    """The control plane's current source error for ``where`` (a file or a key), or ""."""
    return next((line for line in control.status().source_error.splitlines() if line.startswith(f"{where}: ")), "")


@pytest.fixture
def services_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "services"
    directory.mkdir()
    write_services(directory / "a.yaml", [WEB, DB, API])
    return directory


# -- the file source ----------------------------------------------------------------------


def test_hashed_virtual_ips_agree_across_replicas_and_restarts(start_control: StartControl,
                                                                services_dir: Path) -> None:
    one = start_control(f"file:{services_dir}")
    first = virtual_ips(one.watch_config().next())
    assert set(first) == {"api", "db", "web"}
    assert_hashed(first)

    # A second replica on the same source computes the same addresses (and config version).
    two = start_control(f"file:{services_dir}")
    assert virtual_ips(two.watch_config().next()) == first
    assert one.status().config_version == two.status().config_version

    # So does a control plane started after the first one is gone.
    version = one.status().config_version
    one.stop()
    again = start_control(f"file:{services_dir}")
    assert virtual_ips(again.watch_config().next()) == first
    assert again.status().config_version == version


def test_an_explicit_virtual_ip_is_kept_and_hashed_ones_avoid_it(start_control: StartControl,
                                                                 services_dir: Path) -> None:
    control = start_control(f"file:{services_dir}")
    watch = control.watch_config()
    before = virtual_ips(watch.next())

    # A new service claims the address web was hashed to; an IPv6 one is streamed canonical.
    write_services(services_dir / "b.yaml", [{"name": "cache", "virtualIp": before["web"]},
                                             {"name": "search", "virtualIp": "FD00:0:0::7"}])
    after = virtual_ips(watch.next(timeout=PUSH_TIMEOUT))
    assert after["cache"] == before["web"] and after["search"] == "fd00::7"
    assert after["web"] != before["web"], "the hashed address did not make way for the explicit one"
    assert_hashed({n: after[n] for n in ("api", "db", "web")})
    assert after["web"] not in (after["cache"], after["search"])
    assert after["db"] == before["db"] and after["api"] == before["api"], "an unrelated service moved"

    # Without the claim, web gets its first address back: the assignment depends on the
    # services alone, not on history.
    (services_dir / "b.yaml").unlink()
    assert virtual_ips(watch.next(timeout=PUSH_TIMEOUT)) == before


def test_bad_virtual_ips_in_files_are_refused_and_the_last_good_state_served(start_control: StartControl,
                                                                            services_dir: Path) -> None:
    write_services(services_dir / "a.yaml", [{**WEB, "virtualIp": "10.240.1.1"}, DB, API])
    control = start_control(f"file:{services_dir}")
    watch = control.watch_config()
    good = watch.next()
    assert virtual_ips(good)["web"] == "10.240.1.1"

    # Another file gives the same address: that file is refused, naming both services.
    write_services(services_dir / "b.yaml", [{"name": "cache", "virtualIp": "10.240.1.1"}])
    error = wait_for(lambda: error_at(control, "b.yaml"), timeout=PUSH_TIMEOUT)
    assert not control.status().source_healthy
    assert error.startswith("b.yaml: services[0].virtualIp: 10.240.1.1 is already the virtual IP of service "
                            "'web' (a.yaml services[0])"), error
    assert "'cache'" in error

    # Two services of one file with the same address: refused with the field and both names.
    # (The engine may be the one to say so: its path names the field `virtual_ip`.)
    write_services(services_dir / "a.yaml", [{**WEB, "virtualIp": "10.240.1.1"}, {**DB, "virtualIp": "10.240.1.1"},
                                             API])
    line = wait_for(lambda: error_at(control, "a.yaml"), timeout=PUSH_TIMEOUT)
    assert line.startswith("a.yaml: services[1].virtual"), line
    assert "is already the virtual IP of service" in line and "web" in line and "'db'" in line, line

    # Not an IP address.
    write_services(services_dir / "c.yaml", [{"name": "queue", "virtualIp": "10.240.1.2:80"}])
    line = wait_for(lambda: error_at(control, "c.yaml"), timeout=PUSH_TIMEOUT)
    assert line.startswith("c.yaml: services[0].virtual") and "is not an IP address" in line, line

    # Meanwhile the last good state is what every proxy gets, old watchers and new.
    watch.nothing_within(0.3)
    late = control.watch_config(proxy_id="late").next()
    assert late.version == good.version and virtual_ips(late) == virtual_ips(good)

    # Fixed: healthy, and the new services are streamed.
    write_services(services_dir / "a.yaml", [{**WEB, "virtualIp": "10.240.1.1"}, DB, API])
    write_services(services_dir / "b.yaml", [{"name": "cache", "virtualIp": "10.240.1.3"}])
    (services_dir / "c.yaml").unlink()
    assert wait_for(lambda: control.status().source_healthy, timeout=PUSH_TIMEOUT), control.status().source_error
    latest = virtual_ips(control.watch_config(proxy_id="after").next())
    assert latest["web"] == "10.240.1.1" and latest["cache"] == "10.240.1.3"


def test_virtual_ips_come_from_the_configured_range(start_control: StartControl, services_dir: Path,
                                                    tmp_path: Path) -> None:
    settings = tmp_path / "control.yaml"
    settings.write_text(yaml.safe_dump({"virtualIpRange": "fd00:10:240::/112"}))
    control = start_control(f"file:{services_dir}", "--config", str(settings))
    ips = virtual_ips(control.watch_config().next())
    assert set(ips) == {"api", "db", "web"}
    assert_hashed(ips, ipaddress.ip_network("fd00:10:240::/112"))


@pytest.mark.parametrize(("value", "phrase"), [
    ("10.240.0.0/30", "is too small"),
    ("not-a-network", "is not a network"),
    ("10.240.0.1/16", "did you mean 10.240.0.0/16"),
    (16, "expected a network"),
])
def test_a_bad_virtual_ip_range_is_refused(services_dir: Path, tmp_path: Path, value: object, phrase: str) -> None:
    settings = tmp_path / "control.yaml"
    settings.write_text(yaml.safe_dump({"virtualIpRange": value}))
    result = subprocess.run(
        [sys.executable, "-c", "from pymesh.cli import main; main()", "control", "run", "--source",
         f"file:{services_dir}", "--config", str(settings), "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
         "--plaintext"],
        capture_output=True, text=True, timeout=30, env=plain_env(PYMESH_CONTROL_STATE_DIR=str(tmp_path / "state")))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "virtualIpRange" in result.stderr and phrase in result.stderr, result.stderr
    assert "listening" not in result.stdout


# -- etcd ---------------------------------------------------------------------------------


def test_etcd_virtual_ips_are_shared_kept_and_checked(start_control: StartControl, etcd: Etcd) -> None:
    etcd.put("/pymesh/services/web", {"authorities": ["web.local"]})
    etcd.put("/pymesh/services/db", {})
    etcd.put("/pymesh/services/api", {"virtualIp": "10.240.7.7"})
    one = start_control(f"etcd:{etcd.endpoint}")
    two = start_control(f"etcd:{etcd.endpoint}")
    watch_one, watch_two = one.watch_config(), two.watch_config()
    first = virtual_ips(watch_one.next())
    assert first["api"] == "10.240.7.7"
    assert_hashed(first)
    assert virtual_ips(watch_two.next()) == first

    # An explicit address web was hashed to: on every replica, the new service has it and
    # web moves; db stays.
    etcd.put("/pymesh/services/cache", {"virtualIp": first["web"]})
    moved = virtual_ips(watch_one.next(timeout=PUSH_TIMEOUT))
    assert moved["cache"] == first["web"] and moved["web"] != first["web"] and moved["db"] == first["db"]
    assert_hashed({n: moved[n] for n in ("api", "db", "web")})
    assert virtual_ips(watch_two.next(timeout=PUSH_TIMEOUT)) == moved

    # A control plane started afresh reads the same.
    one.stop()
    three = start_control(f"etcd:{etcd.endpoint}")
    assert virtual_ips(three.watch_config().next()) == moved
    good_version = two.status().config_version
    assert three.status().config_version == good_version

    # The same address twice, or one that is not an IP address: the key is refused, naming
    # the other service; the key's last good value is kept.
    etcd.put("/pymesh/services/dup", {"virtualIp": "10.240.7.7"})
    etcd.put("/pymesh/services/web", {"authorities": ["web.local"], "virtualIp": "web.local"})
    dup = wait_for(lambda: error_at(two, "/pymesh/services/dup"), timeout=PUSH_TIMEOUT)
    web = wait_for(lambda: error_at(two, "/pymesh/services/web"), timeout=PUSH_TIMEOUT)
    assert dup.startswith("/pymesh/services/dup: virtualIp: 10.240.7.7 is already the virtual IP of service "
                          "'api' (/pymesh/services/api)"), dup
    assert web.startswith("/pymesh/services/web: virtual") and "is not an IP address" in web, web
    watch_two.nothing_within(0.3)
    late = two.watch_config(proxy_id="late").next()
    assert late.version == good_version and virtual_ips(late) == moved

    etcd.delete("/pymesh/services/dup")
    etcd.put("/pymesh/services/web", {"authorities": ["web.local"]})
    assert wait_for(lambda: two.status().source_healthy, timeout=PUSH_TIMEOUT), two.status().source_error


# -- Kubernetes ---------------------------------------------------------------------------


def kube_service(name: str, *, annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "annotations": annotations or {}},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}], **spec}}


def test_kubernetes_virtual_ip_is_the_cluster_ip(kube: KubeApiServer, kube_control: ControlPlane) -> None:
    created = kube.apply(kube_service("vip-web"))
    kube.apply(kube_service("vip-headless", clusterIP="None"))
    web, headless = "vip-web.default.svc.cluster.local", "vip-headless.default.svc.cluster.local"
    watch = kube_control.watch_config()
    update = watch.next()
    while not {web, headless} <= set(virtual_ips(update)):
        update = watch.next(timeout=PUSH_TIMEOUT)  # the first state may predate the Services
    ips = virtual_ips(update)
    assert ips[web] == created["spec"]["clusterIPs"][0] == created["spec"]["clusterIP"], created["spec"]
    assert ips[headless] == "", "a headless Service has no virtual IP"

    # The annotation cannot set one: Kubernetes does. Refused; the last good settings stay.
    kube.apply(kube_service("vip-web", annotations={"config.pymesh.io/service": json.dumps({"virtualIp": "10.1.2.3"})}))
    error = wait_for(lambda: error_at(kube_control, "default/vip-web"), timeout=PUSH_TIMEOUT)
    assert error.startswith("default/vip-web: metadata.annotations[config.pymesh.io/service].virtualIp: set by "
                            "Kubernetes"), error
    assert virtual_ips(kube_control.watch_config(proxy_id="late").next())[web] == ips[web]
    kube.delete("Service", "default", "vip-web")
    kube.delete("Service", "default", "vip-headless")
