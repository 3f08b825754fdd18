"""The HTML pages (server-rendered, no JavaScript needed): events, unknown-face clusters,
gallery, cameras, login. Their forms post here; each handler calls the same service as the
API route and the CLI (through `app.web.services`), then redirects (post/redirect/get) with a
message or an error. `refused_to`, the page-error handler, is the one place a service's
refusal becomes a redirect; every change is audited as its user's by `audited_writer`."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape

from app import __version__
from app.erasure import Outputs, erase
from app.gallery.paging import EventFilter
from app.web.auth import COOKIE, LoginRefused, User
from app.web.context import WebContext
from app.web.deps import audited_writer, current_user, get_ctx, same_site, user_errors, writer
from app.web.services import (
    camera_rows,
    enroll_uploads,
    event_out,
    fleet_view,
    identity_detail,
    list_clusters,
    list_events,
    one_event,
    silent_after_s,
)
from app.web.timefmt import local, parse_time

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)
NAME_CHOICES = 500  # galleries up to this size offer their names in the "this is" field
REPROCESS_BATCH, REPROCESS_BUDGET_S = 200, 30.0  # "re-run against the gallery": per step, at most
templates = Jinja2Templates(directory=str(Path(__file__).resolve().parent.parent / "templates"))
templates.env.filters["local"] = local


def page(request: Request, name: str, user: User | None, **values) -> HTMLResponse:
    ctx = get_ctx(request)
    return templates.TemplateResponse(request, name, {
        "user": user, "csrf": user.csrf if user else "", "version": __version__,
        "auth_required": ctx.auth.required,
        "tz": ctx.tz, "threshold": ctx.threshold,
        "msg": request.query_params.get("msg"), "error": request.query_params.get("error"),
        **values})


def back(path: str, **query: object) -> RedirectResponse:
    q = urlencode({k: v for k, v in query.items() if v is not None})
    return RedirectResponse(f"{path}?{q}" if q else path, status_code=303)


def _one_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class PageRefused(Exception):
    """A service refused what a page asked: `create_app` answers with `response`."""

    def __init__(self, response: RedirectResponse) -> None:
        super().__init__(response.headers.get("location", ""))
        self.response = response


@contextmanager
def refused_to(here: str, *, also: tuple[type[Exception], ...] = (), **query: object
               ) -> Iterator[None]:
    """The page-error handler: a service's refusal in the block (`user_errors()`, and `also`)
    becomes a redirect (303) back to `here` with `query` and its one line as the error."""
    try:
        yield
    except (*also, *user_errors()) as exc:
        raise PageRefused(back(here, **query, error=_one_line(exc))) from None


# --- login ------------------------------------------------------------------------------------


def _local(target: str) -> str:
    """`target` when it is a path on this server, else /events (no open redirect: browsers
    read `//host` and `/\\host` as another site)."""
    ok = target.startswith("/") and target[1:2] not in ("/", "\\") and "\n" not in target
    return target if ok else "/events"


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/events") -> HTMLResponse:
    return page(request, "login.html", None, next=_local(next))


@router.post("/login")
def login(request: Request, username: str = Form(""), password: str = Form(""),
          next: str = Form("/events")) -> Response:
    ctx = get_ctx(request)
    if not same_site(request):
        raise HTTPException(403, "cross-site login refused")
    client = ctx.auth.client_address(request.client.host if request.client else None,
                                     request.headers.get("x-forwarded-for"))
    try:
        cookie = ctx.auth.login(username, password, client)
    except LoginRefused as exc:
        response = page(request, "login.html", None, next=next, error=str(exc))
        response.status_code = 429
        return response
    if cookie is None:
        log.warning("failed web login for %r from %s", username, client)
        response = page(request, "login.html", None, next=next,
                        error="wrong user name or password")
        response.status_code = 401
        return response
    response = RedirectResponse(_local(next), status_code=303)
    response.set_cookie(COOKIE, cookie, httponly=True, samesite="strict",
                        max_age=int(ctx.auth.session_s), secure=request.url.scheme == "https")
    return response


@router.post("/logout")
def logout(request: Request, _user: User = Depends(writer)) -> Response:
    get_ctx(request).auth.end_session(request.cookies.get(COOKIE))  # refused from now on
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response


# --- events -----------------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
def home() -> RedirectResponse:
    return RedirectResponse("/events", status_code=303)


@router.get("/events", response_class=HTMLResponse)
def events_page(request: Request, camera: str = "", identity: str = "", unknown: bool = False,
                since: str = "", until: str = "", cluster: int | None = None,
                before: int | None = None, after: int | None = None,
                user: User = Depends(current_user),
                ctx: WebContext = Depends(get_ctx)) -> HTMLResponse:
    error = None
    try:
        f = EventFilter(camera or None, identity or None, unknown,
                        parse_time(since, "from", ctx.tz), parse_time(until, "to", ctx.tz),
                        cluster)
        events, total, nearest = list_events(ctx, f, before, ctx.cfg.web.page_size, after)
    except (ValueError, *user_errors()) as exc:
        events, total, nearest, error = [], 0, {}, _one_line(exc)
    rows = [event_out(e, nearest.get(e.id)) for e in events]
    query = {k: v for k, v in {"camera": camera, "identity": identity,
                               "unknown": "true" if unknown else "", "since": since,
                               "until": until, "cluster": cluster}.items() if v}
    size = ctx.cfg.web.page_size
    more = (urlencode({**query, "before": rows[-1].id})
            if rows and (len(rows) == size or after is not None) else None)
    # a newer page: after an "older" step, or after a "newer" one when more are newer still
    newer = (urlencode({**query, "after": rows[0].id})
             if rows and (before is not None or (after is not None and ctx.gallery.pages.events(
                 f, after=rows[0].id, limit=1, count=False)[0]))
             else None)
    return page(request, "events.html", user, events=rows, total=total,
                cameras=ctx.gallery.pages.cameras(), filters=query, camera=camera,
                identity=identity, unknown=unknown, since=since, until=until, more=more,
                newer=newer,
                page_error=error, threshold=ctx.threshold)


@router.get("/events/{event_id}", response_class=HTMLResponse)
def event_page(request: Request, event_id: int, user: User = Depends(current_user),
               ctx: WebContext = Depends(get_ctx)) -> Response:
    with refused_to("/events"):
        out = one_event(ctx, event_id)
    known, total = ctx.gallery.pages.identities(limit=NAME_CHOICES)
    return page(request, "event.html", user, e=out, threshold=ctx.threshold,
                names=[i.name for i in known] if total <= NAME_CHOICES else [])


@router.post("/events/{event_id}/name")
def name_event_page(event_id: int, name: str = Form(...), _user: User = Depends(audited_writer),
                    ctx: WebContext = Depends(get_ctx)) -> Response:
    here = f"/events/{event_id}"
    with refused_to(here):
        r = ctx.review.name_event(event_id, name)
    return back(here, msg=f"enrolled {r.name}: {len(r.faces)} template(s), "
                f"{len(r.rejected)} rejected as outlier(s)")


@router.post("/events/{event_id}/relabel")
def relabel_event_page(event_id: int, name: str = Form(""), _user: User = Depends(audited_writer),
                       ctx: WebContext = Depends(get_ctx)) -> Response:
    here = f"/events/{event_id}"
    with refused_to(here):
        old, removed = ctx.review.corrections.relabel(event_id, name.strip() or None)
    msg = f"event {event_id}: {old or 'unknown'} → {name.strip() or 'unknown'}"
    return back(here, msg=msg + (f" ({removed} template(s) from it deleted from {old})"
                                 if removed else ""))


@router.post("/events/{event_id}/not")
def not_person_page(event_id: int, _user: User = Depends(audited_writer),
                    ctx: WebContext = Depends(get_ctx)) -> Response:
    here = f"/events/{event_id}"
    with refused_to(here):
        name, removed = ctx.review.corrections.not_person(event_id)
    return back(here, msg=f"event {event_id} is not {name}: unknown now, and never {name} "
                f"again; {removed} template(s) from it deleted")


@router.post("/events/{event_id}/delete")
def delete_event_page(event_id: int, confirm: str = Form(""), _user: User = Depends(audited_writer),
                      ctx: WebContext = Depends(get_ctx)) -> Response:
    if confirm != "yes":
        return back(f"/events/{event_id}", error="tick the box to confirm the deletion")
    with refused_to("/events"):
        ctx.review.corrections.delete([event_id])
    return back("/events", msg=f"event {event_id} deleted with its crops")


@router.post("/events/reprocess")
def reprocess_page(camera: str = Form(""), identity: str = Form(""), since: str = Form(""),
                   until: str = Form(""), named: str = Form(""),
                   _user: User = Depends(audited_writer),
                   ctx: WebContext = Depends(get_ctx)) -> Response:
    query = {"camera": camera or None, "identity": identity or None, "since": since or None,
             "until": until or None}
    with refused_to("/events", also=(ValueError,), **query):
        f = EventFilter(camera or None, identity or None, False,
                        parse_time(since, "from", ctx.tz), parse_time(until, "to", ctx.tz))
        checked = changed = 0
        before, deadline = None, time.monotonic() + REPROCESS_BUDGET_S
        while True:
            r = ctx.review.reprocess(f, named=named == "yes", before=before,
                                     limit=REPROCESS_BATCH)
            checked, changed, before = checked + r.checked, changed + r.changed, r.next_before
            if before is None or time.monotonic() > deadline:
                break
    more = " (more remain: narrow the time range)" if before is not None else ""
    return back("/events", **query, msg=f"re-ran {checked} event(s) against the gallery: "
                f"{changed} changed name{more}")


# --- clusters ---------------------------------------------------------------------------------


@router.get("/clusters", response_class=HTMLResponse)
def clusters_page(request: Request, state: str = Query("open", pattern="^(open|ignored)$"),
                  offset: int = Query(0, ge=0), user: User = Depends(current_user),
                  ctx: WebContext = Depends(get_ctx)) -> HTMLResponse:
    size = ctx.cfg.web.page_size
    data = list_clusters(ctx, state, offset, size)
    known, total = ctx.gallery.pages.identities(limit=NAME_CHOICES)
    names = [i.name for i in known] if total <= NAME_CHOICES else []  # offered while typing
    return page(request, "clusters.html", user, data=data, state=state, offset=offset,
                size=size, names=names, merge_choices=ctx.review.merge_choices(
                    [c.id for c in data.clusters], {c.id: c.members for c in data.clusters}))


@router.post("/clusters/{cluster_id}/name")
def name_cluster(cluster_id: int, name: str = Form(...), _user: User = Depends(audited_writer),
                 ctx: WebContext = Depends(get_ctx)) -> Response:
    with refused_to("/clusters"):
        r = ctx.review.name(cluster_id, name)
    e = r.enrollment
    msg = (f"cluster {cluster_id} is {e.name}: {len(e.faces)} template(s) enrolled, "
           f"{len(e.rejected)} rejected as outlier(s), {r.events_named} event(s) named"
           + (f", {r.events_left} left unknown (rejected or not matching)" if r.events_left
              else ""))
    return back("/clusters", msg=msg)


@router.post("/clusters/{cluster_id}/ignore")
def ignore_cluster(cluster_id: int, _user: User = Depends(audited_writer),
                   ctx: WebContext = Depends(get_ctx)) -> Response:
    with refused_to("/clusters"):
        ctx.review.ignore(cluster_id)
    return back("/clusters", msg=f"cluster {cluster_id} ignored")


@router.post("/clusters/{cluster_id}/restore")
def restore_cluster(cluster_id: int, _user: User = Depends(audited_writer),
                    ctx: WebContext = Depends(get_ctx)) -> Response:
    with refused_to("/clusters", state="ignored"):
        ctx.review.restore(cluster_id)
    return back("/clusters", msg=f"cluster {cluster_id} restored")


@router.post("/clusters/{cluster_id}/merge")
def merge_cluster(cluster_id: int, other: int = Form(...), _user: User = Depends(audited_writer),
                  ctx: WebContext = Depends(get_ctx)) -> Response:
    with refused_to("/clusters"):
        ctx.review.merge(cluster_id, other)
    return back("/clusters", msg=f"cluster {other} merged into {cluster_id}")


# --- gallery ----------------------------------------------------------------------------------


@router.get("/gallery", response_class=HTMLResponse)
def gallery_page(request: Request, search: str = "", offset: int = Query(0, ge=0),
                 user: User = Depends(current_user),
                 ctx: WebContext = Depends(get_ctx)) -> HTMLResponse:
    size = ctx.cfg.web.page_size
    rows, total = ctx.gallery.pages.identities(search=search, offset=offset, limit=size)
    thumbs = ctx.gallery.pages.photo_templates([i.id for i in rows])
    return page(request, "gallery.html", user, identities=rows, total=total, search=search,
                offset=offset, size=size, thumbs=thumbs)


@router.post("/gallery/enroll")
async def enroll_page(name: str = Form(...), photos: list[UploadFile] = File(...),
                      _user: User = Depends(audited_writer), ctx: WebContext = Depends(get_ctx)
                      ) -> Response:
    with refused_to("/gallery"):
        r = await enroll_uploads(ctx, name, photos)
    return back("/gallery", search=r.name,
                msg=f"enrolled {r.name}: {len(r.faces)} template(s), "
                    f"{len(r.rejected)} rejected as outlier(s)")


@router.get("/gallery/{identity_id}", response_class=HTMLResponse)
def identity_page(request: Request, identity_id: int, user: User = Depends(current_user),
                  ctx: WebContext = Depends(get_ctx)) -> Response:
    with refused_to("/gallery"):
        detail = identity_detail(ctx, identity_id)
    events, _ = ctx.gallery.pages.events(EventFilter(identity=detail.name), limit=12,
                                          count=False)
    known, total = ctx.gallery.pages.identities(limit=NAME_CHOICES)
    return page(request, "identity.html", user, i=detail,
                events=[event_out(e) for e in events],
                names=[k.name for k in known] if total <= NAME_CHOICES else [])


@router.post("/gallery/{identity_id}/photos")
async def add_photos_page(identity_id: int, photos: list[UploadFile] = File(...),
                          _user: User = Depends(audited_writer), ctx: WebContext = Depends(get_ctx)
                          ) -> Response:
    here = f"/gallery/{identity_id}"
    with refused_to(here):
        name = ctx.gallery.pages.identity(identity_id).name
        r = await enroll_uploads(ctx, name, photos)
    return back(here, msg=f"{len(r.faces)} template(s) added, {len(r.rejected)} rejected")


@router.post("/gallery/{identity_id}/rename")
def rename_page(identity_id: int, name: str = Form(...), _user: User = Depends(audited_writer),
                ctx: WebContext = Depends(get_ctx)) -> Response:
    here = f"/gallery/{identity_id}"
    with refused_to(here):
        old = ctx.gallery.pages.identity(identity_id).name
        ctx.gallery.rename(old, name)
    return back(here, msg=f"renamed {old} to {name.strip()}")


@router.post("/gallery/{identity_id}/merge")
def merge_page(identity_id: int, into: str = Form(...), confirm: str = Form(""),
               _user: User = Depends(audited_writer),
               ctx: WebContext = Depends(get_ctx)) -> Response:
    here = f"/gallery/{identity_id}"
    if confirm != "yes":
        return back(here, error="tick the box to confirm the merge")
    with refused_to(here):
        src = ctx.gallery.pages.identity(identity_id).name
        n = ctx.gallery.merge_identities(src, into)
    return back("/gallery", search=into.strip(), msg=f"merged {src} into {into.strip()} "
                f"({n} template(s) moved)")


@router.get("/gallery/{identity_id}/delete", response_class=HTMLResponse)
def delete_confirm_page(request: Request, identity_id: int, user: User = Depends(current_user),
                        ctx: WebContext = Depends(get_ctx)) -> Response:
    with refused_to("/gallery"):
        i = ctx.gallery.pages.identity(identity_id)
    return page(request, "delete.html", user, i=i)


@router.post("/gallery/{identity_id}/delete")
def delete_page(identity_id: int, confirm: str = Form(""), _user: User = Depends(audited_writer),
                ctx: WebContext = Depends(get_ctx)) -> Response:
    with refused_to("/gallery"):
        name = ctx.gallery.pages.identity(identity_id).name
        if confirm.strip() != name:
            return back(f"/gallery/{identity_id}/delete",
                        error="type the name exactly to confirm the deletion")
        erased = erase(ctx.gallery, Outputs.of(ctx.cfg), identity_id=identity_id)
    if erased.unfinished:
        return back("/gallery", error=f"deleted {name}, but not everything was erased "
                    f"({erased.errors[0]}): delete again to finish (facemoe gallery remove)")
    return back("/gallery", msg=f"deleted {name} with its templates, crops and "
                f"{erased.events_deleted} event(s)")


@router.post("/templates/{template_id}/delete")
def delete_template_page(template_id: int, identity: int = Form(...),
                         _user: User = Depends(audited_writer), ctx: WebContext = Depends(get_ctx)
                         ) -> Response:
    here = f"/gallery/{identity}"
    with refused_to(here):
        ctx.gallery.delete_template(template_id)
    return back(here, msg=f"template {template_id} deleted")


# --- API reference ----------------------------------------------------------------------------


@router.get("/docs", response_class=HTMLResponse)
def api_docs(request: Request, user: User = Depends(current_user)) -> HTMLResponse:
    """The REST API's routes from its OpenAPI schema (/openapi.json), as a page."""
    spec = request.app.openapi()
    schemas = spec.get("components", {}).get("schemas", {})
    routes = [
        {"method": method.upper(), "path": path, "summary": op.get("summary", ""),
         "tag": (op.get("tags") or [""])[0],
         "params": [(x["name"], x["in"], x.get("required", False),
                     x.get("description") or x.get("schema", {}).get("description", ""))
                    for x in op.get("parameters", [])],
         "body": _body_of(op, schemas), "response": _response_of(op)}
        for path, ops in spec["paths"].items() for method, op in ops.items()]
    named = {k: v for k, v in schemas.items() if not k.startswith("Body_")}
    return page(request, "docs.html", user, routes=routes, spec=spec, schemas=named)


