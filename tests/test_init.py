"""The init step (`pymesh-proxy init`) in network namespaces this test makes, for both backends.

Topology, all of it made here and deleted after each test: a hub namespace holding a bridge, and
two pods (`pod`, where the rules go, and `peer`), each with a veth to the bridge and addresses
only inside them (10.251.0.0/24 and fd00:251::/64; the peer also has 10.252.0.3 for the skip-CIDR
case). Plain listeners answer each connection with one JSON line saying which namespace and port
took it and the original destination netfilter kept (SO_ORIGINAL_DST), so a client sees at once
whether it was redirected and where it had meant to go. Nothing reaches any other host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from perf.harness import pods as podlib
from perf.harness.pods import run

from .conftest import proxy_binary

BACKENDS = ["nftables", "iptables-legacy"]
POD_V4, PEER_V4, PEER_V4_OTHER = "10.251.0.2", "10.251.0.3", "10.252.0.3"
POD_V6, PEER_V6 = "fd00:251::2", "fd00:251::3"
# Ports inside the test's own namespaces: the sidecar's defaults, an application port, and ones
# the skip flags name.
OUTBOUND, INBOUND, ADMIN, APP, SKIPPED_OUT, SKIPPED_IN = 4140, 4143, 4191, 8080, 9090, 5432
PROXY_UID = podlib.PROXY_UID

# Serves every port given on 0.0.0.0 and [::] until stdin closes or five minutes pass; answers
# each connection with one JSON line and closes it.
LISTENER = r"""
import json, os, selectors, socket, struct, sys, time
name, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
sel = selectors.DefaultSelector()
for port in ports:
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        s.listen(64)
        sel.register(s, selectors.EVENT_READ, port)
sel.register(sys.stdin, selectors.EVENT_READ, None)
print("ready", flush=True)

def original_dst(conn):
    try:
        if conn.family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
            port, = struct.unpack("!H", raw[2:4])
            return f"{socket.inet_ntop(socket.AF_INET, raw[4:8])}:{port}"
        raw = conn.getsockopt(socket.IPPROTO_IPV6, 80, 28)  # IP6T_SO_ORIGINAL_DST
        port, = struct.unpack("!H", raw[2:4])
        return f"[{socket.inet_ntop(socket.AF_INET6, raw[8:24])}]:{port}"
    except OSError:
        return None  # not redirected: netfilter has no original destination to give

deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    for key, _ in sel.select(timeout=1):
        if key.data is None:
            if not sys.stdin.readline():
                sys.exit(0)
            continue
        conn, peer = key.fileobj.accept()
        with conn:
            # What netfilter changed: a connection it left alone has its own address as the original.
            dst = original_dst(conn)
            here = conn.getsockname()
            if dst in (f"{here[0]}:{here[1]}", f"[{here[0]}]:{here[1]}"):
                dst = None
            answer = {"ns": name, "port": key.data, "original_dst": dst}
            conn.sendall((json.dumps(answer) + "\n").encode())
"""

# Connects (as the given uid/gid, if any) and prints what the listener answered, or the error.
CLIENT = r"""
import encodings.idna, json, os, socket, sys  # imported while the interpreter's files are readable
host, port = sys.argv[1], int(sys.argv[2])
if len(sys.argv) > 3:
    os.setgroups([])
    os.setgid(int(sys.argv[4]))
    os.setuid(int(sys.argv[3]))
try:
    with socket.create_connection((host, port), timeout=5) as s:
        s.settimeout(5)
        data = b""
        for _ in range(64):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    print(data.decode().strip() or json.dumps({"error": "empty answer"}))
except OSError as e:
    print(json.dumps({"error": str(e)}))
