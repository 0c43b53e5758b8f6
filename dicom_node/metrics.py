"""Every Prometheus metric of the node, defined once; incremented where the events happen.

Why here: the listener (dicom_node) and the workers (worker) both record metrics, and
dicom_node never imports worker, so the one module that defines them lives in the lower package.
It imports only prometheus-client and the job store and spool it reads at scrape time; the
GPU is sampled by the GPU worker (worker.runtime), which sets the gauges defined here.

Processes: under `up` (and `listen` + `worker` on one host) prometheus-client runs in its
multiprocess mode. ``PROMETHEUS_MULTIPROC_DIR`` (``<spool>/metrics``) is set by the command
before prometheus-client is first imported (dicom_node.metrics_dir, which also allocates each
process's files so that a full spool cannot kill it), so every process (the listener, the Celery workers
and their prefork children) writes its own memory-mapped files there and the HTTP app
(console.app) adds them up at scrape time. Gauges that belong to a live process (GPU memory,
model loaded) are ``live*`` gauges: :func:`sweep_dead` removes the files of processes that are
gone. Without the variable (unit tests, the offline commands) the metrics live in the default
registry of the one process.

Counters count events (instances, predictions, failures); what is a state (jobs per state, the
oldest queued job, spool space) is read by a collector at scrape time (:class:`NodeCollector`),
never kept as counters that can drift. Rates are ratios in PromQL: e.g. the OOD rate is
``rate(medsam2_predictions_ood_total[1h]) / rate(medsam2_predictions_total[1h])``, to compare
with ``medsam2_model_card_ood_rate`` (the drift the model card can be compared with).
"""

from __future__ import annotations

import glob
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

from dicom_node import metrics_dir
from dicom_node.database import StoreUnavailable
from dicom_node.metrics_dir import ENV

UNKNOWN_AE = "unknown"  # a connection refused or violating before any association request was read
OTHER_AE = "other"  # calling AE titles past the cap (see AeLabels)
NOT_ALLOWED_AE = "not_allowed"  # refused because it is not on [node] allowed_calling_aets

# ---------------------------------------------------------------- the listener

INSTANCES_RECEIVED = Counter("medsam2_instances_received", "Instances stored and queued for inference",
                             ["calling_aet"])
INSTANCES_SKIPPED = Counter("medsam2_instances_skipped", "Instances stored and not processed (not a frontal "
                            "chest image, our own result, a duplicate)", ["calling_aet"])
INSTANCES_QUARANTINED = Counter("medsam2_instances_quarantined", "Instances or PDUs refused as malformed and kept "
                                "in the quarantine (0xC000, or an aborted association)", ["calling_aet"])
INSTANCES_REFUSED = Counter("medsam2_instances_refused", "C-STOREs answered with a failure the sender may retry "
                            "(out of resources: spool full; processing failure)", ["calling_aet", "reason"])
ASSOCIATIONS_REFUSED = Counter("medsam2_associations_refused", "Associations or connections refused (AE title "
                               "or address not allowed, association limits)", ["calling_aet"])

# ---------------------------------------------------------------- the workers

TIME_TO_STORED = Histogram("medsam2_receipt_to_stored_seconds", "From receipt of the instance to its results "
                           "stored at the destination", buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600))
MODEL_STEP = Histogram("medsam2_model_step_seconds", "One batch's model step (encoder, head, BL-TTA, calibration, "
                       "saliency)", buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
SEND = Histogram("medsam2_send_seconds", "Sending one job's results, retries included", ["destination"],
                 buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900))
