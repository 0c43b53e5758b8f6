"""The `medsam2-cxr` command: run the node (together or apart), infer offline, make phantoms."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import structlog
import typer

from worker import logs
from worker.settings import Settings, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
log = structlog.get_logger()

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML configuration file")]


def _settings(config: Path | None) -> Settings:
    logs.configure()
    return load_settings(config)


def _metrics_env(settings: Settings, clean: bool = False) -> None:
    """prometheus-client's multiprocess folder (<spool>/metrics) for this process and its
    children, before prometheus-client is imported (dicom_node.metrics_dir). `up` empties it."""
    from dicom_node.metrics_dir import prepare

    prepare(settings.metrics_dir, clean=clean)


@contextlib.contextmanager
def _console(settings: Settings):
    """The node's HTTP app (/metrics, /healthz, /readyz, the web console) in a thread, for the
    duration of the block. [console] port 0: none. A port that cannot be had is reported and the
    node runs on without it: receiving images matters more (Prometheus alerts on a missing target)."""
    from console.app import serve_in_thread

    server = None
    if settings.console.port:
        try:
            server = serve_in_thread(settings)
        except RuntimeError as exc:
            log.error("console.not_started", error=str(exc))
            typer.echo(f"{exc}: running without /metrics, /healthz and /readyz", err=True)
    try:
        yield server
    finally:
        if server is not None:
            server.stop()


def ensure_bundle(settings: Settings) -> Path:
    """The configured bundle, or the default one, built here when it is not yet (minutes, once;
    worker.model_build: a progress file in the spool, one build at a time)."""
    from models.bundle import read_card
    from worker import model_build

    path = settings.bundle_path
    if settings.model.bundle:
        read_card(path)  # a configured bundle must exist and be intact
        return path
    if model_build.needed(settings):
        typer.echo(f"Building the default model bundle and similar-cases index in {settings.spool} (first start "
                   f"only; progress: medsam2-cxr status)...", err=True)
        model_build.build(settings)
    return path


def ensure_default_index(settings: Settings, bundle_path: Path, n: int = 200) -> Path:
    """The default similar-cases index of n phantom cases in <spool>/index (worker.model_build)."""
    from worker import model_build

    settings = settings.model_copy(update={"model": settings.model.model_copy(
        update={"bundle": str(bundle_path), "default_index_cases": n})})
    model_build.build_index(settings)
    return settings.spool / "index"


def require_spool(settings: Settings, config: Path | None) -> Path:
    """The spool `status`, `audit` and `resend` read; exits 2, creating nothing, when there is none."""
    root = settings.spool
    if (root / "jobs.sqlite").is_file():
        return root
    where = f"the configuration {config}" if config else "no --config, so the default ./var of this folder"
    typer.echo(f"medsam2-cxr: no spool at {root} (looked for {root / 'jobs.sqlite'}; {where}). Run this where "
               f"`medsam2-cxr up` runs, or give the node's configuration with --config FILE ([paths] spool), or "
               f"set MEDSAM2_CXR_PATHS__SPOOL=/path/to/spool.", err=True)
    raise typer.Exit(2)


def _start_listener(settings: Settings, enqueue_infer):
    from dicom_node.audit import AuditLog
    from dicom_node.jobstore import JobStore
    from dicom_node.listener import ListenerConfig, start_listener
    from dicom_node.lookup import spool_secret
    from dicom_node.spool import Spool

    from dicom_node.tls import server_context

    root = settings.spool
    n = settings.node
    tls = server_context(n.tls.cert, n.tls.key, n.tls.ca or None, n.tls.require_client_cert) if n.tls.cert else None
    cfg = ListenerConfig(ae_title=n.ae_title, host=n.host, port=n.port, allowed_calling_aets=tuple(n.allowed_calling_aets),
                         allowed_addresses=tuple(n.allowed_addresses), max_associations=n.max_associations,
                         max_associations_per_address=n.max_associations_per_address,
                         max_pending_per_address=n.max_pending_per_address,
                         max_pending=n.max_pending,
                         association_request_timeout=n.association_request_timeout_s,
                         max_pdu_length=n.max_pdu_length, tls=tls,
                         lookup_key=spool_secret(root, "lookup", n.lookup_secret))
    return start_listener(cfg, Spool(root, min_free_bytes=n.min_free_mb * 2**20), JobStore(root / "jobs.sqlite"),
                          AuditLog(root / "audit.jsonl"), enqueue_infer)


def _reconciler(settings: Settings, stop: threading.Event, enqueue_infer, enqueue_send,
                model_ready: threading.Event) -> threading.Thread:
    """Re-enqueues what the broker forgot: at once on start (what waited while the node was
    down), then every reconcile_every_s. While the model is built, jobs waiting for it are left
    in the queue: waiting is not an attempt."""
    from worker.pipeline import reconcile
    from worker.runtime import Runtime

    ctx = Runtime.from_settings(settings).ctx

    def loop() -> None:
        stale_after_s = 0.0
        while True:
            try:
                reconcile(ctx, stale_after_s, enqueue_infer, enqueue_send, infer=model_ready.is_set())
            except Exception:
                log.exception("reconcile.error")
            stale_after_s = settings.worker.stale_after_s
            if stop.wait(settings.worker.reconcile_every_s):
                return

    t = threading.Thread(target=loop, name="reconciler", daemon=True)
    t.start()
    return t


STOP_GRACE_S = 10.0  # SIGTERM to every child, then SIGKILL to what is left: `up` is gone within 15 s


def _spawn(args: list[str]) -> subprocess.Popen:
    # A process group each: a stop reaches what a child started too (Celery's pool processes,
    # the decode processes), and a terminal's Ctrl-C reaches `up` only, which stops them in order.
    return subprocess.Popen(args, env={**os.environ}, process_group=0)


def _stop_children(children: list[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM (Celery: warm shutdown, the task under way finishes or gives its jobs back), then
    after grace_s SIGKILL to each child's whole process group."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    t0 = time.monotonic()
    for child in children:
        try:
            child.wait(timeout=max(0.0, t0 + grace_s - time.monotonic()))
            log.info("up.child_stopped", pid=child.pid, args=child.args[3:5], seconds=round(time.monotonic() - t0, 1))
        except subprocess.TimeoutExpired:
            log.warning("up.child_killed", pid=child.pid, args=child.args[3:5], after_s=grace_s)
    for child in children:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # the leader if still there, and any process it left
        except (ProcessLookupError, PermissionError):
            pass
        child.wait()


def _serve(settings: Settings, launch=None, start_gpu=None) -> None:
    """Listener and reconciler here. Once the listener answers, `launch()` gives (workers,
    builder): the workers are supervised (one exiting stops the node); while the builder builds
    the model, images are received and wait; when it is done, `start_gpu()` adds the GPU worker.
    With start_gpu (`up`: the workers are ours), claims left when they are gone are given back."""
    from dicom_node.audit import AuditLog
    from dicom_node.jobstore import JobStore
    from worker import model_build
    from worker.app import enqueuers, make_app

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before any child starts: none is left behind
        signal.signal(sig, lambda *_: stop.set())
    enqueue_infer, enqueue_send = enqueuers(make_app(settings))
    audit = AuditLog(settings.spool / "audit.jsonl")
    server = _start_listener(settings, enqueue_infer)
    jobs = JobStore(settings.spool / "jobs.sqlite")
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
    _reconciler(settings, stop, enqueue_infer, enqueue_send, model_ready)
    if builder is not None:
        typer.echo("medsam2-cxr: building the default model (first start only, minutes); images are received "
                   "now and wait for it; progress: medsam2-cxr status", err=True)
    try:
        while not stop.wait(0.5):
            if builder is not None and builder.poll() is not None:
                code, builder = builder.returncode, None
                if code == 0 and start_gpu is not None:
                    workers.append(start_gpu())
                    model_ready.set()
                    log.info("up.model_ready", bundle=str(settings.bundle_path))
                    typer.echo("medsam2-cxr: model ready; the images that waited are inferred now", err=True)
                else:
                    _build_failed(settings, code)
            for child in workers:
                if child.poll() is not None:
                    log.error("up.worker_exited", pid=child.pid, code=child.returncode)
                    stop.set()
    finally:
        t0 = time.monotonic()
        log.info("up.stopping")
        server.shutdown()
        _stop_children(([builder] if builder is not None else []) + workers)
        if builder is not None and (model_build.read_progress(settings.spool) or {}).get("state") == "building":
            model_build.mark(settings.spool, "interrupted",
                             "stopped with the node; the next start goes on from the feature cache")
        if start_gpu is not None:
            _release_claims(jobs, "stop")
        audit.record("application_stop", ae_title=settings.node.ae_title, pid=os.getpid())
        log.info("up.stopped", seconds=round(time.monotonic() - t0, 1))


def _release_claims(jobs, when: str) -> None:
    ids = jobs.release_claims()
    if ids:
        log.warning("up.claims_released", when=when, jobs=ids)


def _build_failed(settings: Settings, code: int | None) -> None:
    """A failed build is said at once, in the log and in `status`; the node keeps receiving."""
    from worker import model_build

    progress = model_build.read_progress(settings.spool) or {}
    reason = progress.get("error") if progress.get("state") == "failed" else None
    if not reason:
        reason = f"the build process exited with code {code}"
        model_build.mark(settings.spool, "failed", reason)
    log.error("up.model_build_failed", reason=reason, stage=progress.get("stage"),
              progress=str(settings.spool / model_build.PROGRESS))
    typer.echo(f"medsam2-cxr: the model build FAILED ({reason}). Images are still received and wait in the "
               f"spool; fix the cause and start the node again.", err=True)


@app.command()
def up(config: ConfigOpt = None) -> None:
    """Listener, workers (gpu and io queues), sender and reconciler on this host, and the HTTP app
    (\\[console] host:port: /metrics, /healthz, /readyz, the web console)."""
    from worker import model_build

    settings = _settings(config)
    if settings.model.bundle:
        from models.bundle import read_card

        read_card(settings.bundle_path)  # a configured bundle must exist and be intact: fail now
    _metrics_env(settings, clean=True)
    cfg = ["--config", str(config)] if config else []
    cli = [sys.executable, "-m", "worker.cli"]

    def launch() -> tuple[list[subprocess.Popen], subprocess.Popen | None]:
        # What looks built is checked by the GPU worker; the rest by the builder (it exits at once
        # when another build finished it): `up` itself never imports torch for the default bundle.
        builder = None
        if not model_build.looks_ready(settings):
            model_build.announce(settings.spool)
            builder = _spawn(cli + ["build-default", *cfg])
        workers = [_spawn(cli + ["worker", "--queues", "io", *cfg])]
        if builder is None:
            workers.append(_spawn(cli + ["worker", "--queues", "gpu", *cfg]))
        return workers, builder

    with _console(settings):
        _serve(settings, launch, start_gpu=lambda: _spawn(cli + ["worker", "--queues", "gpu", *cfg]))
    # Everything is stopped, written and audited: skip the interpreter's teardown, which took 5-8 s
    # on a loaded 2-core host (C-level finalisation of the libraries `up` imports, torch among them).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command("build-default", hidden=True)
def build_default(config: ConfigOpt = None) -> None:
    """The default bundle and index, if missing (what `up` runs in the background on first start)."""
    from worker import model_build

    settings = _settings(config)
    try:
        model_build.build(settings)
    except Exception:  # noqa: BLE001 - said in the progress file and the log already
        raise typer.Exit(1) from None


@app.command()
def listen(config: ConfigOpt = None) -> None:
    """The C-STORE listener, the reconciler and the HTTP app (workers run apart: `medsam2-cxr worker`)."""
    settings = _settings(config)
    _metrics_env(settings)
    with _console(settings):
        _serve(settings)


@app.command()
def worker(config: ConfigOpt = None,
           queues: Annotated[str, typer.Option(help="gpu, io or gpu,io")] = "gpu,io",
           concurrency: Annotated[int, typer.Option(help="io processes (0: one per CPU core)")] = 0,
           console: Annotated[bool, typer.Option(help="serve the HTTP app on \\[console] host:port too: for a "
                                                      "worker host without a listener")] = False) -> None:
    """A Celery worker. gpu: one process, the model loaded lazily; io: processes that encode and
    send (encoding is CPU-bound Python: threads would share one core); gpu,io: one process with
    threads, for a small single-host node. Its metrics go to <spool>/metrics, which the
    listener's /metrics on the same host reports."""
    settings = _settings(config)
    _metrics_env(settings)
    if "gpu" in queues.split(","):
        ensure_bundle(settings)
    from worker.app import make_app

    celery_app = make_app(settings)
    n = concurrency or os.cpu_count() or 1
    pool = {"gpu": ["--pool=solo"], "io": ["--pool=prefork", f"--concurrency={n}"]}.get(
        queues, ["--pool=threads", f"--concurrency={n}"])
    with _console(settings) if console else contextlib.nullcontext():
        celery_app.worker_main(["worker", "-Q", queues, "--loglevel=WARNING", "--without-gossip", "--without-mingle",
                                "--without-heartbeat", f"--hostname={queues.replace(',', '-')}@%h", *pool])


