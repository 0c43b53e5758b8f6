"""The node's one HTTP app: /metrics (Prometheus), /healthz, /readyz; the web console joins it.

``create_app(settings)`` builds it; ``medsam2-cxr console`` serves it alone, and `up`, `listen`
(and `worker --console`) serve it in a thread of their own process (:func:`serve_in_thread`),
on ``[console] host:port``, over HTTPS with ``[node.tls]`` cert and key when they are set.

/healthz: the process answers (liveness). /readyz: 200 when every check passes, else 503; the
JSON says which check failed and why:
- ``jobs``: the job store answers a query;
- ``broker``: a connection to the broker (Redis, or the filesystem transport in the spool);
- ``model``: the bundle is built and its card intact (the GPU worker loads it lazily; how many
  worker processes have it loaded is in the detail);
- ``destination``: every destination ([destination] and its routes) answers C-ECHO within
  ``[console] destination_timeout_s``.
An object store check joins the list when one is configured. The same checks are exported on
/metrics as ``medsam2_ready{check}`` and ``medsam2_destination_up{destination}``, so an alert
does not depend on someone calling /readyz.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicom_node import metrics
from dicom_node.jobstore import JobState, JobStore
from dicom_node.sender import ResultDestination
from worker.node import Node
from worker.settings import Settings

log = structlog.get_logger()

CHECKS = ("jobs", "broker", "model", "destination")
ECHO_CACHE_S = 5.0  # /readyz and scrapes within this many seconds share one C-ECHO per destination


@dataclass
class Check:
    ok: bool
    detail: str


def _destinations(settings: Settings) -> list[ResultDestination]:
    """The default destination and every route, once each."""
    out: dict[str, ResultDestination] = {}
    for _, dest in Node(settings).destinations():
        out.setdefault(metrics.destination_label(dest), dest)
    return list(out.values())


@dataclass
class Readiness:
    """The readiness checks of one node; each returns a :class:`Check` and never raises."""

    settings: Settings
    echo: Callable[[ResultDestination], str | None] | None = None  # None: C-ECHO with the configured timeout
    clock: Callable[[], float] = time.monotonic
    _echoes: dict[str, tuple[float, str | None]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _jobs: JobStore | None = None

    def jobs(self) -> Check:
        if self._jobs is None:  # opened on the first check: one that cannot be opened fails the check
            self._jobs = Node(self.settings).jobs
        counts = self._jobs.counts()
        return Check(True, f"{sum(counts.values())} jobs")

    def broker(self) -> Check:
        from kombu import Connection

        from worker.app import broker_options

        url, options = broker_options(self.settings)
        timeout = self.settings.console.destination_timeout_s
        with Connection(url, transport_options=options, connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, interval_max=0, timeout=timeout)
        return Check(True, url.split("@")[-1] if "://" in url else url)  # no password in the detail

    def model(self) -> Check:
        from models.bundle import CARD, read_card

        path = self.settings.bundle_path
        if not (path / CARD).exists():
            return Check(False, f"bundle {path} not built yet (the first start builds it)")
        card = read_card(path)  # an altered card raises: the check fails with its reason
        loaded = _loaded_model_processes()
        return Check(True, f"bundle {card['digest'][:12]} ready; loaded in {loaded} worker process(es)")

    def destination_results(self) -> dict[str, str | None]:
        """label -> None (answered) or why not, one C-ECHO per destination at most every ECHO_CACHE_S."""
        out = {}
        for dest in _destinations(self.settings):
            label = metrics.destination_label(dest)
            with self._lock:
                cached = self._echoes.get(label)
            if cached is not None and self.clock() - cached[0] < ECHO_CACHE_S:
                out[label] = cached[1]
                continue
            try:
                why = (self.echo or self._echo)(dest)
            except Exception as exc:  # noqa: BLE001
                why = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self._echoes[label] = (self.clock(), why)
            out[label] = why
        return out

    def destination(self) -> Check:
        results = self.destination_results()
        bad = {k: v for k, v in results.items() if v is not None}
        if bad:
            return Check(False, "; ".join(f"{k}: {v}" for k, v in bad.items()))
        return Check(True, ", ".join(results) + " answered C-ECHO")

    def _echo(self, dest: ResultDestination) -> str | None:
        return dest.probe(self.settings.node.ae_title, self.settings.console.destination_timeout_s)

    def run(self) -> dict:
        checks: dict[str, Check] = {}
        for name in CHECKS:
            try:
                checks[name] = getattr(self, name)()
            except Exception as exc:  # noqa: BLE001 - a check that raises has failed, with the reason
                checks[name] = Check(False, f"{type(exc).__name__}: {exc}")
        failed = [k for k, c in checks.items() if not c.ok]
        return {"ready": not failed, "failed": failed,
                "checks": {k: {"ok": c.ok, "detail": c.detail} for k, c in checks.items()}}


def _loaded_model_processes() -> int:
    """How many live processes report the model loaded (``medsam2_model_loaded``, from the multiprocess files)."""
    folder = metrics.multiprocess_dir()
    if folder is None:
        return 0
    from prometheus_client import multiprocess

    metrics.sweep_dead(folder)
    total = 0
    for m in multiprocess.MultiProcessCollector(None, path=str(folder)).collect():
        if m.name == "medsam2_model_loaded":
            total += int(sum(s.value for s in m.samples))
    return total


class ReadinessCollector(Collector):
    """``medsam2_ready{check}`` and ``medsam2_destination_up{destination}`` at scrape time."""

    def __init__(self, readiness: Readiness) -> None:
        self.readiness = readiness

    def collect(self) -> Iterable[Metric]:
        result = self.readiness.run()
        ready = GaugeMetricFamily("medsam2_ready", "1 when the readiness check passes (see /readyz)", labels=["check"])
        for name, c in result["checks"].items():
            ready.add_metric([name], 1.0 if c["ok"] else 0.0)
        yield ready
        up = GaugeMetricFamily("medsam2_destination_up", "1 when the destination answered C-ECHO",
                               labels=["destination"])
        for label, why in self.readiness.destination_results().items():
            up.add_metric([label], 1.0 if why is None else 0.0)
        yield up


class ModelCardCollector(Collector):
    """What the model card says, to compare the live rates with (``medsam2_model_card_ood_rate``)."""

    def __init__(self, bundle: Path, overridden: Iterable[str] = ()) -> None:
        self.bundle = bundle
        self.overridden = tuple(overridden)  # [model] operating_points keys: those labels have no drift range

    def collect(self) -> Iterable[Metric]:
        from models.bundle import read_card

        try:
            card = read_card(self.bundle)
        except Exception:  # noqa: BLE001 - not built yet: /readyz says so; no series until then
            return
        model = metrics.model_label(card["digest"])
        info = GaugeMetricFamily("medsam2_model_info", "The configured bundle", labels=["model", "name", "version"])
        info.add_metric([model, str(card.get("name", "")), str(card.get("version", ""))], 1.0)
        yield info
        rate = card_ood_rate(card)
        if rate is not None:
            g = GaugeMetricFamily("medsam2_model_card_ood_rate", "Share of in-distribution images the model card "
                                  "expects flagged out of distribution", labels=["model"])
            g.add_metric([model], rate)
            yield g
        yield from drift_range_metrics(card, model, self.overridden)


def drift_range_metrics(card: dict, model: str, overridden: Iterable[str] = ()) -> Iterable[Metric]:
    """The card's drift range (models.drift) as ``medsam2_model_card_drift_low``/``_high``
    {statistic, label} and the day size it holds for; ``medsam2_model_card_drift_recorded`` 0 for
    a card written before the range was (no range series then: nothing to compare with)."""
    from models.drift import DriftReferenceMissing, card_reference

    recorded = GaugeMetricFamily("medsam2_model_card_drift_recorded", "1 when the model card holds the drift range "
                                 "seen at validation (0: a bundle built before it was; rebuild to compare)",
                                 labels=["model"])
    try:
        ref = card_reference(card, overridden)
    except DriftReferenceMissing:
        recorded.add_metric([model], 0.0)
        yield recorded
        return
    recorded.add_metric([model], 1.0)
    yield recorded
    low = GaugeMetricFamily("medsam2_model_card_drift_low", "Lowest daily figure seen at validation (models.drift)",
                            labels=["model", "statistic", "label"])
    high = GaugeMetricFamily("medsam2_model_card_drift_high", "Highest daily figure seen at validation (models.drift)",
                             labels=["model", "statistic", "label"])
    ranges = [("positive_rate", k, v) for k, v in ref["positive_rate"].items()]
    ranges += [("ood_rate", "", ref["ood_rate"]), ("mean_radius", "", ref["mean_radius"])]
    for statistic, label, (lo, hi) in ranges:
        low.add_metric([model, statistic, label], float(lo))
        high.add_metric([model, statistic, label], float(hi))
    yield low
    yield high
    day = GaugeMetricFamily("medsam2_model_card_drift_day_images", "Images a day needs before its drift figures "
                            "are compared with the range", labels=["model"])
    day.add_metric([model], float(ref["day_images"]))
    yield day


def card_ood_rate(card: dict) -> float | None:
    """The OOD rate the card expects on in-distribution images: its threshold is this percentile
    of the validation scores, so 1 - percentile/100 of them lie above it."""
    ood = card.get("ood", {})
    if "expected_rate" in ood:
        return float(ood["expected_rate"])
    if "percentile_of_validation" in ood:
        return 1.0 - float(ood["percentile_of_validation"]) / 100.0
    return None


def create_app(settings: Settings, readiness: Readiness | None = None) -> FastAPI:
    """The node's HTTP app. ``readiness`` is a seam for tests (e.g. a fake C-ECHO)."""
    readiness = readiness or Readiness(settings)
    node = Node(settings)
    registry = metrics.registry(
        metrics.NodeCollector(node.jobs, node.spool, [s.value for s in JobState]),
        ReadinessCollector(readiness),
        ModelCardCollector(settings.bundle_path, settings.model.operating_points),
    )
    app = FastAPI(title="medsam2-cxr", docs_url=None, redoc_url=None)  # OpenAPI at /openapi.json

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        result = readiness.run()
        return JSONResponse(result, status_code=200 if result["ready"] else 503)

    from console.web import build_router  # the pages, login and JSON API

    app.include_router(build_router(settings))
    from dicom_node.stow import build_router as stow_router  # STOW-RS in: POST /dicomweb/studies

    app.include_router(stow_router(settings, *node.intake_parts(), enqueue=node.enqueue_infer,
                                   objects=node.objects))
    return app


