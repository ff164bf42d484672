"""The control plane's commands: ``pymesh control run|register|deregister|token|ca-bundle`` and
``pymesh check`` (talking to a control plane through :mod:`pymesh.control.client`).

Heavy imports (grpc, aiohttp, the sources) happen inside the commands, so that ``pymesh``
starts fast whatever it is asked to do.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from .settings import ControlSettings

control_app = typer.Typer(help="Run the control plane.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
SettingsOption = Annotated[Path | None, typer.Option(
    "--config", "-c", help="Settings as YAML (source, listen, admin, pollInterval, stateDir, …); flags win.",
    envvar="PYMESH_CONTROL_CONFIG", exists=True, dir_okay=False)]
TrustDomainOption = Annotated[str | None, typer.Option(
    help="The mesh's SPIFFE trust domain. Default cluster.local.", envvar="PYMESH_CONTROL_TRUST_DOMAIN")]
StateDirOption = Annotated[str | None, typer.Option(
    help="Where the generated CA and token secret live. Default ~/.local/state/pymesh/control.",
    envvar="PYMESH_CONTROL_STATE_DIR")]
TrustAnchorOption = Annotated[str | None, typer.Option(
    help="PEM trust anchor(s) the issuer chains to (default: generated in the state directory).",
    envvar="PYMESH_CONTROL_TRUST_ANCHOR_FILE")]
TokenSecretOption = Annotated[str | None, typer.Option(
    help="The secret per-workload tokens are made with (default: generated, STATE_DIR/token-secret).",
    envvar="PYMESH_CONTROL_TOKEN_SECRET_FILE")]
IssuerCertOption = Annotated[str | None, typer.Option(
    help="PEM certificate of the issuer that signs workload certificates (then any intermediates; without "
         "--trust-anchor-file, then the trust anchor, whose key stays offline); re-read when it changes.",
    envvar="PYMESH_CONTROL_ISSUER_CERT_FILE")]
IdentityOption = Annotated[str | None, typer.Option(
    "--identity", help="The control plane's SPIFFE id. Default spiffe://TRUST_DOMAIN/ns/pymesh-system/sa/pymesh-control.",
    envvar="PYMESH_CONTROL_IDENTITY")]
PlaintextOption = Annotated[bool, typer.Option(
    "--plaintext", help="No TLS: for local development only (anyone on the network reads and writes the mesh).",
    envvar="PYMESH_CONTROL_PLAINTEXT")]
TrustAnchorsClientOption = Annotated[Path | None, typer.Option(
    "--trust-anchors", help="PEM trust anchors to verify the control plane with (default: the state directory's).",
    dir_okay=False)]
CertOption = Annotated[Path | None, typer.Option(
    "--cert", help="PEM client certificate (then its chain) of a mesh identity.", dir_okay=False)]
KeyOption = Annotated[Path | None, typer.Option("--key", help="PEM private key of --cert.", dir_okay=False)]


@control_app.command("run")
def control_run(
    source: Annotated[str | None, typer.Option(
        help="file:DIR (a directory of YAML files), etcd:HOST:PORT[,HOST:PORT], or kubernetes[:KUBECONFIG].",
        envvar="PYMESH_CONTROL_SOURCE")] = None,
    listen: Annotated[str | None, typer.Option(
        help="IP:PORT for the Discovery gRPC service (port 0: a free one). Default 127.0.0.1:4200.",
        envvar="PYMESH_CONTROL_LISTEN")] = None,
    admin: Annotated[str | None, typer.Option(
        help="IP:PORT for /metrics, /live and /ready. Default 127.0.0.1:4290.",
        envvar="PYMESH_CONTROL_ADMIN")] = None,
    config: SettingsOption = None,
    log_level: Annotated[str | None, typer.Option(
        "--log-level", help="debug, info, warning or error.", envvar="PYMESH_LOG_LEVEL")] = None,
    trust_domain: TrustDomainOption = None,
    state_dir: StateDirOption = None,
    trust_anchor_file: TrustAnchorOption = None,
    issuer_cert_file: IssuerCertOption = None,
    issuer_key_file: Annotated[str | None, typer.Option(
        help="PEM private key of the issuer; re-read when it changes.",
        envvar="PYMESH_CONTROL_ISSUER_KEY_FILE")] = None,
    cert_lifetime: Annotated[str | None, typer.Option(
        help="Lifetime of a workload certificate, e.g. 24h (the default), 1h or 60s.",
        envvar="PYMESH_CONTROL_CERT_LIFETIME")] = None,
    token_secret_file: TokenSecretOption = None,
    identity: IdentityOption = None,
    plaintext: PlaintextOption = False,
    allow_register: Annotated[bool, typer.Option(
        "--allow-register", help="Serve Register/Deregister: a caller (over mutual TLS) registers endpoints of "
                                 "its own identity only, never replacing one the source defines.",
        envvar="PYMESH_CONTROL_ALLOW_REGISTER")] = False,
    token_audience: Annotated[str | None, typer.Option(
        help="The audience tokens must name (also of Kubernetes ServiceAccount tokens). Default pymesh-control.",
        envvar="PYMESH_CONTROL_TOKEN_AUDIENCE")] = None,
) -> None:
    """Run the control plane until SIGTERM/SIGINT: gRPC over TLS (its certificate from its own
    issuer), or plaintext with --plaintext. Prints `listening IP:PORT` and `admin IP:PORT` once
    both are bound."""
    import pymesh

    from .app import run
    from .settings import parse_duration
    from .sources import make_source

    settings = _load_settings(
        config, source=source, listen=listen, admin=admin, log_level=log_level, trust_domain=trust_domain,
        state_dir=state_dir, trust_anchor_file=trust_anchor_file, issuer_cert_file=issuer_cert_file,
        issuer_key_file=issuer_key_file, token_secret_file=token_secret_file, identity=identity,
        plaintext=plaintext or None, allow_register=allow_register or None, token_audience=token_audience,
        cert_lifetime=None if cert_lifetime is None else lambda: parse_duration(cert_lifetime, "certLifetime"))
    if not settings.source:
        raise typer.BadParameter("a source is required: file:DIR or etcd:HOST:PORT", param_hint="--source")
    try:
        make_source(settings.source)  # fail fast on a malformed spec
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--source") from e
    if settings.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise typer.BadParameter("expected debug, info, warning or error", param_hint="--log-level")
    try:
        run(settings)
    except pymesh.ConfigError as e:
        err.print(f"[red]invalid settings:[/red] {e}", highlight=False)
        raise typer.Exit(2) from e
    except OSError as e:
        err.print(f"[red]cannot start:[/red] {e}")
        raise typer.Exit(1) from e


def _load_settings(config: Path | None, **overrides: Any) -> ControlSettings:
    """The settings file with the flags over it; a value may be a function that parses the flag
    (it raises ConfigError). A bad setting is one line naming it, and exit code 2."""
    import pymesh

    from .settings import load_settings

    try:
        values = {k: v() if callable(v) else v for k, v in overrides.items()}
        return load_settings(config).merged(**values)
    except pymesh.ConfigError as e:
        err.print(f"[red]invalid settings:[/red] {e}", highlight=False)
        raise typer.Exit(2) from e


@control_app.command("token")
def control_token(
    namespace: Annotated[str, typer.Option("--namespace", "-n", help="The workload's namespace.")],
    service_account: Annotated[str, typer.Option(help="The workload's service account.")],
    trust_domain: TrustDomainOption = None,
    state_dir: StateDirOption = None,
    token_secret_file: TokenSecretOption = None,
    lifetime: Annotated[str, typer.Option(
        help="How long the token is accepted, e.g. 24h (the default), 10m or 30d; at most a year.")] = "24h",
    audience: Annotated[str | None, typer.Option(
        help="The control planes' tokenAudience it is for. Default: the settings', pymesh-control.")] = None,
    config: SettingsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print a token that proves a workload identity to this control plane's CA until it
    expires (`v2.…`; give it to the workload's proxy for its first certificate: renewals use the
    certificate). On Kubernetes, proxies use a projected ServiceAccount token instead."""
    import pymesh

    from .identity.proof import load_secret, mint_token
    from .identity.spiffe import parse_spiffe_id
    from .settings import parse_duration

    settings = _load_settings(config, trust_domain=trust_domain, state_dir=state_dir,
                              token_secret_file=token_secret_file, token_audience=audience)
    try:
        seconds = parse_duration(lifetime, "lifetime")
    except pymesh.ConfigError as e:
        err.print(f"[red]invalid --lifetime:[/red] {e}", highlight=False)
        raise typer.Exit(2) from e
    try:
        identity = parse_spiffe_id(f"spiffe://{settings.trust_domain}/ns/{namespace}/sa/{service_account}")
    except ValueError as e:
        err.print(f"[red]invalid identity:[/red] {e}", highlight=False)
        raise typer.Exit(2) from e
    try:
        token = mint_token(load_secret(settings), identity, audience=settings.token_audience, lifetime=seconds)
    except pymesh.ConfigError as e:
        err.print(f"[red]invalid settings:[/red] {e}", highlight=False)
        raise typer.Exit(2) from e
    if as_json:
        console.print_json(json.dumps({"identity": str(identity), "token": token, "audience": settings.token_audience,
                                       "lifetime_seconds": seconds}))
    else:
        typer.echo(token)