@app.command("console")
def console_cmd(config: ConfigOpt = None) -> None:
    """The HTTP app alone on \\[console] host:port: /metrics, /healthz, /readyz (and the web console)."""
    settings = _settings(config)
    _metrics_env(settings)
    from console.app import ConsoleServer, create_app  # after _metrics_env: it imports prometheus-client

    server = ConsoleServer(create_app(settings), settings)
    typer.echo(f"medsam2-cxr console: {server.scheme}://{server.address}", err=True)
    server.server.run()  # in the main thread: uvicorn shuts down on SIGTERM or SIGINT, then re-raises it


@app.command()
def infer(files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False)],
          out: Annotated[Path, typer.Option("--out", "-o")],
          config: ConfigOpt = None) -> None:
    """Run the pipeline offline (no network, no broker): SR, SC and a JSON summary per image.

    Every file is tried; one JSON line each says what came of it (its summary, why it was
    skipped, or the error's type and message); the exit code is 1 when any file failed."""
    import pydicom

    from dicom_node.filters import classify
    from models.bundle import load_bundle
    from models.predictor import Predictor
    from models.preprocess import read_image
    from worker.failures import describe, identifiers
    from worker.pipeline import encode_results, to_bytes
    from worker.runtime import LazyReporter

    settings = _settings(config)
    predictor = Predictor(load_bundle(ensure_bundle(settings), settings.model.operating_points),
                          device=settings.model.device or None)
    model = predictor.bundle.identity()
    index = settings.index_path  # similar cases + draft report, when an index exists
    language = settings.report.language  # of the draft report and the notices
    reporter = LazyReporter(index, settings.index.extractor, language) if index is not None else None
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for i, f in enumerate(files):
        stem = f"{i:04d}-{f.stem}"
        ds, stage = None, "read"
        try:
            ds = pydicom.dcmread(f)
            decision = classify(ds)
            if not decision.process:
                typer.echo(json.dumps({"file": str(f), "skipped": decision.reason}))
                continue
            image = read_image(ds)
            stage = "infer"
            pred = predictor.predict([image])[0]
            stage = "encode"
            results = [to_bytes(r) for r in encode_results(ds, image, pred, model, dt.datetime.now(dt.timezone.utc),
                                                           reporter, language)]
        except Exception as exc:  # noqa: BLE001 - one file's failure is reported and the next one goes on
            failures += 1
            typer.echo(json.dumps({"file": str(f), "stage": stage,
                                   "error": describe(exc, identifiers(ds) if ds is not None else ())}))
            log.error("infer.file_failed", file=f.name, stage=stage, error=type(exc).__name__)
            continue
        names = dict(zip(("sr", "sc", "text"), (f"{stem}.sr.dcm", f"{stem}.sc.dcm", f"{stem}.text.dcm")))
        for name, result in zip(names.values(), results):
            (out / name).write_bytes(result)
        summary = {"file": str(f), **dict(list(names.items())[:len(results)]),
                   "model": {"name": model.name, "version": model.version, "digest": model.digest},
                   **pred.to_json()}
        (out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
        typer.echo(json.dumps({"file": str(f), "summary": f"{stem}.json",
                               "present": [x.label for x in pred.findings if x.present],
                               "out_of_distribution": pred.out_of_distribution}))
    typer.echo(f"{len(files) - failures} of {len(files)} files ok, {failures} failed", err=True)
    raise typer.Exit(1 if failures else 0)


@app.command()
def phantoms(n: Annotated[int, typer.Option("--n")], out: Annotated[Path, typer.Option("--out")],
             seed: Annotated[int, typer.Option("--seed")] = 0,
             shift: Annotated[float, typer.Option(help="device shift intensity: 0 none, 1 training max, 2 twice")] = 0.0,
             view: Annotated[str, typer.Option(help="frontal or lateral")] = "frontal",
             kind: Annotated[str, typer.Option(help="chest or nonchest")] = "chest",
             size: int = 1024) -> None:
    """Synthetic phantom radiographs with known findings: DICOM files, reports and a manifest."""
    from models.phantoms import generate

    manifest = generate(n, out, seed=seed, shift=shift, view=view, kind=kind, size=size, progress=True)
    typer.echo(str(manifest))


@app.command()
def resend(job: Annotated[Optional[list[str]], typer.Argument(help="dead-lettered or failed job ids; none: "
                                                                      "every dead letter")] = None,
           failed: Annotated[bool, typer.Option("--failed", help="also every failed job")] = False,
           config: ConfigOpt = None) -> None:
    """Send dead-lettered results again (after the destination is fixed), or bring failed jobs
    back (after the fix of what failed): encoded and sent again, or inferred again when they
    never got a prediction."""
    from dicom_node.jobstore import JobState
    from worker.app import enqueuers, make_app
    from worker.pipeline import resend_jobs
    from worker.runtime import Runtime

    settings = _settings(config)
    require_spool(settings, config)
    rt = Runtime.from_settings(settings)
    enqueue_infer, enqueue_send = enqueuers(make_app(settings))
    ids = list(job or rt.ctx.spool.dead_letters())
    if failed:
        ids += [j.id for j in rt.ctx.jobs.by_state(JobState.FAILED) if j.id not in ids]
    errors = 0
    for job_id, outcome in resend_jobs(ids, rt.ctx, enqueue_send, enqueue_infer):
        if isinstance(outcome, Exception):
            errors += 1
            typer.echo(f"not requeued {job_id}: {outcome}", err=True)
        else:
            typer.echo(f"requeued {job_id} ({outcome.value})")
    raise typer.Exit(1 if errors else 0)


@app.command()
def status(config: ConfigOpt = None,
           failures: Annotated[int, typer.Option(help="how many recent failed or dead-lettered jobs to list")] = 20,
           echo_timeout: Annotated[float, typer.Option(help="seconds to wait for each destination's C-ECHO")] = 2.0) -> None:
    """One JSON object: job counts by state, the most recent failed and dead-lettered jobs with
    their reasons, the model (ready, or the default build's progress or failure) and whether each
    destination answers a C-ECHO. Exits 2 when there is no spool here (it creates none)."""
    from dicom_node.jobstore import FINAL_FAILURES, JobStore

    settings = _settings(config)
    root = require_spool(settings, config)
    jobs = JobStore(root / "jobs.sqlite")
    recent = [{"job": j.id, "state": j.state.value, "reason": j.reason, "sop_instance_uid": j.sop_instance_uid,
               "since": dt.datetime.fromtimestamp(j.updated_at, dt.timezone.utc).isoformat(timespec="seconds")}
              for j in jobs.recent(FINAL_FAILURES, failures)]
    typer.echo(json.dumps({"counts": jobs.counts(), "failures": recent, "spool": str(root),
                           "model": _model_status(settings), "destinations": _destinations(settings, echo_timeout)},
                          sort_keys=True))


def _model_status(settings: Settings) -> dict:
    from worker import model_build

    card = settings.bundle_path / model_build.CARD_FILE
    if settings.model.bundle:
        if card.is_file():
            return {"state": "ready", "bundle": str(settings.bundle_path)}
        return {"state": "missing", "bundle": str(settings.bundle_path), "error": f"{card}: no model card"}
    progress = model_build.read_progress(settings.spool) or {}
    if model_build.looks_ready(settings):
        return {**progress, "state": "ready", "error": None, "bundle": str(settings.bundle_path)}
    if not progress:
        return {"state": "not built", "bundle": str(settings.bundle_path), "error": None,
                "hint": "`medsam2-cxr up` builds it in the background on start"}
    return {**progress, "bundle": str(settings.bundle_path)}


def _destinations(settings: Settings, timeout: float) -> list[dict]:
    """Each destination (the default, then each route) and whether it answers a C-ECHO now."""
    from concurrent.futures import ThreadPoolExecutor

    from dicom_node.sender import Destination, echo
    from dicom_node.tls import client_context

    d = settings.destination
    entries = [("", d), *sorted(d.routes.items())]

    def check(entry) -> dict:
        caller, dest = entry
        tls = (client_context(dest.tls.ca, dest.tls.cert or None, dest.tls.key or None, dest.tls.check_hostname)
               if dest.tls.ca else None)
        why = echo(Destination(dest.ae_title, dest.host, dest.port, tls), settings.node.ae_title, timeout)
        out = {"ae_title": dest.ae_title, "host": dest.host, "port": dest.port, "reachable": why is None}
        if caller:
            out["for_calling_ae"] = caller
        if why is not None:
            out["error"] = why
        return out

    with ThreadPoolExecutor(min(8, len(entries))) as pool:
        return list(pool.map(check, entries))


@app.command()
def audit(config: ConfigOpt = None, event: Annotated[Optional[str], typer.Option()] = None) -> None:
    """Print the audit trail (JSON lines), optionally one event type. Exits 2 when there is no
    spool here (it creates none)."""
    from dicom_node.audit import AuditLog

    settings = _settings(config)
    root = require_spool(settings, config)
    for rec in AuditLog(root / "audit.jsonl").read():
        if event is None or rec["event"] == event:
            typer.echo(json.dumps(rec, sort_keys=True))


@app.command("build-bundle")
def build_bundle(out: Annotated[Path, typer.Option("--out")], n: int = 400, seed: int = 0,
                 encoder: Annotated[str, typer.Option(help="t512 (MedSAM2) or tiny (tests)")] = "t512",
                 checkpoint: Annotated[Optional[Path], typer.Option(help="MedSAM2 checkpoint")] = None) -> None:
    """Train the phantom B5 bundle (what `up` builds on first start) into a folder."""
    from models.default_bundle import build_default_bundle

    logs.configure()
    card = build_default_bundle(out, n=n, seed=seed, spec=encoder, checkpoint=checkpoint)
    typer.echo(json.dumps({"bundle": str(out), "digest": card["digest"], "metrics": card["metrics"],
                           "validation": card["validation"]}, indent=1))


DataOpt = Annotated[str, typer.Option("--data", help="phantoms:N[:SEED] (rendered in memory), "
                                                    "openi:REPORTS,IMAGES[,METADATA_CSV], a manifest CSV, "
                                                    "or a folder with manifest.csv")]
EncoderOpt = Annotated[str, typer.Option("--encoder", help="t512 (the MedSAM2 graph) or tiny (tests)")]
SizeOpt = Annotated[Optional[int], typer.Option("--image-size", help="encoder input px (default: the spec's, 512 "
                                                                      "for t512; 224 tiles Hiera's windows exactly)")]
CkptOpt = Annotated[Optional[Path], typer.Option("--checkpoint", help="MedSAM2 checkpoint (MedSAM2_latest.pt)")]
CacheOpt = Annotated[Path, typer.Option("--cache", help="feature cache folder")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="feature precision: auto (bf16 on CUDA, fp32 on CPU), "
                                                               "bf16 or fp32")]
