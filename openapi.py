"""The OpenAPI document as exact as the server: the headers that carry the API's semantics.

Responder documents each route's parameters, bodies and statuses from its code. What
it cannot see is what `web.py` does to every resource alike: ETags and Last-Modified,
conditional request headers, pagination and rate-limit headers, request IDs, the
merge-patch media type, and the range of ids in paths. `HttpConventions`, an apispec
plugin, adds them to each operation by its method and its responses, so that a client
generated from the document has a typed way to send `If-Match`.
"""

from typing import Any

from apispec import BasePlugin

from web import MAX_ID

STRING = {"type": "string"}
INTEGER = {"type": "integer"}


def header(description: str, schema: dict[str, Any] = STRING) -> dict[str, Any]:
    return {"description": description, "schema": schema}


RESPONSE_HEADERS = {
    "ETag": header("The representation's strong validator: send it back in If-Match."),
    "Last-Modified": header("When the representation last changed (an HTTP-date)."),
    "Location": header("Where the created resource is."),
    "Link": header("RFC 8288 links to the first, previous, next and last pages."),
    "X-Total-Count": header("How many items the listing has in all.", INTEGER),
    "Retry-After": header("Seconds to wait before trying again.", INTEGER),
    "X-RateLimit-Limit": header("Requests a client may make per window (RATE_LIMIT).", INTEGER),
    "X-RateLimit-Remaining": header("Requests left in this window.", INTEGER),
    "X-RateLimit-Reset": header("Seconds until the window resets.", INTEGER),
    "X-Request-ID": header("This request's ID, also in problem bodies and in the logs."),
    "Cache-Control": header("`no-cache` (revalidate with the validators), `no-store` on errors."),
    "WWW-Authenticate": header('`Bearer realm="books"`: the scheme writes need.'),
    "Accept-Post": header("The media types POST takes."),
    "Accept-Patch": header("The media types PATCH takes."),
}
CONDITIONS = {
    "If-Match": "Only if the current ETag is one of these (or `*`); else 412.",
    "If-None-Match": "On GET, 304 if the current ETag is one of these; on a write, 412.",
    "If-Modified-Since": "On GET, 304 unless it changed after this HTTP-date.",
    "If-Unmodified-Since": "412 if it changed after this HTTP-date (when If-Match is absent).",
}
RATE_LIMITED = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
MERGE_PATCH = "application/merge-patch+json"


class HttpConventions(BasePlugin):
    """Adds what every route does at the HTTP level (see the module's docstring)."""

    def operation_helper(
        self, path: str | None = None, operations: dict[str, Any] | None = None, **_: Any
    ) -> None:
        for method, operation in (operations or {}).items():
            item = (path or "").endswith("}")
            self.parameters(method, item, operation)
            self.response_headers(method, item, operation)
            if method == "patch":  # a JSON merge patch (RFC 7396) is what PATCH takes
                content = operation["requestBody"]["content"]
                content.setdefault(MERGE_PATCH, dict(content["application/json"]))
            # Reads are public: say so, rather than leave it to be guessed.
            operation.setdefault("security", [])

    def parameters(self, method: str, item: bool, operation: dict[str, Any]) -> None:
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "path" and parameter["schema"].get("type") == "integer":
                parameter["schema"] |= {"minimum": 1, "maximum": MAX_ID}
        if not item:
            return
        names = CONDITIONS if method == "get" else [n for n in CONDITIONS if "Modified-" not in n]
        for name in names:
            operation.setdefault("parameters", []).append(
                {"name": name, "in": "header", "required": False, "schema": STRING,
                 "description": CONDITIONS[name]}
            )  # fmt: skip

    def response_headers(self, method: str, item: bool, operation: dict[str, Any]) -> None:
        for status, response in operation["responses"].items():
            names = ["X-Request-ID", "Cache-Control"]
            code = int(status)
            if 200 <= code < 300:
                names += list(RATE_LIMITED)
                if (item and method in ("get", "put", "patch")) or code == 201:
                    names += ["ETag", "Last-Modified"]
                if code == 201:
                    names.append("Location")
                if method == "get" and not item:
                    names += ["Link", "X-Total-Count"]
            names += {
                304: ["ETag", "Last-Modified"],
                401: ["WWW-Authenticate"],
                415: ["Accept-Patch" if method == "patch" else "Accept-Post"],
                429: ["Retry-After", *RATE_LIMITED],
                503: ["Retry-After"],
            }.get(code, [])
            response.setdefault("headers", {}).update(
                {name: RESPONSE_HEADERS[name] for name in names}
            )