class ConsoleServer:
    """uvicorn serving an app in a daemon thread; :meth:`stop` ends it."""

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        import uvicorn

        tls = settings.node.tls
        ssl: dict[str, Any] = {}
        if tls.cert:
            from dicom_node.tls import BCP195_CIPHERS

            ssl = {"ssl_certfile": tls.cert, "ssl_keyfile": tls.key or None, "ssl_ciphers": BCP195_CIPHERS}
        self.scheme = "https" if ssl else "http"
        self.address = f"{settings.console.host}:{settings.console.port}"
        config = uvicorn.Config(app, host=settings.console.host, port=settings.console.port, log_config=None,
                                access_log=False, lifespan="off", log_level="warning", **ssl)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="console", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run()
        except SystemExit:  # uvicorn exits when it cannot bind: start() reports it
            pass

    def start(self, timeout: float = 15.0) -> ConsoleServer:
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError(f"console: cannot serve on {self.address} "
                                   "(port in use, or TLS certificate unreadable?)")
            time.sleep(0.05)
        log.info("console.started", url=f"{self.scheme}://{self.address}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def serve_in_thread(settings: Settings) -> ConsoleServer:
    """The node's HTTP app on [console] host:port in a daemon thread of this process."""
    return ConsoleServer(create_app(settings), settings).start()
