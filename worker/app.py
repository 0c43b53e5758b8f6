"""The Celery app: two queues (gpu for inference, io for sending), reliability settings per
../shared/docs/operations.md, and a serverless filesystem transport in the spool by default.

[broker] url picks the broker: empty, the filesystem transport (one host); redis://, Redis (fast,
keeps its queues in memory: a restart loses them and the reconciler re-enqueues from the job
table); amqp:// or pyamqp://, RabbitMQ, the durable choice: quorum queues (replicated, on disk),
publisher confirms (a publish returns once the broker has the message) and persistent messages,
so a broker restart loses nothing. The reconciler runs with every broker: the job table is the truth.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from worker.settings import Settings

INFER = "medsam2.infer"
SEND = "medsam2.send"


AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://")
AMQP_EXCHANGE = "medsam2"


def is_amqp(url: str) -> bool:
    return url.startswith(AMQP_SCHEMES)


def broker_options(settings: Settings) -> tuple[str, dict]:
    if is_amqp(settings.broker.url):
        # Publisher confirms: send_task returns only once RabbitMQ has taken the message (a broker
        # going away makes it raise, and the job stays QUEUED for the reconciler).
        return settings.broker.url, {"confirm_publish": True}
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
    if is_amqp(url):
        app.conf.update(amqp_queue_settings())
    # The tasks' settings (worker.tasks), as the object itself: a worker process makes its Runtime
    # from it on its first task; nothing is serialised into Celery's configuration and parsed again.
    app.medsam2_settings = settings
    return app


def amqp_queue_settings() -> dict:
    """RabbitMQ: gpu and io as durable quorum queues (RabbitMQ 3.8+), messages persistent.
    Celery sees the quorum queues and uses per-consumer prefetch (quorum queues have no global QoS)."""
    quorum = {"x-queue-type": "quorum"}
    # A topic exchange: Celery's native delayed delivery (which it turns on with quorum queues)
    # needs one, and warns on every start with the default direct "celery" exchange.
    exchange = Exchange(AMQP_EXCHANGE, type="topic", durable=True)
    return {
        "task_queues": [Queue(name, exchange, routing_key=name, durable=True, queue_arguments=quorum)
                        for name in ("gpu", "io")],
        "task_default_exchange": AMQP_EXCHANGE,
        "task_default_exchange_type": "topic",
        "task_default_queue_type": "quorum",
        "task_create_missing_queue_type": "quorum",
        "task_default_delivery_mode": "persistent",
        "worker_detect_quorum_queues": True,
    }


def enqueuers(app: Celery) -> tuple:
    """(enqueue_infer, enqueue_send): the only way the rest of the node talks to the broker."""
    def infer(job_id: str) -> None:
        app.send_task(INFER, args=[job_id], queue="gpu")

    def send(job_id: str) -> None:
        app.send_task(SEND, args=[job_id], queue="io")

    return infer, send
