"""Reloading the config: under traffic with zero failed requests, and a bad config
rejected with its field path while the running one stays."""

from __future__ import annotations

import copy
import os
import signal

import httpx
import pytest

import pymesh
from pymesh.metrics import total

from .backends import GATE_TIMEOUT, start_echo_backend
from .conftest import ProxyFactory, make_config, wait_until
from .traffic import Traffic


def test_reload_under_traffic_moves_endpoints_without_failures(start_proxy: ProxyFactory) -> None:
    old, new = start_echo_backend(), start_echo_backend()
    try:
        config = make_config({"web": [old.address]})
        proxy = start_proxy(config)
        with Traffic(proxy.address(), "web", clients=4) as traffic:
            traffic.wait_for(200)
            for i in range(6):  # flip between endpoint sets under load
                changed = copy.deepcopy(config)
                endpoints = [new.address] if i % 2 == 0 else [old.address, new.address]
                changed["services"][0]["endpoints"] = [{"address": a} for a in endpoints]
                proxy.reload(changed)
                traffic.wait_for(traffic.sent + 100)
        assert traffic.errors == []
        assert set(traffic.statuses) == {200}, traffic.statuses
        assert traffic.sent >= 800
        assert new.connections > 0
        assert total(proxy.metrics(), "config_reload_total", result="ok") == 6
    finally:
        old.stop()
        new.stop()


def test_bad_reload_is_rejected_and_the_old_config_keeps_serving(start_proxy: ProxyFactory) -> None:
    backend = start_echo_backend()
    try:
        config = make_config({"web": [backend.address]})
        proxy = start_proxy(config)
        bad = copy.deepcopy(config)
        bad["services"][0]["endpoints"][0]["address"] = "not-an-address"
        with Traffic(proxy.address(), "web", clients=2) as traffic:
            traffic.wait_for(50)
            with pytest.raises(pymesh.ConfigError) as error:
                proxy.reload(bad)
            assert error.value.path == "services[0].endpoints[0].address"
            assert "not a socket address" in str(error.value)
            traffic.wait_for(traffic.sent + 50)
        assert traffic.errors == [] and set(traffic.statuses) == {200}
        # The running config is still the old one.
        running = httpx.get(f"http://{proxy.admin}/config").json()
        assert running["services"][0]["endpoints"][0]["address"] == backend.address
        assert total(proxy.metrics(), "config_reload_total", result="rejected") == 1
    finally:
        backend.stop()


def test_reload_adds_and_removes_listeners(start_proxy: ProxyFactory) -> None:
    backend = start_echo_backend()
    try:
        config = make_config({"web": [backend.address]})
        proxy = start_proxy(config)
        first = proxy.address("main")
        with httpx.Client(base_url=f"http://{first}", headers={"host": "web"}) as kept_open:
            assert kept_open.get("/echo").status_code == 200
            grown = copy.deepcopy(config)
            grown["listeners"].append({"name": "extra", "address": "127.0.0.1:0"})
            proxy.reload(grown)
            extra = proxy.address("extra")
            assert httpx.get(f"http://{extra}/echo", headers={"host": "web"}).status_code == 200
            # The connection opened before the reload still works.
            assert kept_open.get("/echo").status_code == 200
            shrunk = copy.deepcopy(config)
            shrunk["listeners"][0]["name"] = "renamed"
            shrunk["listeners"][0]["address"] = "127.0.0.1:0"
            proxy.reload(shrunk)
            # Still open after its listener went away: connections in flight are not dropped.
            assert kept_open.get("/echo").status_code == 200
            # But the old address no longer accepts new connections.
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://{first}/echo", headers={"host": "web"})
    finally:
        backend.stop()


