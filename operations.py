"""What operators use: `/health`, `/metrics` and `/docs`."""

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from responder import Request, Response, Router
from sqlalchemy import text

from metrics import count_pool, render
from web import read, shared_cache

router = Router()

DOCS_PAGE = Path(__file__).with_name("docs.html").read_text()
HEALTH_CHECK_TIMEOUT = 2.0


async def database_check(req: Request) -> None:
    await read(req, lambda session: session.execute(text("SELECT 1")))


async def cache_check(req: Request) -> None:
    if not await shared_cache(req).ping():
        raise ConnectionError("the cache did not answer")


async def timed(check: Callable[[Request], Any], req: Request) -> dict[str, Any]:
    """Run one health check under a timeout; report its status and latency, never its error."""
    started = time.perf_counter()
    try:
        await asyncio.wait_for(check(req), HEALTH_CHECK_TIMEOUT)
        status = "ok"
    except Exception:
        status = "error"
    latency_ms = round((time.perf_counter() - started) * 1000, 2)
    return {"status": status, "latency_ms": latency_ms}


@router.get("/health", include_in_schema=False)
async def health(req: Request, resp: Response) -> None:
    """200 while the database answers, 503 otherwise; the cache is reported, not required.

    Written out rather than `health_route=`: Responder's version reports no
    latency, runs checks without a timeout and sends exception text to clients.
    """
    checks = {"database": timed(database_check, req)}
    if shared_cache(req).enabled:
        checks["cache"] = timed(cache_check, req)
    results = dict(zip(checks, await asyncio.gather(*checks.values()), strict=True))
    healthy = results["database"]["status"] == "ok"
    resp.status_code = 200 if healthy else 503
    resp.media = {"status": "ok" if healthy else "error", "checks": results}
    if replicas := req.api.state.replicas.health():  # reported, never required
        resp.media["replicas"] = replicas


@router.get("/docs", include_in_schema=False)
async def docs(req: Request, resp: Response) -> None:
    """The interactive documentation (Swagger UI) of /schema.yml, with no outside assets.

    Written out rather than `docs_route=`: Responder's page loads Swagger UI from a CDN.
    """
    resp.html = DOCS_PAGE


@router.get("/metrics", include_in_schema=False)
async def metrics(req: Request, resp: Response) -> None:
    """Prometheus text: requests, database pools and cache, of every worker of the server
    (see metrics.py). Written out rather than `metrics_route=`: Responder's counts
    are those of the one worker a scrape reaches."""
    if hasattr(req.api.state, "engine"):
        count_pool(req.api.state.engine)  # this worker's figures, as of now
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    resp.content = render()