OodOpt = Annotated[Optional[list[str]], typer.Option("--ood", help="NAME=MANIFEST, repeatable; default: phantom "
                                                                    "lateral and non-chest sets of --n-ood images")]
_CACHE = Path.home() / ".cache" / "medsam2-cxr" / "features"


def _dataset(data: str, render_size: int, n_ood: int, ood: list[str] | None, split_seed: int = 0):
    from models.data import load_dataset

    named = {}
    for spec in ood or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"--ood {spec!r}: expected NAME=MANIFEST_OR_FOLDER")
        named[name] = Path(path)
    return load_dataset(data, size=render_size, n_ood=n_ood, ood=named, split_seed=split_seed)


@app.command()
def train(data: DataOpt, out: Annotated[Path, typer.Option("--out", help="bundle folder to write")],
          variant: Annotated[str, typer.Option(help="B0, B1, B3, B4 or B5")] = "B5",
          seed: int = 0, split_seed: int = 0, encoder: EncoderOpt = "t512", image_size: SizeOpt = None,
          checkpoint: CkptOpt = None, cache: CacheOpt = _CACHE,
          render_size: Annotated[int, typer.Option(help="phantom render size")] = 512,
          n_ood: Annotated[int, typer.Option(help="phantom OOD images per set, measured into the card")] = 0,
          ood: OodOpt = None, epochs: int = 60, precision: PrecisionOpt = "auto",
          device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when available)")] = None) -> None:
    """Train one variant on frozen (cached) features and write a bundle whose card says how it was built."""
    import torch

    from models.train import train_bundle

    logs.configure()
    ds = _dataset(data, render_size, n_ood, ood, split_seed)
    card = train_bundle(ds, variant, seed, out, spec=encoder, image_size=image_size, checkpoint=checkpoint,
                        cache_dir=cache, split_seed=split_seed, epochs=epochs, precision=precision,
                        device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    typer.echo(json.dumps({"bundle": str(out), "digest": card["digest"], "variant": card["variant"],
                           "test": card["metrics"]["test"]}, indent=1))


@app.command()
def evaluate(data: DataOpt, out: Annotated[Path, typer.Option("--out", help="folder for metrics.json, table.md, plots")],
             seeds: Annotated[int, typer.Option(help="seeds per variant")] = 5,
             variants: Annotated[str, typer.Option(help="comma-separated")] = "B0,B1,B3,B4,B5",
             split_seed: int = 0, encoder: EncoderOpt = "t512", image_size: SizeOpt = None,
             checkpoint: CkptOpt = None, cache: CacheOpt = _CACHE,
             render_size: Annotated[int, typer.Option(help="phantom render size")] = 512,
             n_ood: Annotated[int, typer.Option(help="phantom OOD images per set when no --ood is given")] = 256,
             ood: OodOpt = None,
             shift_pairs: Annotated[float, typer.Option(help="share of training images with a shifted copy (B5)")] = 1.0,
             epochs: int = 60, precision: PrecisionOpt = "auto",
             device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when available)")] = None) -> None:
    """Every variant over --seeds seeds: metrics.json, table.md (paper's Table 2 layout) and PNG plots."""
    import torch

    from models.encoder import SPECS
    from models.evaluate import EvalConfig, run_evaluation
    from models.train import FeatureExtractor, load_encoder

    logs.configure()
    cfg = EvalConfig(seeds=seeds, variants=tuple(v.strip() for v in variants.split(",") if v.strip()),
                     split_seed=split_seed, shift_pair_fraction=shift_pairs, epochs=epochs)
    ds = _dataset(data, render_size, n_ood, ood, split_seed)
    enc_model, digest, weights = load_encoder(encoder, checkpoint)
    size = int(image_size or SPECS[encoder].image_size)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    extract = FeatureExtractor(enc_model, size, digest, cache, batch_size=32 if dev == "cuda" else 8, device=dev,
                               precision=precision)
    report = run_evaluation(ds, extract, out, {"spec": encoder, "image_size": size, "weights": weights,
                                               "digest": digest, "render_size": render_size,
                                               "precision": extract.precision}, cfg)
    typer.echo((out / "table.md").read_text())
    typer.echo(f"metrics: {out / 'metrics.json'}; total {report['timing']['total_s'] / 60:.1f} min", err=True)


model_app = typer.Typer(add_completion=False, no_args_is_help=True, help="MedSAM2 weights.")
app.add_typer(model_app, name="model")


@model_app.command("pull")
def model_pull(config: ConfigOpt = None,
               dest: Annotated[Optional[Path], typer.Option(help="file to write (default: <spool>/models/MedSAM2_latest.pt)")] = None,
               sha256: Annotated[Optional[str], typer.Option(help="expected sha256 (default: the one Hugging Face states)")] = None,
               timeout: float = 30.0) -> None:
    """Fetch MedSAM2_latest.pt (HF wanglab/MedSAM2), verify its sha256, or say where to put it."""
    from models.pull import FILENAME, PullError, pull

    settings = _settings(config)
    target = dest or settings.spool / "models" / FILENAME
    try:
        got = pull(target, sha256=sha256, timeout=timeout)
    except PullError as exc:
        typer.echo(f"model pull failed: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps({"path": str(got.path), "sha256": got.sha256, "verified_against": got.verified_against,
                           "downloaded": got.downloaded}))
    typer.echo(f"Set model.encoder_checkpoint = \"{got.path}\" to build bundles on MedSAM2's weights.", err=True)


