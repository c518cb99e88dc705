"""What the proxy itself costs: nginx direct vs. through the proxy vs. a plain aiohttp forwarder.

nginx answers a fixed body as fast as a local upstream can; wrk drives it directly, through
`ctct-proxy serve` (every feature on, limits out of the way) and through
`bench/plain_forwarder.py`, on uvloop like the proxy (`plain`) and on asyncio's own loop
(`plain (asyncio)`, the plainest forwarder there is). Rounds alternate between the paths so that drift of the machine
(other load, CPU frequency) spreads over all of them alike; each figure is the median of the
rounds. Reports requests/s at C connections, p50 / p99 latency at one connection, and the CPU
time each server process spent per request (from /proc, during the load runs).

    .venv/bin/python -m bench.overhead                  # 3 rounds, 10 s at 50 connections
    .venv/bin/python -m bench.overhead --rounds 1 --duration 3 --latency-duration 3
    .venv/bin/python -m bench.overhead --compare /path/to/other/checkout
    .venv/bin/python -m bench.overhead --profile /tmp/proxy.txt   # py-spy the proxy under load

Needs `nginx` and `wrk` (Debian packages `nginx-light` and `wrk`, installed with apt-get when
run as root). The `proxy (info)` path writes the request_finished line of every request (JSON,
to /dev/null): what the default `--log-level info` costs. `--compare` adds the proxy of another
checkout (its `proxy/` package) as one more path, e.g. a `git worktree` of the previous commit,
at `--log-level warning` or, with `--compare-level info`, at the default level.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT, free_port, stop, wait_ready

TARGET = "/v2/lists?api_key=x"
BODY = '{"ok":true}'
# The proxy's limits, set out of the way: every request still takes the full path
# (queue, reservation, credentials, metrics, logs) but is never held.
OUT_OF_THE_WAY = ["--qps", "1000000", "--daily-quota", "1000000000", "--max-queue", "100000"]
# Goals of issue 9: throughput at least this share of the plain forwarder's, and at most this
# much added to the direct p50 at one connection.
THROUGHPUT_GOAL = 0.9
ADDED_P50_GOAL_MS = 0.5
WARM_UP_SECONDS = 2


def ensure_tool(name: str, package: str) -> str:
    """The path of a command-line tool, apt-installed when missing and we are root."""
    system = "/usr/sbin:/usr/bin:/sbin:/bin"
    found = shutil.which(name) or shutil.which(name, path=system)
    if found:
        return found
    if os.geteuid() != 0:
        sys.exit(f"bench/overhead.py needs `{name}`: install it with `apt-get install {package}`.")
    subprocess.run(["apt-get", "install", "-y", "-q", package], check=True)
    found = shutil.which(name, path=system)
    if not found:
        sys.exit(f"bench/overhead.py: `apt-get install {package}` did not provide `{name}`.")
    return found


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
error_log {tmp}/e.log;
pid {tmp}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/json;
    # Keep upstream connections open as a real API gateway does; nginx's default (1000)
    # would make both forwarders reconnect every thousand requests.
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 '{body}'; }}
    }}
}}
"""