def _ref_name(schema: dict) -> str:
    ref = schema.get("$ref") or schema.get("items", {}).get("$ref", "")
    name = ref.rsplit("/", 1)[-1]
    return f"list[{name}]" if name and "items" in schema else name or schema.get("type", "")


def _body_of(op: dict, schemas: dict) -> str:
    """The request body: a named model, or the fields of a form (FastAPI names those models
    Body_<function>_<path>, which says nothing to a reader)."""
    content = op.get("requestBody", {}).get("content", {})
    out = []
    for kind, c in content.items():
        name = _ref_name(c.get("schema", {}))
        if name.startswith("Body_"):
            fields = schemas.get(name, {}).get("properties", {})
            name = "fields " + ", ".join(fields) if fields else "a form"
        out.append(f"{kind}: {name}")
    return ", ".join(out)


def ticks(text: object) -> Markup:
    """Text with `code` spans (as the API's descriptions write them) shown as code."""
    parts = str(escape(str(text or ""))).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick stays as it is
        parts[-2:] = ["`".join(parts[-2:])]
    return Markup("".join(p if k % 2 == 0 else f"<code>{p}</code>" for k, p in enumerate(parts)))


def _response_of(op: dict) -> str:
    ok = next((v for k, v in op.get("responses", {}).items() if k.startswith("2")), {})
    content = ok.get("content", {})
    return ", ".join(f"{kind}: {_ref_name(c.get('schema', {}))}".rstrip(": ")
                     for kind, c in content.items()) or ok.get("description", "")


