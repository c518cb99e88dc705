"""The order in which one key's queued requests get its send slots: lanes, then clients in turn.

Every queued request (a `Ticket`) belongs to a client (a program, named at the edge) and to
a lane, the RFC 9218 urgency it asked for (0 most urgent .. 7, default 3). Each client has
its own FIFO in each lane, and the next slot goes to:

1. a request put back after a send the gateway or the network wasted (`push_again`): it had
   its turn already, so it goes before everything else;
2. else the most urgent lane with something queued, unless a less urgent lane has been
   passed over LANE_ROUND - 1 times in a row: then that lane (the one passed over most
   often first). So a lane with something queued gets at least one send in every LANE_ROUND
   while one other lane competes, and is passed over at most LANE_ROUND - 1 + 6 times in a
   row however many do;
3. within the lane, round robin between its clients: the client at the front of the ring
   sends its oldest request and goes to the back. A client whose FIFO was empty joins at
   the back of the ring. Every request costs the same (one slot), so this is deficit round
   robin with a quantum of one send, and exactly fair.

Why round robin rather than start-time fair queueing: with equal costs both give the same
order, and the ring makes the place of a new arrival a sum over the ring (`ahead`), which
admission needs for every request. The reasoning is in docs/architecture.md ("Fair share").
"""

from __future__ import annotations

import asyncio
import enum
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass

from proxy.clock import Timer

LANES = 8  # RFC 9218 urgencies 0..7
DEFAULT_URGENCY = 3
# A lane with something queued is passed over at most LANE_ROUND - 1 times in a row while
# one other lane competes: at least 1 send in 8 (half a send a second at 4/s) goes to it.
LANE_ROUND = 8
# Beyond this many clients in one lane, a new arrival's place is bounded rather than summed
# (clients identified by User-Agent can be many; admission must stay cheap).
EXACT_CLIENTS = 64
# Sends are counted per client over the last minute in buckets of this many seconds, for at
# most this many clients per bucket (the rest count as OTHER).
SHARE_WINDOW = 60.0
SHARE_BUCKET = 5.0
SHARE_CLIENTS = 1000
OTHER = "(other)"


class TicketState(enum.Enum):
    QUEUED = "queued"
    GRANTED = "granted"
    GONE = "gone"


@dataclass(slots=True, eq=False)
class Ticket:
    """One request's place in its key's queue."""

    future: asyncio.Future[None]
    deadline: float
    enqueued: float
    client: str = ""
    lane: int = DEFAULT_URGENCY
    state: TicketState = TicketState.QUEUED
    timer: Timer | None = None
    granted_at: float | None = None
    replays: int = 0
    deferred: bool = False  # its deadline passed while its slot was due: the pump decides
    again: bool = False  # put back after a send: goes before every lane
    seq: int = 0  # the order of admission within its key
    ahead: int = -1  # sends predicted ahead of it at admission (-1: measured already)
    grants_at: int = 0  # the key's count of grants when it was admitted


class _Flow:
    """One client's FIFO within one lane."""

    __slots__ = ("client", "live", "tickets")

    def __init__(self, client: str) -> None:
        self.client = client
        self.tickets: deque[Ticket] = deque()  # may hold tickets gone since: skipped lazily
        self.live = 0


class _Lane:
    """The clients of one urgency with something queued, in the order of their next turn."""

    __slots__ = ("flows", "live", "ring", "skipped")

    def __init__(self) -> None:
        self.flows: dict[str, _Flow] = {}
        self.ring: deque[_Flow] = deque()  # every flow with live > 0; the front sends next
        self.live = 0
        self.skipped = 0  # sends that went to other lanes since this one last sent

    def position(self, client: str) -> int:
        """Sends of this lane before a new request of `client` would go, by round robin."""
        ring = self.ring
        flow = self.flows.get(client)
        if flow is None:
            return len(ring)  # joins the back: everyone else sends once first
        k = flow.live  # the new request is the client's (k+1)th: it goes in round k
        if len(ring) > EXACT_CLIENTS:
            return k + min(self.live - k, (k + 1) * (len(ring) - 1))
        total = k
        before = True
        for other in ring:
            if other is flow:
                before = False
                continue
            # Clients ahead of it in the ring send in rounds 0..k, those behind in 0..k-1.
            total += min(other.live, k + 1 if before else k)
        return total


