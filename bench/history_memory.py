"""Measure the dashboard history's memory: one key, and the most keys it keeps, filled up.

Every key gets a send, a rejection, a replay and a wait in every second of the window (so each
bucket and wait slot is in use), and, with --clients, that many named clients; then twice the
history's key limit is fed, to show that forgotten keys free their memory. Sizes come from
tracemalloc (Python allocations), not RSS.

    python -m bench.history_memory
    python -m bench.history_memory --clients 32
"""

from __future__ import annotations

import argparse
import json
import tracemalloc

from proxy.history import MAX_KEYS, WAIT_SAMPLES, WINDOW, History


def fill(history: History, key: str, clients: int, start: float) -> None:
    """Use every bucket and wait slot of a key, and name `clients` clients."""
    for second in range(max(WINDOW, WAIT_SAMPLES)):
        now = start + second
        client = f"client-{second % clients:02d}" if clients else None
        history.sent(key, now, client)
        history.rejected(key, now)
        history.replayed(key, now)
        history.waited(key, 0.25, now)


def measure(keys: int, clients: int) -> int:
    """Bytes allocated for a history holding `keys` filled keys (more are fed, then forgotten)."""
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    history = History()
    for n in range(keys):
        fill(history, f"{n:012x}", clients, 1_800_000_000.0)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    size = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert len(history.recent_keys()) == min(keys, MAX_KEYS)
    return size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=0, help="named clients per key")
    args = parser.parse_args()
    one = measure(1, args.clients)
    full = measure(MAX_KEYS, args.clients)
    over = measure(2 * MAX_KEYS, args.clients)
    print(
        f"clients per key {args.clients}: one key {one / 1024:.1f} KiB, "
        f"{MAX_KEYS} keys {full / 1024 / 1024:.2f} MiB, "
        f"{2 * MAX_KEYS} keys fed ({MAX_KEYS} kept) {over / 1024 / 1024:.2f} MiB"
    )
    print(json.dumps({"clients": args.clients, "one_key": one, "max_keys": full, "over": over}))


if __name__ == "__main__":
    main()
