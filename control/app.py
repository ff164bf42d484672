"""``pymesh control run``: the source, the mesh state, the Discovery and Identity services
(one gRPC server, over TLS with the control plane's own certificate unless ``plaintext``) and
the admin endpoint wired together on one uvloop event loop."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable

import prometheus_client
import uvloop

import pymesh

from .backoff import Backoff
from .http import AdminServer
from .identity.service import identity_service
from .identity.spiffe import SpiffeId, check_trust_domain, parse_spiffe_id
from .metrics import ControlMetrics
from .server import DiscoveryServer
from .settings import ControlSettings
from .sources import Source, SourceError, make_source
from .state import MeshState
from .tls import ServerCertificate, TlsFront
from .virtual_ip import parse_range

#: behind the TLS front, the gRPC server listens here (the port is the OS's choice)
INTERNAL_ADDRESS = "127.0.0.1:0"

log = logging.getLogger("pymesh.control")

async def run_source(source: Source, state: MeshState) -> None:
    """Loads the source into the state and follows its changes, for ever. When the source
    fails, the state keeps what it had (proxies are served their last good state) while the
    source is tried again with a growing delay."""
    backoff = Backoff()
    while True:
        try:
            await source.load(state)
            state.mark_loaded()
            backoff.reset()
            await source.watch(state)
            continue  # the source asked to be read again from scratch
        except SourceError as e:
            state.report_errors({**state.source_errors, e.where: e.message})
        except Exception:  # a bug; keep serving the last state and try again
            log.exception("the source %s failed", source.name)
            state.report_errors({**state.source_errors, "": "internal error; see the control plane's log"})
        await backoff.wait()


async def serve(settings: ControlSettings, announce: Callable[[str], None] | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Runs the control plane until ``stop`` is set (or SIGTERM/SIGINT). ``announce`` gets the
    ``listening IP:PORT`` and ``admin IP:PORT`` lines once both are bound."""
    control_identity = check_control_identity(settings)
    virtual_ip_range = parse_range(settings.virtual_ip_range)  # settings made in code are checked too
    source = make_source(settings.source, poll_interval=settings.poll_interval, etcd_prefix=settings.etcd_prefix,
                         virtual_ip_range=virtual_ip_range)
    metrics = ControlMetrics()
    state = MeshState(source.name, metrics, max_pending=settings.max_pending_updates)
    try:
        identity = identity_service(settings, source, metrics)  # a bad CA setting stops us here
        certificate = None if settings.plaintext else ServerCertificate(identity.ca, control_identity)
    except BaseException:
        await source.close()
        raise
    peers = identity.peers
    server = DiscoveryServer(state, source, metrics, peers, allow_register=settings.allow_register,
                             control_identity=str(control_identity))
    if settings.plaintext:
        log.warning("serving in PLAINTEXT: for local development only. Anyone who reaches %s can read "
                    "the whole mesh and every token proxies send; no caller has an identity", settings.listen)
    admin = AdminServer(state, metrics)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tasks: list[asyncio.Task[None]] = []
    front: TlsFront | None = None
    try:
        if certificate is None:
            listening = await server.start(settings.listen, identity.handler())
        else:
            front = TlsFront(certificate)
            backend = await server.start(INTERNAL_ADDRESS, identity.handler())
            listening = await front.start(settings.listen, backend)
            peers.front = front
        admin_address = await admin.start(settings.admin)
        tasks.append(asyncio.create_task(run_source(source, state), name="source"))
        tasks.append(asyncio.create_task(identity.follow_issuer(), name="issuer"))
        if certificate is not None:
            tasks.append(asyncio.create_task(certificate.follow(), name="server-certificate"))
        log.info("control plane for %s: discovery on %s, admin on %s", source.name, listening, admin_address)
        if announce is not None:
            announce(f"listening {listening}")
            announce(f"admin {admin_address}")
        await stop.wait()
        log.info("stopping")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.stop(settings.shutdown_grace)
        if front is not None:
            await front.stop()
        await admin.stop()
        await source.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def check_control_identity(settings: ControlSettings) -> SpiffeId:
    """The control plane's own identity, a workload id of its trust domain. Raises
    :class:`pymesh.ConfigError` naming ``trustDomain`` or ``identity``."""
    try:
        check_trust_domain(settings.trust_domain)
    except ValueError as e:
        raise pymesh.ConfigError("trustDomain", str(e)) from None
    try:
        identity = parse_spiffe_id(settings.control_identity)
    except ValueError as e:
        raise pymesh.ConfigError("identity", str(e)) from None
    if identity.trust_domain != settings.trust_domain:
        raise pymesh.ConfigError("identity", f"{identity} is not in the trust domain {settings.trust_domain!r}")
    return identity


def _print(line: str) -> None:
    print(line, flush=True)


def run(settings: ControlSettings) -> None:
    """Runs the control plane in this process on uvloop until SIGTERM/SIGINT."""
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prometheus_client.disable_created_metrics()  # this process serves only its own metrics
    uvloop.run(serve(settings, announce=_print))
