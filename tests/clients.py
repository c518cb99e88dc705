"""Run the real example clients in ``examples/`` (PHP, C# on Mono, curl) and collect what they saw.

Each runner starts the program as a subprocess against a base URL (the proxy, the simulator or a
test app), waits for it within a timeout, and fails loudly, with the program's stderr, when it
crashes: a non-zero exit means the client could not make sense of an answer (for example a v2
error body that is not a JSON array), which is exactly what the proxy must never cause.

Every program prints one JSON object per request on stdout::

    {"client": "php-v2" | "cs-v2" | "cs-v3", "i": int, "method": str, "path": str,
     "status": int, "retry_after": str | None, "error_key": str | None,
     "error_message": str | None, "body_sha256_sent": str, "body_sha256_echoed": str | None,
     "attempts": int}

(``php-v2`` lines also carry ``"id"``.) The tools are required, never skipped: install them with
``apt-get install -y php-cli php-curl mono-mcs libmono-system-net-http4.0-cil curl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEFAULT_TIMEOUT = 60.0
INSTALL_HINT = "apt-get install -y php-cli php-curl mono-mcs libmono-system-net-http4.0-cil curl"

# Program name -> (sources under examples/csharp, assemblies to reference).
_CS_PROGRAMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "V2Client": (("V2Client.cs", "MiniJson.cs", "ClientProcess.cs"), ()),
    "V3Client": (("V3Client.cs", "MiniJson.cs", "ClientProcess.cs"), ("System.Net.Http.dll",)),
}
# Clients must reach 127.0.0.1 directly: libcurl and Mono both honour these.
_PROXY_VARIABLES = frozenset(
    {"http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"}
)
_build_lock = threading.Lock()
_tools_checked = False


class ClientToolMissingError(RuntimeError):
    """php, php-curl, mcs, mono or curl is not installed."""


class ClientRunError(RuntimeError):
    """A client program failed to build, crashed, timed out or printed something unparseable."""


def _build_dir() -> Path:
    """A build directory named after the C# sources, so an edit to them forces a rebuild."""
    digest = hashlib.sha256()
    for sources, refs in _CS_PROGRAMS.values():
        for name in sources:
            digest.update((EXAMPLES / "csharp" / name).read_bytes())
        digest.update(repr(refs).encode())
    return Path(tempfile.gettempdir()) / "ctct-proxy-clients" / digest.hexdigest()[:16]


def _check_tools() -> None:
    missing = [tool for tool in ("php", "mcs", "mono", "curl") if shutil.which(tool) is None]
    if missing:
        raise ClientToolMissingError(f"missing {', '.join(missing)}; install: {INSTALL_HINT}")
    probe = subprocess.run(
        ["php", "-r", "exit(function_exists('curl_init') ? 0 : 1);"],
        capture_output=True,
        check=False,
        timeout=30,
    )
    if probe.returncode != 0:
        raise ClientToolMissingError(f"php has no curl extension; install: {INSTALL_HINT}")


def ensure_built() -> None:
    """Check the client tool chain and compile the C# clients with mcs (once per source version).

    Raises ClientToolMissingError when a tool is absent and ClientRunError when mcs fails.
    """
    global _tools_checked
    with _build_lock:
        if not _tools_checked:
            _check_tools()
            _tools_checked = True
        out_dir = _build_dir()
        out_dir.mkdir(parents=True, exist_ok=True)
        for program, (sources, refs) in _CS_PROGRAMS.items():
            exe = out_dir / f"{program}.exe"
            if exe.exists():
                continue
            # Compile beside the target, then rename: another process may be building too.
            partial = out_dir / f"{program}.{os.getpid()}.partial.exe"
            result = subprocess.run(
                [
                    "mcs",
                    f"-out:{partial}",
                    *(f"-r:{ref}" for ref in refs),
                    *(str(EXAMPLES / "csharp" / name) for name in sources),
                ],
                capture_output=True,
                text=True,
                check=False,
                timeout=120,
            )
            if result.returncode != 0:
                partial.unlink(missing_ok=True)
                raise ClientRunError(
                    f"mcs failed to build {program} (is {INSTALL_HINT!r} done?):\n"
                    f"{result.stdout}{result.stderr}"
                )
            partial.replace(exe)


def _client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARIABLES}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


