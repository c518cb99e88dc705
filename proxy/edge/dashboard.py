"""The live dashboard: `GET /` and `/dashboard` (one page), and `/dashboard.json` that it polls.

The page is three hand-written files in `proxy/edge/static/`, served from the package with a
Content-Security-Policy that allows nothing from elsewhere: the proxy often runs where there is
no internet, and a page that shows quota state should not load code from anyone else. The page
asks for the JSON every 1.5 s.

Access and redaction are those of `/status`: no client token is needed, keys appear as
fingerprints (and the names `--key-name` gives them), the JSON passes through `redact`, and the
token state is times and counts only.
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from proxy.config import Config
from proxy.credentials import TokenSource, fingerprint, redact
from proxy.history import History, Snapshot
from proxy.quota import KeyQueue, QuotaEngine

POLL_SECONDS = 1.5
# Keys shown at most (most recently active first); /status lists them all.
MAX_SHOWN_KEYS = 50
_STATIC = importlib.resources.files("proxy.edge") / "static"
_TYPES = {
    "dashboard.html": "text/html",
    "dashboard.css": "text/css",
    "dashboard.js": "text/javascript",
}
# Nothing but this origin: no CDN, no inline code, no framing. `data:` only for the empty icon.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True, slots=True)
class ClientQueue:
    """One client's part of a key's queue, as per-client (fair-share) queues report it."""

    name: str  # the client token's name, or a short fingerprint of what identifies the client
    queued: int
    lane: int | None = None  # the Priority urgency (0-7) it is queued under, if any


# The hook for per-client queues inside a key (the fair-share issue): given a key's queue, the
# clients with requests in it, or None when the queue has no per-client breakdown. The share of
# sends comes from the history (`HistoryFeed.granted(..., client=name)`).
ClientBreakdown = Callable[[KeyQueue], list[ClientQueue] | None]


def no_client_breakdown(queue: KeyQueue) -> list[ClientQueue] | None:
    """The hook until queues know their clients: no breakdown."""
    return None


class Dashboard:
    """Builds the dashboard's JSON from the engine, the history, the mode and the token state."""

    def __init__(
        self,
        config: Config,
        engine: QuotaEngine,
        history: History,
        mode: Callable[[], str],
        tokens: TokenSource,
        client_breakdown: ClientBreakdown = no_client_breakdown,
    ) -> None:
        self.config = config
        self.engine = engine
        self.history = history
        self.mode = mode
        self.tokens = tokens
        self.client_breakdown = client_breakdown
        self.names = key_names(config)

    def document(self, seconds: int | None = None) -> dict[str, object]:
        """Everything the page shows, for the last `seconds` of history (default: all kept)."""
        clock = self.engine.clock
        now = clock.time()
        queues = self.engine.queues
        by_fp: dict[str, KeyQueue] = {queue.fingerprint: queue for queue in queues.values()}
        order = [fp for fp in self.history.recent_keys() if fp in by_fp]
        order += sorted(set(by_fp) - set(order))
        config = self.config
        return {
            "now": now,
            "poll_seconds": POLL_SECONDS,
            "mode": self.mode(),
            "qps": config.qps,
            "daily_quota": config.daily_quota,
            "max_wait": config.max_wait,
            "window_seconds": self.history.window,
            "token": self.tokens.status(),
            "keys_total": len(by_fp),
            "keys": [self._key(by_fp[fp], now, seconds) for fp in order[:MAX_SHOWN_KEYS]],
        }

    def _key(self, queue: KeyQueue, now: float, seconds: int | None) -> dict[str, object]:
        snap = self.history.snapshot(queue.fingerprint, now, seconds)
        return {
            **queue.status(),  # the same figures as /status
            "name": self.names.get(queue.fingerprint),
            "predicted_wait_seconds": round(queue.predicted_wait(), 3),
            "sends_last_minute": snap.sends_last_minute,
            "wait_p50_seconds": _rounded(snap.wait_p50),
            "wait_p95_seconds": _rounded(snap.wait_p95),
            "wait_samples": snap.wait_samples,
            "history": {
                "end": snap.end,
                "sends": snap.sends,
                "rejections": snap.rejections,
                "replays": snap.replays,
            },
            "clients": self._clients(queue, snap),
        }

    def _clients(self, queue: KeyQueue, snap: Snapshot) -> list[dict[str, object]] | None:
        rows = self.client_breakdown(queue)
        if rows is None and not snap.clients:
            return None
        queued = {row.name: (row.queued, row.lane) for row in rows or []}
        sent = snap.clients
        total = snap.sends_last_minute

        def order(name: str) -> tuple[int, int, str]:
            return -sent.get(name, 0), -queued.get(name, (0, None))[0], name

        return [
            {
                "name": name,
                "sends_last_minute": sent.get(name, 0),
                # Client counts move in 5-second steps: never more than the whole.
                "share": round(min(1.0, sent.get(name, 0) / total), 4) if total else 0.0,
                "queued": queued.get(name, (0, None))[0],
                "lane": queued.get(name, (0, None))[1],
            }
            for name in sorted(set(queued) | set(sent), key=order)
        ]


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)


def key_names(config: Config) -> dict[str, str]:
    """Key fingerprint -> name, from --key-name (a bare NAME names --api-key)."""
    names: dict[str, str] = {}
    for item in config.key_name:
        key, sep, name = item.rpartition("=")
        if sep:
            names[key] = name
        elif config.api_key is not None:
            names[fingerprint(config.api_key.reveal())] = name
    return names


DASHBOARD = web.AppKey("dashboard", Dashboard)


def add_dashboard_routes(app: web.Application) -> None:
    """`/` and `/dashboard` (the page), its CSS and JS, and `/dashboard.json`."""
    files = {name: (_STATIC / name).read_bytes() for name in _TYPES}
    page = _static(files["dashboard.html"], _TYPES["dashboard.html"])
    app.router.add_get("/", page)
    app.router.add_get("/dashboard", page)
    app.router.add_get("/dashboard.css", _static(files["dashboard.css"], _TYPES["dashboard.css"]))
    app.router.add_get("/dashboard.js", _static(files["dashboard.js"], _TYPES["dashboard.js"]))
    app.router.add_get("/dashboard.json", dashboard_json)


def _static(body: bytes, content_type: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=_HEADERS)

    serve.__doc__ = f"The dashboard's {content_type} file."
    return serve


async def dashboard_json(request: web.Request) -> web.Response:
    """What the page shows, as JSON: per key fingerprint, never a key, token or secret."""
    seconds = request.query.get("seconds", "")
    window = int(seconds) if seconds.isdigit() else None
    body = request.app[DASHBOARD].document(window)
    return web.Response(
        text=redact(json.dumps(body, separators=(",", ":"))),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