index_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Similar prior cases index (index/).")
sources_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Training source selection by box coverage.")
app.add_typer(index_app, name="index")
app.add_typer(sources_app, name="sources")
IndexData = Annotated[Path, typer.Option("--data", exists=True, help="manifest CSV (path, report, labels) or phantom folder")]
IndexBundle = Annotated[Path, typer.Option("--bundle", exists=True, file_okay=False, help="model bundle folder")]


@index_app.command("build")
def index_build(data: IndexData, bundle: IndexBundle, out: Annotated[Path, typer.Option("--out")],
                source: Annotated[Optional[str], typer.Option(help="source name (default: site/device column or folder)")] = None,
                cache: Annotated[Optional[Path], typer.Option("--cache-dir", help="encoder feature cache")] = None,
                extractor: Annotated[str, typer.Option(help="labeler for reports without labels")] = "lexicon",
                split: Annotated[Optional[str], typer.Option(help="only manifest rows of this split (e.g. train)")] = None) -> None:
    """A new index: the bundle's box per image, de-identified report text and labels per case."""
    from index.build import run

    logs.configure()
    typer.echo(json.dumps(run(data, bundle, out, source=source, cache_dir=cache, extractor=extractor, split=split)))


@index_app.command("add")
def index_add(data: IndexData, bundle: IndexBundle, index: Annotated[Path, typer.Option("--index", exists=True)],
              source: Annotated[Optional[str], typer.Option(help="source name (default: site/device column or folder)")] = None,
              cache: Annotated[Optional[Path], typer.Option("--cache-dir", help="encoder feature cache")] = None,
              extractor: Annotated[str, typer.Option(help="labeler for reports without labels")] = "lexicon") -> None:
    """Append a site's own de-identified cases to an index built with the same bundle."""
    from index.build import run

    logs.configure()
    typer.echo(json.dumps(run(data, bundle, index, add=True, source=source, cache_dir=cache, extractor=extractor)))


