"""The books service: the Responder `api`, and what it is made of.

Run it with `uv run app.py`, or any ASGI server: `uv run uvicorn app:api --workers 4`.
Each resource's routes live in a module of their own (`books.py`, `reviews.py`); what they
share (problems, sessions, ETags, body checks) in `web.py`; the protocol rules below the
routes in `protocol.py`; `/health`, `/metrics` and `/docs` in `operations.py`; the command
line in `cli.py`.
"""

import importlib.resources
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from responder import API
from responder.ext.auth import BearerAuth
from responder.ext.logging import setup_logging
from responder.ext.metrics import MetricsMiddleware

import books
import cli
import operations
import reviews
from cache import open_cache
from database import engine_for, open_database
from metrics import RequestMetrics, pool_figures
from openapi import HttpConventions
from protocol import HttpRules
from rate_limit import limit_rate, rate_limiter
from replicas import open_replicas
from settings import Settings, load_settings
from web import DATABASE_ERRORS, database_failure, plain_problem

# Swagger UI's files, from the swagger-ui-py package: /docs needs no CDN.
SWAGGER_UI_ASSETS = importlib.resources.files("swagger_ui") / "static"
MAX_BODY_BYTES = 1024 * 1024


@asynccontextmanager
async def lifespan(api: API) -> AsyncIterator[None]:
    """Per process (per event loop): the database, its schema checked, and the cache."""
    settings: Settings = api.state.settings
    async with (
        open_database(api),
        pool_figures(api.state.engine),
        open_cache(settings) as cache,
        open_replicas(settings, api.state.engine, cache, engine_for(settings)) as replicas,
    ):
        api.state.cache = cache
        api.state.replicas = replicas
        # Library code compares the tokens, in constant time; None: writes are open.
        tokens = settings.write_tokens
        api.state.writers = BearerAuth(tokens=tokens, realm="books") if tokens else None
        # Responder answers 504 for a handler that runs longer (read per request).
        api.router.request_timeout = settings.request_timeout
        api.state.rate_limiter = rate_limiter(settings, cache)
        if (
            api.state.rate_limiter is not None
            and limit_rate not in api.router.before_requests["http"]
        ):
            # Before any other hook: a 429 costs little. (Added only when RATE_LIMIT is
            # set: Responder's hooks cost each request a look at their signature.)
            api.route(before_request=True)(limit_rate)
        yield


settings = load_settings()
# Every log line carries the request's method, path, ID and client (Responder's format).
setup_logging(level=logging.getLevelNamesMapping()[settings.log_level.upper()])
api = API(
    title="Books",
    version="1.0.0",
    description="A books catalogue: Responder, async SQLAlchemy, Alembic.",
    openapi="3.1.0",  # the document at /schema.yml; /docs is served by operations.py, offline
    openapi_servers=[{"url": "/", "description": "the server that serves this document"}],
    static_dir=str(SWAGGER_UI_ASSETS),
    static_route="/docs/assets",
    lifespan=lifespan,
    request_id=True,
    # Request IDs in every log line, and an access line per request (so run
    # uvicorn with --no-access-log, as `uv run app.py` does).
    enable_logging=True,
    trust_proxy_headers=settings.trust_proxy_headers,  # client address, links behind a proxy
    security_headers=True,  # X-Content-Type-Options: nosniff and friends
    max_request_size=MAX_BODY_BYTES,
    problem_handler=plain_problem,
    sessions=False,  # a stateless JSON API: no cookie sessions
    gzip=False,  # compression belongs to the proxy in front, not to every worker
    # Resources have one representation, JSON (see below): they do not vary on Accept.
    auto_vary=False,
    # CORS is fixed when the process starts (the request timeout is set in `lifespan`).
    cors=bool(settings.cors_origins),
    cors_params={
        "allow_origins": settings.cors_origins,
        "allow_methods": ["GET", "POST", "PUT", "PATCH", "DELETE"],
        "allow_headers": ["Content-Type", "Authorization", "If-Match", "If-None-Match"],
        "expose_headers": ["ETag", "Location", "Link", "X-Total-Count", "X-Request-ID"],
        "max_age": 600,
    },
)
api.state.settings = settings
api.openapi.plugins.append(HttpConventions())  # the headers every route has, documented
# One representation per resource: Responder would also answer `Accept: application/yaml`
# (or msgpack) with the same strong ETag as the JSON, which RFC 9110 §8.8.1 forbids.
del api.formats["yaml"], api.formats["msgpack"]
# Protocol rules below the routes: Host, request-target length, problems, Cache-Control.
api.add_middleware(HttpRules, negotiated=api.openapi.openapi_route)
# Responder's request metrics, recorded where every worker's are summed (metrics.py).
api.add_middleware(MetricsMiddleware, collector=RequestMetrics())
api.add_security_scheme(
    "bearerAuth",
    {
        "type": "http",
        "scheme": "bearer",
        "description": "Needed by POST, PUT, PATCH and DELETE when the server sets API_TOKENS.",
    },
)
for error in DATABASE_ERRORS:
    api.add_exception_handler(error, database_failure)

# The resources, one line each.
api.include_router(books.router)
api.include_router(reviews.router)

api.include_router(operations.router)


if __name__ == "__main__":
    sys.exit(cli.main(api))
