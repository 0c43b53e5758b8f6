"""RabbitMQ as the broker ([broker] url = amqp://...): the real node and Celery workers go
through a burst of 100 phantom CXRs while the RabbitMQ node is stopped and started again
(rabbitmqctl stop_app / start_app, every connection dropped). Its queues are durable quorum
queues and every message persistent with publisher confirms, so the broker keeps what it had;
the reconciler still re-enqueues anything a publish lost while it was down. Nothing lost, no
duplicates, and the queues are quorum queues."""

from __future__ import annotations

import threading
import time

import pytest

from tests.faults.harness import RabbitMQ, storescu, wait_for
from tests.faults.test_faults import finish

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def test_rabbitmq_restarted_mid_burst_loses_nothing(rig, batch, sources, digest):
    node = rig(broker="rabbitmq")
    assert isinstance(node.broker, RabbitMQ)
    t0 = time.monotonic()
    sender = threading.Thread(target=storescu, args=(node.port, [s.path for s in sources]))
    sender.start()
    wait_for(lambda: node.counts().get("done", 0) >= 10, 240, "the first results")
    queues = node.broker.queue_types()
    assert queues.get("gpu") == "quorum durable=true" and queues.get("io") == "quorum durable=true", queues
    done_before = node.counts().get("done", 0)
    node.broker.restart(down_s=5)
    print(f"[rabbitmq restart] broker stopped for 5 s with {done_before} of {len(sources)} done")
    sender.join()
    finish(node, sources, digest, "rabbitmq restart", t0)
    # Every process rode it out: none exited (two GPU workers on one host each have their own
    # node name and control queue), and each worker reconnected.
    assert {name: p.poll() for name, p in node.procs.items()} == dict.fromkeys(node.procs), "a process exited"
    for name in ("gpu", "io"):
        assert "Connection to broker lost" in (node.logs / f"{name}.log").read_text(), f"{name} saw no restart"