class FairOrder:
    """The requests of one key waiting for a send slot, and which one gets the next."""

    def __init__(self) -> None:
        self._lanes: dict[int, _Lane] = {}  # only lanes with something queued
        self._again: deque[Ticket] = deque()
        self._again_live = 0
        self.live = 0

    def push(self, ticket: Ticket) -> None:
        """Queue a ticket at the back of its client's FIFO in its lane."""
        lane = self._lanes.get(ticket.lane)
        if lane is None:
            lane = self._lanes[ticket.lane] = _Lane()
        flow = lane.flows.get(ticket.client)
        if flow is None:
            flow = lane.flows[ticket.client] = _Flow(ticket.client)
            lane.ring.append(flow)
        flow.tickets.append(ticket)
        flow.live += 1
        lane.live += 1
        self.live += 1

    def push_again(self, ticket: Ticket) -> None:
        """Queue a ticket whose send was wasted: it goes before every lane and client."""
        ticket.again = True
        self._again.appendleft(ticket)
        self._again_live += 1
        self.live += 1

    def remove(self, ticket: Ticket) -> None:
        """Forget a queued ticket that left (its state already says so)."""
        self.live -= 1
        if ticket.again:
            self._again_live -= 1
            return
        lane = self._lanes[ticket.lane]
        flow = lane.flows[ticket.client]
        flow.live -= 1
        lane.live -= 1
        if flow.live == 0:
            lane.ring.remove(flow)
            del lane.flows[ticket.client]
        if lane.live == 0:
            del self._lanes[ticket.lane]

    def peek(self) -> Ticket | None:
        """The ticket the next slot goes to, if any (nothing is committed)."""
        again = self._again
        while again and again[0].state is not TicketState.QUEUED:
            again.popleft()
        if again:
            return again[0]
        if not self._lanes:
            return None
        tickets = self._lanes[self._next_lane()].ring[0].tickets
        while tickets[0].state is not TicketState.QUEUED:
            tickets.popleft()
        return tickets[0]

    def pop(self) -> Ticket:
        """Take the ticket `peek` names, and turn the ring and the lanes' counts."""
        ticket = self.peek()
        assert ticket is not None, "pop from an empty order"
        self.live -= 1
        if ticket.again:
            self._again.popleft()
            self._again_live -= 1
            ticket.again = False
            return ticket
        urgency = ticket.lane
        lane = self._lanes[urgency]
        flow = lane.ring.popleft()
        flow.tickets.popleft()
        flow.live -= 1
        lane.live -= 1
        if flow.live:
            lane.ring.append(flow)
        else:
            del lane.flows[flow.client]
        for other in self._lanes.values():
            other.skipped += 1
        lane.skipped = 0
        if lane.live == 0:
            del self._lanes[urgency]
        return ticket

    def _next_lane(self) -> int:
        lanes = self._lanes
        if len(lanes) == 1:
            return next(iter(lanes))
        owed = [(lane.skipped, -u) for u, lane in lanes.items() if lane.skipped >= LANE_ROUND - 1]
        if owed:
            return -max(owed)[1]  # passed over most often; on a tie, the more urgent
        return min(lanes)

    def ahead(self, client: str, urgency: int) -> int:
        """About how many sends would go before a new request of `client` in lane `urgency`.

        Exact within its lane for the requests queued now; other lanes are counted by the
        lane rule (a lane gets one send in LANE_ROUND while more urgent ones have work).
        Later arrivals are not foreseen: `KeyQueue` stretches this by what it has measured.
        """
        lanes = self._lanes
        own = lanes.get(urgency)
        in_lane = own.position(client) if own is not None else 0
        total = self._again_live + in_lane
        if len(lanes) > (own is not None):
            skipped = own.skipped if own is not None else 0
            urgent = sum(lane.live for u, lane in lanes.items() if u < urgency)
            first = max(0, LANE_ROUND - 1 - skipped)
            urgent_before = min(urgent, first + in_lane * (LANE_ROUND - 1))
            sent = in_lane + urgent_before
            total += urgent_before
            for u, lane in lanes.items():
                if u > urgency:
                    total += min(lane.live, (sent + lane.skipped) // (LANE_ROUND - 1))
        return total

    def depths(self) -> Counter[str]:
        """Queued tickets per client (all lanes)."""
        depths: Counter[str] = Counter()
        for lane in self._lanes.values():
            for flow in lane.ring:
                depths[flow.client] += flow.live
        for ticket in self._again:
            if ticket.state is TicketState.QUEUED:
                depths[ticket.client] += 1
        return depths

    def client_lanes(self) -> dict[str, int]:
        """The most urgent lane each queued client waits in."""
        found: dict[str, int] = {}
        for urgency, lane in self._lanes.items():
            for flow in lane.ring:
                if flow.live and urgency < found.get(flow.client, 8):
                    found[flow.client] = urgency
        return found

    def lanes(self) -> dict[int, int]:
        """Queued tickets per lane with something queued (tickets put back not included)."""
        return {u: lane.live for u, lane in sorted(self._lanes.items())}

    def drain(self) -> Iterator[Ticket]:
        """Every queued ticket, the order emptied (their states are the caller's to set)."""
        again, lanes = self._again, self._lanes
        self._again, self._lanes = deque(), {}
        self._again_live = self.live = 0
        for ticket in again:
            if ticket.state is TicketState.QUEUED:
                yield ticket
        for lane in lanes.values():
            for flow in lane.ring:
                for ticket in flow.tickets:
                    if ticket.state is TicketState.QUEUED:
                        yield ticket


class RecentSends:
    """Sends per client over the last minute, in buckets; bounded in the clients it names."""

    def __init__(self) -> None:
        self._buckets: deque[tuple[int, Counter[str]]] = deque()

    def add(self, client: str, now: float) -> None:
        """Count one send of `client` at monotonic time `now`."""
        index = int(now // SHARE_BUCKET)
        buckets = self._buckets
        if not buckets or buckets[-1][0] != index:
            buckets.append((index, Counter()))
            self._expire(index)
        counts = buckets[-1][1]
        if client not in counts and len(counts) >= SHARE_CLIENTS:
            client = OTHER
        counts[client] += 1

    def counts(self, now: float) -> Counter[str]:
        """Sends per client in the last SHARE_WINDOW seconds."""
        self._expire(int(now // SHARE_BUCKET))
        total: Counter[str] = Counter()
        for _, counts in self._buckets:
            total.update(counts)
        return total

    def _expire(self, index: int) -> None:
        oldest = index - int(SHARE_WINDOW // SHARE_BUCKET) + 1
        while self._buckets and self._buckets[0][0] < oldest:
            self._buckets.popleft()
