"""The RFC 8058 one-click unsubscribe endpoint (aiohttp).

- `POST /u/TOKEN` with the body `List-Unsubscribe=One-Click` unsubscribes the token's address from the
  token's list and answers 200 (RFC 8058 §3.2).
- `GET /u/TOKEN` only shows a page with a button that posts: link scanners follow every link, so a GET
  never unsubscribes anybody.
- A forged, expired or unknown token gets a 400 page that says why, and changes nothing.
"""

from __future__ import annotations

import html
import logging
from typing import Awaitable, Callable

from aiohttp import web

from optout.errors import TransientError

log = logging.getLogger("optout.web")

# check(token) and unsubscribe(token) both return (status, address or None, list or None).
Check = Callable[[str], Awaitable[tuple[str, str | None, str | None]]]

WHY = {
    "forged": "This link was not issued by us, or it was changed on the way.",
    "expired": "This link has expired. Use the link in a more recent message, or reply to it with \"unsubscribe\".",
    "unknown": "We do not know this link. Use the link in a more recent message, or reply to it with \"unsubscribe\".",
    "malformed": "This is not an unsubscribe link of ours.",
}
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem;color:#222}}
button{{font-size:1.1rem;padding:.6rem 1.4rem;border:0;border-radius:.4rem;background:#1a5fb4;color:#fff;cursor:pointer}}
.note{{color:#666;font-size:.9rem}}</style></head>
<body><h1>{title}</h1>{body}</body></html>
"""


def _mask(address: str | None) -> str:
    if not address or "@" not in address:
        return "your address"
    local, _, domain = address.partition("@")
    return f"{local[:2]}…@{domain}"


def _page(title: str, body: str, status: int = 200) -> web.Response:
    return web.Response(text=PAGE.format(title=html.escape(title), body=body), status=status,
                        content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-store", "X-Robots-Tag": "noindex",
                                 "Referrer-Policy": "no-referrer"})


def _refused(status: str) -> web.Response:
    return _page("This link does not work", f"<p>{html.escape(WHY.get(status, WHY['malformed']))}</p>", 400)


def make_app(check: Check, unsubscribe: Check) -> web.Application:
    """Build the application around two callables that run on the store's writer."""

    async def show(request: web.Request) -> web.Response:
        status, address, list_name = await check(request.match_info["token"])
        if status != "valid":
            return _refused(status)
        body = (f"<p>Stop sending <strong>{html.escape(list_name or '')}</strong> to "
                f"{html.escape(_mask(address))}?</p>"
                '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
                '<button type="submit">Unsubscribe</button></form>'
                '<p class="note">Nothing changes until you press the button.</p>')
        return _page("Unsubscribe", body)

    async def one_click(request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("List-Unsubscribe") != "One-Click":
            return _page("This link does not work",
                         "<p>An unsubscribe request must carry List-Unsubscribe=One-Click (RFC 8058).</p>", 400)
        try:
            status, address, list_name = await unsubscribe(request.match_info["token"])
        except TransientError:
            return _page("Please try again", "<p>We could not record this just now. Please try again.</p>", 503)
        if status != "valid":
            return _refused(status)
        log.info("one-click unsubscribe from list %s", list_name)
        return _page("Unsubscribed", f"<p>{html.escape(_mask(address))} will get no more "
                                     f"<strong>{html.escape(list_name or '')}</strong>.</p>")

    app = web.Application(client_max_size=16 * 1024)
    app.router.add_get("/u/{token}", show)
    app.router.add_post("/u/{token}", one_click)
    return app


async def start_web(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, tuple[str, int]]:
    """Serve the application on host:port (0 picks a free port); return the runner and the address."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    address = site._server.sockets[0].getsockname()[:2]  # the port actually bound (port 0 picks one)
    return runner, address
