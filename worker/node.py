"""The composition root: one node's settings become its parts here, and nowhere else.

Every command and process of the node (`up`, `listen`, `worker`, `console`, `status`, `audit`,
`resend`, the Celery tasks, the HTTP app, the benchmarks) asks a :class:`Node` for the listener's
configuration, the destinations, the spool, the job store, the audit log and the pipeline's
context, instead of reading settings and joining spool paths itself. Each part is made on first
use and then shared, all with the node's one clock (worker.clock) and its spool layout
(dicom_node.layout).

Imports of modules that load prometheus-client (the listener, the pipeline, the sender) wait for
the method that needs them: a command prepares the metrics folder first (dicom_node.metrics_dir).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.audit import AuditLog
from dicom_node.database import Database
from dicom_node.jobstore import JobStore
from dicom_node.layout import SpoolLayout
from dicom_node.lookup import spool_secret
from dicom_node.objects import Objects, SpoolObjects, fetch_folder, open_objects, publish_folder
from dicom_node.pause import Pauses
from dicom_node.spool import Spool
from dicom_node.stores import open_database
from worker import settings as config
from worker.clock import SYSTEM, Clock
from worker.settings import Settings

if TYPE_CHECKING:
    from dicom_node.audit_copy import AuditCopy
    from dicom_node.listener import ListenerConfig
    from dicom_node.sender import ResultDestination
    from models.prediction import Prediction
    from ris.inbound import ReportListener
    from ris.intake import SecondReader
    from ris.ledger import Ledger
    from ris.reportstore import ReportStore
    from worker.pipeline import Context, Reporter


def destination(d: config.Destination) -> ResultDestination:
    """A configured destination ([destination] or one of its routes) as the sender takes it:
    C-STORE or STOW-RS by its type, with its TLS context (dicom_node.destinations)."""
    from dicom_node.destinations import open_destination

    return open_destination(d)


class Node:
    """What one node's settings make. Parts are made on first use and shared by whoever asks."""

    def __init__(self, settings: Settings, clock: Clock = SYSTEM) -> None:
        self.settings = settings
        self.clock = clock
        self.layout: SpoolLayout = settings.layout

    # -- state in the spool ---------------------------------------------------------------------
    @cached_property
    def spool(self) -> Spool:
        return Spool(self.layout.root, min_free_bytes=self.settings.node.min_free_mb * 2**20)

    def database(self, sqlite_path: Path) -> Database:
        """[store] url's database, or (empty) the SQLite file ``sqlite_path`` of the spool."""
        st = self.settings.store
        return open_database(st.url, sqlite_path, pool_size=st.pool_size, timeout_s=st.timeout_s)

    @cached_property
    def objects(self) -> Objects:
        """Instances, predictions and results: the spool itself, or [objects] url's S3 store with the
        spool as this host's scratch (dicom_node.objects)."""
        o = self.settings.objects
        return open_objects(o.url, o.endpoint, self.spool)

    # -- what every host loads: the model bundle and the similar-cases index ---------------------------
    SHARED = ("bundle", "index")

    def shared_folder(self, name: str) -> Path:
        """This host's path of the bundle or the index (settings.bundle_path, <spool>/index or [index] path)."""
        if name == "bundle":
            return self.settings.bundle_path
        if name == "index":
            return self.settings.index_path or self.layout.index
        raise ValueError(f"no shared folder {name!r}: {' or '.join(self.SHARED)}")

    def publish_shared(self) -> list[str]:
        """Put this host's bundle and index (those it has) into an S3 object store as shared/<name>,
        with their digests, for GPU and io workers on hosts that share nothing else. Returns what
        was published; nothing with the spool as the store (every process reads the spool's own)."""
        if isinstance(self.objects, SpoolObjects):
            return []
        done = []
        for name in self.SHARED:
            folder = self.shared_folder(name)
            if folder.is_dir():
                publish_folder(self.objects, folder, f"shared/{name}")
                done.append(name)
        return done

    def fetch_shared(self, name: str) -> Path | None:
        """The bundle or index this host uses: its own, or, with an S3 store and none here, the one
        published under shared/<name>, fetched into the spool and checked by digest
        (dicom_node.objects.fetch_folder). None when there is none anywhere."""
        folder = self.shared_folder(name)
        own = self.settings.model.bundle if name == "bundle" else self.settings.index.path
        if isinstance(self.objects, SpoolObjects) or own:
            return folder if folder.is_dir() else None
        try:
            return fetch_folder(self.objects, f"shared/{name}", folder)
        except FileNotFoundError:  # not published (yet): this host's own, if any
            return folder if folder.is_dir() else None

    @cached_property
    def jobs(self) -> JobStore:
        return JobStore(self.database(self.layout.jobs), clock=self.clock.time)

    @cached_property
    def ledger(self) -> Ledger:
        """Which targets have a job's results: in the job store's database."""
        from ris.ledger import Ledger

        return Ledger(self.jobs.db, clock=self.clock.time)

    @cached_property
    def audit(self) -> AuditLog:
        """This host's trail in the spool; with a shared store, also a copy there (dicom_node.audit_copy)."""
        copy = self.audit_copy
        return AuditLog(self.layout.audit, clock=self.clock.time, copy=copy)

    @cached_property
    def audit_copy(self) -> AuditCopy | None:
        """Every host's audit records in the shared store ([store] url); None without one."""
        if not self.settings.store.url:  # the embedded default opens no database for its trail
            return None
        from dicom_node.audit_copy import AuditCopy

        return AuditCopy(self.jobs.db)

    @cached_property
    def pauses(self) -> Pauses:
        """Paused destinations: in the spool, or with [store] url in the store every host's senders read."""
        return Pauses(self.layout.root, db=self.jobs.db if self.settings.store.url else None)

    def secret(self, name: str, configured: str = "") -> bytes:
        """A configured secret, or the key the node made once in <spool>/secrets/<name>.key."""
        return spool_secret(self.layout.root, name, configured)

    # -- the broker -----------------------------------------------------------------------------
    @cached_property
    def enqueuers(self) -> tuple[Callable[[str], None], Callable[[str], None]]:
        """(enqueue_infer, enqueue_send) on this node's broker; its Celery app is made on first use,
        so a console or STOW-RS app that never queues a job never connects to a broker."""
        from worker.app import enqueuers, make_app

        return enqueuers(make_app(self.settings))

    def enqueue_infer(self, job_id: str) -> None:
        self.enqueuers[0](job_id)

    # -- the listener ---------------------------------------------------------------------------
    def listener_config(self, **overrides: Any) -> ListenerConfig:
        """[node] as the listener takes it; ``overrides`` replace fields (tests, benchmarks)."""
        from dicom_node.listener import ListenerConfig
        from dicom_node.tls import server_context

        n = self.settings.node
        tls = server_context(n.tls.cert, n.tls.key, n.tls.ca or None, n.tls.require_client_cert) if n.tls.cert else None
        cfg = ListenerConfig(ae_title=n.ae_title, host=n.host, port=n.port,
                             allowed_calling_aets=tuple(n.allowed_calling_aets),
                             allowed_addresses=tuple(n.allowed_addresses), max_associations=n.max_associations,
                             max_associations_per_address=n.max_associations_per_address,
                             max_pending_per_address=n.max_pending_per_address, max_pending=n.max_pending,
                             association_request_timeout=n.association_request_timeout_s,
                             max_pdu_length=n.max_pdu_length, tls=tls, reuse_port=n.processes > 1,
                             # empty: start_listener reads (or makes) the spool's own key
                             lookup_key=self.secret("lookup", n.lookup_secret) if n.lookup_secret else b"")
        return dataclasses.replace(cfg, **overrides)

    def intake_parts(self) -> tuple[ListenerConfig, Spool, JobStore, AuditLog, bytes]:
        """What accepting an instance needs, for the STOW-RS routes (dicom_node.stow.build_router)
        as for the C-STORE listener: the same spool, job store, audit log and lookup key."""
        n = self.settings.node
        return self.listener_config(), self.spool, self.jobs, self.audit, self.secret("lookup", n.lookup_secret)

    # -- destinations and sending ---------------------------------------------------------------
    def destinations(self) -> list[tuple[str, ResultDestination]]:
        """(calling AE title, destination): the default ("") first, then each route by caller."""
        d = self.settings.destination
        return [("", destination(d)), *((caller, destination(r)) for caller, r in sorted(d.routes.items()))]

    def destination_for(self, calling_aet: str) -> ResultDestination:
        """Where the results of a study sent by ``calling_aet`` go."""
        return destination(self.settings.destination.for_caller(calling_aet))

    @property
    def shadow(self) -> bool:
        """[node] mode = "shadow": nothing goes to the PACS, RIS or FHIR server (worker.pipeline)."""
        return self.settings.node.mode == "shadow"

    def qa_destination(self) -> ResultDestination | None:
        """[node.qa_destination]: where shadow mode sends the DICOM results; None: nowhere."""
        qa = self.settings.node.qa_destination
        return None if qa is None else destination(qa)

    def site_labels(self) -> Callable[[str], str]:
        """Calling AE title -> the `site` label of the drift metrics, bounded (dicom_node.metrics.AeLabels):
        with an allow list, its titles and the DICOMweb clients' names are their own labels."""
        from dicom_node.metrics import AeLabels

        allowed = self.settings.node.allowed_calling_aets
        return AeLabels([*allowed, *(c.name for c in self.settings.dicomweb.clients)] if allowed else ())

    def mode(self) -> dict:
        """The node's mode as `status` and the console show it."""
        qa = self.settings.node.qa_destination
        out: dict = {"mode": self.settings.node.mode}
        if self.shadow:
            out["sends"] = ("DICOM results to the QA destination only; nothing to the PACS, RIS or FHIR server"
                            if qa is not None else "nothing: results stay in the spool")
            out["qa_destination"] = None if qa is None else {"ae_title": qa.ae_title, "host": qa.host, "port": qa.port}
        return out

    def send(self, files: list[Path], dest: ResultDestination) -> None:
        """C-STORE with the configured retries; a paused destination raises DestinationPaused
        (the job waits)."""
        from dicom_node.sender import send_with_retry

        self.pauses.check(dest.ae_title, dest.host, dest.port)
        s = self.settings.sender
        send_with_retry(files, dest, attempts=s.attempts, backoff_s=s.backoff_s, max_backoff_s=s.max_backoff_s,
                        calling_ae=self.settings.node.ae_title, timeout=s.timeout_s)

    @property
    def send_lease_s(self) -> float:
        """A SENDING claim outlasts every retry of one send (dicom_node.sender.retry_window_s), and
        the RIS and FHIR deliveries of the route after it (ris.delivery.window_s)."""
        from dicom_node.sender import retry_window_s
        from ris import delivery

        s = self.settings.sender
        return retry_window_s(s.attempts, s.backoff_s, s.max_backoff_s, s.timeout_s) + delivery.window_s(self.settings)

    # -- the second read ---------------------------------------------------------------------------
    @cached_property
    def reports(self) -> ReportStore:
        from ris.reportstore import ReportStore

        return ReportStore(self.database(self.layout.reports), clock=self.clock.time)

    def load_prediction(self, job_id: str) -> Prediction | None:
        """A job's saved prediction, None while it has none (worker.pipeline.load_prediction)."""
        from worker.pipeline import PREDICTION, load_prediction

        folder = self.spool.result_dir(job_id)
        key = self.spool.relative(folder / PREDICTION)
        if not self.objects.exists(key):
            return None
        self.objects.fetch_prefix(self.spool.relative(folder))
        return load_prediction(folder)[0]

    def second_reader(self) -> SecondReader | None:
        """[second_read] as ris.intake takes it; None when it is off."""
        from dicom_node.tls import client_context
        from ris.intake import SecondReader
        from ris.notify import Notifier

        s = self.settings
        sr = s.second_read
        if not sr.enabled:
            return None
        n = sr.notify
        tls = client_context(n.tls.ca, n.tls.cert or None, n.tls.key or None, n.tls.check_hostname) if n.tls.ca else None
        notifier = Notifier(sending_application=s.node.ae_title, hl7_host=n.hl7_host, hl7_port=n.hl7_port,
                            receiving_application=n.receiving_application, hl7_tls=tls, webhook_url=n.webhook_url,
                            webhook_verify=n.webhook_ca or True, timeout_s=n.timeout_s)
        clock = self.clock
        return SecondReader(store=self.reports, jobs=self.jobs, audit=self.audit,
                            lookup_key=self.secret("lookup", s.node.lookup_secret),
                            load_prediction=lambda job: self.load_prediction(job.id),
                            # shadow mode sends nothing out, notifications included: listed, audited, counted
                            notify=((lambda rows: notifier(rows, clock.now()))
                                    if notifier.configured and not self.shadow else None),
                            tiers=sr.tiers, also_report_positive=sr.also_report_positive_model_negative)

    def report_listener(self, reader: SecondReader, **overrides: Any) -> ReportListener | None:
        """The MLLP listener of [second_read.inbound], not started; None when its port is 0."""
        from dicom_node.tls import server_context
        from ris.inbound import ReportListener

        i = self.settings.second_read.inbound
        port = overrides.get("port", i.port)
        if not port:
            return None
        t = i.tls
        tls = server_context(t.cert, t.key, t.ca or None, t.require_client_cert) if t.cert else None
        return ReportListener(host=overrides.get("host", i.host), port=port, keep=lambda r: reader.keep(r)[0],
                              after=reader.match_report, application=self.settings.node.ae_title, tls=tls)

    # -- the pipeline -----------------------------------------------------------------------------
    def reporter(self) -> Reporter | None:
        """The similar-cases drafter, opened on its first draft; None when there is no index."""
        from worker.reporter import LazyReporter

        index = self.settings.index_path if isinstance(self.objects, SpoolObjects) else self.fetch_shared("index")
        if index is None:
            return None
        return LazyReporter(index, self.settings.index.extractor, self.settings.report.language)

    def context(self) -> Context:
        """The side effects of the pipeline's steps (worker.pipeline.Context)."""
        from models.urgency import assess
        from ris import delivery
        from worker.pipeline import Context

        s = self.settings
        reader = self.second_reader()
        return Context(spool=self.spool, objects=self.objects, jobs=self.jobs, audit=self.audit, lease_s=s.worker.lease_s,
                       send_lease_s=self.send_lease_s, reporter=self.reporter(), language=s.report.language,
                       clock=self.clock, urgent_rules=s.urgent.rules, shadow=self.shadow,
                       qa_destination=self.qa_destination(), site_label=self.site_labels(),
                       reports=delivery.from_settings(s, self.ledger,
                                                      urgency=lambda p: assess(p, s.urgent.rules).is_urgent),
                       second_read=reader.job_inferred if reader is not None else None)
