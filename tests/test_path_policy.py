"""Path policies against an application that routes on the raw path (issue 10, item 3).

A real Flask/Werkzeug application serves `/admin`, `/admin/<anything>` and `/internal`
behind a proxy whose DENY policy names exactly those. Each payload below once reached the
admin or internal handler, or a path another server resolves to them (Tomcat and Spring read
`..;`, Windows drops a trailing `.`, case-insensitive routers ignore case): the policy decided
on the normalised path while the raw one was forwarded. Now a path the proxy and the
application could read differently is refused with 400 on a listener with path policies, and
`ignoreCase` / `ignoreTrailingSlash` make exact rules hold for applications that route so."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from .conftest import NativeProxy

PAYLOADS = ["/admin/../x", "/admin/%2e%2e/x", "/admin/..%2fx", "/admin/.%2e/x", "/admin;jsessionid=x",
            "/admin;/users", "/static/..;/admin", "/internal/", "/ADMIN/users", "/internal.", "/internal%00",
            "/x/..\\admin", "//admin", "/admin%2fusers", "/%61dmin"]


@dataclass
class App:
    address: str
    server: BaseWSGIServer
    protected_hits: list[str] = field(default_factory=list)


@pytest.fixture
def app() -> Iterator[App]:
    flask = Flask("path-policy-test")
    hits: list[str] = []

    @flask.route("/admin")
    @flask.route("/admin/<path:rest>")
    def admin(rest: str = "") -> str:
        hits.append(f"admin {rest}")
        return "the admin handler\n"

    @flask.route("/internal")
    def internal() -> str:
        hits.append("internal")
        return "the internal handler\n"

    @flask.route("/<path:anything>")
    def public(anything: str) -> str:
        return f"public {anything}\n"

    server = make_server("127.0.0.1", 0, flask, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield App(f"127.0.0.1:{server.server_port}", server, hits)
    finally:
        server.shutdown()


def proxy_for(app: App, tmp_path: Path, name: str, **options: bool) -> NativeProxy:
    policy = {"name": "no-admin", "action": "DENY", "paths": ["/admin", "/admin/*", "/internal"], **options}
    return NativeProxy({
        "admin": {"address": "127.0.0.1:0"},
        "listeners": [{"name": "inbound", "address": "127.0.0.1:0", "direction": "INBOUND",
                       "defaultService": "app", "tls": "DISABLED"}],
        "services": [{"name": "app", "endpoints": [{"address": app.address}]}],
        "authorization": {"policies": [policy]},
    }, tmp_path / f"{name}.yaml")


def status_of(proxy: NativeProxy, path: str) -> tuple[int, bytes]:
    """Sent byte for byte (an HTTP client library would tidy the path first)."""
    host, port = proxy.address("inbound").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


def test_no_spelling_of_a_denied_path_reaches_its_handler(app: App, tmp_path: Path) -> None:
    proxy = proxy_for(app, tmp_path, "strict", ignoreCase=True, ignoreTrailingSlash=True)
    try:
        for path in PAYLOADS:
            status, answer = status_of(proxy, path)
            assert status in (400, 403), (path, answer[:200])
            reason = b"pymesh-reason: bad-path" if status == 400 else b"pymesh-reason: denied"
            assert reason in answer.lower(), (path, answer[:200])
        assert app.protected_hits == []
        # What is not denied, or merely percent-encoded, still reaches the application.
        for path, body in [("/x", b"public x"), ("/files/my%20doc", b"public files/my doc"),
                           ("/administrator", b"public administrator")]:
            status, answer = status_of(proxy, path)
            assert status == 200 and body in answer, (path, answer[:200])
        assert status_of(proxy, "/admin")[0] == 403
    finally:
        proxy.stop()


def test_case_and_trailing_slash_match_only_when_asked(app: App, tmp_path: Path) -> None:
    """Without the options an exact rule is exact: `/internal/` and `/ADMIN/users` are not
    `/internal` and `/admin/*`, so they reach this application (which routes them elsewhere,
    as Werkzeug does: its protected handlers stay unrun)."""
    proxy = proxy_for(app, tmp_path, "exact")
    try:
        for path in ["/internal/", "/ADMIN/users"]:
            status, answer = status_of(proxy, path)
            assert status == 200 and b"public" in answer, (path, answer[:200])
        assert status_of(proxy, "/internal")[0] == 403
        assert status_of(proxy, "/admin/..%2fx")[0] == 400  # ambiguity is refused whatever the options
        assert app.protected_hits == []
    finally:
        proxy.stop()
