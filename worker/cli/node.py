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
    from worker.cli.serve import serve, spawn, spawn_listeners
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
        workers = spawn_listeners(node, cli, cfg) + [spawn(cli + ["worker", "--queues", "io", *cfg])]
        if builder is None:
            workers.append(spawn(cli + ["worker", "--queues", "gpu", *cfg]))
        return workers, builder

    node = Node(settings)
    with common.console(settings):
        serve(node, launch, start_gpu=lambda: spawn(cli + ["worker", "--queues", "gpu", *cfg]))
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
def listen(config: ConfigOpt = None,
           reconcile: Annotated[bool, typer.Option(help="run the reconciler here too (--no-reconcile: a "
                                                        "`medsam2-cxr reconcile` runs elsewhere)")] = True) -> None:
    """The C-STORE listener (\\[node] processes of them on one port), the reconciler and the HTTP app
    (workers run apart: `medsam2-cxr worker`)."""
    from worker.cli.serve import serve, spawn_listeners
    from worker.node import Node

    settings = common.settings_for(config)
    if settings.node.role == "edge":
        _edge(settings)
        return
    common.metrics_env(settings)
    node = Node(settings)
    cli, cfg = [sys.executable, "-m", "worker.cli"], ["--config", str(config)] if config else []
    launch = (lambda: (spawn_listeners(node, cli, cfg), None)) if settings.node.processes > 1 else None
    with common.console(settings):
        serve(node, launch, reconcile=reconcile)


@app.command("reconcile")
def reconcile_role(config: ConfigOpt = None) -> None:
    """The reconciler alone: re-enqueues from the job table what the broker does not hold (for a
    host without a listener, or listeners started with --no-reconcile)."""
    from worker.cli.serve import reconcile_only
    from worker.node import Node

    settings = common.settings_for(config)
    reconcile_only(Node(settings))


@app.command("listener-process", hidden=True)
def listener_process(config: ConfigOpt = None) -> None:
    """One more listener on \\[node] port, started by `listen` or `up` when \\[node] processes > 1."""
    from worker.cli.serve import listener_process as run
    from worker.node import Node

    settings = common.settings_for(config)
    common.metrics_env(settings)
    run(Node(settings))


def _fetch_shared(settings, attempts: int = 20, wait_s: float = 3.0) -> None:
    """The bundle and index another host published in the object store, fetched and checked
    (worker.node.Node.fetch_shared); a store that is away (or just starting) is tried for a minute."""
    import time

    from dicom_node.objects import ObjectsUnavailable
    from worker.node import Node

    node = Node(settings)
    for attempt in range(attempts):
        try:
            for name in Node.SHARED:
                node.fetch_shared(name)
            return
        except ObjectsUnavailable as exc:
            if attempt == attempts - 1:
                raise
            typer.echo(f"medsam2-cxr worker: {exc}; trying again in {wait_s:.0f} s", err=True)
            time.sleep(wait_s)


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
        if settings.objects.url:  # another host built them: fetch and check what it published, build nothing
            _fetch_shared(settings)
        ensure_bundle(settings)
    from worker.app import make_app

    celery_app = make_app(settings)
    n = concurrency or os.cpu_count() or 1
    pool = {"gpu": ["--pool=solo"], "io": ["--pool=prefork", f"--concurrency={n}"]}.get(
        queues, ["--pool=threads", f"--concurrency={n}"])
    with common.console(settings) if console else contextlib.nullcontext():
        celery_app.worker_main(["worker", "-Q", queues, "--loglevel=WARNING", "--without-gossip", "--without-mingle",
                                "--without-heartbeat", f"--hostname={node_name(queues)}", *pool])


def node_name(queues: str) -> str:
    """The Celery node name, one per worker process: RabbitMQ gives each node an exclusive
    control queue, so a second worker of one queue on the same host under the same name exits
    (RESOURCE_LOCKED)."""
    return f"{queues.replace(',', '-')}.{os.getpid()}@%h"


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
def audit(config: ConfigOpt = None, event: Annotated[str | None, typer.Option()] = None,
          all_hosts: Annotated[bool, typer.Option("--all-hosts", help="every host's records, from the "
                                                  "[store] url database's copy")] = False) -> None:
    """Print the audit trail (JSON lines), optionally one event type. Exits 2 when there is no
    spool here (it creates none), or with --all-hosts when there is no [store] url."""
    from worker.node import Node

    settings = common.settings_for(config)
    require_spool(settings, config)
    node = Node(settings)
    if all_hosts:
        if node.audit_copy is None:
            typer.echo("medsam2-cxr audit --all-hosts: no [store] url, so no shared copy; this host's trail is "
                       "`medsam2-cxr audit`", err=True)
            raise typer.Exit(2)
        records = node.audit_copy.read(event, limit=None)
    else:
        records = [rec for rec in node.audit.read() if event is None or rec["event"] == event]
    for rec in records:
        typer.echo(json.dumps(rec, sort_keys=True))
