"""What the command groups share: the --config option, settings (a configuration error becomes
its message and exit code 1), the spool a read-only command needs, the metrics folder and the
HTTP app in a thread."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import structlog
import typer

from worker import logs
from worker.errors import ConfigError
from worker.settings import Settings, load_settings

log = structlog.get_logger()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML configuration file")]


def settings_for(config: Path | None) -> Settings:
    """The settings, or the configuration error printed to stderr and exit code 1."""
    logs.configure()
    try:
        return load_settings(config)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(exc.exit_code) from None


def metrics_env(settings: Settings, clean: bool = False) -> None:
    """prometheus-client's multiprocess folder (<spool>/metrics) for this process and its
    children, before prometheus-client is imported (dicom_node.metrics_dir). `up` empties it."""
    from dicom_node.metrics_dir import prepare

    prepare(settings.metrics_dir, clean=clean)


@contextlib.contextmanager
def console(settings: Settings) -> Iterator[object]:
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


def require_spool(settings: Settings, config: Path | None) -> Path:
    """The spool `status`, `audit` and `resend` read; exits 2, creating nothing, when there is none.
    With [store] url the job table is in that database and the spool folder is what must exist."""
    root, jobs = settings.spool, settings.layout.jobs
    if jobs.is_file() or (settings.store.url and root.is_dir()):
        return root
    where = f"the configuration {config}" if config else "no --config, so the default ./var of this folder"
    typer.echo(f"medsam2-cxr: no spool at {root} (looked for {jobs}; {where}). Run this where "
               f"`medsam2-cxr up` runs, or give the node's configuration with --config FILE ([paths] spool), or "
               f"set MEDSAM2_CXR_PATHS__SPOOL=/path/to/spool.", err=True)
    raise typer.Exit(2)