def pin(pid: int, cpu: int) -> None:
    """Keep every thread of a process on one CPU."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that has ended meanwhile
            os.sched_setaffinity(int(task.name), {cpu})


def start_nginx(nginx: str, tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    """nginx on a free port, answering every request with a fixed JSON body."""
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, body=BODY))
    proc = subprocess.Popen(
        [nginx, "-p", str(tmp), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, port


def start_proxy(
    port: int, upstream: str, state: Path, level: str, tree: Path = ROOT
) -> subprocess.Popen[bytes]:
    """`ctct-proxy serve` (the `proxy/` package of `tree`), every feature on, limits out of the way."""
    args = ["--port", str(port), "--upstream-v2", upstream, "--upstream-v3", upstream]
    args += [*OUT_OF_THE_WAY, "--api-key", "bench-api-key", "--access-token", "bench-token"]
    args += ["--state-dir", str(state), "--log-level", level, "--log-format", "json"]
    # `-m` puts the working directory first on sys.path: the tree's own package is the one run.
    # wrk repeats one GET: coalesced, concurrent ones would share sends and skip the path
    # being measured (set through the environment, which older trees simply ignore).
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", *args],
        cwd=tree,
        env={**os.environ, "CTCT_PROXY_COALESCE": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_plain(port: int, upstream: str, *loop: str) -> subprocess.Popen[bytes]:
    """The plain forwarder of bench/plain_forwarder.py (`"asyncio"`: on asyncio's own loop)."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "plain_forwarder.py"), upstream, str(port), *loop],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@dataclass
class WrkResult:
    """What one wrk run measured."""

    rps: float
    p50_ms: float
    p99_ms: float
    bad: int  # non-2xx answers plus socket errors


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _field(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise ValueError(f"wrk printed no {pattern!r}:\n{text}")
    return match.group(1)


def wrk(wrk_bin: str, url: str, threads: int, connections: int, seconds: float) -> WrkResult:
    """Run wrk once and parse its figures."""
    command = [wrk_bin, f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency", url]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    bad = 0
    if match := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        bad += int(match.group(1))
    if match := re.search(r"Socket errors:(.*)", out):
        bad += sum(int(n) for n in re.findall(r"\d+", match.group(1)))
    return WrkResult(
        rps=float(_field(r"Requests/sec:\s+([\d.]+)", out)),
        p50_ms=_ms(_field(r"\s50%\s+(\S+)", out)),
        p99_ms=_ms(_field(r"\s99%\s+(\S+)", out)),
        bad=bad,
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    try:
        loop = f"uvloop {version('uvloop')}"
    except PackageNotFoundError:
        loop = "asyncio"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "loop": loop,
        "aiohttp": version("aiohttp"),
    }


# -- profiling ----------------------------------------------------------------------------


def profile(proxy_pid: int, wrk_bin: str, url: str, args: argparse.Namespace) -> None:
    """Sample the proxy with py-spy under load; write collapsed stacks and print a summary."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        sys.exit("--profile needs py-spy: `pip install py-spy`.")
    raw = Path(args.profile)
    command = [py_spy, "record", "--pid", str(proxy_pid), "--format", "raw", "--rate", "200"]
    command += ["--duration", f"{args.duration:g}", "--output", str(raw), "--nonblocking"]
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # py-spy attaches
    wrk(wrk_bin, url, args.threads, args.connections, args.duration)
    spy.wait()
    print(summarise_profile(raw.read_text()))


def summarise_profile(collapsed: str, top: int = 25) -> str:
    """Where the samples of py-spy's collapsed stacks fall: by package, and the busiest frames.

    A sample belongs to its innermost Python frame (time in C called from Python, a socket
    write say, counts for the frame that called it).
    """
    own: Counter[str] = Counter()
    package: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        leaf = stack.split(";")[-1]
        own[_short(leaf)] += count
        package[_package(leaf)] += count
    lines = [f"{total} samples", "share  package (innermost frame)"]
    lines += [f"{100 * n / total:5.1f}  {name}" for name, n in package.most_common()]
    lines += ["share  frame (self)"]
    lines += [f"{100 * n / total:5.1f}  {frame}" for frame, n in own.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (module.py)"; lines would split one function.
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1]
    return f"{name} ({file})"


_PACKAGES = frozenset(
    {"proxy", "aiohttp", "multidict", "yarl", "structlog", "prometheus_client", "uvloop"}
)


def _package(frame: str) -> str:
    # py-spy names files relative to sys.path: "aiohttp/client.py", "asyncio/events.py", "uuid.py".
    where = frame.partition(" (")[2]
    top = where.split("/", 1)[0] if "/" in where else ""
    return top if top in _PACKAGES else "stdlib"


# -- the run ------------------------------------------------------------------------------


@dataclass
class Route:
    """One way to nginx: its base URL and the server process whose CPU time is counted."""

    url: str
    pid: int
    rps: list[float]
    cpu_us: list[float]
    p50_ms: list[float]
    p99_ms: list[float]

    @classmethod
    def of(cls, url: str, pid: int) -> Route:
        return cls(url + TARGET, pid, [], [], [], [])


def measure(paths: dict[str, Route], wrk_bin: str, args: argparse.Namespace) -> None:
    """Alternate load runs and one-connection runs over all paths, round after round."""
    for round_no in range(1, args.rounds + 1):
        for name, path in paths.items():
            cpu_before = cpu_seconds(path.pid)
            result = wrk(wrk_bin, path.url, args.threads, args.connections, args.duration)
            used = cpu_seconds(path.pid) - cpu_before
            _check(name, result)
            path.rps.append(result.rps)
            path.cpu_us.append(1e6 * used / (result.rps * args.duration))
        for name, path in paths.items():
            result = wrk(wrk_bin, path.url, 1, 1, args.latency_duration)
            _check(name, result)
            path.p50_ms.append(result.p50_ms)
            path.p99_ms.append(result.p99_ms)
        print(
            f"round {round_no}: "
            + ", ".join(
                f"{n} {p.rps[-1]:.0f}/s p50 {p.p50_ms[-1]:.3f} ms" for n, p in paths.items()
            ),
            file=sys.stderr,
        )


def _check(name: str, result: WrkResult) -> None:
    if result.bad:
        sys.exit(f"bench/overhead.py: {result.bad} failed requests on the {name} path")


def report(paths: dict[str, Route], args: argparse.Namespace) -> None:
    """Print the table, the ratios against the goals, and one JSON line."""
    med = {
        name: {
            "rps": statistics.median(p.rps),
            "p50_ms": statistics.median(p.p50_ms),
            "p99_ms": statistics.median(p.p99_ms),
            "cpu_us_per_request": statistics.median(p.cpu_us),
        }
        for name, p in paths.items()
    }
    direct_p50 = med["direct"]["p50_ms"]
    width = max(len(name) for name in med) + 2
    print(
        f"\n{'path':<{width}} {f'req/s @{args.connections}':>12} {'p50 @1':>10} {'p99 @1':>10} "
        f"{'+p50':>10} {'CPU/req':>9}"
    )
    for name, m in med.items():
        print(
            f"{name:<{width}} {m['rps']:>12.0f} {m['p50_ms']:>8.3f}ms {m['p99_ms']:>8.3f}ms "
            f"{m['p50_ms'] - direct_p50:>+8.3f}ms {m['cpu_us_per_request']:>7.1f}us"
        )
    ratios = {
        f"{_key(name)}_over_{_key(yardstick)}_rps": round(m["rps"] / med[yardstick]["rps"], 3)
        for yardstick in ("plain", "plain (asyncio)")
        for name, m in med.items()
        if name.startswith("proxy")
    }
    added_p50 = med["proxy"]["p50_ms"] - direct_p50
    print(
        f"\nproxy / plain throughput: {ratios['proxy_over_plain_rps']:.2f} "
        f"(goal >= {THROUGHPUT_GOAL}); proxy p50 over direct: {added_p50:+.3f} ms "
        f"(goal <= {ADDED_P50_GOAL_MS} ms)"
        f"\nproxy / plain (asyncio) throughput: {ratios['proxy_over_plain_asyncio_rps']:.2f}; "
        f"proxy (info) / plain (asyncio): {ratios.get('proxy_info_over_plain_asyncio_rps', 0):.2f}"
    )
    summary = {
        "bench": "overhead",
        "rounds": args.rounds,
        "duration_s": args.duration,
        "connections": args.connections,
        "paths": {
            name: {k: round(v, 3) for k, v in m.items()} | {"rounds_rps": paths[name].rps}
            for name, m in med.items()
        },
        **ratios,
        "proxy_added_p50_ms": round(added_p50, 3),
        "pinned": args.pinned,
        "machine": machine(),
    }
    print(json.dumps(summary))


def _key(name: str) -> str:
    # "proxy (info)" -> "proxy_info": a JSON key without spaces or brackets.
    return re.sub(r"\W+", "_", name).strip("_")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load run")
    parser.add_argument(
        "--latency-duration", type=float, default=5.0, help="seconds per one-connection run"
    )
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-info", action="store_true", help="skip the proxy at --log-level info")
    parser.add_argument(
        "--compare", type=Path, metavar="DIR", help="also measure the proxy of another checkout"
    )
    parser.add_argument(
        "--compare-level",
        default="warning",
        choices=["warning", "info"],
        help="log level of the compared proxy",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let the OS place processes (default: wrk on CPU 0; nginx and the servers on CPU 1)",
    )
    parser.add_argument(
        "--profile", metavar="FILE", help="only py-spy the proxy under load; stacks to FILE"
    )
    args = parser.parse_args()
    pinned = args.pinned = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
    if pinned:
        # wrk (and this script) on CPU 0, every server and nginx on CPU 1: the load generator
        # never competes with the server it measures, and every path crosses the same two
        # CPUs. Figures then depend far less on where the scheduler put things.
        os.sched_setaffinity(0, {0})

    nginx = ensure_tool("nginx", "nginx-light")
    wrk_bin = ensure_tool("wrk", "wrk")
    procs: list[subprocess.Popen[bytes]] = []
    paths: dict[str, Route] = {}
    with tempfile.TemporaryDirectory(prefix="ctct-overhead-") as tmp_name:
        tmp = Path(tmp_name)

        def add(name: str, proc: subprocess.Popen[bytes], url: str) -> None:
            procs.append(proc)
            paths[name] = Route.of(url, proc.pid)

        try:
            nginx_proc, nginx_port = start_nginx(nginx, tmp)
            upstream = f"http://127.0.0.1:{nginx_port}"
            add("direct", nginx_proc, upstream)
            servers = [("proxy", "warning", ROOT)]
            if not args.no_info:
                servers.append(("proxy (info)", "info", ROOT))
            if args.compare is not None:
                servers.append(("proxy (compared)", args.compare_level, args.compare.resolve()))
            for name, level, tree in servers:
                port = free_port()
                proc = start_proxy(port, upstream, tmp / f"state-{len(procs)}", level, tree)
                add(name, proc, f"http://127.0.0.1:{port}")
            port = free_port()
            add("plain", start_plain(port, upstream), f"http://127.0.0.1:{port}")
            port = free_port()
            plain_asyncio = start_plain(port, upstream, "asyncio")
            add("plain (asyncio)", plain_asyncio, f"http://127.0.0.1:{port}")
            for path in paths.values():
                asyncio.run(wait_ready(path.url))
                if pinned:
                    pin(path.pid, 1)
            for path in paths.values():  # warm up: connections, caches, first-use paths
                wrk(wrk_bin, path.url, args.threads, args.connections, WARM_UP_SECONDS)
            if args.profile:
                profile(paths["proxy"].pid, wrk_bin, paths["proxy"].url, args)
                return
            measure(paths, wrk_bin, args)
        finally:
            for proc in reversed(procs):
                stop(proc)
    report(paths, args)


if __name__ == "__main__":
    main()