def test_native_reloads_on_file_change_and_sighup(native_proxy, tmp_path) -> None:  # noqa: ANN001
    old, new = start_echo_backend(), start_echo_backend()
    try:
        import yaml

        config = make_config({"web": [old.address]})
        proxy = native_proxy(config, "--watch-interval", "100ms")

        def reloads(result: str) -> float:
            return total(proxy.metrics(), "config_reload_total", result=result)

        def running() -> str:
            return httpx.get(f"http://{proxy.admin}/config", timeout=5).json()["services"][0]["endpoints"][0][
                "address"]

        with Traffic(proxy.address(), "web", clients=2) as traffic:
            traffic.wait_for(50)
            config["services"][0]["endpoints"] = [{"address": new.address}]
            proxy.config_path.write_text(yaml.safe_dump(config))
            assert wait_until(lambda: reloads("ok") == 1, timeout=10)
            served_before = new.connections
            traffic.wait_for(traffic.sent + 50)
            assert new.connections >= max(served_before, 1)

            # A broken file is rejected and logged; traffic carries on. (Padded with a comment
            # so that the next version can be given exactly its length.)
            broken = "listeners: [{address: nope}]\n#" + "-" * 4096 + "\n"
            proxy.config_path.write_text(broken)
            assert wait_until(lambda: reloads("rejected") == 1, timeout=10)
            traffic.wait_for(traffic.sent + 50)

            # SIGHUP re-reads the file even when the watcher sees no change: new content of
            # the same length renamed into place with the old modification time, so the
            # watcher's stamp (modification time, length) is unchanged and only the signal
            # applies it.
            mtime = proxy.config_path.stat().st_mtime_ns
            config["services"][0]["endpoints"] = [{"address": old.address}]
            text = yaml.safe_dump(config)
            text += "#" + "-" * (len(broken) - len(text) - 2) + "\n"
            assert len(text.encode()) == proxy.config_path.stat().st_size
            staged = proxy.config_path.with_name("staged.yaml")
            staged.write_text(text)
            os.utime(staged, ns=(mtime, mtime))
            staged.replace(proxy.config_path)
            proxy.process.send_signal(signal.SIGHUP)
            assert wait_until(lambda: reloads("ok") == 2, timeout=10), proxy.logs
            assert running() == old.address
            traffic.wait_for(traffic.sent + 50)
        assert traffic.errors == [] and set(traffic.statuses) == {200}, (traffic.errors[:3], traffic.statuses)
        assert reloads("rejected") == 1
    finally:
        old.stop()
        new.stop()


def test_native_reloads_on_sighup_without_watching(native_proxy) -> None:  # noqa: ANN001
    old, new = start_echo_backend(), start_echo_backend()
    try:
        import yaml

        config = make_config({"web": [old.address]})
        proxy = native_proxy(config, "--watch-interval", "0s")  # only SIGHUP reloads
        # A control that stays in: the same proxy with its watcher on (the default 1 s poll),
        # under the same load as the one under test.
        watching = native_proxy(config)
        config["services"][0]["endpoints"] = [{"address": new.address}]
        for changed in (proxy, watching):
            changed.config_path.write_text(yaml.safe_dump(config))

        def watcher_reloads(n: int) -> bool:
            return wait_until(lambda: total(watching.metrics(), "config_reload_total", result="ok") == n,
                              timeout=30)

        # The control takes the change, then a second one made after it: a whole watch cycle
        # later than any watcher that saw the first change, so one left on would have by now.
        assert watcher_reloads(1)
        config["services"][0]["endpoints"] = [{"address": old.address}]
        watching.config_path.write_text(yaml.safe_dump(config))
        assert watcher_reloads(2)
        assert total(proxy.metrics(), "config_reload_total") == 0
        proxy.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: total(proxy.metrics(), "config_reload_total", result="ok") == 1, timeout=10)
        response = httpx.get(f"http://{proxy.address()}/echo", headers={"host": "web"})
        assert response.status_code == 200 and new.connections == 1
    finally:
        old.stop()
        new.stop()


def test_a_request_in_flight_finishes_on_the_old_config(start_proxy: ProxyFactory) -> None:
    """A response still streaming when the config changes finishes from the endpoint the old
    config chose, while new requests already go by the new config."""
    old, new = start_echo_backend(), start_echo_backend()
    try:
        config = make_config({"web": [old.address]})
        proxy = start_proxy(config)
        with httpx.Client(base_url=f"http://{proxy.address()}", headers={"host": "web"},
                          timeout=GATE_TIMEOUT + 10) as client, client.stream("GET", "/gated?key=reload") as held:
            chunks = held.iter_raw()
            first = next(chunks)  # in flight: the old endpoint holds back the rest
            changed = copy.deepcopy(config)
            changed["services"][0]["endpoints"] = [{"address": new.address}]
            proxy.reload(changed)
            assert httpx.get(f"http://{proxy.address()}/echo", headers={"host": "web"}, timeout=10).status_code == 200
            assert new.connections == 1, "a new request did not use the new config"
            old.gate("reload").set()
            body = first + b"".join(chunks)
        assert body == b"first chunk;last chunk", body
        assert "reload" in old.gates and not new.gates
    finally:
        old.stop()
        new.stop()