"""


def require_tools() -> None:
    if os.geteuid() != 0:
        pytest.fail("the init tests make network namespaces: run them as root")
    for tool, package in [("ip", "iproute2"), ("nft", "nftables"), ("iptables-legacy-restore", "iptables"),
                          ("ip6tables-legacy-save", "iptables")]:
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing (Debian's {package}): run scripts/install --test")


class Netns(podlib.Netns):
    """Network namespaces made by this test (perf/harness/pods.py), with its listeners and clients."""

    def init(self, ns: str, *flags: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.exec(ns, proxy_binary(), "init", *flags, check=check)

    def listen(self, ns: str, *ports: int) -> None:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", LISTENER, ns,
                                 *map(str, ports)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", f"listener in {ns} did not start (exit {proc.poll()})"

    def connect(self, ns: str, host: str, port: int, *, uid: int | None = None,
                gid: int | None = None) -> dict[str, object]:
        argv = [sys.executable, "-c", CLIENT, host, str(port)]
        if uid is not None:
            argv += [str(uid), str(gid if gid is not None else uid)]
        out = self.exec(ns, *argv).stdout.strip()
        return json.loads(out)


@pytest.fixture
def netns(request: pytest.FixtureRequest) -> Iterator[Netns]:
    require_tools()
    spaces = Netns(prefix=f"pmi{os.getpid()}-{abs(hash(request.node.nodeid)) % 10000}")
    try:
        yield spaces
    finally:
        spaces.close()


@dataclass
class Pods:
    net: Netns
    pod: str
    peer: str


@pytest.fixture
def pods(netns: Netns) -> Pods:
    """Two pods on a bridge; listeners on the redirect ports in `pod`, the application's in both."""
    podlib.bridge(netns, {"pod": [POD_V4, POD_V6], "peer": [PEER_V4, PEER_V4_OTHER, PEER_V6]})
    pod, peer = netns.ns("pod"), netns.ns("peer")
    run("ip", "-n", pod, "route", "add", "10.252.0.0/24", "dev", "eth0")
    netns.listen(pod, OUTBOUND, INBOUND, ADMIN, APP, SKIPPED_IN)
    netns.listen(peer, APP, SKIPPED_OUT)
    return Pods(netns, pod, peer)


def snapshot(net: Netns, ns: str, *, exact: bool = False) -> str:
    """Every netfilter rule of the namespace, both front ends; `exact` adds nft handles and
    iptables counters, which any rewrite of the rules would change (else counters read 0)."""
    nft = net.exec(ns, "nft", *(["-a"] if exact else []), "list", "ruleset").stdout
    saved = []
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        out = net.exec(ns, tool, *(["-c"] if exact else [])).stdout
        # The only lines that differ between two identical saves: "# Generated ... on <date>".
        lines = [line for line in out.splitlines() if not line.startswith("#")]
        if not exact:
            lines = [re.sub(r"\[\d+:\d+\]", "[0:0]", line) for line in lines]
        saved.append("\n".join(lines))
    return "\n".join([nft, *saved])


def settled_snapshot(net: Netns, ns: str) -> str:
    """An exact snapshot once two reads agree: the last packets of a connection that just closed
    (a late ACK or RST, on a busy machine) can still move a counter."""
    last = snapshot(net, ns, exact=True)
    for _ in range(25):  # bounded: 5 s
        time.sleep(0.2)
        now = snapshot(net, ns, exact=True)
        if now == last:
            return now
        last = now
    return last


def foreign_rules(net: Netns, ns: str) -> None:
    """Rules somebody else owns, which the init step must leave exactly as they are."""
    net.exec(ns, "nft", "add table inet keep { chain out { type filter hook output priority 0; "
             "policy accept; tcp dport 9 accept; }; }")
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        for chain in ("OUTPUT", "PREROUTING"):
            net.exec(ns, tool, "-t", "nat", "-A", chain, "-p", "udp", "--dport", "9", "-j", "RETURN")
        net.exec(ns, tool, "-A", "INPUT", "-p", "udp", "--dport", "9", "-j", "ACCEPT")


def redirected(answer: dict[str, object], pods: Pods, port: int, original: str) -> bool:
    return answer == {"ns": pods.pod, "port": port, "original_dst": original}


def direct(answer: dict[str, object], ns: str, port: int) -> bool:
    return answer == {"ns": ns, "port": port, "original_dst": None}


