"""The dashboard's web application (Starlette): one page, its static files, and the JSON it polls.

Every route answers GET (and HEAD) only; any other method is refused with 405 before routing, so
nothing on the page, or sent by hand, can change a run. With a ``token`` every request must carry it:
as ``?token=`` on the first visit (answered with an HttpOnly, Secure, SameSite=Strict cookie and a
redirect that drops it from the address bar; Secure over TLS), then as that cookie or an ``Authorization: Bearer``
header. The page loads nothing from the network: its script, style and Plotly's bundle (from the
pinned ``plotly`` package) are served from here, and the Content-Security-Policy says so.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import plotly
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from fedloom.dashboard.sources import Watched

STATIC = Path(__file__).parent / "static"
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
COOKIE = "fedloom_dashboard"
READ_ONLY = ("GET", "HEAD")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _since(text: str) -> dict[str, int]:
    """``key:round,key:round``: the last round the page has of each run (anything else is ignored)."""
    out = {}
    for part in text.split(",")[:1000]:
        key, _, rnd = part.partition(":")
        if key and rnd.isdigit() and len(rnd) <= 12:  # int() refuses numbers of thousands of digits
            out[key] = int(rnd)
    return out


def make_app(watched: Watched, token: str | None = None, refresh_s: float = 2.0,
             names: tuple[str, ...] | None = LOOPBACK_NAMES) -> Starlette:
    """The application over ``watched``'s runs; with ``token``, every request must present it. With ``names``
    (bound to loopback) it answers only requests addressed to one of them: no DNS rebinding, where a web page
    elsewhere has the browser read the dashboard under a name of its own."""

    async def guard(request: Request, call_next: RequestResponseEndpoint) -> Response:
        if request.method not in READ_ONLY:
            return PlainTextResponse("the dashboard is read-only: it answers GET only", status_code=405,
                                     headers={"Allow": "GET, HEAD", **HEADERS})
        if names is not None and request.url.hostname not in names:
            return PlainTextResponse(f"this dashboard answers as {', '.join(names)} only", status_code=400,
                                     headers=HEADERS)
        if token is not None:
            given = request.query_params.get("token")
            if given is not None and request.url.path == "/" and hmac.compare_digest(given.encode(), token.encode()):
                answer: Response = RedirectResponse("/", status_code=303)
                answer.set_cookie(COOKIE, token, httponly=True, secure=request.url.scheme == "https", samesite="strict")
                return answer
            bearer = request.headers.get("authorization", "")
            held = bearer[7:] if bearer.lower().startswith("bearer ") else request.cookies.get(COOKIE, "")
            if not hmac.compare_digest(held.encode(), token.encode()):
                return PlainTextResponse("this dashboard needs its token: open /?token=... with the token its "
                                         "operator gave you", status_code=401, headers=HEADERS)
        answer = await call_next(request)
        answer.headers.update(HEADERS)
        return answer

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def plotly_js(request: Request) -> Response:
        return FileResponse(PLOTLY_JS, media_type="text/javascript")

    async def state(request: Request) -> Response:
        since = _since(request.query_params.get("since", ""))
        runs = await run_in_threadpool(watched.runs)  # SQLite and file reads, off the event loop
        return JSONResponse({"refresh_s": refresh_s, "runs": [r.view(since.get(r.key, 0)) for r in runs]},
                            headers={"Cache-Control": "no-store"})

    return Starlette(
        routes=[Route("/", index, methods=["GET"]), Route("/api/state", state, methods=["GET"]),
                Route("/static/plotly.min.js", plotly_js, methods=["GET"]),
                Mount("/static", StaticFiles(directory=STATIC), name="static")],
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=guard)],
    )
