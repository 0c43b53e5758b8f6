"""How `up` and `listen` run a node: the listener and the reconciler in this process, the
workers and the first start's model build as child processes, and a stop within seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable

import structlog
import typer

from dicom_node.jobstore import JobStore
from worker.node import Node

log = structlog.get_logger()

STOP_GRACE_S = 10.0  # SIGTERM to every child, then SIGKILL to what is left: `up` is gone within 15 s


def _reconciler(node: Node, stop: threading.Event, enqueue_infer, enqueue_send,
                model_ready: threading.Event) -> threading.Thread:
    """Re-enqueues what the broker forgot: at once on start (what waited while the node was
    down), then every reconcile_every_s. While the model is built, jobs waiting for it are left
    in the queue: waiting is not an attempt."""
    from worker.pipeline import reconcile

    ctx = node.context()
    w = node.settings.worker

    def loop() -> None:
        stale_after_s = 0.0
        while True:
            try:
                reconcile(ctx, stale_after_s, enqueue_infer, enqueue_send, infer=model_ready.is_set())
            except Exception:
                log.exception("reconcile.error")
            stale_after_s = w.stale_after_s
            if stop.wait(w.reconcile_every_s):
                return

    t = threading.Thread(target=loop, name="reconciler", daemon=True)
    t.start()
    return t


def spawn(args: list[str]) -> subprocess.Popen:
    # A process group each: a stop reaches what a child started too (Celery's pool processes,
    # the decode processes), and a terminal's Ctrl-C reaches `up` only, which stops them in order.
    return subprocess.Popen(args, env={**os.environ}, process_group=0)


def _what(child: subprocess.Popen) -> list[str]:
    """Which command a child runs (its arguments after `python -m worker.cli`), for the log."""
    return [str(a) for a in child.args[3:5]] if isinstance(child.args, list) else [str(child.args)]


def stop_children(children: list[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM (Celery: warm shutdown, the task under way finishes or gives its jobs back), then
    after grace_s SIGKILL to each child's whole process group."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    t0 = time.monotonic()
    for child in children:
        try:
            child.wait(timeout=max(0.0, t0 + grace_s - time.monotonic()))
            log.info("up.child_stopped", pid=child.pid, args=_what(child), seconds=round(time.monotonic() - t0, 1))
        except subprocess.TimeoutExpired:
            log.warning("up.child_killed", pid=child.pid, args=_what(child), after_s=grace_s)
    for child in children:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # the leader if still there, and any process it left
        except (ProcessLookupError, PermissionError):
            pass
        child.wait()


Launch = Callable[[], tuple[list[subprocess.Popen], "subprocess.Popen | None"]]


def serve(node: Node, launch: Launch | None = None,
          start_gpu: Callable[[], subprocess.Popen] | None = None, reconcile: bool = True) -> None:
    """Listener and reconciler here (reconcile=False: the listener only, a `medsam2-cxr reconcile`
    runs elsewhere). Once the listener answers, `launch()` gives (workers,
    builder): the workers are supervised (one exiting stops the node); while the builder builds
    the model, images are received and wait; when it is done, `start_gpu()` adds the GPU worker.
    With start_gpu (`up`: the workers are ours), claims left when they are gone are given back."""
    from dicom_node.listener import start_listener
    from worker import model_build
    from worker.app import enqueuers, make_app

    settings = node.settings
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before any child starts: none is left behind
        signal.signal(sig, lambda *_: stop.set())
    enqueue_infer, enqueue_send = enqueuers(make_app(settings))
    audit, jobs = node.audit, node.jobs
    reader = node.second_reader()
    server = start_listener(node.listener_config(), node.spool, jobs, audit, enqueue_infer,
                            on_report=_sr_intake(reader) if reader is not None else None, objects=node.objects)
    reports = node.report_listener(reader) if reader is not None else None
    if reports is not None:
        reports.start()
    if start_gpu is not None:
        _release_claims(jobs, "start")  # left by an `up` that was killed: its workers are gone
    audit.record("application_start", ae_title=settings.node.ae_title, port=settings.node.port, pid=os.getpid())
    d = settings.destination
    typer.echo(f"medsam2-cxr listening: AE title {settings.node.ae_title}, port {settings.node.port}; "
               f"results go to {d.ae_title}@{d.host}:{d.port}; spool {settings.spool}", err=True)
    workers, builder = launch() if launch is not None else ([], None)
    model_ready = threading.Event()
    if builder is None:
        model_ready.set()
        _publish_shared(node)
    if reconcile:
        _reconciler(node, stop, enqueue_infer, enqueue_send, model_ready)
    if builder is not None:
        typer.echo("medsam2-cxr: building the default model (first start only, minutes); images are received "
                   "now and wait for it; progress: medsam2-cxr status", err=True)
    try:
        while not stop.wait(0.5):
            if builder is not None and builder.poll() is not None:
                code, builder = builder.returncode, None
                if code == 0 and start_gpu is not None:
                    _publish_shared(node)
                    workers.append(start_gpu())
                    model_ready.set()
                    log.info("up.model_ready", bundle=str(settings.bundle_path))
                    typer.echo("medsam2-cxr: model ready; the images that waited are inferred now", err=True)
                else:
                    _build_failed(node, code)
            for child in workers:
                if child.poll() is not None:
                    log.error("up.worker_exited", pid=child.pid, code=child.returncode)
                    stop.set()
    finally:
        t0 = time.monotonic()
        log.info("up.stopping")
        server.shutdown()
        if reports is not None:
            reports.shutdown()
        stop_children(([builder] if builder is not None else []) + workers)
        if builder is not None and (model_build.read_progress(settings.spool) or {}).get("state") == "building":
            model_build.mark(settings.spool, "interrupted",
                             "stopped with the node; the next start goes on from the feature cache")
        if start_gpu is not None:
            _release_claims(jobs, "stop")
        audit.record("application_stop", ae_title=settings.node.ae_title, pid=os.getpid())
        log.info("up.stopped", seconds=round(time.monotonic() - t0, 1))


def reconcile_only(node: Node) -> None:
    """The reconciler as a role of its own (`medsam2-cxr reconcile`), for a host that runs no
    listener or listeners started with --no-reconcile; until SIGTERM."""
    from worker.app import enqueuers, make_app

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    enqueue_infer, enqueue_send = enqueuers(make_app(node.settings))
    ready = threading.Event()
    ready.set()
    thread = _reconciler(node, stop, enqueue_infer, enqueue_send, ready)
    typer.echo(f"medsam2-cxr reconciling every {node.settings.worker.reconcile_every_s:g} s", err=True)
    stop.wait()
    thread.join(timeout=STOP_GRACE_S)


def listener_process(node: Node) -> None:
    """One more C-STORE listener on the node's port (SO_REUSEPORT), for [node] processes > 1:
    only the listener, no reconciler, no HTTP app, and no spool sweep (the first listener did it
    before starting this one). Runs until SIGTERM."""
    from dicom_node.listener import start_listener
    from worker.app import enqueuers, make_app

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    enqueue_infer, _ = enqueuers(make_app(node.settings))
    reader = node.second_reader()
    server = start_listener(node.listener_config(), node.spool, node.jobs, node.audit, enqueue_infer,
                            on_report=_sr_intake(reader) if reader is not None else None, recover=False,
                            objects=node.objects)
    try:
        stop.wait()
    finally:
        server.shutdown()


def spawn_listeners(node: Node, cli: list[str], cfg: list[str]) -> list[subprocess.Popen]:
    """The [node] processes - 1 further listener processes (`cli listener-process cfg`)."""
    return [spawn([*cli, "listener-process", *cfg]) for _ in range(node.settings.node.processes - 1)]


def _publish_shared(node: Node) -> None:
    """The bundle and index this host has, into an S3 object store for the other hosts (worker.node)."""
    try:
        published = node.publish_shared()
    except OSError as exc:  # the store away: workers elsewhere use what they fetched before
        log.error("objects.publish_failed", error=str(exc))
        return
    if published:
        log.info("objects.published", folders=published)


def _sr_intake(reader):
    """The DICOM listener's hook for a Basic Text SR from the PACS: kept and compared as a report
    (ris.report_in.from_text_sr); one that is no report is logged, the instance stays stored."""
    from ris.report_in import ReportUnreadable, from_text_sr

    def on_report(ds) -> None:
        try:
            report = from_text_sr(ds)
        except ReportUnreadable as exc:
            log.info("text SR is no report", reason=str(exc))
            return
        reader.receive(report)

    return on_report


def _release_claims(jobs: JobStore, when: str) -> None:
    """Give back the claims of this node's workers, gone now. In a store other hosts share, a
    claim may be theirs: none is given back, the reconciler takes each when its lease runs out."""
    if jobs.db.shared:
        log.info("up.claims_left_to_leases", when=when, store=jobs.db.describe())
        return
    ids = jobs.release_claims()
    if ids:
        log.warning("up.claims_released", when=when, jobs=ids)


def _build_failed(node: Node, code: int | None) -> None:
    """A failed build is said at once, in the log and in `status`; the node keeps receiving."""
    from worker import model_build

    spool = node.settings.spool
    progress = model_build.read_progress(spool) or {}
    reason = progress.get("error") if progress.get("state") == "failed" else None
    if not reason:
        reason = f"the build process exited with code {code}"
        model_build.mark(spool, "failed", reason)
    log.error("up.model_build_failed", reason=reason, stage=progress.get("stage"),
              progress=str(node.layout.model_build_progress))
    typer.echo(f"medsam2-cxr: the model build FAILED ({reason}). Images are still received and wait in the "
               f"spool; fix the cause and start the node again.", err=True)
