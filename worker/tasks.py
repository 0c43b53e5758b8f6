"""Thin Celery tasks: serialisation and routing only; the work is in worker.pipeline.

No task retries on its own (no autoretry_for, no self.retry): a job whose step hit an error that
will not go away is FAILED by the pipeline, which then returns normally, so its message is acked
and nothing runs it again until `medsam2-cxr resend`. A transient error (worker.failures) is
raised after the pipeline gave the job back; its message is acked too (acks_on_failure) and the
reconciler, which owns every retry, enqueues the job again.
"""

from __future__ import annotations

import os
import threading

from celery import current_app, shared_task
from celery.signals import worker_process_init

from dicom_node.metrics_dir import reserve_in_child
from worker import pipeline
from worker.app import INFER, SEND, enqueuers
from worker.runtime import Runtime


@worker_process_init.connect
def _metric_files(**_) -> None:
    reserve_in_child()  # a prefork child's own metric files, allocated before its first metric


def _stopping() -> bool:
    """True once this worker was told to shut down (SIGTERM: Celery's warm shutdown)."""
    from celery.worker import state

    # Celery sets these to the exit code (0 for a clean stop) or True; None or False: running.
    return any(flag is not None and flag is not False for flag in (state.should_stop, state.should_terminate))


_RUNTIME = threading.Lock()


def _runtime() -> Runtime:
    """This process's Runtime, made on its first task (after the fork: a prefork child makes its
    own) from the settings its Celery app was made with (worker.app.make_app), then kept."""
    app = current_app._get_current_object()
    with _RUNTIME:
        rt = getattr(app, "medsam2_runtime", None)
        if rt is None:
            rt = app.medsam2_runtime = Runtime.from_settings(app.medsam2_settings)
    return rt


# The most images per forward: a GPU needs large batches to be busy, a CPU gains little from them
# and the first image of a batch waits for the last. GATHER_S: how long a lone job waits for company.
GPU_BATCH, CPU_BATCH, GATHER_S = 32, 4, 0.005
# Processes that decode the next batch during a forward: on a GPU decoding is the slower part (a
# 2500 x 2048 JPEG 2000 image takes about 150 ms of one core, `python -m bench decode`).
DECODE_PROCESSES = min(8, os.cpu_count() or 1)


@shared_task(name=INFER)
def infer(job_id: str) -> list[str]:
    rt = _runtime()
    _, enqueue_send = enqueuers(current_app)
    predictor = rt.predictor()
    batch = GPU_BATCH if predictor.device.type == "cuda" else CPU_BATCH
    return pipeline.infer_waiting(job_id, rt.ctx, predictor, enqueue_send, batch_size=batch, gather_s=GATHER_S,
                                  decode=rt.decoder(DECODE_PROCESSES), stopping=_stopping)


@shared_task(name=SEND)
def send(job_id: str) -> str | None:
    rt = _runtime()
    state = pipeline.deliver_job(job_id, rt.ctx, rt.destination_for, rt.send)
    return state.value if state else None
