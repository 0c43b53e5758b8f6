"""Every file and folder in the spool, named once.

The spool is one folder on one filesystem that holds all the node's state; everything that
builds a path inside it asks a :class:`SpoolLayout` instead of joining names itself, so a
newcomer reads the layout here and a rename happens in one place::

    jobs.sqlite                  the job table (dicom_node.jobstore): the source of truth
    reports.sqlite               first readers' reports, comparisons, discrepancies (ris.reportstore)
    audit.jsonl                  the audit trail (dicom_node.audit)
    incoming/ results/ dead-letter/ quarantine/ tmp/
                                 received instances, results owed, given up, refused, partial writes
                                 (dicom_node.spool)
    metrics/                     prometheus-client's multiprocess files (dicom_node.metrics_dir)
    secrets/<name>.key           keys the node made itself (dicom_node.lookup)
    paused/                      destinations an operator paused (dicom_node.pause)
    broker/queue|processed|control
                                 Celery's filesystem transport when no broker URL is set (worker.app)
    models/default/              the default bundle built on first start (worker.model_build)
    models/<checkpoint>          MedSAM2 weights fetched by `medsam2-cxr model pull`
    index/                       the default similar-cases index (worker.model_build)
    cache/features/              encoder features of the default build, kept across restarts
    model-build.json, .model-build.lock
                                 the default build's progress file and its one-at-a-time lock
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SpoolLayout:
    """The paths of one spool (``root``); nothing here touches the disk."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # -- the job table and the audit trail ----------------------------------------------------
    @property
    def jobs(self) -> Path:
        return self.root / "jobs.sqlite"

    @property
    def reports(self) -> Path:
        return self.root / "reports.sqlite"

    @property
    def audit(self) -> Path:
        return self.root / "audit.jsonl"

    # -- the durable file store (dicom_node.spool) ----------------------------------------------
    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def dead_letter(self) -> Path:
        return self.root / "dead-letter"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    # -- what the node's processes share ---------------------------------------------------------
    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    def secret(self, name: str) -> Path:
        return self.secrets / f"{name}.key"

    @property
    def paused(self) -> Path:
        return self.root / "paused"

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    def broker_folder(self, name: str) -> Path:
        """One of the filesystem transport's folders: queue, processed or control."""
        if name not in ("queue", "processed", "control"):
            raise ValueError(f"no broker folder {name!r}: queue, processed or control")
        return self.broker / name

    # -- the first start's model and index -------------------------------------------------------
    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def default_bundle(self) -> Path:
        return self.models / "default"

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def feature_cache(self) -> Path:
        return self.root / "cache" / "features"

    @property
    def model_build_progress(self) -> Path:
        return self.root / "model-build.json"

    @property
    def model_build_lock(self) -> Path:
        return self.root / ".model-build.lock"

    def partial(self, final: Path) -> Path:
        """Where a folder is built before it is renamed into place whole (``<final>.partial``)."""
        return final.with_name(final.name + ".partial")
