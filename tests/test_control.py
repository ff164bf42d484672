"""The control plane (`pymesh control run`) against real sources: a directory of YAML files
and etcd from Debian's package, talked to with a real gRPC client. No mocks."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pymesh._proto.pymesh.config.v1 import proxy_pb2
from pymesh._proto.pymesh.mesh.v1 import discovery_pb2, discovery_pb2_grpc
from pymesh.control.metrics import ControlMetrics
from pymesh.control.state import Delta, MeshState, Snapshot

from .console import plain_env
from .control_plane import ControlPlane, Etcd, StartControl, Watch, free_port, wait_for, write_services

#: a generous deadline for a change to reach watchers (the file source polls every 200 ms):
#: how fast a push is, is perf/bench_control.py's to measure
PUSH_TIMEOUT = 10.0

WEB = {"name": "web", "authorities": ["web.local"],
       "endpoints": [{"address": "127.0.0.1:8080"}, {"address": "127.0.0.1:8081", "weight": 2}]}
DB = {"name": "db", "endpoints": [{"address": "127.0.0.1:5432"}]}

@pytest.fixture
def services_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "services"
    directory.mkdir()
    write_services(directory / "a.yaml", [WEB, DB])
    return directory


def addresses(update: discovery_pb2.EndpointsUpdate) -> dict[str, int]:
    return {e.address: e.weight for e in update.added}


# -- the file source ----------------------------------------------------------------------


def test_config_and_endpoints_full_then_incremental(start_control: StartControl, services_dir: Path) -> None:
    control = start_control(f"file:{services_dir}")
    config_watch = control.watch_config()
    first = config_watch.next()
    assert [s.name for s in first.config.services] == ["db", "web"]
    assert all(not s.endpoints for s in first.config.services), "endpoints come from WatchEndpoints"
    assert list(first.config.services[1].authorities) == ["web.local"]
    assert first.version

    web = control.watch_endpoints("web")
    full = web.next()
    assert full.full and addresses(full) == {"127.0.0.1:8080": 0, "127.0.0.1:8081": 2} and full.version

    # An endpoint added and one removed: one incremental update, and the config stays.
    write_services(services_dir / "a.yaml", [
        {**WEB, "endpoints": [{"address": "127.0.0.1:8081", "weight": 2}, {"address": "127.0.0.1:8082"}]}, DB])
    change = web.next(timeout=PUSH_TIMEOUT)
    assert not change.full
    assert addresses(change) == {"127.0.0.1:8082": 0} and list(change.removed) == ["127.0.0.1:8080"]
    assert change.version != full.version
    config_watch.nothing_within(0.5)

    # A setting changes: a new full config with a new version.
    write_services(services_dir / "a.yaml", [
        {**WEB, "endpoints": [{"address": "127.0.0.1:8081", "weight": 2}, {"address": "127.0.0.1:8082"}],
         "timeouts": {"connect": "0.25s"}}, DB])
    second = config_watch.next(timeout=PUSH_TIMEOUT)
    assert second.version != first.version
    assert second.config.services[1].timeouts.connect.ToMilliseconds() == 250

    # A reconnecting watcher gets the whole current set first.
    web.cancel()
    again = control.watch_endpoints("web").next()
    assert again.full and addresses(again) == {"127.0.0.1:8081": 2, "127.0.0.1:8082": 0}
    assert again.version == change.version

    # A new file adds a service; removing it removes the service.
    write_services(services_dir / "b.yaml", [{"name": "api", "endpoints": [{"address": "127.0.0.1:9000"}]}])
    assert [s.name for s in config_watch.next(timeout=PUSH_TIMEOUT).config.services] == ["api", "db", "web"]
    (services_dir / "b.yaml").unlink()
    assert [s.name for s in config_watch.next(timeout=PUSH_TIMEOUT).config.services] == ["db", "web"]


def test_unknown_service_is_watched_until_it_appears(start_control: StartControl, services_dir: Path) -> None:
    control = start_control(f"file:{services_dir}")
    watch = control.watch_endpoints("later")
    first = watch.next()
    assert first.full and not first.added
    write_services(services_dir / "later.yaml", [{"name": "later", "endpoints": [{"address": "127.0.0.1:7000"}]}])
    assert addresses(watch.next(timeout=PUSH_TIMEOUT)) == {"127.0.0.1:7000": 0}


def test_bad_files_are_reported_and_the_last_good_state_served(start_control: StartControl,
                                                              services_dir: Path) -> None:
    control = start_control(f"file:{services_dir}")
    config_watch = control.watch_config()
    good = config_watch.next()
    web = control.watch_endpoints("web")
    assert web.next().full
    assert control.status().source_healthy

    # Malformed YAML: reported with the file and line; nothing changes for watchers.
    write_services(services_dir / "a.yaml", "services:\n  - name: web\n    endpoints: [{address: 127.0.0.1:8080\n")
    status = wait_for(lambda: (s := control.status()) and not s.source_healthy and s, timeout=PUSH_TIMEOUT)
    assert status, "the malformed file was not reported"
    assert "a.yaml" in status.source_error and "line" in status.source_error, status.source_error
    # An invalid service: the engine's field path, with the file.
    write_services(services_dir / "a.yaml", [{**WEB, "endpoints": [{"address": "not-an-address"}]}, DB])
    status = wait_for(lambda: "services[0].endpoints[0].address" in (s := control.status()).source_error and s,
                      timeout=PUSH_TIMEOUT)
    assert status, control.status().source_error
    assert status.source_error.startswith("a.yaml: services[0].endpoints[0].address:")
    assert "not a socket address" in status.source_error
    config_watch.nothing_within(0.3)
    web.nothing_within(0.1)
    # A watcher connecting now gets the last good state.
    assert control.watch_config(proxy_id="late").next().version == good.version
    assert addresses(control.watch_endpoints("web", proxy_id="late").next()) == {
        "127.0.0.1:8080": 0, "127.0.0.1:8081": 2}
    # One clear log line per error.
    assert control.logs.count("not a socket address") == 1, control.logs

    # Fixed: healthy again, and the change is pushed.
    write_services(services_dir / "a.yaml", [{**WEB, "endpoints": [{"address": "127.0.0.1:8090"}]}, DB])
    change = web.next(timeout=PUSH_TIMEOUT)
    assert addresses(change) == {"127.0.0.1:8090": 0}
    assert sorted(change.removed) == ["127.0.0.1:8080", "127.0.0.1:8081"]
    assert wait_for(lambda: control.status().source_healthy, timeout=PUSH_TIMEOUT)


def test_conflicts_across_files_name_the_file(start_control: StartControl, services_dir: Path) -> None:
    control = start_control(f"file:{services_dir}")
    config_watch = control.watch_config()
    good = config_watch.next()

    write_services(services_dir / "b.yaml", [{"name": "web", "endpoints": [{"address": "127.0.0.1:1"}]}])
    status = wait_for(lambda: not (s := control.status()).source_healthy and s, timeout=PUSH_TIMEOUT)
    assert status.source_error == ("b.yaml: services[0].name: service 'web' is already defined in a.yaml "
                                   "(services[0])"), status.source_error

    write_services(services_dir / "b.yaml", [{"name": "other", "authorities": ["web.local"]}])
    status = wait_for(lambda: "authorities" in (s := control.status()).source_error and s, timeout=PUSH_TIMEOUT)
    assert status.source_error.startswith("b.yaml: services[0].authorities[0]:"), status.source_error
    assert "web.local" in status.source_error and "a.yaml" in status.source_error
    config_watch.nothing_within(0.2)
    assert control.watch_config(proxy_id="late").next().version == good.version

    write_services(services_dir / "b.yaml", [{"name": "other", "authorities": ["other.local"]}])
    assert [s.name for s in config_watch.next(timeout=PUSH_TIMEOUT).config.services] == ["db", "other", "web"]
    assert wait_for(lambda: control.status().source_healthy, timeout=PUSH_TIMEOUT)


def test_register_deregister_and_ttl_with_the_file_source(start_control: StartControl,
                                                        services_dir: Path) -> None:
    import grpc

    control = start_control(f"file:{services_dir}")
    web = control.watch_endpoints("web")
    assert web.next().full
    control.register("web", "127.0.0.1:9001", weight=3)
    assert addresses(web.next(timeout=PUSH_TIMEOUT)) == {"127.0.0.1:9001": 3}
    control.deregister("web", "127.0.0.1:9001")
    assert list(web.next(timeout=PUSH_TIMEOUT).removed) == ["127.0.0.1:9001"]

    control.register("web", "127.0.0.1:9002", ttl=0.5)
    assert addresses(web.next(timeout=PUSH_TIMEOUT)) == {"127.0.0.1:9002": 0}
    assert list(web.next(timeout=PUSH_TIMEOUT).removed) == ["127.0.0.1:9002"], "the registration did not expire"

    with pytest.raises(grpc.RpcError) as bad:
        control.register("web", "nowhere")
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.value.details().startswith("endpoint.address:")
    with pytest.raises(grpc.RpcError) as unknown:
        control.register("nope", "127.0.0.1:1")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as missing:
        control.deregister("web", "127.0.0.1:9999")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_status_metrics_and_health(start_control: StartControl, services_dir: Path) -> None:
    control = start_control(f"file:{services_dir}")
    assert httpx.get(f"http://{control.admin}/live", timeout=5).status_code == 200
    assert httpx.get(f"http://{control.admin}/ready", timeout=5).status_code == 200
    config_watch = control.watch_config(proxy_id="proxy-1", workload="web", namespace="default")
    update = config_watch.next()
    control.watch_endpoints("web", proxy_id="proxy-1").next()
    control.watch_endpoints("db", proxy_id="proxy-1").next()

    status = control.status()
    assert status.source == f"file:{services_dir}" and status.source_healthy and status.version
    assert status.config_version == update.version
    [proxy] = status.proxies
    assert proxy.identity.proxy_id == "proxy-1" and proxy.identity.workload == "web"
    assert proxy.config_version == update.version and proxy.endpoint_watches == 2

    metrics = httpx.get(f"http://{control.admin}/metrics", timeout=5).text
    assert "control_connected_proxies 1.0" in metrics
    assert 'control_active_watches{kind="endpoints"} 2.0' in metrics
    assert 'control_pushes_total{full="true",kind="config"} 1.0' in metrics
    assert 'control_push_latency_seconds_count{kind="endpoints"} 2.0' in metrics
    assert "control_source_healthy 1.0" in metrics and "control_services 2.0" in metrics


def test_check_command(start_control: StartControl, services_dir: Path) -> None:
    control = start_control(f"file:{services_dir}")
    control.watch_config(proxy_id="proxy-1").next()

    def check(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", "from pymesh.cli import main; main()", "check", *args],
                              capture_output=True, text=True, timeout=60, env=plain_env())

    def verdicts(result: subprocess.CompletedProcess[str]) -> dict[str, bool]:
        return {c["name"]: c["ok"] for c in json.loads(result.stdout)["checks"]}

    result = check("--control-plane", control.address, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and all(verdicts(result).values()), report
    assert verdicts(result)["control plane is reachable"] is True
    assert [p["proxy_id"] for p in report["proxies"]] == ["proxy-1"]
    assert report["proxies"][0]["config_version"] == control.status().config_version
    # The same verdicts for a person: one mark per check, the proxy listed.
    text = check("--control-plane", control.address)
    assert text.returncode == 0, text.stdout + text.stderr
    assert "✔ control plane is reachable" in text.stdout and "✖" not in text.stdout
    assert "proxy-1" in text.stdout

    # A broken source fails the check.
    write_services(services_dir / "a.yaml", "services: [")
    assert wait_for(lambda: not control.status().source_healthy, timeout=10)
    result = check("--control-plane", control.address, "--json")
    assert result.returncode == 1 and verdicts(result)["source is healthy"] is False, result.stdout
    assert "✖ source is healthy" in check("--control-plane", control.address).stdout

    control.stop()
    result = check("--control-plane", control.address, "--timeout", "1", "--json")
    assert result.returncode == 1
    assert verdicts(result)["control plane is reachable"] is False, result.stdout


def test_run_refuses_a_bad_source(tmp_path: Path) -> None:
    # A long path, as temporary directories can be: the message must not depend on wrapping.
    missing = tmp_path / ("deep" * 30) / "missing"
    result = subprocess.run([sys.executable, "-c", "from pymesh.cli import main; main()", "control", "run",
                             "--source", f"file:{missing}"], capture_output=True, text=True, timeout=60,
                            env=plain_env())
    assert result.returncode == 2, result.stderr
    assert f"{missing}' is not a directory" in result.stderr, result.stderr


# -- etcd ---------------------------------------------------------------------------------


def test_etcd_watch_register_deregister_ttl(start_control: StartControl, etcd: Etcd) -> None:
    etcd.put("/pymesh/services/web", {"authorities": ["web.local"]})
    etcd.put("/pymesh/endpoints/web/127.0.0.1:8080", {"weight": 2})
    control = start_control(f"etcd:{etcd.endpoint}")
    config_watch = control.watch_config()
    assert [s.name for s in config_watch.next().config.services] == ["web"]
    web = control.watch_endpoints("web")
    assert addresses(web.next()) == {"127.0.0.1:8080": 2}

    control.register("web", "127.0.0.1:8081")
    assert addresses(web.next(timeout=PUSH_TIMEOUT)) == {"127.0.0.1:8081": 0}
    assert etcd.get("/pymesh/registrations/web/127.0.0.1:8081") == {"value": '{"address":"127.0.0.1:8081"}',
                                                                 "lease": 0}
    control.deregister("web", "127.0.0.1:8081")
    assert list(web.next(timeout=PUSH_TIMEOUT).removed) == ["127.0.0.1:8081"]
    assert etcd.get("/pymesh/registrations/web/127.0.0.1:8081") is None

    # A ttl is an etcd lease: etcd expires the key (its minimum lease is about 2 s).
    control.register("web", "127.0.0.1:8082", ttl=1)
    assert addresses(web.next(timeout=PUSH_TIMEOUT)) == {"127.0.0.1:8082": 0}
    assert etcd.get("/pymesh/registrations/web/127.0.0.1:8082")["lease"] != 0
    assert list(web.next(timeout=PUSH_TIMEOUT + 5).removed) == ["127.0.0.1:8082"]

    # Written straight to etcd, by any tool: pushed.
    etcd.put("/pymesh/services/web", {"authorities": ["web.local", "web.example"]})
    assert list(config_watch.next(timeout=PUSH_TIMEOUT).config.services[0].authorities) == [
        "web.local", "web.example"]
    etcd.delete("/pymesh/endpoints/web/127.0.0.1:8080")
    assert list(web.next(timeout=PUSH_TIMEOUT).removed) == ["127.0.0.1:8080"]


def test_etcd_invalid_values_keep_the_last_good(start_control: StartControl, etcd: Etcd) -> None:
    etcd.put("/pymesh/services/web", {"authorities": ["web.local"]})
    etcd.put("/pymesh/services/db", {})
    control = start_control(f"etcd:{etcd.endpoint}")
    config_watch = control.watch_config()
    good = config_watch.next()

    etcd.put("/pymesh/services/web", {"timeouts": {"connect": "soon"}})
    status = wait_for(lambda: not (s := control.status()).source_healthy and s, timeout=PUSH_TIMEOUT)
    assert status.source_error.startswith("/pymesh/services/web: timeouts.connect:"), status.source_error
    etcd.put("/pymesh/services/db", {"authorities": ["web.local"]})
    status = wait_for(lambda: "/pymesh/services/db" in (s := control.status()).source_error and s,
                      timeout=PUSH_TIMEOUT)
    assert "web.local" in status.source_error
    etcd.put("/pymesh/endpoints/web/bogus", {})
    status = wait_for(lambda: "/pymesh/endpoints/web/bogus" in (s := control.status()).source_error and s,
                      timeout=PUSH_TIMEOUT)
    assert "/pymesh/endpoints/web/bogus: address:" in status.source_error
    config_watch.nothing_within(0.3)
    assert control.watch_config(proxy_id="late").next().version == good.version

    etcd.put("/pymesh/services/web", {"authorities": ["web.local"], "timeouts": {"connect": "1s"}})
    assert config_watch.next(timeout=PUSH_TIMEOUT).version != good.version
    etcd.delete("/pymesh/services/db")
    etcd.delete("/pymesh/endpoints/web/bogus")
    assert wait_for(lambda: control.status().source_healthy, timeout=PUSH_TIMEOUT), control.status().source_error


def test_two_replicas_share_etcd(start_control: StartControl, etcd: Etcd) -> None:
    etcd.put("/pymesh/services/web", {})
    one = start_control(f"etcd:{etcd.endpoint}")
    two = start_control(f"etcd:{etcd.endpoint}")
    watch_two = two.watch_endpoints("web")
    watch_one = one.watch_endpoints("web")
    assert watch_two.next().full and watch_one.next().full

    one.register("web", "127.0.0.1:8080", ttl=30)
    assert addresses(watch_two.next(timeout=PUSH_TIMEOUT)) == {"127.0.0.1:8080": 0}
    assert addresses(watch_one.next(timeout=PUSH_TIMEOUT)) == {"127.0.0.1:8080": 0}
    two.deregister("web", "127.0.0.1:8080")
    assert list(watch_one.next(timeout=PUSH_TIMEOUT).removed) == ["127.0.0.1:8080"]
    assert one.status().config_version == two.status().config_version


def test_etcd_outage_serves_the_last_state_and_resumes(start_control: StartControl, etcd: Etcd) -> None:
    etcd.put("/pymesh/services/web", {})
    etcd.put("/pymesh/endpoints/web/127.0.0.1:8080", {})
    control = start_control(f"etcd:{etcd.endpoint}")
    web = control.watch_endpoints("web")
    assert addresses(web.next()) == {"127.0.0.1:8080": 0}

    etcd.kill()
    status = wait_for(lambda: not (s := control.status()).source_healthy and s, timeout=10)
    assert status, "the outage was not reported"
    assert status.source_error.startswith("connection: "), status.source_error
    # While etcd is away, watchers keep their streams and newcomers get the last state.
    assert addresses(control.watch_endpoints("web", proxy_id="late").next()) == {"127.0.0.1:8080": 0}
    assert web.error is None

    # Changes made while the control plane cannot reach etcd: etcd runs for a while on a
    # port the control plane does not know, then comes back on its own port.
    client_port = etcd.client_port
    etcd.client_port = free_port()
    etcd.start()
    etcd.put("/pymesh/endpoints/web/127.0.0.1:8081", {})
    etcd.delete("/pymesh/endpoints/web/127.0.0.1:8081")
    etcd.put("/pymesh/endpoints/web/127.0.0.1:8082", {})
    etcd.kill()
    etcd.client_port = client_port
    etcd.start()

    # A resumed watch replays each change, in order, once; a re-read of the prefix would
    # show only the end result (one update adding 8082).
    first = web.next(timeout=20)
    assert addresses(first) == {"127.0.0.1:8081": 0} and not first.full, first
    second = web.next(timeout=5)
    assert list(second.removed) == ["127.0.0.1:8081"] and not second.added, second
    third = web.next(timeout=5)
    assert addresses(third) == {"127.0.0.1:8082": 0} and not third.removed, third
    web.nothing_within(1.0)
    assert wait_for(lambda: control.status().source_healthy, timeout=10), control.status().source_error
    assert control.logs.count("loaded 1 services") == 1, "the prefix was read again"


# -- the state, on its own ----------------------------------------------------------------


def test_a_slow_watcher_is_resynchronised_not_queued_forever() -> None:
    async def scenario() -> None:
        state = MeshState("test", ControlMetrics(), max_pending=4)
        state.replace(Snapshot({"web": proxy_pb2.Service(name="web")}, {}))
        slow = state.subscribe_endpoints("web")
        fast = state.subscribe_endpoints("web")
        for watch in (slow, fast):
            first = discovery_pb2.EndpointsUpdate.FromString(state.take_endpoints(watch)[0])
            assert first.full and not first.added
        for i in range(10):
            state.apply(Delta(endpoints={"web": {f"127.0.0.1:{8000 + i}": proxy_pb2.Endpoint()}}))
            payload, _, full = state.take_endpoints(fast)
            assert not full and [e.address for e in discovery_pb2.EndpointsUpdate.FromString(payload).added] == [
                f"127.0.0.1:{8000 + i}"]
        # The slow one never read: its queue stayed bounded, and it gets one full state.
        assert len(slow.pending) == 0 and slow.needs_full and slow.resyncs == 1
        payload, _, full = state.take_endpoints(slow)
        update = discovery_pb2.EndpointsUpdate.FromString(payload)
        assert full and update.full and len(update.added) == 10
        assert update.version == state.endpoints_version("web")
        assert state.take_endpoints(slow) is None

    asyncio.run(scenario())


def test_register_and_deregister_from_the_cli(start_control: StartControl, services_dir: Path) -> None:
    control = start_control(f"file:{services_dir}")
    web = control.watch_endpoints("web")
    web.next()  # the full set first

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", "from pymesh.cli import main; main()", "control", *args,
                               "--control-plane", control.address, "--plaintext"],
                              capture_output=True, text=True, timeout=30, env=plain_env())

    assert cli("register", "web", "127.0.0.1:9999", "--weight", "3").returncode == 0
    assert addresses(web.next(timeout=PUSH_TIMEOUT)) == {"127.0.0.1:9999": 3}
    assert cli("deregister", "web", "127.0.0.1:9999").returncode == 0
    assert list(web.next(timeout=PUSH_TIMEOUT).removed) == ["127.0.0.1:9999"]
    bad = cli("register", "web", "not-an-address")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr, bad.stderr


# -- a watcher that stops reading ------------------------------------------------------------


class StalledWatcher:
    """A gRPC client over HTTP/2 (the h2 library) that offers a tiny stream window and opens
    it only when told: to the server, exactly a proxy that stopped reading its stream."""

    WINDOW = 256

    def __init__(self, address: str, method: str, request: bytes) -> None:
        import h2.config
        import h2.connection
        import h2.settings

        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                         header_encoding="utf-8"))
        self.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.WINDOW})
        self.conn.initiate_connection()
        self.stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(self.stream, [
            (":method", "POST"), (":scheme", "http"), (":authority", address),
            (":path", f"/pymesh.mesh.v1.Discovery/{method}"),
            ("content-type", "application/grpc"), ("te", "trailers")])
        self.conn.send_data(self.stream, b"\x00" + len(request).to_bytes(4, "big") + request, end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        self.buffer = b""
        self.reading = False

    def open(self) -> None:
        """Starts reading: a large window, and every byte received acknowledged from now on."""
        self.reading = True
        self.conn.increment_flow_control_window(1 << 30)
        self.conn.increment_flow_control_window(1 << 30, stream_id=self.stream)
        self.sock.sendall(self.conn.data_to_send())

    def messages(self, quiet: float) -> list[bytes]:
        """The gRPC messages that arrive until nothing has for ``quiet`` seconds."""
        import h2.events

        self.sock.settimeout(quiet)
        while True:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    self.buffer += event.data
                    if self.reading:
                        self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            self.sock.sendall(self.conn.data_to_send())
        found = []
        while len(self.buffer) >= 5 and len(self.buffer) >= 5 + (size := int.from_bytes(self.buffer[1:5], "big")):
            found.append(self.buffer[5:5 + size])
            self.buffer = self.buffer[5 + size:]
        return found

    def close(self) -> None:
        self.sock.close()


def test_a_watcher_that_stops_reading_gets_one_fresh_full_state(start_control: StartControl, services_dir: Path,
                                                                 tmp_path: Path) -> None:
    """A proxy that stops reading its endpoint stream is not queued for without bound: past
    maxPendingUpdates (from `control run --config`) its queue is dropped, and when it reads
    again it gets one full state, the current one. A config stream sends the latest config."""
    settings = tmp_path / "control.yaml"
    settings.write_text("maxPendingUpdates: 4\npollInterval: 50ms\n")
    control = start_control(f"file:{services_dir}", "--config", str(settings))
    endpoints = StalledWatcher(control.address, "WatchEndpoints", discovery_pb2.WatchEndpointsRequest(
        service="web", identity=discovery_pb2.ProxyIdentity(proxy_id="stalled")).SerializeToString())
    config = StalledWatcher(control.address, "WatchConfig", discovery_pb2.WatchConfigRequest(
        identity=discovery_pb2.ProxyIdentity(proxy_id="stalled")).SerializeToString())
    try:
        [first] = [discovery_pb2.EndpointsUpdate.FromString(m) for m in endpoints.messages(quiet=2)]
        assert first.full and addresses(first) == {"127.0.0.1:8080": 0, "127.0.0.1:8081": 2}
        first_config = [discovery_pb2.ConfigUpdate.FromString(m) for m in config.messages(quiet=0.5)]
        assert len(first_config) == 1, first_config

        # Far more changes than the window lets through and the queue may hold.
        registered = [f"127.0.0.1:{9000 + i}" for i in range(60)]
        for address in registered:
            control.register("web", address)
        # Each config change its own version: a watcher that does read sees every one.
        reader = control.watch_config(proxy_id="reader")
        reader.next()
        for i in range(20):
            write_services(services_dir / "a.yaml", [{**WEB, "timeouts": {"connect": f"{(100 + i) / 1000}s"}}, DB])
            seen = reader.next(timeout=PUSH_TIMEOUT)
            assert seen.config.services[1].timeouts.connect.ToMilliseconds() == 100 + i
        wanted_config = seen.version

        endpoints.open()
        updates = [discovery_pb2.EndpointsUpdate.FromString(m) for m in endpoints.messages(quiet=2)]
        fulls = [u for u in updates if u.full]
        assert len(fulls) == 1 and updates[-1].full, [(u.full, len(u.added)) for u in updates]
        assert set(addresses(updates[-1])) == {"127.0.0.1:8080", "127.0.0.1:8081", *registered}
        assert len(updates) < len(registered), "every change was queued for the stalled watcher"
        metrics = httpx.get(f"http://{control.admin}/metrics", timeout=5).text
        assert 'control_watch_resyncs_total{kind="endpoints"} 1.0' in metrics or \
            "control_watch_resyncs_total 1.0" in metrics, [m for m in metrics.splitlines() if "resync" in m]

        config.open()
        configs = [discovery_pb2.ConfigUpdate.FromString(m) for m in config.messages(quiet=2)]
        assert configs and configs[-1].version == wanted_config, [c.version for c in configs]
        assert configs[-1].config.services[1].timeouts.connect.ToMilliseconds() == 119
        assert len(configs) < 20, "every config version was sent to the stalled watcher"
    finally:
        endpoints.close()
        config.close()


def _refuses_new_calls(address: str) -> bool:
    """Whether a new call to ``address`` is refused (the server stopped taking RPCs)."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        stub = discovery_pb2_grpc.DiscoveryStub(channel)
        try:
            stub.Status(discovery_pb2.StatusRequest(), timeout=2)
        except grpc.RpcError:
            return True
    return False


