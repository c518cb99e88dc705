"""A raw-socket upstream on 127.0.0.1 that misbehaves the way real servers and networks do.

Each connection reads one request and answers with the next scripted `Fault`; when the script
runs out, the last entry repeats. What it received is kept, so tests can count sends.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass, field

from yarl import URL


@dataclass(frozen=True)
class Fault:
    """One scripted answer: status line and headers, then `body`, then what goes wrong."""

    head: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
    body: bytes = b"ok"
    then: str = "close"  # close | reset | stall | keep
    before: str = "answer"  # answer | reset (close the connection before any answer)


def answer(status: str, headers: dict[str, str], body: bytes, length: int | None = None) -> Fault:
    """A Fault with a status line, headers and a body (Content-Length: `length` or the body's)."""
    lines = [f"HTTP/1.1 {status}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if "Transfer-Encoding" not in headers:
        lines.append(f"Content-Length: {len(body) if length is None else length}")
    return Fault(("\r\n".join(lines) + "\r\n\r\n").encode(), body)


@dataclass
class FaultyUpstream:
    """The server: start it, point the proxy at `url`, read `requests` afterwards."""

    script: list[Fault]
    requests: list[bytes] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> URL:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return URL(f"http://127.0.0.1:{port}")

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length) if length else b""
        self.requests.append(head + body)
        fault = self.script[min(len(self.requests), len(self.script)) - 1]
        if fault.before == "reset":
            _reset(writer)
            return
        writer.write(fault.head + fault.body)
        await writer.drain()
        if fault.then == "reset":
            _reset(writer)
        elif fault.then == "stall":
            await asyncio.sleep(30)
            writer.close()
        elif fault.then == "close":
            writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed server or a middlebox does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
