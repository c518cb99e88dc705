"""How much memory request bodies may hold across all requests at once, and giving it back.

A request body is read in full and kept until its request is answered (a replay after a
quota error sends it again), so each one costs its size for as long as it waits in its key's
queue. `--max-body` bounds one body; `BodyBudget` bounds them all together: a body that
would take the total past `--max-body-memory` is refused with 503 and `Retry-After` —
before a byte of it is read when its `Content-Length` says how big it is, as soon as the
chunk that would cross the bound arrives when it is chunked.
"""

from __future__ import annotations

import asyncio
import ctypes
from types import TracebackType

from proxy.errors import Unavailable

# Bodies leave memory as their requests are answered, a few a second per key: a client
# refused for lack of room can come back about as soon as that.
RETRY_AFTER = 1.0


class BodyBudget:
    """The bytes of request bodies held now, across all requests, and their bound."""

    __slots__ = ("held", "limit", "peak")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0

    def hold(self, until_done: asyncio.Task[object] | None = None) -> BodyHold:
        """A new, empty hold on the budget for one body.

        It is released when it is closed (`with`), or when the task `until_done` finishes:
        for a body kept, like the proxy's, until its request has been answered.
        """
        hold = BodyHold(self)
        if until_done is not None:
            until_done.add_done_callback(hold.release_after)
        return hold

    def _grant(self, n: int) -> None:
        if self.held + n > self.limit:
            raise Unavailable(
                "The proxy is holding as many request bodies as its memory bound allows "
                f"({self.limit} bytes); retry shortly.",
                retry_after=RETRY_AFTER,
            )
        self.held += n
        self.peak = max(self.peak, self.held)


class BodyHold:
    """The part of the budget one body holds; grows as the body arrives, released once."""

    __slots__ = ("_budget", "received", "reserved")

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self.reserved = 0
        self.received = 0

    def reserve(self, n: int) -> None:
        """Hold n bytes before reading them (a declared length); Unavailable (503) if no room."""
        if n > self.reserved:
            self._budget._grant(n - self.reserved)
            self.reserved = n

    def take(self, n: int) -> None:
        """Count n more bytes received, holding more of the budget if past what was reserved."""
        self.received += n
        if self.received > self.reserved:
            self.reserve(self.received)

    def release(self) -> None:
        """Give the bytes back (idempotent)."""
        self._budget.held -= self.reserved
        self.reserved = 0

    def release_after(self, _task: asyncio.Task[object]) -> None:
        """`release`, as a task's done callback."""
        self.release()

    def __enter__(self) -> BodyHold:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


# -- giving freed memory back ----------------------------------------------------------------

# glibc keeps what Python frees in its heap for reuse and returns to the system only a free
# stretch at the heap's top. Measured with bench/attack.py (docs/security.md):
# - after 1,000 connections' request heads were freed the proxy stayed at 130 MB resident
#   (50 MB idle) until malloc_trim(0) released the free pages inside the heap (55 MB); a
#   trim costs ~10 ms after such a burst, ~30 us when there is nothing to give back;
# - glibc serves blocks of 128 KiB and more from mmap, but raises that threshold to the
#   size of each such block freed (up to 32 MiB), after which request bodies come from the
#   heap, interleaved with short-lived buffers: 150 clients streaming 8 MiB bodies peaked
#   15-25 MB higher than with the threshold held at 128 KiB (159-167 MB against 173-192).
TRIM_INTERVAL = 2.0
MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None  # not glibc (musl, macOS): its allocator's own policy stands
    return libc


def hold_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Keep glibc serving blocks of `threshold` bytes and more from mmap (returned on free).

    Returns whether the allocator took the setting.
    """
    libc = _libc()
    return libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1


async def give_back_freed_memory(interval: float = TRIM_INTERVAL) -> None:
    """Every `interval` seconds, return the allocator's free pages to the system (until cancelled)."""
    libc = _libc()
    if libc is None:
        return
    while True:
        await asyncio.sleep(interval)
        libc.malloc_trim(0)
