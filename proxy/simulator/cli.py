"""`ctct-proxy simulate`: the simulator's flags, read into a `SimulatorConfig`."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from proxy.config import add_arguments, read_settings
from proxy.simulator.config import DEFAULT_HOST, DEFAULT_PORT, SIMULATOR_SETTINGS, SimulatorConfig


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `simulate` command's flags, one per setting, each with an environment twin."""
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0 = any free)")
    add_arguments(parser, SIMULATOR_SETTINGS)


def simulator_config_from_args(
    ns: argparse.Namespace, env: Mapping[str, str] | None = None
) -> SimulatorConfig:
    """Build and validate the config from parsed `simulate` flags and the environment.

    Flags win over the environment; ValueError names the flag (or its environment twin).
    """
    if not 0 <= ns.port <= 65_535:
        raise ValueError("--port must be between 0 and 65535")
    if not ns.host.strip():
        raise ValueError("--host must not be empty")
    return SimulatorConfig(**read_settings(SIMULATOR_SETTINGS, vars(ns), env or {}))
