"""The Celery app: two queues (gpu for inference, io for sending), reliability settings per
../shared/docs/operations.md, and a serverless filesystem transport in the spool by default."""

from __future__ import annotations

from celery import Celery

from worker.settings import Settings

INFER = "medsam2.infer"
SEND = "medsam2.send"


def broker_options(settings: Settings) -> tuple[str, dict]:
    if settings.broker.url:
        # Longer than the longest task, so a slow task is not delivered twice.
        return settings.broker.url, {"visibility_timeout": 3600}
    queue, processed, control = (settings.layout.broker_folder(n) for n in ("queue", "processed", "control"))
    for folder in (queue, processed, control):
        folder.mkdir(parents=True, exist_ok=True)
    # Every folder inside the spool: kombu's default control folder is the working directory.
    return "filesystem://", {"data_folder_in": str(queue), "data_folder_out": str(queue),
                             "processed_folder": str(processed), "store_processed": False,
                             "control_folder": str(control)}


def make_app(settings: Settings) -> Celery:
    url, transport = broker_options(settings)
    app = Celery("medsam2_cxr", broker=url, include=["worker.tasks"])
    app.conf.update(
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A task that raised is acked, never redelivered by the broker: a permanent failure is
        # FAILED in the job store already, a transient one is retried by the reconciler.
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        # A send under way when the broker goes finishes: the job store records it, and a message
        # delivered again finds the job done. Cancelling it (a prefork child is killed) would hold
        # its SENDING claim for the whole send lease, many minutes.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_routes={INFER: {"queue": "gpu"}, SEND: {"queue": "io"}},
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    # The tasks' settings (worker.tasks), as the object itself: a worker process makes its Runtime
    # from it on its first task; nothing is serialised into Celery's configuration and parsed again.
    app.medsam2_settings = settings
    return app


def enqueuers(app: Celery) -> tuple:
    """(enqueue_infer, enqueue_send): the only way the rest of the node talks to the broker."""
    def infer(job_id: str) -> None:
        app.send_task(INFER, args=[job_id], queue="gpu")

    def send(job_id: str) -> None:
        app.send_task(SEND, args=[job_id], queue="io")

    return infer, send