@index_app.command("evaluate")
def index_evaluate(out: Annotated[Path, typer.Option("--out", help="folder for metrics.json and table.md")],
                   bundle: Annotated[Optional[Path], typer.Option(help="bundle (default: train a tiny phantom bundle)")] = None,
                   n_index: int = 1000, n_test: int = 200, n_site: int = 160,
                   cache: Annotated[Optional[Path], typer.Option("--cache-dir")] = None,
                   latency_sizes: Annotated[str, typer.Option(help="comma-separated index sizes")] = "1000,10000,100000",
                   extractor: str = "lexicon", seed: int = 0) -> None:
    """Label-F1 of drafts, precision@5, latency, ANN recall and source selection on phantoms."""
    from index.evaluate import EvalConfig, run_evaluation

    logs.configure()
    cfg = EvalConfig(n_index=n_index, n_test=n_test, n_site=n_site, extractor=extractor, seed=seed,
                     latency_sizes=tuple(int(s) for s in latency_sizes.split(",") if s.strip()))
    run_evaluation(out, cfg, bundle_dir=bundle, cache_dir=cache)
    typer.echo((out / "table.md").read_text())


@sources_app.command("rank", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sources_rank(ctx: typer.Context, target: Annotated[Path, typer.Option("--target", exists=True)],
                 sources: Annotated[str, typer.Option("--sources", help="candidate source folders: --sources A B C")],
                 bundle: IndexBundle,
                 cache: Annotated[Optional[Path], typer.Option("--cache-dir")] = None) -> None:
    """Rank candidate training sources (data or index folders) by how well their boxes cover the target's."""
    from index.sources import rank_folders

    logs.configure()
    folders = [Path(sources), *(Path(a) for a in ctx.args)]
    missing = [str(f) for f in folders if not f.exists()]
    if missing:
        raise typer.BadParameter(f"source folders not found: {missing}")
    for rank, s in enumerate(rank_folders(target, folders, bundle, cache), 1):
        typer.echo(json.dumps({"rank": rank, "source": s.name, "coverage": round(s.coverage, 4), "boxes": s.n_boxes}))


def _report_texts(path: Path) -> list[str]:
    """Report texts in a file: a text report, one Open-i XML (FINDINGS + IMPRESSION), or an Open-i archive."""
    from models.openi import parse_report, read_reports

    if not path.is_file():
        raise typer.BadParameter(f"{path}: no such report file")
    name = path.name.lower()
    if name.endswith((".tgz", ".tar.gz", ".tar")):
        return [r.text for r in read_reports(path)]
    if name.endswith(".xml"):
        try:
            return [parse_report(path.read_bytes(), str(path)).text]
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    return [path.read_text(encoding="utf-8", errors="replace")]


@app.command()
def label(files: Annotated[Optional[list[Path]], typer.Argument(help="more report files (after --file)")] = None,
          text: Annotated[Optional[list[str]], typer.Option("--text", help="a report as text (repeatable)")] = None,
          file: Annotated[Optional[list[Path]], typer.Option(
              "--file", help="report files: .txt, Open-i .xml, or an Open-i .tgz (one line per report inside)")] = None,
          extractor: Annotated[str, typer.Option(help="lexicon or grammar")] = "lexicon") -> None:
    """Print the 14 CheXpert labels of each report as one JSON line (1, 0, -1 uncertain, null not mentioned).

    Order: the --text reports, then the files in the order given.
    """
    from index.labelers import get_extractor

    try:
        fn = get_extractor(extractor)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    paths = [*(file or []), *(files or [])]
    if not text and not paths:
        raise typer.BadParameter("give --text TEXT or --file FILE...")
    for t in text or []:
        typer.echo(json.dumps(fn(t)))
    for p in paths:
        for t in _report_texts(Path(p)):
            typer.echo(json.dumps(fn(t)))


@app.command("label-eval")
def label_eval(openi: Annotated[Path, typer.Option("--openi", help="Open-i ecgen-radiology .tgz or folder")],
               out: Annotated[Path, typer.Option("--out", help="folder for metrics.json and table.md")],
               repeats: Annotated[int, typer.Option(help="timing runs per extractor (best is kept)")] = 3) -> None:
    """Kappa between the two report labelers, their F1 against MeSH-derived labels, and their speed."""
    from index import label_eval as le
    from models.openi import read_reports

    logs.configure()
    metrics = le.evaluate(read_reports(openi), repeats=repeats)
    mj, tm = le.write(metrics, out)
    a = metrics["agreement"]
    typer.echo(json.dumps({"metrics": str(mj), "table": str(tm), "kappa_4class": round(a["kappa_4class"], 4),
                           "kappa_binary": round(a["kappa_binary"], 4),
                           "micro_f1_vs_mesh": {e: round(x["vs_mesh_u_ones"]["micro"]["f1"], 4)
                                                for e, x in metrics["extractors"].items()},
                           "reports_per_second": {e: round(x["throughput"]["reports_per_second"])
                                                  for e, x in metrics["extractors"].items()}}))


bench_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Benchmarks against the best that exists for each stage; each prints one JSON object.")
app.add_typer(bench_app, name="bench")
WorkOpt = Annotated[Optional[Path], typer.Option("--work", help="scratch folder (default: a temporary one, removed)")]


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


@bench_app.command("ingest")
def bench_ingest(n: Annotated[int, typer.Option("--n", help="images")] = 40, rows: int = 2500, cols: int = 2048,
                 senders: Annotated[int, typer.Option(help="concurrent storescu processes in the second pass")] = 8,
                 repeats: int = 2,
                 probe_scale: Annotated[float, typer.Option(help="node-only pass at this scale per side (0: none)")] = 0.5,
                 work: WorkOpt = None) -> None:
    """storescu -> the node's listener against storescu -> DCMTK storescp: wall time, ratio, memory."""
    from bench import ingest

    typer.echo(json.dumps(ingest.run(n=n, rows=rows, cols=cols, senders=senders, repeats=repeats,
                                     probe_scale=probe_scale, work=work)))


@bench_app.command("infer")
def bench_infer(specs: Annotated[str, typer.Option(help="encoders, comma-separated")] = "t512,tiny",
                batches: Annotated[str, typer.Option(help="batch sizes, comma-separated")] = "1,8,32",
                repeats: int = 3, device: Annotated[Optional[str], typer.Option(help="cpu or cuda")] = None,
                rows: int = 2500, cols: int = 2048, work: WorkOpt = None) -> None:
    """Full model step (Predictor.predict) against the encoder forward alone: images/s per batch size."""
    from bench import infer

    typer.echo(json.dumps(infer.run(specs=tuple(s.strip() for s in specs.split(",") if s.strip()),
                                    batches=_ints(batches), repeats=repeats, device=device, rows=rows, cols=cols,
                                    work=work)))


@bench_app.command("decode")
def bench_decode(rows: int = 2500, cols: int = 2048, repeats: int = 5,
                 threads: Annotated[int, typer.Option(help="threads for the overlap check (0: skip it)")] = 2,
                 work: WorkOpt = None) -> None:
    """pydicom's decoder plugins on JPEG 2000 and JPEG lossless radiographs: speed and exactness."""
    from bench import decode

    typer.echo(json.dumps(decode.run(rows=rows, cols=cols, repeats=repeats, threads=threads, work=work)))


@bench_app.command("e2e")
def bench_e2e(spec: Annotated[str, typer.Option(help="encoder of the benchmark bundle")] = "t512",
              bundle: Annotated[Optional[Path], typer.Option(help="a bundle to use instead")] = None,
              runs: Annotated[int, typer.Option(help="single-image latency runs")] = 20,
              burst: Annotated[int, typer.Option(help="images in the throughput burst")] = 200,
              rows: int = 2500, cols: int = 2048, device: Annotated[str, typer.Option(help="cpu or cuda")] = "",
              redis_url: str = "redis://127.0.0.1:6379/8", work: WorkOpt = None) -> None:
    """storescu -> node (Redis, gpu + io workers) -> Orthanc: latency p50/p95 and burst throughput."""
    from bench import e2e

    typer.echo(json.dumps(e2e.run(spec=spec, bundle=bundle, runs=runs, burst=burst, rows=rows, cols=cols,
                                  device=device, redis_url=redis_url, work=work)))


@bench_app.command("train")
def bench_train(n: Annotated[int, typer.Option("--n", help="phantom images")] = 300,
                encoder: Annotated[str, typer.Option(help="t512 or tiny")] = "t512", seeds: int = 5,
                variants: str = "B0,B1,B3,B4,B5", n_ood: Annotated[int, typer.Option("--n-ood")] = 64,
                epochs: int = 60, device: Annotated[Optional[str], typer.Option(help="cpu or cuda")] = None,
                work: WorkOpt = None) -> None:
    """The whole `medsam2-cxr evaluate` run with cached features (after one run that fills the cache)."""
    from bench import train

    typer.echo(json.dumps(train.run(n=n, encoder=encoder, seeds=seeds, variants=variants, n_ood=n_ood,
                                    epochs=epochs, device=device, work=work)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
