"""A real forward proxy for tests: Debian's `tinyproxy` on a free loopback port, its log in a
temp dir, optionally demanding Basic credentials (as corporate egress proxies do)."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from pathlib import Path

from tests.redis_server import free_port

START_TIMEOUT = 10.0
# tinyproxy logs each request line at LogLevel Connect: "Request (file descriptor 5): CONNECT h:p HTTP/1.1"
_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+) (\S+) HTTP/")


class TinyProxy:
    """One tinyproxy process on 127.0.0.1:`port`, configured and logging under `directory`."""

    def __init__(self, directory: Path, user: str | None = None, password: str | None = None):
        self.directory = directory
        self.port = free_port()
        self.user = user
        self.password = password
        self.log_file = directory / "tinyproxy.log"
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """The proxy's URL, with its credentials when it has some."""
        auth = f"{self.user}:{self.password}@" if self.user else ""
        return f"http://{auth}127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Write the configuration, start tinyproxy in the foreground, wait for its port."""
        binary = shutil.which("tinyproxy")
        if binary is None:
            raise RuntimeError("tinyproxy is not installed (apt-get install tinyproxy)")
        self.directory.mkdir(parents=True, exist_ok=True)
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 30",
            "MaxClients 50",
            "Allow 127.0.0.1",
            f'LogFile "{self.log_file}"',
            "LogLevel Connect",  # one line per request, CONNECT included
            "DisableViaHeader Yes",
        ]
        if self.user:
            lines.append(f"BasicAuth {self.user} {self.password}")
        config = self.directory / "tinyproxy.conf"
        config.write_text("\n".join(lines) + "\n")
        self._process = await asyncio.create_subprocess_exec(
            binary,
            "-d",
            "-c",
            str(config),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not await self._listening():
            if self._process.returncode is not None:
                raise RuntimeError(
                    f"tinyproxy exited with {self._process.returncode}; see {self.log_file}"
                )
            if time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError(f"tinyproxy did not listen on port {self.port}")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Stop the process (SIGTERM, then wait)."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        await process.wait()

    def requests(self) -> list[tuple[str, str]]:
        """(method, target) of every request the proxy received, in order."""
        if not self.log_file.exists():
            return []
        return _REQUEST.findall(self.log_file.read_text(errors="replace"))

    def connects(self) -> list[str]:
        """The host:port of every CONNECT tunnel asked for."""
        return [target for method, target in self.requests() if method == "CONNECT"]

    async def _listening(self) -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        writer.close()
        return True
