"""The `medsam2-cxr` command: run the node (together or apart), infer offline, make phantoms."""

from __future__ import annotations

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


def ensure_bundle(settings: Settings) -> Path:
    """The configured bundle, or the default one, built on first start (minutes, once)."""
    from models.bundle import read_card

    path = settings.bundle_path
    if settings.model.bundle:
        read_card(path)  # a configured bundle must exist and be intact
        return path
    try:
        read_card(path)
        return path
    except Exception:
        pass
    from models.default_bundle import build_default_bundle

    ckpt = Path(settings.model.encoder_checkpoint) if settings.model.encoder_checkpoint else None
    typer.echo(f"Building the default model bundle in {path} (first start only: phantoms, features, training)...", err=True)
    t0 = time.time()
    card = build_default_bundle(path, n=settings.model.default_images, checkpoint=ckpt,
                                cache_dir=settings.spool / "cache" / "features")
    typer.echo(f"Default bundle {card['digest'][:12]} built in {time.time() - t0:.0f} s "
               f"(test macro-AUROC on phantoms {card['metrics']['test']['macro_auroc']:.3f}).", err=True)
    return path


def _start_listener(settings: Settings, enqueue_infer):
    from dicom_node.audit import AuditLog
    from dicom_node.jobstore import JobStore
    from dicom_node.listener import ListenerConfig, start_listener
    from dicom_node.spool import Spool

    from dicom_node.tls import server_context

    root = settings.spool
    n = settings.node
    tls = server_context(n.tls.cert, n.tls.key, n.tls.ca or None, n.tls.require_client_cert) if n.tls.cert else None
    cfg = ListenerConfig(ae_title=n.ae_title, host=n.host, port=n.port, allowed_calling_aets=tuple(n.allowed_calling_aets),
                         allowed_addresses=tuple(n.allowed_addresses), max_associations=n.max_associations,
                         max_pdu_length=n.max_pdu_length, tls=tls)
    return start_listener(cfg, Spool(root, min_free_bytes=n.min_free_mb * 2**20), JobStore(root / "jobs.sqlite"),
                          AuditLog(root / "audit.jsonl"), enqueue_infer)


def _reconciler(settings: Settings, stop: threading.Event, enqueue_infer, enqueue_send) -> threading.Thread:
    from worker.pipeline import reconcile
    from worker.runtime import Runtime

    ctx = Runtime.from_settings(settings).ctx

    def loop() -> None:
        while not stop.wait(settings.worker.reconcile_every_s):
            try:
                reconcile(ctx, settings.worker.stale_after_s, enqueue_infer, enqueue_send)
            except Exception:
                log.exception("reconcile.error")

    t = threading.Thread(target=loop, name="reconciler", daemon=True)
    t.start()
    return t


