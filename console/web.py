"""The console's pages and JSON API as one FastAPI router (console/app.py includes it).

Pages: today, jobs (filters; one job: timeline, findings, draft, SC preview), failures and dead
letters (resend), second reads (the discrepancies with the first readers' reports, ris/intake.py), the model card, sites, the configuration (secrets redacted), login. The JSON
API under /api/ says the same (FastAPI's OpenAPI description at the app's /openapi.json).

Jobs are shown by UIDs and job ids only. An operator finds a study by its Accession Number or
Patient ID through their keyed hashes (audited as a query, the value never stored nor logged);
an admin reads a job's identifiers from its source header on demand (audited, Patient Record).
Every POST needs a session and its CSRF token (console.auth); every change is audited with the
user.
"""


import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, cast
from urllib.parse import quote

import structlog
from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field

from console import data
from console.auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    Auth,
    LoginRefused,
    Session,
    csrf_ok,
    role_allows,
)
from dicom_node.jobstore import FINAL_FAILURES, JobState
from dicom_node.lookup import keyed_hash
from models.labels import LABELS

log = structlog.get_logger()
HERE = Path(__file__).resolve().parent
JOB_ID = r"^[A-Za-z0-9_-]{1,64}$"
JobId = Annotated[str, PathParam(pattern=JOB_ID, max_length=64)]
Target = Annotated[str, PathParam(max_length=16, description="'default' or a route's calling AE title")]
STATES = [s.value for s in JobState]


class Lookup(BaseModel):
    accession_number: str | None = Field(None, max_length=64)
    patient_id: str | None = Field(None, max_length=64)


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _time(value: str | None, name: str) -> float | None:
    """An ISO 8601 time from a filter (no zone: UTC) as a POSIX time; empty: none."""
    if value is None or not value.strip():
        return None
    try:
        t = dt.datetime.fromisoformat(value.strip())
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.UTC)
        return t.timestamp()
    except (ValueError, OverflowError, OSError):
        raise HTTPException(422, f"{name}: not an ISO 8601 time: {value[:40]!r}") from None


def _state(value: str | None) -> tuple[JobState, ...]:
    if value is None or not value.strip():
        return ()
    if value not in STATES:
        raise HTTPException(422, f"state: one of {', '.join(STATES)}")
    return (JobState(value),)


def _safe_next(value: str | None) -> str:
    return value if value and value.startswith("/") and not value.startswith("//") and "\\" not in value else "/"