BATCH_SIZE = Histogram("medsam2_batch_size", "Images per model step", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
JOBS_FAILED = Counter("medsam2_jobs_failed", "Jobs ended in 'failed' (decode, infer, encode, send, worker lost)",
                      ["stage"])
DEAD_LETTERS = Counter("medsam2_dead_letters", "Jobs whose results went to the dead-letter folder after the "
                       "last send attempt", ["destination"])
SEND_ATTEMPTS_FAILED = Counter("medsam2_send_attempts_failed", "Send attempts that failed (each retry counts)",
                               ["destination"])
SHADOW_JOBS = Counter("medsam2_jobs_shadow", "Jobs done in shadow mode ([node] mode = \"shadow\"): results kept "
                      "in the spool, sent to no PACS, RIS or FHIR server (qa: the QA destination, or none)", ["qa"])
PREDICTIONS = Counter("medsam2_predictions", "Images the model predicted", ["model"])
PREDICTIONS_OOD = Counter("medsam2_predictions_ood", "Predictions flagged out of distribution", ["model"])
PREDICTIONS_URGENT = Counter("medsam2_predictions_urgent", "Predictions that made their study urgent "
                             "([urgent] rules: a Key Object Selection, C-STORE priority HIGH)", ["model"])
POSITIVES = Counter("medsam2_findings_positive", "Predictions with the finding present (above its threshold)",
                    ["model", "label"])
# ---------------------------------------------------------------- the second read (ris/intake.py)

REPORTS_RECEIVED = Counter("medsam2_reports_received", "First readers' reports kept for the second read (HL7 "
                           "ORU^R01 over MLLP, or a Basic Text SR from the PACS)", ["source"])
REPORTS_REFUSED = Counter("medsam2_reports_refused", "HL7 messages answered AE: not readable as a report "
                          "(the ACK names why)", ["reason"])
DISCREPANCIES = Counter("medsam2_discrepancies", "Findings the model and the first reader's report disagree on "
                        "([second_read]: the model calls it present at a confident tier, the report is negative "
                        "or silent; and the other way round when configured)", ["label"])

# Drift per site (label calling_aet, bounded by AeLabels; not "site", which scrape configs set per node) against the model card's validation range
# (models.drift): daily rates are increase(...[1d]) ratios, e.g. the recording rules in deploy/prometheus.
DRIFT_IMAGES = Counter("medsam2_drift_images", "Images predicted, per site (calling AE title)", ["model", "calling_aet"])
DRIFT_POSITIVES = Counter("medsam2_drift_positive", "Images with the finding present, per site", ["model", "calling_aet", "label"])
DRIFT_OOD = Counter("medsam2_drift_ood", "Images flagged out of distribution, per site", ["model", "calling_aet"])
DRIFT_RADIUS = Counter("medsam2_drift_radius", "Sum over images of the mean box radius (mean of r over the latent "
                       "dimensions), per site: divided by medsam2_drift_images_total, the mean radius", ["model", "calling_aet"])
MODEL_LOADED = Gauge("medsam2_model_loaded", "GPU worker processes with the model loaded", ["model", "device"],
                     multiprocess_mode="livesum")
GPU_MEMORY_ALLOCATED = Gauge("medsam2_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated", ["device"],
                             multiprocess_mode="livesum")
GPU_MEMORY_RESERVED = Gauge("medsam2_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved (the caching "
                            "allocator's hold)", ["device"], multiprocess_mode="livesum")
GPU_MEMORY_PEAK = Gauge("medsam2_gpu_memory_peak_bytes", "torch.cuda.max_memory_allocated since the worker "
                        "started", ["device"], multiprocess_mode="livemax")
GPU_MEMORY_TOTAL = Gauge("medsam2_gpu_memory_total_bytes", "The device's memory", ["device"],
                         multiprocess_mode="livemax")
GPU_UTILIZATION = Gauge("medsam2_gpu_utilization_ratio", "Share of time a kernel ran (NVML; only with "
                        "nvidia-ml-py installed)", ["device"], multiprocess_mode="livemax")


def destination_label(dest) -> str:
    """The ``destination`` label of a destination (``ae_title``, ``host``, ``port``): AE@host:port."""
    return f"{dest.ae_title}@{dest.host}:{dest.port}"


def model_label(digest: str) -> str:
    """The ``model`` label: the bundle digest's first 12 characters (as `up` prints it)."""
    return digest[:12]


def record_prediction(digest: str, prediction, urgent: bool = False) -> None:
    """Count one prediction (a models.prediction.Prediction): its OOD flag, whether it made its
    study urgent (models.urgency) and each finding present. Every label's series exists from the
    first prediction on (at 0), so a rate is 0, not missing."""
    m = model_label(digest)
    PREDICTIONS.labels(model=m).inc()
    ood = PREDICTIONS_OOD.labels(model=m)
    if prediction.out_of_distribution:
        ood.inc()
    flagged = PREDICTIONS_URGENT.labels(model=m)
    if urgent:
        flagged.inc()
    for finding in prediction.findings:
        positive = POSITIVES.labels(model=m, label=finding.label)
        if finding.present:
            positive.inc()


def record_drift(digest: str, site: str, prediction) -> None:
    """Count one prediction towards its site's drift figures (models.drift); ``site`` is already a
    bounded label value (AeLabels). Every label's series exists from the site's first image on."""
    m = model_label(digest)
    DRIFT_IMAGES.labels(model=m, calling_aet=site).inc()
    ood = DRIFT_OOD.labels(model=m, calling_aet=site)
    if prediction.out_of_distribution:
        ood.inc()
    radius = float(prediction.radius.mean()) if prediction.radius.size else 0.0
    DRIFT_RADIUS.labels(model=m, calling_aet=site).inc(max(0.0, radius))
    for finding in prediction.findings:
        positive = DRIFT_POSITIVES.labels(model=m, calling_aet=site, label=finding.label)
        if finding.present:
            positive.inc()


class AeLabels:
    """Calling AE titles as label values, with a bounded number of them.

    A calling AE title is whatever the peer sends: without an allow list a peer could make a
    new series per association. Allowed titles are always their own label; without an allow
    list the first ``cap`` distinct titles are, the rest count as ``other``.
    """

    def __init__(self, allowed: Iterable[str] = (), cap: int = 64) -> None:
        self.allowed = frozenset(allowed)
        self.cap = cap
        self._seen: set[str] = set()
        self._lock = threading.Lock()  # one listener thread per association

    def __call__(self, calling_aet: str | None) -> str:
        if not calling_aet:
            return UNKNOWN_AE
        if self.allowed:
            return calling_aet if calling_aet in self.allowed else NOT_ALLOWED_AE
        with self._lock:
            if calling_aet in self._seen:
                return calling_aet
            if len(self._seen) < self.cap:
                self._seen.add(calling_aet)
                return calling_aet
        return OTHER_AE


# ---------------------------------------------------------------- processes

def multiprocess_dir() -> Path | None:
    """The multiprocess folder when this process runs in that mode, else None."""
    value = os.environ.get(ENV)
    return Path(value) if value else None


def sweep_dead(folder: Path, alive: Callable[[int], bool] = metrics_dir.alive) -> list[int]:
    """Mark processes that are gone as dead (their ``live*`` gauges stop counting); returns their pids.

    Their counters and histograms stay: what they counted happened. Run at scrape time, so a
    worker killed by a signal (no exit hook runs) is marked too.
    """
    dead = sorted(pid for pid in metrics_dir.pids(folder) if not alive(pid)
                  and glob.glob(str(folder / f"gauge_live*_{pid}.db")))
    for pid in dead:
        multiprocess.mark_process_dead(pid, str(folder))
    return dead


class _Default(Collector):
    """The default registry of this process (single-process mode), as one collector."""

    def collect(self) -> Iterable[Metric]:
        yield from REGISTRY.collect()


def registry(*collectors: Collector) -> CollectorRegistry:
    """A registry for one HTTP app: the node's metrics (every process's in multiprocess mode, this
    process's otherwise) and ``collectors`` read at scrape time."""
    reg = CollectorRegistry(auto_describe=False)
    folder = multiprocess_dir()
    if folder is not None:
        reg.register(_Sweeping(folder))
    else:
        reg.register(_Default())
    for c in collectors:
        reg.register(c)
    return reg


class _Sweeping(Collector):
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._inner = multiprocess.MultiProcessCollector(None, path=str(folder))

    def collect(self) -> Iterable[Metric]:
        sweep_dead(self.folder)
        yield from self._inner.collect()


# ---------------------------------------------------------------- read at scrape time

class NodeCollector(Collector):
    """Jobs per state and the oldest queued job (the job store), and free spool space.

    ``jobs`` is a :class:`dicom_node.jobstore.JobStore`, ``spool`` a :class:`dicom_node.spool.Spool`.
    """

    def __init__(self, jobs, spool, states: Iterable[str], clock: Callable[[], float] = time.time) -> None:
        self.jobs, self.spool, self.states, self.clock = jobs, spool, tuple(states), clock

    def collect(self) -> Iterable[Metric]:
        try:
            counts = self.jobs.counts()
            oldest = self.jobs.oldest_created_at("queued")
        except StoreUnavailable:  # [store] url's database away: the spool's gauges still come, the jobs' do not
            counts = None
        yield GaugeMetricFamily("medsam2_store_up", "1 when the job store answered this scrape, else 0 "
                                "(a [store] url database unreachable)", value=float(counts is not None))
        if counts is not None:
            per_state = GaugeMetricFamily("medsam2_jobs", "Jobs per state in the job store", labels=["state"])
            for state in self.states:
                per_state.add_metric([state], counts.get(state, 0))
            yield per_state
            yield GaugeMetricFamily("medsam2_oldest_queued_job_age_seconds",
                                    "Seconds since the oldest job still waiting for inference was received (0: none)",
                                    value=0.0 if oldest is None else max(0.0, self.clock() - oldest))
        yield GaugeMetricFamily("medsam2_spool_free_bytes", "Free space on the spool's filesystem",
                                value=self.spool.free_bytes())
        yield GaugeMetricFamily("medsam2_spool_min_free_bytes", "Below this free space the listener refuses "
                                "instances (out of resources)", value=self.spool.min_free_bytes)