def _serve(settings: Settings, children: list[subprocess.Popen]) -> None:
    from dicom_node.audit import AuditLog
    from worker.app import enqueuers, make_app

    enqueue_infer, enqueue_send = enqueuers(make_app(settings))
    audit = AuditLog(settings.spool / "audit.jsonl")
    server = _start_listener(settings, enqueue_infer)
    stop = threading.Event()
    _reconciler(settings, stop, enqueue_infer, enqueue_send)
    audit.record("application_start", ae_title=settings.node.ae_title, port=settings.node.port, pid=os.getpid())
    d = settings.destination
    typer.echo(f"medsam2-cxr listening: AE title {settings.node.ae_title}, port {settings.node.port}; "
               f"results go to {d.ae_title}@{d.host}:{d.port}; spool {settings.spool}", err=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            for child in children:
                if child.poll() is not None:
                    log.error("up.worker_exited", pid=child.pid, code=child.returncode)
                    stop.set()
    finally:
        server.shutdown()
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
        audit.record("application_stop", ae_title=settings.node.ae_title, pid=os.getpid())


@app.command()
def up(config: ConfigOpt = None) -> None:
    """Listener, workers (gpu and io queues), sender and reconciler on this host."""
    settings = _settings(config)
    ensure_bundle(settings)
    env = {**os.environ}
    args = [sys.executable, "-m", "worker.cli", "worker"] + (["--config", str(config)] if config else [])
    children = [subprocess.Popen(args + ["--queues", "gpu"], env=env),
                subprocess.Popen(args + ["--queues", "io"], env=env)]
    _serve(settings, children)


@app.command()
def listen(config: ConfigOpt = None) -> None:
    """The C-STORE listener and the reconciler only (workers run apart: `medsam2-cxr worker`)."""
    _serve(_settings(config), [])


@app.command()
def worker(config: ConfigOpt = None,
           queues: Annotated[str, typer.Option(help="gpu, io or gpu,io")] = "gpu,io",
           concurrency: Annotated[int, typer.Option(help="io threads")] = 4) -> None:
    """A Celery worker. gpu: one process, model loaded lazily; io: threads that encode and send."""
    settings = _settings(config)
    if "gpu" in queues.split(","):
        ensure_bundle(settings)
    from worker.app import make_app

    celery_app = make_app(settings)
    pool = ["--pool=solo"] if queues == "gpu" else ["--pool=threads", f"--concurrency={concurrency}"]
    celery_app.worker_main(["worker", "-Q", queues, "--loglevel=WARNING", "--without-gossip", "--without-mingle",
                            "--without-heartbeat", f"--hostname={queues.replace(',', '-')}@%h", *pool])


@app.command()
def infer(files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False)],
          out: Annotated[Path, typer.Option("--out", "-o")],
          config: ConfigOpt = None) -> None:
    """Run the pipeline offline (no network, no broker): SR, SC and a JSON summary per image."""
    import pydicom

    from dicom_node.filters import classify
    from models.bundle import load_bundle
    from models.predictor import Predictor
    from models.preprocess import ImageError, read_image
    from worker.pipeline import encode_results, to_bytes

    settings = _settings(config)
    predictor = Predictor(load_bundle(ensure_bundle(settings)), device=settings.model.device or None)
    model = predictor.bundle.identity()
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for i, f in enumerate(files):
        stem = f"{i:04d}-{f.stem}"
        try:
            ds = pydicom.dcmread(f)
            decision = classify(ds)
            if not decision.process:
                typer.echo(json.dumps({"file": str(f), "skipped": decision.reason}))
                continue
            image = read_image(ds)
        except (ImageError, pydicom.errors.InvalidDicomError, OSError, ValueError) as exc:
            failures += 1
            typer.echo(json.dumps({"file": str(f), "error": str(exc)}))
            continue
        pred = predictor.predict([image])[0]
        sr, sc = encode_results(ds, image, pred, model, dt.datetime.now(dt.timezone.utc))
        (out / f"{stem}.sr.dcm").write_bytes(to_bytes(sr))
        (out / f"{stem}.sc.dcm").write_bytes(to_bytes(sc))
        summary = {"file": str(f), "sr": f"{stem}.sr.dcm", "sc": f"{stem}.sc.dcm",
                   "model": {"name": model.name, "version": model.version, "digest": model.digest},
                   **pred.to_json()}
        (out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
        typer.echo(json.dumps({"file": str(f), "summary": f"{stem}.json",
                               "present": [x.label for x in pred.findings if x.present],
                               "out_of_distribution": pred.out_of_distribution}))
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
def resend(job: Annotated[Optional[list[str]], typer.Argument(help="dead-lettered job ids; none: all")] = None,
           config: ConfigOpt = None) -> None:
    """Send dead-lettered results again (after the destination is fixed)."""
    from worker.app import enqueuers, make_app
    from worker.pipeline import resend as resend_job
    from worker.runtime import Runtime

    settings = _settings(config)
    rt = Runtime.from_settings(settings)
    enqueue_infer, enqueue_send = enqueuers(make_app(settings))
    for job_id in job or rt.ctx.spool.dead_letters():
        resend_job(job_id, rt.ctx, enqueue_send, enqueue_infer)
        typer.echo(f"requeued {job_id}")


@app.command()
def status(config: ConfigOpt = None) -> None:
    """Job counts by state, from the job store."""
    from worker.runtime import Runtime

    typer.echo(json.dumps(Runtime.from_settings(_settings(config)).ctx.jobs.counts(), sort_keys=True))


@app.command()
def audit(config: ConfigOpt = None, event: Annotated[Optional[str], typer.Option()] = None) -> None:
    """Print the audit trail (JSON lines), optionally one event type."""
    from dicom_node.audit import AuditLog

    settings = _settings(config)
    for rec in AuditLog(settings.spool / "audit.jsonl").read():
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
