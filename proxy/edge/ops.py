"""The operator endpoints: `/healthz`, `/readyz`, `/metrics`, `/status`."""

from __future__ import annotations

import json

from aiohttp import web

from proxy.credentials import redact
from proxy.reads import READS
from proxy.state import STATE


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready to serve: upstreams configured, shared state and credentials usable."""
    state = request.app[STATE]
    problems = [p for check in state.ready_checks if (p := await check())]
    if not state.tokens.ready:
        problems.append("the proxy's OAuth credentials need attention")
    if state.shutting_down:
        problems.append("shutting down")
    body = {"ready": not problems, "mode": state.backend.mode(), "problems": problems}
    return web.json_response(body, status=200 if not problems else 503)


async def metrics_page(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    body = request.app[STATE].metrics.render()
    return web.Response(
        body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


async def status_page(request: web.Request) -> web.Response:
    """Per-key quota state as JSON; keys appear only as fingerprints."""
    state = request.app[STATE]
    config = state.config
    body = {
        "mode": state.backend.mode(),
        "qps": config.qps,
        "daily_quota": config.daily_quota,
        "upstreams": {"v2": str(config.upstream_v2), "v3": str(config.upstream_v3)},
        "keys": state.engine.status(),
        "reads": request.app[READS].status(),
    }
    return web.Response(text=redact(json.dumps(body)), content_type="application/json")


def add_routes(app: web.Application) -> None:
    """Route the operator endpoints."""
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/status", status_page)
