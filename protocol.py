"""The HTTP protocol below the routes, where no handler shapes the answer (ASGI middleware)."""

import re
from http import HTTPStatus
from typing import Any

import orjson
from responder.errors import problem_payload_for

from web import MAX_ID

# An id as a path writes it: ASCII digits, no leading zero, at most ten of them.
CANONICAL_ID = re.compile(r"[1-9][0-9]{0,9}")

# Request targets longer than this are a 414 (RFC 9112 §3 asks servers for 8,000 octets at
# least). The ASGI server refuses, with its own 400, requests past its buffer (64 KiB).
MAX_TARGET_BYTES = 8192
# A Host header: a name, an IPv4 address or a bracketed IP literal, and an optional port.
HOST = re.compile(r"([A-Za-z0-9._~!$&'()*+,;=%-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{0,5})?")
JSON_TYPES = (b"application/json", b"application/problem+json")


class HttpRules:
    """ASGI middleware for what happens below the routes, where no handler shapes the
    answer:

    - a request with no `Host`, with several, or with an invalid one is a 400 (RFC 9112
      §3.2; HTTP/1.0 may leave it out), and a request target over MAX_TARGET_BYTES is a
      414: both as problems;
    - only the canonical spelling of an id addresses a resource (`noncanonical_id`);
    - the OpenAPI document, YAML or JSON by `Accept`, says it varies on Accept;
    - an error answered below the routes in some other form (a refused CORS preflight
      is a `text/plain` 400 from Starlette) becomes a problem with the same status,
      its text as the detail;
    - a response that says nothing about caching gets `Cache-Control: no-cache` (a cache
      may keep it but must revalidate it, with its ETag or Last-Modified) or, for an
      error, `no-store`: shared caches must not guess a freshness of their own.
    """

    def __init__(self, app: Any, negotiated: str) -> None:
        self.app = app
        self.negotiated = negotiated  # the path of the one response that varies on Accept

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = refused(scope)
        if refusal is not None:
            await send_problem(scope, send, *refusal)
            return
        varies = scope["path"] == self.negotiated
        await self.app(scope, receive, ProblemsAndCaching(scope, send, varies))


def refused(scope: Any) -> tuple[int, str] | None:
    """The status and detail for a request the protocol rules refuse, if they do."""
    if noncanonical_id(scope["path"]):
        return 404, f"Nothing is found at {scope['path']}: ids are 1 to {MAX_ID}."
    target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    if target > MAX_TARGET_BYTES:
        return 414, f"The request target is longer than {MAX_TARGET_BYTES} bytes."
    hosts = [value for name, value in scope["headers"] if name == b"host"]
    if scope.get("http_version") == "1.0" and not hosts:
        return None
    if len(hosts) != 1:
        return 400, "A request needs exactly one Host header."
    if not HOST.fullmatch(hosts[0].decode("latin-1")):
        return 400, "The Host header is not a valid host."
    return None


def noncanonical_id(path: str) -> bool:
    """Whether a path segment that Responder's `{name:int}` takes as an id is not its one
    canonical spelling.

    That convertor takes any run of Unicode decimal digits, so `/books/01`,
    `/books/\u0661` (Arabic-Indic) and `/books/\uff11` (fullwidth) would all be book 1,
    and a number past the tables' 32-bit ids would reach the database. A segment of
    decimal digits must be a plain ASCII number from 1 to MAX_ID, or it names nothing.
    """
    return any(
        segment.isdecimal() and not (CANONICAL_ID.fullmatch(segment) and int(segment) <= MAX_ID)
        for segment in path.split("/")
    )


async def send_problem(scope: Any, send: Any, status: int, detail: str) -> None:
    """Answer with a problem (request ID and `problem_handler` applied, as Responder does)."""
    payload = problem_payload_for(scope, status, detail)
    body = orjson.dumps(payload)
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ProblemsAndCaching:
    """The `send` of HttpRules: error responses that are not JSON are held and replaced
    by a problem; every response gets a default Cache-Control."""

    def __init__(self, scope: Any, send: Any, varies: bool) -> None:
        self.scope = scope
        self.send = send
        self.varies = varies  # on Accept
        self.held: dict[str, Any] | None = None  # the start of a response being replaced
        self.text = b""

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            content_type = headers.get(b"content-type", b"").split(b";")[0].strip()
            if message["status"] >= 400 and content_type not in JSON_TYPES:
                self.held = message
                return
            added = []
            if b"cache-control" not in headers:
                added.append(
                    (b"cache-control", b"no-cache" if message["status"] < 400 else b"no-store")
                )
            if self.varies:
                added.append((b"vary", b"Accept"))
            if added:
                message["headers"] = [*message.get("headers", []), *added]
        elif message["type"] == "http.response.body" and self.held is not None:
            self.text += message.get("body", b"")
            if not message.get("more_body", False):
                status = self.held["status"]
                detail = self.text.decode("utf-8", "replace").strip()
                await send_problem(
                    self.scope, self.send, status, detail or HTTPStatus(status).phrase
                )
            return
        await self.send(message)
