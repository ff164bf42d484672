"""gRPC through the proxy: a real grpcio server and client, every call shape, metadata,
trailers, error statuses, large messages, and the proxy's own gRPC answers.

The service needs no .proto: handlers take and return raw bytes."""

from __future__ import annotations

import hashlib
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest

from pymesh.metrics import total

from .conftest import ProxyFactory, RunningProxy, make_config

SERVICE = "echo"
MAX_MESSAGE = 16 * 1024 * 1024
MESSAGE_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]
CALL_TIMEOUT = 10.0


@dataclass
class GrpcBackend:
    address: str
    server: grpc.Server
    # Metadata the server saw, per method, for assertions on what the proxy forwarded.
    seen_metadata: list[dict[str, str | bytes]] = field(default_factory=list)
    #: `Hold` calls wait for this (at most CALL_TIMEOUT), so a test decides when they end
    release: threading.Event = field(default_factory=threading.Event)
    holding: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"echo:" + request


def _server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request)):
        yield b"message-%d" % i


def _client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    digest = hashlib.sha256()
    count = 0
    for message in requests:
        digest.update(message)
        count += 1
    return b"%d:%s" % (count, digest.hexdigest().encode())


def _bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for message in requests:
        yield b"pong:" + message


def _with_trailers(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.set_trailing_metadata((
        ("x-result-id", "r-42"),
        ("x-checksum-bin", b"\x00\x01\xfe\xff"),
    ))
    return b"done"


def _fail(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    raise AssertionError("abort returns only by raising")


def _stream_then_fail(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield b"first"
    yield b"second"
    context.abort(grpc.StatusCode.INTERNAL, "broke mid-stream")


def _large(request: bytes, context: grpc.ServicerContext) -> bytes:
    # Answer with the request reversed, so the response is large too and not a trivial echo.
    return request[::-1]


def start_grpc_backend() -> GrpcBackend:
    backend_holder: list[GrpcBackend] = []

    def _metadata(request: bytes, context: grpc.ServicerContext) -> bytes:
        backend_holder[0].seen_metadata.append(dict(context.invocation_metadata()))
        return b"ok"

    def _hold(request: bytes, context: grpc.ServicerContext) -> bytes:
        backend_holder[0].holding.release()
        backend_holder[0].release.wait(CALL_TIMEOUT)
        return b"held"

    handler = grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
        "Trailers": grpc.unary_unary_rpc_method_handler(_with_trailers),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
        "Large": grpc.unary_unary_rpc_method_handler(_large),
        "StreamThenFail": grpc.unary_stream_rpc_method_handler(_stream_then_fail),
        "Metadata": grpc.unary_unary_rpc_method_handler(_metadata),
        "Hold": grpc.unary_unary_rpc_method_handler(_hold),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), handlers=[handler],
                         options=MESSAGE_OPTIONS)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port, "grpc server could not bind 127.0.0.1:0"
    server.start()
    backend = GrpcBackend(address=f"127.0.0.1:{port}", server=server)
    backend_holder.append(backend)
    return backend


@pytest.fixture
def grpc_backend() -> Iterator[GrpcBackend]:
    backend = start_grpc_backend()
    yield backend
    backend.release.set()
    backend.server.stop(grace=1).wait(timeout=5)


def open_channel(proxy: RunningProxy, authority: str = SERVICE) -> grpc.Channel:
    """A client channel to the proxy's listener that names ``authority`` as :authority."""
    return grpc.insecure_channel(proxy.address(), options=[
        ("grpc.default_authority", authority),
        ("grpc.enable_http_proxy", 0),
        *MESSAGE_OPTIONS,
    ])


def closed_port() -> int:
    """A loopback port nothing listens on (bound by the OS, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def grpc_responses(proxy: RunningProxy, service: str = SERVICE) -> float:
    return total(proxy.metrics(), "response_total", dst_service=service)


def test_unary(start_proxy: ProxyFactory, grpc_backend: GrpcBackend) -> None:
    proxy = start_proxy(make_config({SERVICE: [grpc_backend.address]}))
    with open_channel(proxy) as channel:
        call = channel.unary_unary("/test.Echo/Unary")
        for i in range(20):
            assert call(b"hello-%d" % i, timeout=CALL_TIMEOUT) == b"echo:hello-%d" % i
    text = proxy.metrics()
    assert total(text, "request_total", dst_service=SERVICE) == 20
    assert total(text, "response_total", dst_service=SERVICE, status_code="200",
                 classification="success") == 20


def test_request_metadata_and_authority_reach_server(
    start_proxy: ProxyFactory, grpc_backend: GrpcBackend
) -> None:
    proxy = start_proxy(make_config({SERVICE: [grpc_backend.address]}))
    with open_channel(proxy) as channel:
        call = channel.unary_unary("/test.Echo/Metadata")
        reply = call(b"", timeout=CALL_TIMEOUT, metadata=(("x-tenant", "blue"), ("x-token-bin", b"\x00\xff")))
    assert reply == b"ok"
    [seen] = grpc_backend.seen_metadata
    assert seen["x-tenant"] == "blue"
    assert seen["x-token-bin"] == b"\x00\xff"
    assert grpc_responses(proxy) == 1


def test_server_streaming(start_proxy: ProxyFactory, grpc_backend: GrpcBackend) -> None:
    proxy = start_proxy(make_config({SERVICE: [grpc_backend.address]}))
    with open_channel(proxy) as channel:
        call = channel.unary_stream("/test.Echo/ServerStream")
        received = list(call(b"100", timeout=CALL_TIMEOUT))
    assert received == [b"message-%d" % i for i in range(100)]
    assert grpc_responses(proxy) == 1


def test_client_streaming(start_proxy: ProxyFactory, grpc_backend: GrpcBackend) -> None:
    proxy = start_proxy(make_config({SERVICE: [grpc_backend.address]}))
    messages = [os.urandom(1000 + i) for i in range(100)]
    expected = hashlib.sha256(b"".join(messages)).hexdigest()
    with open_channel(proxy) as channel:
        call = channel.stream_unary("/test.Echo/ClientStream")
        reply = call(iter(messages), timeout=CALL_TIMEOUT)
    assert reply == f"100:{expected}".encode()
    assert grpc_responses(proxy) == 1


def test_bidirectional_streaming_in_lockstep(start_proxy: ProxyFactory, grpc_backend: GrpcBackend) -> None:
    """Each reply is awaited before the next message is sent, so the proxy must stream
    both directions frame by frame rather than buffer either body."""
    proxy = start_proxy(make_config({SERVICE: [grpc_backend.address]}))
    outgoing: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[bytes]:
        while (message := outgoing.get(timeout=CALL_TIMEOUT)) is not None:
            yield message

    with open_channel(proxy) as channel:
        call = channel.stream_stream("/test.Echo/Bidi")
        responses = call(requests(), timeout=CALL_TIMEOUT)
        for i in range(50):
            outgoing.put(b"ping-%d" % i)
            assert next(responses) == b"pong:ping-%d" % i
        outgoing.put(None)
        assert list(responses) == []
        assert responses.code() == grpc.StatusCode.OK
    assert grpc_responses(proxy) == 1


def test_trailing_metadata_arrives(start_proxy: ProxyFactory, grpc_backend: GrpcBackend) -> None:
    proxy = start_proxy(make_config({SERVICE: [grpc_backend.address]}))
    with open_channel(proxy) as channel:
        call = channel.unary_unary("/test.Echo/Trailers")
        reply, status = call.with_call(b"", timeout=CALL_TIMEOUT)
    assert reply == b"done"
    assert status.code() == grpc.StatusCode.OK
    trailers = dict(status.trailing_metadata() or ())
    assert trailers["x-result-id"] == "r-42"
    assert trailers["x-checksum-bin"] == b"\x00\x01\xfe\xff"
    assert total(proxy.metrics(), "response_total", dst_service=SERVICE, classification="success") == 1


def test_error_status_and_details_arrive_intact(start_proxy: ProxyFactory, grpc_backend: GrpcBackend) -> None:
    proxy = start_proxy(make_config({SERVICE: [grpc_backend.address]}))
    with open_channel(proxy) as channel:
        call = channel.unary_unary("/test.Echo/Fail")
        with pytest.raises(grpc.RpcError) as raised:
            call(b"", timeout=CALL_TIMEOUT)
    error = raised.value
    assert isinstance(error, grpc.Call)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "no such thing"
    # The server's error came through, not one the proxy made up.
    metadata = dict(error.trailing_metadata() or ()) | dict(error.initial_metadata() or ())
    assert "pymesh-reason" not in metadata
    text = proxy.metrics()
    assert total(text, "response_total", dst_service=SERVICE) == 1
    # Not a proxy error, but a failure all the same: grpcio sent a trailers-only response.
    assert total(text, "response_total", dst_service=SERVICE, grpc_status="5", classification="failure") == 1
    assert total(text, "response_total", error="unknown-service") == 0


def test_status_in_trailers_classifies_the_call(start_proxy: ProxyFactory, grpc_backend: GrpcBackend) -> None:
    """Messages first, then an error in the trailers: the call counts as a failure."""
    proxy = start_proxy(make_config({SERVICE: [grpc_backend.address]}))
    with open_channel(proxy) as channel:
        call = channel.unary_stream("/test.Echo/StreamThenFail")(b"", timeout=CALL_TIMEOUT)
        received = []
        with pytest.raises(grpc.RpcError) as raised:
            for message in call:
                received.append(message)
        ok = channel.unary_stream("/test.Echo/ServerStream")(b"3", timeout=CALL_TIMEOUT)
        assert len(list(ok)) == 3
    assert received == [b"first", b"second"]
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    text = proxy.metrics()
    assert total(text, "response_total", dst_service=SERVICE, grpc_status="13", classification="failure") == 1
    assert total(text, "response_total", dst_service=SERVICE, grpc_status="0", classification="success") == 1


def test_large_messages(start_proxy: ProxyFactory, grpc_backend: GrpcBackend) -> None:
    proxy = start_proxy(make_config({SERVICE: [grpc_backend.address]}))
    payload = os.urandom(3 * 1024 * 1024)
    with open_channel(proxy) as channel:
        call = channel.unary_unary("/test.Echo/Large")
        for _ in range(2):
            reply = call(payload, timeout=CALL_TIMEOUT)
            assert len(reply) == len(payload)
            assert hashlib.sha256(reply).digest() == hashlib.sha256(payload[::-1]).digest()
    assert grpc_responses(proxy) == 2


def test_concurrent_calls_on_one_channel(start_proxy: ProxyFactory, grpc_backend: GrpcBackend) -> None:
    proxy = start_proxy(make_config({SERVICE: [grpc_backend.address]}))
    with open_channel(proxy) as channel:
        call = channel.unary_unary("/test.Echo/Unary")
        pending = [call.future(b"c-%d" % i, timeout=CALL_TIMEOUT) for i in range(64)]
        replies = [f.result(timeout=CALL_TIMEOUT) for f in pending]
    assert replies == [b"echo:c-%d" % i for i in range(64)]
    assert grpc_responses(proxy) == 64


def test_unknown_service_is_unimplemented(start_proxy: ProxyFactory, grpc_backend: GrpcBackend) -> None:
    proxy = start_proxy(make_config({SERVICE: [grpc_backend.address]}))
    with open_channel(proxy, authority="no-such-service") as channel:
        call = channel.unary_unary("/test.Echo/Unary")
        with pytest.raises(grpc.RpcError) as raised:
            call(b"hello", timeout=CALL_TIMEOUT)
    error = raised.value
    assert isinstance(error, grpc.Call)
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED, error.details()
    assert "no-such-service" in (error.details() or "")
    # A trailers-only response: its headers reach grpcio as trailing metadata.
    metadata = dict(error.trailing_metadata() or ()) | dict(error.initial_metadata() or ())
    assert metadata.get("pymesh-reason") == "unknown-service"
    text = proxy.metrics()
    assert total(text, "response_total", error="unknown-service", classification="failure") == 1
    assert total(text, "response_total", dst_service=SERVICE) == 0


def test_unreachable_endpoint_is_unavailable(start_proxy: ProxyFactory) -> None:
    proxy = start_proxy(make_config({"down": [f"127.0.0.1:{closed_port()}"]}))
    with open_channel(proxy, authority="down") as channel:
        call = channel.unary_unary("/test.Echo/Unary")
        with pytest.raises(grpc.RpcError) as raised:
            call(b"hello", timeout=CALL_TIMEOUT)
    error = raised.value
    assert isinstance(error, grpc.Call)
    # UNAVAILABLE from the proxy, not the client's own DEADLINE_EXCEEDED after waiting.
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    metadata = dict(error.trailing_metadata() or ()) | dict(error.initial_metadata() or ())
    assert metadata.get("pymesh-reason") == "connect-failed"
    text = proxy.metrics()
    assert total(text, "response_total", dst_service="down", error="connect-failed",
                 classification="failure") == 1


def reason_of(error: grpc.RpcError) -> str | None:
    assert isinstance(error, grpc.Call)
    metadata = dict(error.trailing_metadata() or ()) | dict(error.initial_metadata() or ())
    return metadata.get("pymesh-reason")  # type: ignore[return-value]


def test_proxy_answers_carry_the_matching_grpc_status(start_proxy: ProxyFactory, grpc_backend: GrpcBackend) -> None:
    """What the proxy answers itself reaches a gRPC client as a gRPC status, with the reason:
    no endpoints UNAVAILABLE, shed UNAVAILABLE, rate-limited RESOURCE_EXHAUSTED, the proxy's
    timeout DEADLINE_EXCEEDED, denied PERMISSION_DENIED."""
    config = make_config({})
    config["services"] = [
        {"name": "empty", "endpoints": []},
        {"name": "limited", "endpoints": [{"address": grpc_backend.address}],
         "rateLimit": {"requestsPerSecond": 0.001, "burst": 1}},
        {"name": "held", "endpoints": [{"address": grpc_backend.address}],
         "limits": {"maxConcurrent": 1}, "timeouts": {"request": "1s"}},
    ]
    proxy = start_proxy(config)

    def fails(authority: str, method: str = "/test.Echo/Unary") -> grpc.RpcError:
        with open_channel(proxy, authority=authority) as channel, pytest.raises(grpc.RpcError) as raised:
            channel.unary_unary(method)(b"x", timeout=CALL_TIMEOUT)
        return raised.value

    error = fails("empty")
    assert (error.code(), reason_of(error)) == (grpc.StatusCode.UNAVAILABLE, "no-endpoints"), error

    with open_channel(proxy, authority="limited") as channel:
        assert channel.unary_unary("/test.Echo/Unary")(b"x", timeout=CALL_TIMEOUT) == b"echo:x"
    error = fails("limited")
    assert (error.code(), reason_of(error)) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "rate-limited"), error

    # One call held by the backend fills the service: the next is shed; the held one then
    # meets the proxy's 1 s request timeout, long before the client's own 10 s deadline.
    # The proxy passes that deadline on (grpc-timeout), so either it answers `timeout` or
    # the backend's gRPC server ends the call at the same deadline: DEADLINE_EXCEEDED both.
    with open_channel(proxy, authority="held") as channel:
        started = time.monotonic()
        held = channel.unary_unary("/test.Echo/Hold").future(b"x", timeout=CALL_TIMEOUT)
        assert grpc_backend.holding.acquire(timeout=CALL_TIMEOUT), "the held call never reached the backend"
        error = fails("held")
        assert (error.code(), reason_of(error)) == (grpc.StatusCode.UNAVAILABLE, "shed"), error
        timed_out = held.exception(timeout=CALL_TIMEOUT + 5)
        ended = time.monotonic() - started
    assert isinstance(timed_out, grpc.RpcError), held
    assert timed_out.code() == grpc.StatusCode.DEADLINE_EXCEEDED and reason_of(timed_out) in ("timeout", None)
    assert ended < CALL_TIMEOUT, "the client's own deadline ended the call, not the proxy's"
    grpc_backend.release.set()

    denied = make_config({SERVICE: [grpc_backend.address]}, authorization={"defaultPolicy": "DENY"})
    denied["listeners"][0].update(direction="INBOUND", defaultService=SERVICE)
    proxy = start_proxy(denied)
    error = fails(SERVICE)
    assert (error.code(), reason_of(error)) == (grpc.StatusCode.PERMISSION_DENIED, "denied"), error
