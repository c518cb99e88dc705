"""The command line: parse, build the configuration, run. No logic lives here."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

from proxy import __version__
from proxy.config import Config, ConfigError, add_serve_arguments, environ

EXIT_CONFIG = 2
EXIT_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    """The `ctct-proxy` parser with its subcommands."""
    from proxy.oauth.login import add_login_arguments
    from proxy.simulator import add_simulate_arguments

    parser = argparse.ArgumentParser(
        prog="ctct-proxy",
        description="A local proxy that keeps Constant Contact API clients within their quota.",
    )
    parser.add_argument("--version", action="version", version=f"ctct-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    add_serve_arguments(serve)
    simulate = sub.add_parser("simulate", help="run a local stand-in for the Constant Contact API")
    add_simulate_arguments(simulate)
    login = sub.add_parser(
        "login", help="sign in once in a browser (OAuth + PKCE) and save tokens for serve"
    )
    add_login_arguments(login)
    demo = sub.add_parser("demo", help="show the proxy against the stand-in, side by side")
    demo.add_argument(
        "--requests", type=int, default=40, help="requests in each burst (default 40)"
    )
    demo.add_argument(
        "--qps", type=int, default=4, help="the stand-in's per-second quota (default 4)"
    )
    return parser


def _run(coro: Coroutine[Any, Any, object]) -> None:
    try:
        import uvloop  # an optional extra: `pip install ctct-proxy[fast]`
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Entry point of `ctct-proxy` and `python -m proxy`; returns the exit status."""
    from proxy import logs

    args = build_parser().parse_args(argv)
    env = environ() if env is None else env
    if args.command == "serve":
        try:
            config = Config.from_sources(vars(args), env)
        except ConfigError as error:
            print(f"ctct-proxy: error: {error}", file=sys.stderr)
            return EXIT_CONFIG
        logs.configure(config.log_format, config.log_level)
        from proxy.edge.server import CannotListen, serve
        from proxy.errors import StartupError

        try:
            _run(serve(config))
        except CannotListen as error:
            print(f"ctct-proxy: error: --host/--port: {error}", file=sys.stderr)
            return EXIT_CONFIG
        except (StartupError, OSError) as error:
            print(f"ctct-proxy: error: {_one_line(error)}", file=sys.stderr)
            return EXIT_CONFIG
        return 0
    if args.command == "simulate":
        from proxy.edge.server import run_until_stopped
        from proxy.simulator import make_simulator_app, simulator_config_from_args

        try:
            sim_config = simulator_config_from_args(args, env)
        except ValueError as error:
            print(f"ctct-proxy: error: {error}", file=sys.stderr)
            return EXIT_CONFIG
        logs.configure(None, "info")
        sim_log = logs.get_logger("simulator")

        def listening(host: str, port: int) -> None:
            sim_log.info("simulator_listening", host=host, port=port)

        _run(
            run_until_stopped(make_simulator_app(sim_config), args.host, args.port, 5.0, listening)
        )
        return 0
    if args.command == "login":
        from proxy.oauth.login import LoginFailed, login, login_settings

        try:
            config, options = login_settings(vars(args), env)
        except ConfigError as error:
            print(f"ctct-proxy: error: {error}", file=sys.stderr)
            return EXIT_CONFIG
        logs.configure("console", "warning", stream=sys.stderr)
        try:
            _run(login(config, options))
        except LoginFailed as error:
            print(f"ctct-proxy: login failed: {error}", file=sys.stderr)
            return EXIT_FAILED
        return 0
    from proxy.demo import run_demo

    logs.configure("console", "warning")
    _run(run_demo(args.requests, args.qps))
    return 0
