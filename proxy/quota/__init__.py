"""Per-key queues that pace sends to the key's quota, and the backends that hold its state.

`engine.py` queues and paces (the product's own idea), `fair.py` orders a key's queued
requests between its clients and lanes, `backend.py` says what a backend is,
`local.py` keeps the state in this process and `redis.py` shares it between replicas (its
Lua scripts are in `lua/`).
"""

from proxy.quota.backend import QuotaBackend, Reservation, Usage, next_reset, utc_day
from proxy.quota.engine import KeyQueue, Limits, QuotaEngine
from proxy.quota.fair import DEFAULT_URGENCY, LANE_ROUND, Ticket
from proxy.quota.local import FLUSH_INTERVAL, LocalBackend

__all__ = [
    "DEFAULT_URGENCY",
    "FLUSH_INTERVAL",
    "LANE_ROUND",
    "KeyQueue",
    "Limits",
    "LocalBackend",
    "QuotaBackend",
    "QuotaEngine",
    "Reservation",
    "Ticket",
    "Usage",
    "next_reset",
    "utc_day",
]
