"""The HTTP endpoint: /metrics for Prometheus, /healthz for liveness, /readyz for readiness.

POST /pull-through/refresh re-reads the ECR pull-through cache rules at once.

Ready means the watch caches are synced; a follower that is synced is ready too, so a
rollout does not wait for leadership.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def build_app(
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    live: Callable[[], bool],
    refresh_rules: Callable[[], None] | None = None,
) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n") if live() else web.Response(status=503, text="not live\n")

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n") if ready() else web.Response(status=503, text="caches not synced\n")

    async def refresh(_: web.Request) -> web.Response:
        if refresh_rules is not None:
            refresh_rules()
        return web.Response(status=202, text="pull-through cache rules refresh requested\n")

    app = web.Application()
    app.router.add_post("/pull-through/refresh", refresh)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def serve(app: web.Application, host: str, port: int) -> None:
    """Serve until cancelled, then close the listener."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    try:
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await runner.cleanup()
