"""Everything a process needs to run pipeline steps, built from settings once per process.

The predictor (and torch's CUDA) is created lazily on the first inference, in the worker
process itself, never before a fork; the similar cases index likewise on the first draft.
"""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from dicom_node import metrics
from dicom_node.audit import AuditLog
from dicom_node.jobstore import JobStore
from dicom_node.sender import Destination, retry_window_s, send_with_retry
from dicom_node.spool import Spool
from worker import decoding
from worker.pipeline import Context
from worker.settings import Settings

log = structlog.get_logger()


@dataclass
class Runtime:
    settings: Settings
    ctx: Context
    _predictor: object = None
    _decoder: Executor | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Runtime":
        root = settings.spool
        index = settings.index_path
        ctx = Context(spool=Spool(root, min_free_bytes=settings.node.min_free_mb * 2**20),
                      jobs=JobStore(root / "jobs.sqlite"), audit=AuditLog(root / "audit.jsonl"),
                      lease_s=settings.worker.lease_s,
                      send_lease_s=retry_window_s(settings.sender.attempts, settings.sender.backoff_s,
                                                  settings.sender.max_backoff_s, settings.sender.timeout_s),
                      reporter=(LazyReporter(index, settings.index.extractor, settings.report.language)
                                if index is not None else None),
                      language=settings.report.language)
        return cls(settings=settings, ctx=ctx)

    def predictor(self):
        with self._lock:
            if self._predictor is None:
                from models.bundle import load_bundle
                from models.predictor import Predictor

                self._predictor = Predictor(load_bundle(self.settings.bundle_path, self.settings.model.operating_points),
                                            device=self.settings.model.device or None)
                device = self._predictor.device
                metrics.MODEL_LOADED.labels(model=metrics.model_label(self._predictor.bundle.digest),
                                            device=str(device)).set(1)
                if device.type == "cuda":
                    start_gpu_sampler(device)
            return self._predictor

    def decoder(self, processes: int) -> Executor:
        """The GPU worker's decode processes (worker.decoding), started once and kept; started
        again when a killed process broke the pool (its jobs were given back, see worker.failures)."""
        with self._lock:
            if self._decoder is None or getattr(self._decoder, "_broken", False):
                self._decoder = decoding.start(processes)
            return self._decoder

    def destination_for(self, calling_aet: str) -> Destination:
        from dicom_node.tls import client_context

        d = self.settings.destination.for_caller(calling_aet)
        tls = (client_context(d.tls.ca, d.tls.cert or None, d.tls.key or None, d.tls.check_hostname)
               if d.tls.ca else None)
        return Destination(ae_title=d.ae_title, host=d.host, port=d.port, tls=tls)

    def send(self, files, dest: Destination) -> None:
        from dicom_node.pause import Pauses

        Pauses(self.settings.spool).check(dest.ae_title, dest.host, dest.port)  # paused: the job waits
        s = self.settings.sender
        send_with_retry(files, dest, attempts=s.attempts, backoff_s=s.backoff_s, max_backoff_s=s.max_backoff_s,
                        calling_ae=self.settings.node.ae_title, timeout=s.timeout_s)


def sample_gpu(device) -> None:
    """Set the GPU gauges (dicom_node.metrics) from torch's allocator, and utilisation from NVML
    when nvidia-ml-py is installed. Only in the process that owns the device (the GPU worker)."""
    import torch

    label = str(device)
    metrics.GPU_MEMORY_ALLOCATED.labels(device=label).set(torch.cuda.memory_allocated(device))
    metrics.GPU_MEMORY_RESERVED.labels(device=label).set(torch.cuda.memory_reserved(device))
    metrics.GPU_MEMORY_PEAK.labels(device=label).set(torch.cuda.max_memory_allocated(device))
    metrics.GPU_MEMORY_TOTAL.labels(device=label).set(torch.cuda.get_device_properties(device).total_memory)
    try:
        import pynvml  # nvidia-ml-py, optional
    except ImportError:
        return
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        metrics.GPU_UTILIZATION.labels(device=label).set(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
    except pynvml.NVMLError as exc:
        log.warning("gpu.nvml_unavailable", error=str(exc))


def start_gpu_sampler(device, every_s: float = 5.0) -> threading.Thread:
    """Sample the GPU every ``every_s`` seconds in a daemon thread of the GPU worker."""
    def loop() -> None:
        while True:
            try:
                sample_gpu(device)
            except Exception:  # noqa: BLE001 - metrics must never stop the worker
                log.exception("gpu.sample_failed")
                return
            time.sleep(every_s)

    t = threading.Thread(target=loop, name="gpu-metrics", daemon=True)
    t.start()
    return t


class LazyReporter:
    """The similar cases index and drafter, opened on the first draft in the process that uses them.

    An index that cannot be opened does not stop the node: drafts are written from the findings
    alone and say why there are no similar cases; the error is logged once.
    """

    def __init__(self, folder: Path, extractor: str = "lexicon", language: str = "en") -> None:
        from index.wording import wording_for

        self.folder, self.extractor = folder, extractor
        self.wording = wording_for(language)  # an unknown language fails here, not on the first draft
        self._reporter = None
        self._why = ""
        self._lock = threading.Lock()

    def _load(self):
        from index.draft import Drafter, open_reporter
        from index.labelers import get_extractor

        try:
            return open_reporter(self.folder, self.extractor, language=self.wording)
        except (ValueError, OSError) as exc:  # StoreError is a ValueError
            log.error("index.cannot_open", folder=str(self.folder), error=str(exc))
            self._why = self.wording.index_unopenable.format(folder=self.folder)
            return Drafter(get_extractor(self.extractor), wording=self.wording)

    def __call__(self, prediction, digest: str):
        with self._lock:
            if self._reporter is None:
                self._reporter = self._load()
        if self._why:
            return self._reporter.draft(prediction, None, why_none=self._why)
        return self._reporter(prediction, digest)


@functools.cache
def runtime_for(settings_json: str) -> Runtime:
    return Runtime.from_settings(Settings.model_validate_json(settings_json))