def build_router(settings, *, ctx=None, enqueue: tuple[Callable[[str], None], Callable[[str], None]] | None = None,
                 echo: Callable | None = None, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> APIRouter:
    """The console's routes for the node these settings describe.

    ctx: the pipeline Context (default: the node's, worker.node.Node.context); enqueue:
    (enqueue_infer, enqueue_send) for resends (default: the node's broker, made on the first
    resend); echo: settings Destination -> (up, detail) (default: a real C-ECHO).
    """
    from worker.node import Node

    node = Node(settings)
    if ctx is None:
        ctx = node.context()
    auth = Auth.from_settings(settings.console, node.secret("session", settings.console.session_secret),
                              ctx.audit.record, clock, monotonic)
    lookup_key = node.secret("lookup", settings.node.lookup_secret)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["num"] = lambda v, digits=3: ("–" if v is None else f"{v:.{digits}f}"
                                                         if isinstance(v, float) else v)
    echoes = data.EchoCache(settings, echo)
    mode = node.mode()  # live, or shadow and its QA destination: on every page (base.html) and in /api/today
    templates.env.globals["node_mode"] = mode

    def enqueuers() -> tuple[Callable[[str], None], Callable[[str], None]]:
        return enqueue or node.enqueuers

    def card() -> dict | None:
        from models.bundle import BundleError, read_card

        try:
            return read_card(settings.bundle_path)
        except (BundleError, OSError, ValueError):
            return None

    # -- who is asking -------------------------------------------------------------------------
    def need(role: str, page: bool):
        async def dependency(request: Request) -> Session:
            session = auth.session(request.cookies.get(SESSION_COOKIE))
            if session is None:
                if page and request.method == "GET":
                    raise HTTPException(303, "log in first",
                                        headers={"Location": "/login?next=" + quote(request.url.path)})
                raise HTTPException(401, "log in first")
            if request.method == "POST":
                token: object = request.headers.get(CSRF_HEADER)
                if token is None and "form" in request.headers.get("content-type", ""):
                    token = (await request.form()).get(CSRF_FIELD)
                if not csrf_ok(session, token if isinstance(token, str) else None):
                    ctx.audit.record("access_denied", user=session.user, address=_address(request),
                                     path=request.url.path, reason="missing or wrong CSRF token")
                    raise HTTPException(403, "missing or wrong CSRF token")
            if not role_allows(session.role, role):
                ctx.audit.record("access_denied", user=session.user, role=session.role, address=_address(request),
                                 path=request.url.path, reason=f"needs role {role}")
                raise HTTPException(403, f"needs role {role}")
            return session
        return dependency

    Viewer = Annotated[Session, Depends(need("viewer", page=False))]
    Operator = Annotated[Session, Depends(need("operator", page=False))]
    Admin = Annotated[Session, Depends(need("admin", page=False))]
    ViewerPage = Annotated[Session, Depends(need("viewer", page=True))]
    OperatorPage = Annotated[Session, Depends(need("operator", page=True))]
    AdminPage = Annotated[Session, Depends(need("admin", page=True))]

    def page(request: Request, name: str, session: Session | None, status: int = 200, **values) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"session": session, "csrf_field": CSRF_FIELD, **values},
                                          status_code=status)

    def job_or_404(job_id: str):
        job = ctx.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    # -- what the pages and the API share ------------------------------------------------------
    pauses = node.pauses

    def today_summary() -> dict:
        dests = [{**d, "paused": pauses.get(d["ae_title"], d["host"], d["port"])} for d in echoes()]
        return {**data.today(ctx, card(), clock(), dests), "mode": mode}

    def pause(target: str, session: Session, request: Request, paused: bool) -> dict:
        d = data.destination(settings, target)
        if d is None:
            raise HTTPException(404, f"no destination {target!r}: 'default' or a route's calling AE title")
        if paused:
            pauses.pause(d.ae_title, d.host, d.port, session.user, clock())
        else:
            pauses.resume(d.ae_title, d.host, d.port)
        ctx.audit.record("destination_paused" if paused else "destination_resumed", user=session.user,
                         address=_address(request), destination=f"{d.ae_title}@{d.host}:{d.port}", target=target,
                         event_type_code="110131")
        return {"target": target, "destination": f"{d.ae_title}@{d.host}:{d.port}", "paused": paused}

    def jobs_list(state, calling_aet, since, until, limit, offset) -> list[dict]:
        found = ctx.jobs.search(states=_state(state), calling_aet=calling_aet or None, since=_time(since, "since"),
                                until=_time(until, "until"), limit=limit, offset=offset)
        return [data.job_json(j) for j in found]

    def readable(what: str, job_id: str, read: Callable):
        """What ``read`` returns, or None when the spool's file cannot be read (logged, not a 500)."""
        try:
            return read(ctx, job_id)
        except Exception as exc:  # noqa: BLE001 - a damaged result file must not take the page down
            log.warning("console.unreadable", job=job_id, what=what, error=type(exc).__name__)
            return None

    def job_detail(job_id: str) -> dict:
        job = job_or_404(job_id)
        return {"job": data.job_json(job), "timeline": data.timeline(ctx, job_id),
                "findings": readable("prediction", job_id, data.findings),
                "draft": readable("text SR", job_id, data.draft),
                "dead_letter_reason": data.dead_letter_reason(ctx, job_id),
                "sc_preview": f"/jobs/{job_id}/sc.png" if data.result_file(ctx, job_id, "sc.dcm") else None}

    reports = node.reports

    def second_reads(label: str | None, limit: int, offset: int) -> dict:
        if label and label not in LABELS:
            raise HTTPException(422, f"label: one of {', '.join(LABELS)}")
        return {"counts": reports.counts(), "enabled": settings.second_read.enabled,
                "discrepancies": [data.discrepancy_json(d) for d in reports.discrepancies(limit, offset, label or None)]}

    def failures() -> list[dict]:
        out = []
        for job in ctx.jobs.recent(FINAL_FAILURES, 500):
            out.append({**data.job_json(job), "dead_letter_reason": data.dead_letter_reason(ctx, job.id)})
        return out

    def resend(job_id: str, session: Session) -> dict:
        from worker.pipeline import resend_jobs

        job_or_404(job_id)
        enqueue_infer, enqueue_send = enqueuers()
        [(_, outcome)] = resend_jobs([job_id], ctx, enqueue_send, enqueue_infer, user=session.user)
        if isinstance(outcome, Exception):
            raise HTTPException(409, f"not requeued: {outcome}")
        return {"job": job_id, "state": outcome.value}

    def lookup(accession_number: str | None, patient_id: str | None, session: Session, request: Request) -> list[dict]:
        acc = keyed_hash(lookup_key, accession_number)
        pid = keyed_hash(lookup_key, patient_id)
        if acc is None and pid is None:
            raise HTTPException(422, "give an accession number or a patient ID")
        found = ctx.jobs.search(accession_hash=acc, patient_hash=pid, limit=200)
        ctx.audit.record("job_query", user=session.user, address=_address(request),
                         by=[k for k, v in (("accession_number", acc), ("patient_id", pid)) if v], matches=len(found))
        return [data.job_json(j) for j in found]

    def identifiers(job_id: str, session: Session, request: Request) -> dict:
        job = job_or_404(job_id)
        try:
            values = data.identifiers(ctx, job)
        except FileNotFoundError as exc:
            raise HTTPException(404, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a source header pydicom cannot read
            raise HTTPException(409, f"the source header of job {job_id} cannot be read: {type(exc).__name__}") from None
        ctx.audit.record("identifiers_viewed", user=session.user, address=_address(request), job=job.id,
                         sop_instance_uid=job.sop_instance_uid, study_instance_uid=job.study_instance_uid,
                         fields=sorted(values))
        return values

    router = APIRouter()
    StateQ = Annotated[str | None, Query(max_length=16, description="a job state")]
    AetQ = Annotated[str | None, Query(max_length=16, description="calling AE title")]
    SinceQ = Annotated[str | None, Query(max_length=40, description="received at or after (ISO 8601, UTC if no zone)")]
    UntilQ = Annotated[str | None, Query(max_length=40, description="received before (ISO 8601, UTC if no zone)")]
    LimitQ = Annotated[int, Query(ge=1, le=1000)]
    LabelQ = Annotated[str | None, Query(max_length=40, description="a finding label")]
    OffsetQ = Annotated[int, Query(ge=0, le=1_000_000)]

    # -- login ---------------------------------------------------------------------------------
    @router.get("/login", response_class=HTMLResponse, tags=["session"])
    def login_form(request: Request, next: Annotated[str | None, Query(max_length=200)] = None):
        token = auth.login_form_token()
        resp = page(request, "login.html", None, token=token, next=_safe_next(next), error=None)
        resp.set_cookie(LOGIN_COOKIE, token, max_age=3600, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/login")
        return resp

    @router.post("/login", response_class=HTMLResponse, tags=["session"])
    def login(request: Request, user: Annotated[str, Form(max_length=128)], password: Annotated[str, Form(max_length=1024)],
              csrf: Annotated[str, Form(max_length=512)] = "", next: Annotated[str, Form(max_length=200)] = "/"):
        if not auth.login_form_ok(request.cookies.get(LOGIN_COOKIE), csrf):
            ctx.audit.record("access_denied", user=user[:128], address=_address(request), path="/login",
                             reason="missing or wrong login form token")
            raise HTTPException(403, "missing or wrong CSRF token: reload the login page")
        try:
            _, cookie = auth.login(user, password, _address(request))
        except LoginRefused as exc:
            token = auth.login_form_token()
            resp = page(request, "login.html", None, status=429 if exc.locked else 401, token=token,
                        next=_safe_next(next), error=str(exc))
            resp.set_cookie(LOGIN_COOKIE, token, max_age=3600, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/login")
            return resp
        redirect = RedirectResponse(_safe_next(next), status_code=303)
        redirect.set_cookie(SESSION_COOKIE, cookie, max_age=int(auth.session_s), httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")
        redirect.delete_cookie(LOGIN_COOKIE, path="/login")
        return redirect

    @router.post("/logout", tags=["session"])
    def logout(request: Request, session: Viewer):
        auth.logout(session, _address(request))
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    @router.get("/api/session", tags=["session"])
    def api_session(session: Viewer) -> dict:
        """Who is logged in, with the CSRF token every POST must carry (header X-CSRF-Token)."""
        return {"user": session.user, "role": session.role, "csrf": session.csrf, "expires": data.iso(session.expires)}

    # -- pages ---------------------------------------------------------------------------------
    @router.get("/", response_class=HTMLResponse, tags=["pages"])
    def today_page(request: Request, session: ViewerPage):
        summary = today_summary()
        return page(request, "today.html", session, s=summary, plots=data.plots(summary), nav="today")

    @router.get("/jobs", response_class=HTMLResponse, tags=["pages"])
    def jobs_page(request: Request, session: ViewerPage, state: StateQ = None, calling_aet: AetQ = None,
                  since: SinceQ = None, until: UntilQ = None, limit: LimitQ = 100, offset: OffsetQ = 0):
        jobs = jobs_list(state, calling_aet, since, until, limit, offset)
        return page(request, "jobs.html", session, jobs=jobs, states=STATES, nav="jobs", title="Jobs",
                    filters={"state": state or "", "calling_aet": calling_aet or "", "since": since or "",
                             "until": until or ""})

    @router.post("/jobs/lookup", response_class=HTMLResponse, tags=["pages"])
    def lookup_page(request: Request, session: OperatorPage,
                    accession_number: Annotated[str, Form(max_length=64)] = "",
                    patient_id: Annotated[str, Form(max_length=64)] = ""):
        jobs = lookup(accession_number or None, patient_id or None, session, request)
        return page(request, "jobs.html", session, jobs=jobs, states=STATES, nav="jobs", filters={},
                    title=f"Jobs found by {'accession number' if accession_number else 'patient ID'}")

    @router.get("/jobs/{job_id}", response_class=HTMLResponse, tags=["pages"])
    def job_page(request: Request, session: ViewerPage, job_id: JobId,
                 resent: Annotated[str | None, Query(max_length=16)] = None):
        return page(request, "job.html", session, d=job_detail(job_id), nav="jobs", identifiers=None,
                    resent=resent if resent in STATES else None, resendable=None)

    @router.get("/jobs/{job_id}/sc.png", tags=["pages"], response_class=Response,
                responses={200: {"content": {"image/png": {}}}})
    def sc_preview(session: ViewerPage, job_id: JobId):
        job_or_404(job_id)
        png = readable("SC", job_id, data.sc_png)
        if png is None:
            raise HTTPException(404, f"job {job_id} has no SC in the spool")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    @router.post("/jobs/{job_id}/resend", tags=["pages"])
    def resend_form(session: OperatorPage, job_id: JobId):
        state = resend(job_id, session)["state"]
        return RedirectResponse(f"/jobs/{job_id}?resent={state}", status_code=303)

    @router.post("/jobs/{job_id}/identifiers", response_class=HTMLResponse, tags=["pages"])
    def identifiers_page(request: Request, session: AdminPage, job_id: JobId):
        values = identifiers(job_id, session, request)
        resp = page(request, "job.html", session, d=job_detail(job_id), nav="jobs", identifiers=values, resent=None)
        resp.headers["Cache-Control"] = "no-store"
        return resp

    @router.post("/destinations/{target}/pause", tags=["pages"])
    def pause_form(request: Request, session: OperatorPage, target: Target):
        pause(target, session, request, True)
        return RedirectResponse("/", status_code=303)

    @router.post("/destinations/{target}/resume", tags=["pages"])
    def resume_form(request: Request, session: OperatorPage, target: Target):
        pause(target, session, request, False)
        return RedirectResponse("/", status_code=303)

    @router.get("/failures", response_class=HTMLResponse, tags=["pages"])
    def failures_page(request: Request, session: ViewerPage):
        return page(request, "failures.html", session, failures=failures(), nav="failures",
                    can_resend=role_allows(session.role, "operator"))

    @router.get("/second-reads", response_class=HTMLResponse, tags=["pages"])
    def second_reads_page(request: Request, session: ViewerPage, label: LabelQ = None, limit: LimitQ = 200,
                          offset: OffsetQ = 0):
        return page(request, "second_reads.html", session, nav="second-reads", labels=LABELS, label=label or "",
                    **second_reads(label, limit, offset))

    @router.get("/model", response_class=HTMLResponse, tags=["pages"])
    def model_page(request: Request, session: ViewerPage):
        return page(request, "model.html", session, card=card(), path=str(settings.bundle_path), nav="model")

    def drift_summary() -> dict:
        return data.drift_summary(ctx, card(), clock(), settings.model.operating_points)

    @router.get("/drift", response_class=HTMLResponse, tags=["pages"])
    def drift_page(request: Request, session: ViewerPage):
        summary = drift_summary()
        return page(request, "drift.html", session, d=summary, plots=data.drift_plots(summary), nav="drift",
                    title="Drift")

    @router.get("/sites", response_class=HTMLResponse, tags=["pages"])
    def sites_page(request: Request, session: ViewerPage):
        return page(request, "sites.html", session, sites=data.sites(ctx, settings), nav="sites")

    @router.get("/config", response_class=HTMLResponse, tags=["pages"])
    def config_page(request: Request, session: ViewerPage):
        import json

        text = json.dumps(data.redacted(settings.model_dump(mode="json")), indent=2)
        return page(request, "config.html", session, config=text, nav="config")

    @router.get("/console.css", tags=["pages"], response_class=Response, include_in_schema=False)
    def stylesheet():
        return Response((HERE / "static" / "console.css").read_text(), media_type="text/css")

    # -- JSON API --------------------------------------------------------------------------
    @router.get("/api/today", tags=["api"])
    def api_today(session: Viewer) -> dict:
        """Counts per state, throughput and latency per hour, OOD rate, positive rates, destinations, the mode."""
        return today_summary()

    @router.get("/api/jobs", tags=["api"])
    def api_jobs(session: Viewer, state: StateQ = None, calling_aet: AetQ = None, since: SinceQ = None,
                 until: UntilQ = None, limit: LimitQ = 100, offset: OffsetQ = 0) -> list[dict]:
        return jobs_list(state, calling_aet, since, until, limit, offset)

    @router.post("/api/jobs/lookup", tags=["api"])
    def api_lookup(request: Request, session: Operator, body: Lookup) -> list[dict]:
        """Jobs whose source had this Accession Number or Patient ID (matched by keyed hash)."""
        return lookup(body.accession_number, body.patient_id, session, request)

    @router.get("/api/jobs/{job_id}", tags=["api"])
    def api_job(session: Viewer, job_id: JobId) -> dict:
        return job_detail(job_id)

    @router.post("/api/jobs/{job_id}/resend", tags=["api"])
    def api_resend(session: Operator, job_id: JobId) -> dict:
        """Send a dead-lettered job's results again, or bring a failed job back (worker.pipeline.resend)."""
        return resend(job_id, session)

    @router.post("/api/jobs/{job_id}/identifiers", tags=["api"])
    def api_identifiers(request: Request, session: Admin, job_id: JobId) -> JSONResponse:
        """The patient identifiers in the job's source header (admin; audited)."""
        return JSONResponse(identifiers(job_id, session, request), headers={"Cache-Control": "no-store"})

    @router.post("/api/destinations/{target}/pause", tags=["api"])
    def api_pause(request: Request, session: Operator, target: Target) -> dict:
        """Hold results owed to a destination ('default' or a route's calling AE) until resumed."""
        return pause(target, session, request, True)

    @router.post("/api/destinations/{target}/resume", tags=["api"])
    def api_resume(request: Request, session: Operator, target: Target) -> dict:
        return pause(target, session, request, False)

    @router.get("/api/failures", tags=["api"])
    def api_failures(session: Viewer) -> list[dict]:
        return failures()

    @router.get("/api/discrepancies", tags=["api"])
    def api_discrepancies(session: Viewer, label: LabelQ = None, limit: LimitQ = 200, offset: OffsetQ = 0) -> dict:
        """The second read's discrepancies, the newest first, and the report store's counts."""
        return second_reads(label, limit, offset)

    @router.get("/api/model-card", tags=["api"])
    def api_card(session: Viewer) -> dict:
        c = card()
        if c is None:
            raise HTTPException(404, f"no readable model card in {settings.bundle_path}")
        return c

    @router.get("/api/drift", tags=["api"])
    def api_drift(session: Viewer) -> dict:
        """Each site's label rates, OOD rate and mean box radius per UTC day, the model card's validation
        range (models.drift) and the days outside it."""
        return drift_summary()

    @router.get("/api/sites", tags=["api"])
    def api_sites(session: Viewer) -> list[dict]:
        return data.sites(ctx, settings)

    @router.get("/api/config", tags=["api"])
    def api_config(session: Viewer) -> dict:
        return cast(dict, data.redacted(settings.model_dump(mode="json")))

    return router