async def _run(
    name: str, argv: list[str], timeout: float, extra_env: dict[str, str] | None = None
) -> str:
    """Run one client to completion; return its stdout or raise ClientRunError with its stderr."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**_client_env(), **(extra_env or {})},
        start_new_session=True,  # its own process group, so curl children die with calls.sh
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    reads = asyncio.gather(proc.stdout.read(), proc.stderr.read())
    timed_out = False
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        timed_out = True
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    out, err = await reads
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if timed_out:
        raise ClientRunError(
            f"{name} timed out after {timeout} s\nstdout:\n{stdout}\nstderr:\n{stderr}"
        )
    if proc.returncode != 0:
        raise ClientRunError(
            f"{name} exited {proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        )
    return stdout


def _parse_lines(name: str, stdout: str, expected: int) -> list[dict[str, object]]:
    """Parse one JSON object per line, sorted by request number; insist on one per request."""
    lines: list[dict[str, object]] = []
    for text in stdout.splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ClientRunError(f"{name} printed a non-JSON line: {text!r}") from exc
        if not isinstance(line, dict) or not isinstance(line.get("i"), int):
            raise ClientRunError(f"{name} printed an unexpected line: {text!r}")
        lines.append(line)
    if len(lines) != expected:
        raise ClientRunError(f"{name} printed {len(lines)} lines, expected {expected}:\n{stdout}")
    return sorted(lines, key=lambda line: int(str(line["i"])))


async def run_php_v2(
    base: str,
    count: int,
    ident: str,
    *,
    max_retries: int = 0,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[dict[str, object]]:
    """Run examples/php/v2_client.php: ``count`` contact adds one at a time, then one bulk import.

    Returns ``count + 1`` lines; the last (``i == count``) is the multipart
    ``POST /v2/activities/addcontacts``. ``max_retries`` > 0 makes it sleep one second and retry
    on ``mashery.not.authorized.over.qps``, as the forum's scripts do.
    """
    await asyncio.to_thread(ensure_built)
    argv = [
        "php",
        str(EXAMPLES / "php" / "v2_client.php"),
        "--base", base,
        "--count", str(count),
        "--id", ident,
        "--max-retries", str(max_retries),
    ]  # fmt: skip
    stdout = await _run(f"php v2_client.php ({ident})", argv, timeout)
    return _parse_lines("v2_client.php", stdout, count + 1)


async def run_cs_v2(
    base: str,
    count: int,
    *,
    max_retries: int = 0,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[dict[str, object]]:
    """Run V2Client.exe: ``count`` concurrent calls (even ``i`` GET /v2/lists, odd POST contacts).

    Each call carries a duplicated ``api_key`` (``stale`` then ``stale2``) and a stale Bearer
    token. ``max_retries`` > 0 retries after one second on ``mashery.not.authorized.over.qps``.
    """
    await asyncio.to_thread(ensure_built)
    argv = [
        "mono",
        str(_build_dir() / "V2Client.exe"),
        "--base", base,
        "--count", str(count),
        "--max-retries", str(max_retries),
    ]  # fmt: skip
    stdout = await _run("V2Client.exe", argv, timeout)
    return _parse_lines("V2Client.exe", stdout, count)


async def run_cs_v3(
    base: str,
    count: int,
    max_retries: int,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[dict[str, object]]:
    """Run V3Client.exe: ``count`` concurrent calls (even ``i`` GET /v3/contacts, odd POST).

    On 429 each call sleeps ``Retry-After`` seconds (1 when absent; gives up above 30) and
    retries up to ``max_retries`` times; ``attempts`` in each line counts the tries.
    """
    await asyncio.to_thread(ensure_built)
    argv = [
        "mono",
        str(_build_dir() / "V3Client.exe"),
        "--base", base,
        "--count", str(count),
        "--max-retries", str(max_retries),
    ]  # fmt: skip
    stdout = await _run("V3Client.exe", argv, timeout)
    return _parse_lines("V3Client.exe", stdout, count)


async def run_curl(base: str, *, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Run examples/curl/calls.sh and return its stdout, one ``METHOD PATH STATUS ...`` line a call.

    Lines look like ``GET /v2/lists 200`` or
    ``GET /v2/lists 429 retry-after=1 error_key=mashery.not.authorized.over.qps``.
    """
    await asyncio.to_thread(ensure_built)
    return await _run("calls.sh", ["bash", str(EXAMPLES / "curl" / "calls.sh"), base], timeout)


RECIPES = EXAMPLES / "recipes"
# npm packages the Node recipes need, installed by scripts/test (`npm ci` from the lock file).
NODE_MODULES = Path(__file__).resolve().parent / "node" / "node_modules"


def recipe_argv(name: str, base: str, count: int) -> list[str]:
    """The command line of one recipe in examples/recipes, run against `base` with `count` calls.

    Raises ClientToolMissingError when its interpreter or npm packages are not installed.
    """
    path = RECIPES / name
    if path.suffix == ".py":
        return [sys.executable, str(path), base, str(count)]
    if path.suffix == ".sh":
        return ["bash", str(path), base, str(count)]
    if shutil.which("node") is None:
        raise ClientToolMissingError("missing node; install: apt-get install -y nodejs npm")
    if not (NODE_MODULES / "axios-retry").is_dir():
        raise ClientToolMissingError("missing npm packages; install: npm ci --prefix tests/node")
    return ["node", str(path), base, str(count)]


async def run_recipe(
    name: str, base: str, count: int, *, timeout: float = DEFAULT_TIMEOUT
) -> list[dict[str, object]]:
    """Run one recipe; its lines (``client``, ``i``, ``method``, ``status``, ``attempts``) by ``i``.

    CommonJS recipes find the npm packages through NODE_PATH; the recipes themselves stay free
    of the test suite's layout.
    """
    argv = recipe_argv(name, base, count)
    stdout = await _run(name, argv, timeout, {"NODE_PATH": str(NODE_MODULES)})
    return _parse_lines(name, stdout, count)
