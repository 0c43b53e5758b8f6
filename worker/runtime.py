"""Everything a process needs to run pipeline steps, built from settings once per process.

The predictor (and torch's CUDA) is created lazily on the first inference, in the worker
process itself, never before a fork.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field

from dicom_node.audit import AuditLog
from dicom_node.jobstore import JobStore
from dicom_node.sender import Destination, send_with_retry
from dicom_node.spool import Spool
from worker.pipeline import Context
from worker.settings import Settings


@dataclass
class Runtime:
    settings: Settings
    ctx: Context
    _predictor: object = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Runtime":
        root = settings.spool
        ctx = Context(spool=Spool(root, min_free_bytes=settings.node.min_free_mb * 2**20),
                      jobs=JobStore(root / "jobs.sqlite"), audit=AuditLog(root / "audit.jsonl"),
                      lease_s=settings.worker.lease_s)
        return cls(settings=settings, ctx=ctx)

    def predictor(self):
        with self._lock:
            if self._predictor is None:
                from models.bundle import load_bundle
                from models.predictor import Predictor

                self._predictor = Predictor(load_bundle(self.settings.bundle_path), device=self.settings.model.device or None)
            return self._predictor

    def destination_for(self, calling_aet: str) -> Destination:
        d = self.settings.destination.for_caller(calling_aet)
        return Destination(ae_title=d.ae_title, host=d.host, port=d.port)

    def send(self, files, dest: Destination) -> None:
        s = self.settings.sender
        send_with_retry(files, dest, attempts=s.attempts, backoff_s=s.backoff_s, max_backoff_s=s.max_backoff_s,
                        calling_ae=self.settings.node.ae_title, timeout=s.timeout_s)


@functools.cache
def runtime_for(settings_json: str) -> Runtime:
    return Runtime.from_settings(Settings.model_validate_json(settings_json))