# --- cameras ----------------------------------------------------------------------------------


@router.get("/fleet", response_class=HTMLResponse)
def fleet_page(request: Request, user: User = Depends(current_user),
               ctx: WebContext = Depends(get_ctx)) -> HTMLResponse:
    view = fleet_view(ctx)
    if ctx.cameras is not None:  # the daemon serving this page: its own cameras, live
        box, live = ctx.cfg.daemon.box, camera_rows(ctx)
        mine = [b for b in view["boxes"] if b["box"] == box]
        if not mine:  # before its first heartbeat is in the database
            mine = [{"box": box, "state": "starting", "silent": False, "last_seen_s": 0.0,
                     "started_at": None, "reasons": []}]
            view["boxes"].insert(0, mine[0])
        mine[0]["cameras"] = live
    for b in view["boxes"]:
        if isinstance(b.get("started_at"), str):
            b["started_at"] = datetime.fromisoformat(b["started_at"])
        for c in b["cameras"]:
            if isinstance(c.get("last_event"), str):
                c["last_event"] = datetime.fromisoformat(c["last_event"])
    return page(request, "fleet.html", user, boxes=view["boxes"], clashes=view["clashes"],
                silent_after=silent_after_s(ctx))


@router.get("/cameras", include_in_schema=False)
def cameras_page() -> RedirectResponse:
    return RedirectResponse("/fleet", status_code=308)


templates.env.filters["ticks"] = ticks
