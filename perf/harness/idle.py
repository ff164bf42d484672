"""The idle-connection client: open N TCP connections through a proxy with asyncio, send one
request on each (so every proxy has parsed, routed and answered on it, and holds it as an idle
keep-alive connection rather than an undecided socket), hold them all, call back to measure
memory while they are held, then close them. HTTP/1.1 keep-alive, or HTTP/2 with prior
knowledge (h2c), whose framing the `h2` package does: one GET on stream 1, the connection's
SETTINGS acknowledged, then nothing until it closes.

Bounded everywhere: N connections, at most `concurrency` being opened at once, a timeout on
every connect and response, a fixed hold time.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

CONNECT_TIMEOUT_S = 5.0
RESPONSE_TIMEOUT_S = 5.0


@dataclass
class IdleOutcome:
    """What happened to the connections, and what the callback measured while they were held."""

    requested: int
    opened: int = 0  # connected and answered 2xx
    held: int = 0  # still open after the hold
    failures: dict[str, int] = field(default_factory=dict)
    measured: Any = None


async def _open_one(host: str, port: int, authority: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
    try:
        writer.write(f"GET / HTTP/1.1\r\nhost: {authority}\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RESPONSE_TIMEOUT_S)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next((int(v) for k, _, v in (line.partition(":") for line in lines[1:])
                       if k.strip().lower() == "content-length"), None)
        if length is None:
            raise ValueError("response without content-length")
        await asyncio.wait_for(reader.readexactly(length), RESPONSE_TIMEOUT_S)
        if not 200 <= status < 300:
            raise ValueError(f"status {status}")
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def _open_one_h2(host: str, port: int, authority: str
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An h2c connection that has been answered once (stream 1, GET /, read to its end)."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import ConnectionTerminated, DataReceived, ResponseReceived, StreamEnded, StreamReset
    from h2.exceptions import ProtocolError

    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
    try:
        h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        h2.initiate_connection()
        h2.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", authority), (":path", "/")],
                        end_stream=True)
        writer.write(h2.data_to_send())
        await writer.drain()
        status = None
        ended = False
        while not ended:
            data = await asyncio.wait_for(reader.read(65536), RESPONSE_TIMEOUT_S)
            if not data:
                raise ValueError("connection closed before the response ended")
            try:
                events = h2.receive_data(data)
            except ProtocolError as e:
                raise ValueError(f"HTTP/2 protocol error: {e}") from e
            for event in events:
                if isinstance(event, ResponseReceived):
                    status = int(dict(event.headers)[":status"])
                elif isinstance(event, DataReceived):
                    h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, StreamEnded):
                    ended = event.stream_id == 1
                elif isinstance(event, (StreamReset, ConnectionTerminated)):
                    raise ValueError(f"HTTP/2 {type(event).__name__}")
            writer.write(h2.data_to_send())  # SETTINGS acknowledged, window updates
            await writer.drain()
        if status is None or not 200 <= status < 300:
            raise ValueError(f"status {status}")
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def _still_open(reader: asyncio.StreamReader) -> bool:
    """Whether the peer has not closed: what it sent meanwhile (an HTTP/2 peer's SETTINGS
    acknowledgement, say) is read and dropped until nothing more comes for a moment."""
    while True:
        try:
            data = await asyncio.wait_for(reader.read(65536), 0.05)
        except TimeoutError:
            return True
        if not data:
            return False


async def _hold(address: str, count: int, hold_s: float, concurrency: int,
                measure: Callable[[], Any], http2: bool = False) -> IdleOutcome:
    host, _, port_text = address.rpartition(":")
    outcome = IdleOutcome(requested=count)
    gate = asyncio.Semaphore(concurrency)
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def one() -> None:
        async with gate:
            try:
                opener = _open_one_h2 if http2 else _open_one
                connections.append(await opener(host.strip("[]"), int(port_text), address))
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, asyncio.LimitOverrunError) as e:
                kind = type(e).__name__
                outcome.failures[kind] = outcome.failures.get(kind, 0) + 1

    try:
        await asyncio.gather(*(one() for _ in range(count)))
        outcome.opened = len(connections)
        await asyncio.sleep(hold_s)
        outcome.held = sum(await asyncio.gather(*(_still_open(reader) for reader, _ in connections)))
        outcome.measured = measure()
    finally:
        for _, writer in connections:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for _, w in connections), return_exceptions=True)
    return outcome


def hold_idle(address: str, count: int, hold_s: float, measure: Callable[[], Any],
              concurrency: int = 100, netns: str | None = None, http2: bool = False) -> IdleOutcome:
    """Open `count` idle keep-alive connections to `address` (HTTP/2 ones with `http2`), hold
    them `hold_s` seconds, call `measure()` while they are held, close them, and say how many
    made it. With `netns` (a network namespace's name, as `ip netns` knows it), the connections
    start in that namespace: the client runs on a thread of its own that enters it, and the
    harness stays where it is."""
    if netns is None:
        return asyncio.run(_hold(address, count, hold_s, concurrency, measure, http2))

    def in_namespace() -> IdleOutcome:
        enter_netns(netns)
        return asyncio.run(_hold(address, count, hold_s, concurrency, measure, http2))

    # A thread of its own, which ends with the pool: no other work runs in the namespace.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"idle-{netns}") as pool:
        return pool.submit(in_namespace).result()


CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    """Moves the calling thread (only it: a namespace is per thread) into the network namespace
    `ip netns add NAME` made; sockets it opens from then on live there."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into network namespace {name}: {os.strerror(errno)}")
    finally:
        os.close(fd)
