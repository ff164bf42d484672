"""The `pymesh` command line."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from . import __version__
from .bench import bench_app
from .errors import MeshError
from .proxy import Proxy, validate

_check_settings: dict[str, object] = {}
try:
    from .control.cli import check_command, control_app
except ModuleNotFoundError as missing:  # installed without the control plane (pymesh-control)
    _missing = f"the control plane is not installed ({missing}): pip install pymesh-control"
    _anything = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}

    def _unavailable(ctx: typer.Context) -> None:
        Console(stderr=True).print(f"[red]pymesh {ctx.info_name}:[/red] {_missing}")
        raise typer.Exit(2)

    control_app = typer.Typer(help=f"Unavailable: {_missing}.")
    control_app.callback(invoke_without_command=True)(_unavailable)
    control_app.command("run", context_settings=_anything)(_unavailable)
    control_app.command("token", context_settings=_anything)(_unavailable)
    control_app.command("ca-bundle", context_settings=_anything)(_unavailable)
    check_command, _check_settings = _unavailable, _anything

app = typer.Typer(help="pymesh: a service mesh with a Rust data plane, driven from Python.",
                  no_args_is_help=True)
proxy_app = typer.Typer(help="Run or check a proxy in this process.", no_args_is_help=True)
app.add_typer(proxy_app, name="proxy")
app.add_typer(bench_app, name="bench")
app.add_typer(control_app, name="control")
app.command("check", context_settings=_check_settings)(check_command)
console = Console()
err = Console(stderr=True)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="ProxyConfig as YAML or JSON.",
                                            envvar="PYMESH_CONFIG", exists=True, dir_okay=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


@app.command()
def version(as_json: JsonOption = False) -> None:
    """Print the version."""
    console.print_json(json.dumps({"version": __version__})) if as_json else console.print(__version__)


@proxy_app.command("run")
def proxy_run(
    config: ConfigOption,
    threads: Annotated[int, typer.Option(help="Engine worker threads.", envvar="PYMESH_THREADS")] = 1,
    grace: Annotated[float, typer.Option(help="Seconds to drain on SIGTERM.")] = 30.0,
    log: Annotated[str, typer.Option(help="Engine log filter, e.g. info or pymesh_engine=debug.",
                                     envvar="PYMESH_LOG")] = "info",
    log_format: Annotated[str, typer.Option(help="plain or json.", envvar="PYMESH_LOG_FORMAT")] = "plain",
) -> None:
    """Run the engine in this process until SIGTERM/SIGINT; SIGHUP reloads the config file."""
    from . import enable_logging

    if log_format not in ("plain", "json"):
        raise typer.BadParameter("expected plain or json", param_hint="--log-format")
    enable_logging(log, log_format == "json")
    stop = threading.Event()
    proxy = Proxy(config, threads=threads)
    try:
        proxy.start()
    except MeshError as e:
        err.print(f"[red]cannot start:[/red] {e}")
        raise typer.Exit(1) from e

    def reload(_signum: int, _frame: object) -> None:
        try:
            proxy.reload(config)
            err.print("configuration reloaded")
        except MeshError as e:
            err.print(f"[red]configuration rejected; the running one stays:[/red] {e}")

    signal.signal(signal.SIGHUP, reload)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    for name, address in sorted(proxy.listeners.items()):
        print(f"listening {name} {address}", flush=True)
    print(f"admin {proxy.admin_address}", flush=True)
    while not stop.wait(0.5):
        pass
    drained = proxy.stop(grace)
    err.print("stopped" if drained else "stopped; the grace period ran out before every connection closed")


@proxy_app.command("validate")
def proxy_validate(config: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
                   as_json: JsonOption = False) -> None:
    """Check a config file; print it normalised, or the field that is wrong."""
    try:
        normalised = validate(config)
    except MeshError as e:
        if as_json:
            console.print_json(json.dumps({"valid": False, "path": getattr(e, "path", ""), "error": str(e)}))
        else:
            err.print(f"[red]invalid:[/red] {e}")
        raise typer.Exit(1) from e
    if as_json:
        console.print_json(json.dumps({"valid": True, "config": normalised}))
    else:
        console.print(f"[green]valid[/green]: {len(normalised.get('listeners', []))} listener(s), "
                      f"{len(normalised.get('services', []))} service(s)")


@app.command()
def demo(
    requests: Annotated[int, typer.Option(help="Requests to send.", min=1, max=100_000)] = 30,
    as_json: JsonOption = False,
) -> None:
    """Start a local service behind two meshed proxies (mutual TLS, certificates from a local
    control plane acting as the mesh CA), send traffic, and show what the proxies saw."""
    from . import demo as demo_module

    try:
        result = demo_module.run(requests=requests)
    except MeshError as e:
        err.print(f"[red]the demo failed:[/red] {e}", highlight=False)
        raise typer.Exit(1) from e
    if as_json:
        console.print_json(json.dumps(result.as_json()))
    else:
        demo_module.print_result(result, console)


def main() -> None:
    app()