@control_app.command("ca-bundle")
def control_ca_bundle(
    state_dir: StateDirOption = None,
    trust_anchor_file: TrustAnchorOption = None,
    issuer_cert_file: IssuerCertOption = None,
    issuer_key_file: Annotated[str | None, typer.Option(
        help="PEM private key of the issuer.", envvar="PYMESH_CONTROL_ISSUER_KEY_FILE")] = None,
    config: SettingsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print the trust anchors (PEM) proxies must trust to accept the mesh's certificates.
    Without a trust anchor file, the CA is generated in the state directory first if it is
    not there yet (as `pymesh control run` would)."""
    import pymesh

    from .identity.ca import trust_anchor_bundle

    settings = _load_settings(config, state_dir=state_dir, trust_anchor_file=trust_anchor_file,
                              issuer_cert_file=issuer_cert_file, issuer_key_file=issuer_key_file)
    try:
        path, pem = trust_anchor_bundle(settings)
    except pymesh.ConfigError as e:
        err.print(f"[red]invalid settings:[/red] {e}", highlight=False)
        raise typer.Exit(2) from e
    if as_json:
        console.print_json(json.dumps({"file": str(path), "trust_anchors": pem.decode()}))
    else:
        typer.echo(pem.decode(), nl=False)


@dataclass
class Check:
    """One line of `pymesh check`; a warning passes, but says what is not as it should be."""

    name: str
    ok: bool
    detail: str = ""
    hint: str = ""
    warning: bool = False


@dataclass
class CheckReport:
    control_plane: str
    checks: list[Check] = field(default_factory=list)
    proxies: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def client_credentials(settings: ControlSettings, trust_anchors: Path | None, cert: Path | None,
                       key: Path | None) -> Any:
    """TLS client credentials (:class:`pymesh.control.client.ClientCredentials`) from the
    files given, the anchors defaulting to the state directory's. Raises ValueError saying what
    is missing."""
    from .client import ClientCredentials

    anchors = trust_anchors or settings.state_path / "trust-anchor.pem"
    if not anchors.is_file():
        raise ValueError(f"no trust anchors to verify the control plane with: {anchors} does not exist; give "
                         "--trust-anchors (`pymesh control ca-bundle` prints them)")
    if (cert is None) != (key is None):
        raise ValueError("--cert and --key go together")
    try:
        return ClientCredentials(anchors.read_bytes(), settings.control_identity,
                                 key.read_bytes() if key else b"", cert.read_bytes() if cert else b"")
    except OSError as e:
        raise ValueError(f"cannot read {e.filename}: {e.strerror}") from None


def _operator_certificate(address: str, settings: ControlSettings, credentials: Any, timeout: float) -> Any:
    """On the control plane's host (its token secret readable): credentials with a certificate
    for the control plane's own identity, the one Status shows the connected proxies to. Else
    the credentials as they are."""
    from .client import obtain_certificate
    from .identity.proof import mint_token

    secret_file = Path(settings.token_secret_file).expanduser() if settings.token_secret_file \
        else settings.state_path / "token-secret"
    try:
        secret = secret_file.read_bytes().strip()
    except OSError:
        return credentials
    token = mint_token(secret, settings.control_identity, audience=settings.token_audience, lifetime=60)
    return obtain_certificate(address, credentials, settings.control_identity, token, timeout)


def run_checks(address: str, timeout: float, *, plaintext: bool = False, settings: ControlSettings | None = None,
               trust_anchors: Path | None = None, cert: Path | None = None, key: Path | None = None) -> CheckReport:
    """Asks the control plane at ``address`` for its status and judges it: over TLS, verifying
    its identity, unless it answers in plaintext (a warning) or ``plaintext`` is asked."""
    import grpc
    from google.protobuf import json_format

    from pymesh._proto.pymesh.mesh.v1 import discovery_pb2, discovery_pb2_grpc

    from .client import open_channel
    from .settings import ControlSettings

    settings = settings or ControlSettings()
    report = CheckReport(address)

    def status_over(credentials: Any) -> Any:
        with open_channel(address, credentials) as channel:
            return discovery_pb2_grpc.DiscoveryStub(channel).Status(discovery_pb2.StatusRequest(), timeout=timeout)

    status = None
    if not plaintext and trust_anchors is None and cert is None:
        try:  # a development control plane answers in plaintext (nothing secret is sent)
            status, plaintext = status_over(None), True
        except grpc.RpcError:
            pass
    try:
        if plaintext:
            status = status or status_over(None)
            report.checks.append(Check("control plane uses TLS", True, "no: plaintext, for local development only",
                                       "run it without --plaintext: anyone who reaches it can read the mesh and "
                                       "the tokens proxies send", warning=True))
        else:
            credentials = client_credentials(settings, trust_anchors, cert, key)
            if cert is None:
                credentials = _operator_certificate(address, settings, credentials, timeout)
            status = status_over(credentials)
            report.checks.append(Check("control plane uses TLS", True, f"verified as {settings.control_identity}"))
    except ValueError as e:
        report.checks.append(Check("control plane is reachable", False, str(e)))
        report.checks.append(Check("source is healthy", False, "not checked: the control plane is unreachable"))
        return report
    except grpc.RpcError as e:
        code = e.code().name if hasattr(e, "code") else "UNKNOWN"
        details = e.details() if hasattr(e, "details") else str(e)
        hint = (f"is `pymesh control run` listening on {address}?" if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
                else "give a client certificate of the mesh (--cert/--key), or run this where the control plane's "
                     "token secret is")
        report.checks.append(Check("control plane is reachable", False, f"{code}: {details}", hint))
        report.checks.append(Check("source is healthy", False, "not checked: the control plane is unreachable"))
        return report
    report.checks.insert(0, Check("control plane is reachable", True, f"pymesh {status.version}"))
    report.checks.append(Check(
        "source is healthy", status.source_healthy,
        status.source if status.source_healthy else f"{status.source}: {status.source_error}",
        "" if status.source_healthy else "fix the source; proxies are served its last good state meanwhile"))
    for proxy in status.proxies:
        entry = json_format.MessageToDict(proxy.identity, preserving_proto_field_name=True)
        entry.update(config_version=proxy.config_version, endpoint_watches=proxy.endpoint_watches,
                     current=not proxy.config_version or proxy.config_version == status.config_version)
        report.proxies.append(entry)
    report.checks.append(Check("proxies are connected", True, f"{len(status.proxies)} connected"))
    stale = [p["proxy_id"] for p in report.proxies if not p["current"]]
    report.checks.append(Check(
        "proxies have the current config", not stale,
        f"config version {status.config_version}" + (f"; behind: {', '.join(stale)}" if stale else ""),
        "a proxy behind for long is stuck; see its logs" if stale else ""))
    return report


ControlPlaneOption = Annotated[str, typer.Option(
    "--control-plane", help="HOST:PORT of a control plane's Discovery service.", envvar="PYMESH_CONTROL_PLANE")]


@control_app.command("register")
def control_register(
    service: Annotated[str, typer.Argument(help="The service the endpoint belongs to.")],
    address: Annotated[str, typer.Argument(help="The endpoint, IP:PORT.")],
    control_plane: ControlPlaneOption = "127.0.0.1:4200",
    weight: Annotated[int, typer.Option(help="Relative share of traffic (0: the default of 1).", min=0)] = 0,
    ttl: Annotated[float, typer.Option(help="Seconds until it expires unless registered again; 0 keeps it.",
                                       min=0)] = 0.0,
    plaintext: PlaintextOption = False,
    trust_anchors: TrustAnchorsClientOption = None,
    cert: CertOption = None,
    key: KeyOption = None,
    config: SettingsOption = None,
) -> None:
    """Add an endpoint to a service (the control plane must allow it). Over TLS, the endpoint is
    the identity of --cert: a caller registers only its own endpoints."""
    import grpc

    from pymesh._proto.pymesh.mesh.v1 import discovery_pb2

    request = discovery_pb2.RegisterRequest(service=service)
    request.endpoint.address = address
    request.endpoint.weight = weight
    if ttl:
        request.ttl.FromNanoseconds(int(ttl * 1e9))
    _call(control_plane, lambda stub: stub.Register(request, timeout=10), grpc,
          _call_credentials(config, plaintext, trust_anchors, cert, key))
    console.print(f"registered {address} in {service}")


@control_app.command("deregister")
def control_deregister(
    service: Annotated[str, typer.Argument(help="The service the endpoint belongs to.")],
    address: Annotated[str, typer.Argument(help="The endpoint, IP:PORT.")],
    control_plane: ControlPlaneOption = "127.0.0.1:4200",
    plaintext: PlaintextOption = False,
    trust_anchors: TrustAnchorsClientOption = None,
    cert: CertOption = None,
    key: KeyOption = None,
    config: SettingsOption = None,
) -> None:
    """Remove an endpoint this caller registered from a service."""
    import grpc

    from pymesh._proto.pymesh.mesh.v1 import discovery_pb2

    request = discovery_pb2.DeregisterRequest(service=service, address=address)
    _call(control_plane, lambda stub: stub.Deregister(request, timeout=10), grpc,
          _call_credentials(config, plaintext, trust_anchors, cert, key))
    console.print(f"deregistered {address} from {service}")


def _call_credentials(config: Path | None, plaintext: bool, trust_anchors: Path | None, cert: Path | None,
                      key: Path | None) -> Any:
    """The TLS credentials of a Register/Deregister call (None: plaintext); exit code 2 if
    they cannot be had."""
    if plaintext:
        return None
    if cert is None:
        err.print("[red]--cert and --key are required[/red] over TLS: an endpoint is registered by its own identity")
        raise typer.Exit(2)
    try:
        return client_credentials(_load_settings(config), trust_anchors, cert, key)
    except ValueError as e:
        err.print(f"[red]{e}[/red]", highlight=False)
        raise typer.Exit(2) from e


def _call(address: str, call: Any, grpc: Any, credentials: Any) -> None:
    """One Discovery call; a gRPC error becomes a one-line message and exit code 1."""
    from pymesh._proto.pymesh.mesh.v1 import discovery_pb2_grpc

    from .client import open_channel

    with open_channel(address, credentials) as channel:
        try:
            call(discovery_pb2_grpc.DiscoveryStub(channel))
        except grpc.RpcError as e:
            err.print(f"[red]{address}:[/red] {e.code().name}: {e.details()}")
            raise typer.Exit(1) from e


def check_command(
    control_plane: Annotated[str, typer.Option(
        "--control-plane", help="HOST:PORT of a control plane's Discovery service.",
        envvar="PYMESH_CONTROL_PLANE")] = "127.0.0.1:4200",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the control plane.", min=0.1)] = 5.0,
    plaintext: PlaintextOption = False,
    trust_anchors: TrustAnchorsClientOption = None,
    cert: CertOption = None,
    key: KeyOption = None,
    identity: IdentityOption = None,
    trust_domain: TrustDomainOption = None,
    state_dir: StateDirOption = None,
    config: SettingsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check a mesh: control plane reachable (over TLS, as its identity; plaintext is a
    warning), source healthy, proxies and their config. Without --cert, where the control
    plane's token secret is readable, it gets itself a certificate of the control plane's
    identity (the one shown the connected proxies).

    Exits 1 if any check fails.
    """
    settings = _load_settings(config, identity=identity, trust_domain=trust_domain, state_dir=state_dir)
    report = run_checks(control_plane, timeout, plaintext=plaintext, settings=settings,
                        trust_anchors=trust_anchors, cert=cert, key=key)
    if as_json:
        console.print_json(json.dumps({
            "control_plane": report.control_plane, "ok": report.ok,
            "checks": [asdict(c) for c in report.checks], "proxies": report.proxies,
        }))
    else:
        _print_report(report)
    if not report.ok:
        raise typer.Exit(1)


def _print_report(report: CheckReport) -> None:
    from rich.markup import escape
    from rich.table import Table

    console.print(f"control plane {escape(report.control_plane)}")
    for check in report.checks:
        mark = "[yellow]![/yellow]" if check.warning else "[green]✔[/green]" if check.ok else "[red]✖[/red]"
        detail = f" [dim]({escape(check.detail)})[/dim]" if check.detail else ""
        console.print(f"{mark} {escape(check.name)}{detail}")
        if check.hint and (check.warning or not check.ok):
            console.print(f"    [yellow]hint:[/yellow] {escape(check.hint)}")
    if report.proxies:
        table = Table("proxy", "workload", "namespace", "config version", "endpoint watches")
        for proxy in report.proxies:
            version = proxy["config_version"] or "-"
            table.add_row(proxy.get("proxy_id", ""), proxy.get("workload", ""), proxy.get("namespace", ""),
                          version if proxy["current"] else f"[red]{version}[/red]", str(proxy["endpoint_watches"]))
        console.print(table)
    console.print("[green]Status check results are ✔[/green]" if report.ok
                  else "[red]Status check results are ✖[/red]")
