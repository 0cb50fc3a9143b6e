"""What keeps a local app safe from the pages a browser has open elsewhere.

- Host check (Starlette's ``TrustedHostMiddleware``): a page on evil.example whose name is made to
  resolve to 127.0.0.1 (DNS rebinding) sends ``Host: evil.example``, and is refused.
- Same origin for state-changing requests: a token that only this app's pages hold, sent in the
  ``X-CSRF-Token`` header (a header no cross-site form can set, and which needs a CORS preflight this
  app never grants), and an ``Origin``/``Sec-Fetch-Site`` that, when the browser sends them, is this app.
- Body limit: a request body over ``serve.max_upload_mb`` is refused with 413 as soon as its
  ``Content-Length`` says so, or as soon as that many bytes have arrived.
"""
from __future__ import annotations

import hmac
import ipaddress
import json

from starlette.exceptions import HTTPException

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
# pages and assets: nothing from another origin, no framing by another site
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
                               "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# the evaluation report is one self-contained file: inline style and script, plots as data URIs
REPORT_HEADERS = {**PAGE_HEADERS, "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                  "style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'"}


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def allowed_hosts(serve) -> list[str]:
    """Host names (port aside) the app answers to: loopback names, the address served, serve.allowed_hosts."""
    hosts = list(LOOPBACK_NAMES)
    if serve.host not in ("0.0.0.0", "::") and serve.host not in hosts:
        hosts.append(serve.host)
    return hosts + [h for h in serve.allowed_hosts if h not in hosts]


def check_same_origin(request, token: str) -> None:
    sent = request.headers.get("x-csrf-token", "")
    if not hmac.compare_digest(sent.encode(), token.encode()):
        raise HTTPException(403, "missing or wrong X-CSRF-Token: state-changing requests come from this app's pages")
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise HTTPException(403, "cross-site request refused")
    origin = request.headers.get("origin")
    if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host", ""):
        raise HTTPException(403, f"request from origin {origin} refused: not this app")


class BodyLimit:
    """ASGI middleware: 413 with a one-line JSON error for a request body over ``max_bytes``."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send):
        megabytes = self.max_bytes / (1024 * 1024)
        body = json.dumps({"error": f"request body over {megabytes:g} MB (serve.max_upload_mb)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