def _watched_control(start_control: StartControl, services_dir: Path, tmp_path: Path,
                     grace: str) -> tuple[ControlPlane, Watch]:
    """A control plane with ``shutdownGrace: grace`` (from a settings file) and an endpoints
    watch that has had its first update."""
    settings = tmp_path / "settings.yaml"
    settings.write_text(f"shutdownGrace: {grace}\n")
    control = start_control(f"file:{services_dir}", "--config", str(settings))
    watch = control.watch_endpoints("web")
    assert {e.address for e in watch.next().added} == {"127.0.0.1:8080", "127.0.0.1:8081"}
    return control, watch


def test_shutdown_waits_its_grace_for_calls_in_flight(start_control: StartControl, services_dir: Path,
                                                      tmp_path: Path) -> None:
    control, watch = _watched_control(start_control, services_dir, tmp_path, "60s")
    control.process.send_signal(signal.SIGTERM)
    # New calls are refused at once; the stream in flight is still open, and so is the process.
    assert wait_for(lambda: _refuses_new_calls(control.address), timeout=10), control.logs
    assert control.process.poll() is None and watch.error is None, control.logs
    # Once the last call ends, the control plane exits cleanly: it does not sit out the grace.
    watch.call.cancel()
    assert control.process.wait(timeout=30) == 0, control.logs


def test_shutdown_ends_calls_still_open_when_the_grace_is_over(start_control: StartControl, services_dir: Path,
                                                               tmp_path: Path) -> None:
    control, watch = _watched_control(start_control, services_dir, tmp_path, "200ms")
    control.process.send_signal(signal.SIGTERM)
    # The client holds its stream open; the grace ends it, and the process exits 0.
    assert control.process.wait(timeout=30) == 0, control.logs
    assert wait_for(lambda: watch.error is not None, timeout=10), "the stream was never ended"
