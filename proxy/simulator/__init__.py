"""A local stand-in for the Constant Contact API: both gateways, their quotas and error shapes,
and the OAuth authorization server (`ctct-proxy simulate`).

`gateway.py` is the API (quota ledger, credential checks, canned errors, stats), `oauth_server.py`
the token endpoint, `config.py` its settings, `cli.py` its flags.
"""

from proxy.simulator.cli import add_simulate_arguments, simulator_config_from_args
from proxy.simulator.config import (
    OAUTH_EXPIRE_PATH,
    OAUTH_REVOKE_PATH,
    OAUTH_TOKEN_PATH,
    RESET_PATH,
    STATS_PATH,
    SimulatorConfig,
)
from proxy.simulator.gateway import Simulator, make_simulator_app

__all__ = [
    "OAUTH_EXPIRE_PATH",
    "OAUTH_REVOKE_PATH",
    "OAUTH_TOKEN_PATH",
    "RESET_PATH",
    "STATS_PATH",
    "Simulator",
    "SimulatorConfig",
    "add_simulate_arguments",
    "make_simulator_app",
    "simulator_config_from_args",
]