@pytest.mark.parametrize("backend", BACKENDS)
def test_outbound_goes_to_the_outbound_port_keeping_the_destination(pods: Pods, backend: str) -> None:
    net = pods.net
    # Before: straight to the peer.
    assert direct(net.connect(pods.pod, PEER_V4, APP), pods.peer, APP)
    out = net.init(pods.pod, "--backend", backend).stdout
    assert out.split() == ["install", f"{backend}:", "installed"]
    assert redirected(net.connect(pods.pod, PEER_V4, APP), pods, OUTBOUND, f"{PEER_V4}:{APP}")
    assert redirected(net.connect(pods.pod, PEER_V6, APP), pods, OUTBOUND, f"[{PEER_V6}]:{APP}")
    # Loopback is left alone: the pod's own application answers.
    assert direct(net.connect(pods.pod, "127.0.0.1", APP), pods.pod, APP)
    assert direct(net.connect(pods.pod, "::1", APP), pods.pod, APP)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_proxy_user_is_not_redirected(pods: Pods, backend: str) -> None:
    net = pods.net
    net.init(pods.pod, "--backend", backend)
    assert direct(net.connect(pods.pod, PEER_V4, APP, uid=PROXY_UID), pods.peer, APP)
    assert direct(net.connect(pods.pod, PEER_V6, APP, uid=PROXY_UID), pods.peer, APP)
    # Another unprivileged user is.
    assert redirected(net.connect(pods.pod, PEER_V4, APP, uid=PROXY_UID + 1), pods, OUTBOUND,
                      f"{PEER_V4}:{APP}")
    # Reconfigured: another proxy user, and a group whose members are skipped too.
    net.init(pods.pod, "--backend", backend, "--proxy-uid", "3000", "--proxy-gid", "3001")
    assert direct(net.connect(pods.pod, PEER_V4, APP, uid=3000, gid=3000), pods.peer, APP)
    assert direct(net.connect(pods.pod, PEER_V4, APP, uid=4000, gid=3001), pods.peer, APP)
    assert redirected(net.connect(pods.pod, PEER_V4, APP, uid=PROXY_UID), pods, OUTBOUND, f"{PEER_V4}:{APP}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_ports_and_cidrs_are_not_redirected(pods: Pods, backend: str) -> None:
    net = pods.net
    net.init(pods.pod, "--backend", backend, "--skip-outbound-ports", f"22,{SKIPPED_OUT}",
             "--skip-outbound-cidrs", f"10.252.0.0/24,{PEER_V6}")
    assert direct(net.connect(pods.pod, PEER_V4, SKIPPED_OUT), pods.peer, SKIPPED_OUT)
    assert direct(net.connect(pods.pod, PEER_V4_OTHER, APP), pods.peer, APP)
    assert direct(net.connect(pods.pod, PEER_V6, APP), pods.peer, APP)
    assert redirected(net.connect(pods.pod, PEER_V4, APP), pods, OUTBOUND, f"{PEER_V4}:{APP}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inbound_goes_to_the_inbound_port_except_admin_and_skip_ports(pods: Pods, backend: str) -> None:
    net = pods.net
    net.init(pods.pod, "--backend", backend, "--skip-inbound-ports", str(SKIPPED_IN))
    assert redirected(net.connect(pods.peer, POD_V4, APP), pods, INBOUND, f"{POD_V4}:{APP}")
    assert redirected(net.connect(pods.peer, POD_V6, APP), pods, INBOUND, f"[{POD_V6}]:{APP}")
    assert direct(net.connect(pods.peer, POD_V4, ADMIN), pods.pod, ADMIN)
    assert direct(net.connect(pods.peer, POD_V6, ADMIN), pods.pod, ADMIN)
    assert direct(net.connect(pods.peer, POD_V4, SKIPPED_IN), pods.pod, SKIPPED_IN)


@pytest.mark.parametrize("backend", BACKENDS)
def test_init_is_idempotent(pods: Pods, backend: str) -> None:
    net = pods.net
    flags = ["--backend", backend, "--skip-outbound-ports", "22", "--proxy-gid", "3001"]
    net.init(pods.pod, *flags)
    # One redirected connection, so the rules' counters are not all zero.
    assert redirected(net.connect(pods.pod, PEER_V4, APP), pods, OUTBOUND, f"{PEER_V4}:{APP}")
    before = settled_snapshot(net, pods.pod)
    again = net.init(pods.pod, *flags).stdout
    assert again.split() == ["install", f"{backend}:", "unchanged"]
    # Same handles, same counters: nothing was even rewritten.
    assert snapshot(net, pods.pod, exact=True) == before
    # A changed configuration replaces the rules instead of adding to them.
    net.init(pods.pod, "--backend", backend, "--outbound-port", str(APP))
    assert redirected(net.connect(pods.pod, PEER_V4, SKIPPED_OUT), pods, APP, f"{PEER_V4}:{SKIPPED_OUT}")
    net.init(pods.pod, *flags)
    assert snapshot(net, pods.pod) == snapshot_after_fresh_install(net, flags)


def snapshot_after_fresh_install(net: Netns, flags: list[str]) -> str:
    ns = net.add("fresh")
    net.init(ns, *flags)
    return snapshot(net, ns)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uninstall_restores_the_tables_exactly(netns: Netns, backend: str) -> None:
    ns = netns.add("alone")  # loopback only: no traffic moves a counter between the snapshots
    foreign_rules(netns, ns)
    before = snapshot(netns, ns, exact=True)
    netns.init(ns, "--backend", backend, "--skip-outbound-ports", "22", "--skip-outbound-cidrs",
               "10.96.0.0/12,fd00::/8")
    assert snapshot(netns, ns, exact=True) != before
    out = netns.init(ns, "--backend", backend, "--uninstall").stdout
    assert out.split() == ["uninstall", f"{backend}:", "removed"]
    assert snapshot(netns, ns, exact=True) == before
    # Nothing left to remove: nothing changes.
    out = netns.init(ns, "--backend", backend, "--uninstall").stdout
    assert out.split() == ["uninstall", f"{backend}:", "unchanged"]
    assert snapshot(netns, ns, exact=True) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_dry_run_prints_the_rules_and_changes_nothing(netns: Netns, backend: str) -> None:
    ns = netns.add("dry")
    foreign_rules(netns, ns)
    before = snapshot(netns, ns, exact=True)
    out = netns.init(ns, "--backend", backend, "--dry-run", "--outbound-port", "4999").stdout
    expected = "redirect to :4999" if backend == "nftables" else "-j REDIRECT --to-ports 4999"
    assert expected in out
    assert snapshot(netns, ns, exact=True) == before
    # The same through PYMESH_* variables, as a container passes them.
    env = netns.exec(ns, "env", f"PYMESH_INIT_BACKEND={backend}", "PYMESH_INIT_DRY_RUN=1",
                     "PYMESH_OUTBOUND_PORT=4999", proxy_binary(), "init").stdout
    assert env == out
    assert snapshot(netns, ns, exact=True) == before
    # And a dry-run uninstall leaves installed rules in place.
    netns.init(ns, "--backend", backend)
    installed = snapshot(netns, ns, exact=True)
    netns.init(ns, "--backend", backend, "--uninstall", "--dry-run")
    assert snapshot(netns, ns, exact=True) == installed


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_refused_and_changes_nothing(netns: Netns, backend: str) -> None:
    ns = netns.add("bad")
    netns.init(ns, "--backend", backend)
    before = snapshot(netns, ns, exact=True)
    for flags, named in [
        (["--no-such-flag"], "--no-such-flag"),
        (["--outbound-port", "70000"], "70000"),
        (["--inbound-port", "0"], "--inbound-port"),
        (["--skip-outbound-ports", "22,x"], '"x"'),
        (["--skip-outbound-ports", "9000-8000"], "9000-8000"),
        (["--skip-outbound-cidrs", "10.0.0.0/33"], "10.0.0.0/33"),
        (["--skip-outbound-cidrs", "not-a-net"], "not-a-net"),
        (["--inbound-port", "4140"], "--inbound-port"),
        (["--backend", "ipchains"], "ipchains"),
    ]:
        argv = flags if flags[0] == "--backend" else ["--backend", backend, *flags]
        result = netns.init(ns, *argv, check=False)
        assert result.returncode != 0, flags
        assert named in result.stderr, (flags, result.stderr)
        assert snapshot(netns, ns, exact=True) == before, flags


def test_a_missing_backend_tool_says_what_to_install(netns: Netns, tmp_path: Path) -> None:
    ns = netns.add("notool")
    env_path = f"PATH={tmp_path}"
    result = netns.exec(ns, "env", env_path, proxy_binary(), "init", check=False)
    assert result.returncode != 0
    assert "nftables" in result.stderr and "nft" in result.stderr
