"""Thin Celery tasks: serialisation and routing only; the work is in worker.pipeline."""

from __future__ import annotations

import json

from celery import current_app, shared_task

from worker import pipeline
from worker.app import INFER, SEND, enqueuers
from worker.runtime import Runtime, runtime_for


def _runtime() -> Runtime:
    return runtime_for(json.dumps(current_app.conf.medsam2_settings, sort_keys=True))


@shared_task(name=INFER)
def infer(job_id: str) -> list[str]:
    rt = _runtime()
    _, enqueue_send = enqueuers(current_app)
    return pipeline.infer_jobs([job_id], rt.ctx, rt.predictor(), enqueue_send)


@shared_task(name=SEND)
def send(job_id: str) -> str | None:
    rt = _runtime()
    state = pipeline.deliver_job(job_id, rt.ctx, rt.destination_for, rt.send)
    return state.value if state else None
