"""The node's commands: up, listen, worker, console (run it, together or apart), and status,
audit, resend (look at it and act on it; these need a spool and create none)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from worker.cli import common
from worker.cli.common import ConfigOpt, require_spool
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.node import Node

app = typer.Typer()


@app.command()
def up(config: ConfigOpt = None) -> None:
    """Listener, workers (gpu and io queues), sender and reconciler on this host, and the HTTP app
    (\\[console] host:port: /metrics, /healthz, /readyz, the web console)."""
    from worker import model_build
    from worker.cli.serve import serve, spawn
    from worker.node import Node

    settings = common.settings_for(config)
    if settings.node.role == "edge":  # no model, no workers: listeners and the relay (worker/edge.py)
        _edge(settings)
        return
    if settings.model.bundle:
        from models.bundle import read_card

        read_card(settings.bundle_path)  # a configured bundle must exist and be intact: fail now
    common.metrics_env(settings, clean=True)
    cfg = ["--config", str(config)] if config else []
    cli = [sys.executable, "-m", "worker.cli"]

    def launch() -> tuple[list[subprocess.Popen], subprocess.Popen | None]:
        # What looks built is checked by the GPU worker; the rest by the builder (it exits at once
        # when another build finished it): `up` itself never imports torch for the default bundle.
        builder = None
        if not model_build.looks_ready(settings):
            model_build.announce(settings.spool)
            builder = spawn(cli + ["build-default", *cfg])
        workers = [spawn(cli + ["worker", "--queues", "io", *cfg])]
        if builder is None:
            workers.append(spawn(cli + ["worker", "--queues", "gpu", *cfg]))
        return workers, builder

    with common.console(settings):
        serve(Node(settings), launch, start_gpu=lambda: spawn(cli + ["worker", "--queues", "gpu", *cfg]))
    # Everything is stopped, written and audited: skip the interpreter's teardown, which took 5-8 s
    # on a loaded 2-core host (C-level finalisation of the libraries `up` imports, torch among them).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command("build-default", hidden=True)
def build_default(config: ConfigOpt = None) -> None:
    """The default bundle and index, if missing (what `up` runs in the background on first start)."""
    from worker import model_build

    settings = common.settings_for(config)
    try:
        model_build.build(settings)
    except Exception:  # noqa: BLE001 - said in the progress file and the log already
        raise typer.Exit(1) from None


@app.command()
def listen(config: ConfigOpt = None) -> None:
    """The C-STORE listener, the reconciler and the HTTP app (workers run apart: `medsam2-cxr worker`)."""
    from worker.cli.serve import serve
    from worker.node import Node

    settings = common.settings_for(config)
    if settings.node.role == "edge":
        _edge(settings)
        return
    common.metrics_env(settings)
    with common.console(settings):
        serve(Node(settings))


def _edge(settings: Settings) -> None:
    """`up` and `listen` of an edge ([node] role = "edge"): its listeners and relay, and the HTTP app."""
    from worker.edge import serve_edge
    from worker.node import Node

    common.metrics_env(settings, clean=True)
    with common.console(settings):
        serve_edge(Node(settings))


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
    from worker.model_build import ensure_bundle

    settings = common.settings_for(config)
    if settings.node.role == "edge":
        from worker.edge import refuse_worker

        refuse_worker(config)
    common.metrics_env(settings)
    if "gpu" in queues.split(","):
        ensure_bundle(settings)
    from worker.app import make_app

    celery_app = make_app(settings)
    n = concurrency or os.cpu_count() or 1
    pool = {"gpu": ["--pool=solo"], "io": ["--pool=prefork", f"--concurrency={n}"]}.get(
        queues, ["--pool=threads", f"--concurrency={n}"])
    with common.console(settings) if console else contextlib.nullcontext():
        celery_app.worker_main(["worker", "-Q", queues, "--loglevel=WARNING", "--without-gossip", "--without-mingle",
                                "--without-heartbeat", f"--hostname={queues.replace(',', '-')}@%h", *pool])


@app.command("console")
def console_cmd(config: ConfigOpt = None) -> None:
    """The HTTP app alone on \\[console] host:port: /metrics, /healthz, /readyz (and the web console)."""
    settings = common.settings_for(config)
    common.metrics_env(settings)
    from console.app import ConsoleServer, create_app  # after metrics_env: it imports prometheus-client

    server = ConsoleServer(create_app(settings), settings)
    typer.echo(f"medsam2-cxr console: {server.scheme}://{server.address}", err=True)
    server.server.run()  # in the main thread: uvicorn shuts down on SIGTERM or SIGINT, then re-raises it


@app.command()
def resend(job: Annotated[list[str] | None, typer.Argument(help="dead-lettered or failed job ids; none: "
                                                                      "every dead letter")] = None,
           failed: Annotated[bool, typer.Option("--failed", help="also every failed job")] = False,
           config: ConfigOpt = None) -> None:
    """Send dead-lettered results again (after the destination is fixed), or bring failed jobs
    back (after the fix of what failed): encoded and sent again, or inferred again when they
    never got a prediction."""
    from dicom_node.jobstore import JobState
    from worker.app import enqueuers, make_app
    from worker.node import Node
    from worker.pipeline import resend_jobs

    settings = common.settings_for(config)
    require_spool(settings, config)
    ctx = Node(settings).context()
    enqueue_infer, enqueue_send = enqueuers(make_app(settings))
    ids = list(job or ctx.spool.dead_letters())
    if failed:
        ids += [j.id for j in ctx.jobs.by_state(JobState.FAILED) if j.id not in ids]
    errors = 0
    for job_id, outcome in resend_jobs(ids, ctx, enqueue_send, enqueue_infer):
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
    their reasons, the mode (live, or shadow and its QA destination), the model (ready, or the default build's progress or failure) and whether each
    destination answers a C-ECHO. Exits 2 when there is no spool here (it creates none)."""
    from dicom_node.jobstore import FINAL_FAILURES
    from worker.node import Node

    settings = common.settings_for(config)
    root = require_spool(settings, config)
    node = Node(settings)
    jobs = node.jobs
    recent = [{"job": j.id, "state": j.state.value, "reason": j.reason, "sop_instance_uid": j.sop_instance_uid,
               "since": dt.datetime.fromtimestamp(j.updated_at, dt.UTC).isoformat(timespec="seconds")}
              for j in jobs.recent(FINAL_FAILURES, failures)]
    hub = settings.edge.hub
    model = (_model_status(settings) if settings.node.role != "edge" else  # an edge runs none: its hub does
             {"state": "at the hub", "hub": {"ae_title": hub.ae_title, "host": hub.host, "port": hub.port}})
    typer.echo(json.dumps({"counts": jobs.counts(), "failures": recent, "spool": str(root), "mode": node.mode(),
                           "model": model, "destinations": _destinations(node, echo_timeout)},
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


def _destinations(node: Node, timeout: float) -> list[dict]:
    """Each destination (the default, then each route) and whether it answers now (C-ECHO, or an HTTP request for STOW-RS)."""
    from concurrent.futures import ThreadPoolExecutor

    entries = node.destinations()
    calling_ae = node.settings.node.ae_title

    def check(entry) -> dict:
        caller, dest = entry
        why = dest.probe(calling_ae, timeout)
        out = {"ae_title": dest.ae_title, "host": dest.host, "port": dest.port, "reachable": why is None}
        if caller:
            out["for_calling_ae"] = caller
        if why is not None:
            out["error"] = why
        return out

    with ThreadPoolExecutor(min(8, len(entries))) as pool:
        return list(pool.map(check, entries))


@app.command()
def audit(config: ConfigOpt = None, event: Annotated[str | None, typer.Option()] = None) -> None:
    """Print the audit trail (JSON lines), optionally one event type. Exits 2 when there is no
    spool here (it creates none)."""
    from worker.node import Node

    settings = common.settings_for(config)
    require_spool(settings, config)
    for rec in Node(settings).audit.read():
        if event is None or rec["event"] == event:
            typer.echo(json.dumps(rec, sort_keys=True))
