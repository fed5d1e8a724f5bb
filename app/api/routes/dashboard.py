"""The web dashboard: static HTML, JS and CSS from app/dashboard, calling the same /v1 API."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from app.core.errors import NotFound

router = APIRouter(prefix="/dashboard", tags=["dashboard"], include_in_schema=False)
# The service's address itself leads to the dashboard (the address `tuneforge serve` prints).
root_router = APIRouter(include_in_schema=False)

DASHBOARD_DIR = Path(__file__).resolve().parents[2] / "dashboard"
# Only these files are served: no path from the request ever reaches the filesystem.
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
# The page holds the user's API key (in localStorage): it runs only its own script, talks only to this service, and
# is shown in no other site's frame. Inline styles stay allowed: the charts and progress bars set them.
HEADERS = {
    "cache-control": "no-cache",
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


@root_router.get("/")
@router.get("")
def redirect_dashboard() -> RedirectResponse:
    """The dashboard lives under /dashboard/ (its assets are relative to it)."""
    return RedirectResponse("/dashboard/")


@router.get("/")
def read_dashboard() -> FileResponse:
    """The dashboard page: jobs, live charts, artifacts, and a form to start a job."""
    return FileResponse(DASHBOARD_DIR / "index.html", media_type="text/html", headers=HEADERS)


@router.get("/{asset}")
def read_dashboard_asset(asset: str) -> FileResponse:
    """A dashboard script or stylesheet."""
    if asset not in ASSETS:
        raise NotFound(f"No dashboard asset named {asset!r}.", param="asset")
    return FileResponse(DASHBOARD_DIR / asset, media_type=ASSETS[asset], headers=HEADERS)
