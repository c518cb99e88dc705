"""A real `redis-server` for tests and benchmarks: a free loopback port, a temp dir, no disk.

It can be stopped and started again on the same port mid-test (to play an outage), or
frozen with SIGSTOP (to play a Redis that is there but does not answer).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import time
from pathlib import Path

START_TIMEOUT = 10.0


def free_port() -> int:
    """A loopback port nobody listens on right now (bound and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process on 127.0.0.1:`port`, its files under `directory`."""

    def __init__(
        self, directory: Path, port: int | None = None, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.extra_args = extra_args  # e.g. ("--requirepass", "...")
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """The redis:// URL of the server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the process is up (it may be frozen)."""
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        """Start the server (again, on the same port) and wait until it answers PING."""
        if self.running:
            return
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._process = await asyncio.create_subprocess_exec(
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.directory / "redis.log"),
            *self.extra_args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not await self._pong():
            if self._process.returncode is not None:
                raise RuntimeError(
                    f"redis-server exited with {self._process.returncode}; "
                    f"see {self.directory / 'redis.log'}"
                )
            if time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError(f"redis-server did not answer PING on port {self.port}")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Kill the server at once (no save, no goodbye): what an outage looks like."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        self.resume()
        process.kill()
        await process.wait()

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered."""
        if self.running:
            assert self._process is not None
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `freeze`."""
        if self.running:
            assert self._process is not None
            self._process.send_signal(signal.SIGCONT)

    async def _pong(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 1.0)
            # A server that wants a password answers, which is all "up" means here.
            return line.startswith((b"+PONG", b"-NOAUTH"))
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
