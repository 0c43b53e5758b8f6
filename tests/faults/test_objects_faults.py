"""The whole node with [objects] in a real S3 store (SeaweedFS, tests/seaweed.py): listener, GPU
workers and io worker as processes, Redis, Orthanc; the store stopped mid-burst and started again.
Figures and checks as in test_faults.finish: sent=N delivered=N lost=0 duplicates=0."""

from __future__ import annotations

import time

import pytest

from dicom_node.jobstore import JobState
from dicom_node.objects import open_objects
from dicom_node.spool import Spool
from tests.faults.harness import storescu
from tests.faults.test_faults import finish
from tests.seaweed import BUCKET, SeaweedFS, weed_binary

pytestmark = [pytest.mark.faults, pytest.mark.integration]
N = 30  # of the batch: the scenario is about the store, not the throughput


def test_object_store_restarted_mid_burst(tmp_path, monkeypatch, rig, sources, digest):
    """Half the burst is stored; the store stops; the other half is refused with Out of Resources
    and leaves no job row; workers that cannot fetch or save give their jobs back; the store comes
    back and the modality sends the refused ones again; everything is delivered exactly once."""
    store = SeaweedFS(tmp_path / "seaweedfs", weed_binary())
    for name, value in store.env().items():
        monkeypatch.setenv(name, value)  # the node's processes inherit them
    store.start()
    try:
        node = rig(objects={"url": f"s3://{BUCKET}/node", "endpoint": store.endpoint})
        burst = sources[:N]
        t0 = time.monotonic()
        first = storescu(node.port, [s.path for s in burst[: N // 2]])
        assert len(first.ok) == N // 2, first.refused

        store.stop()
        second = storescu(node.port, [s.path for s in burst[N // 2:]], extra=("--no-halt",))
        print(f"[object store down] {len(second.ok)} stored, {len(second.refused)} refused "
              f"({sorted(set(second.refused.values()))})")
        assert len(second.refused) == N - N // 2 and set(second.refused.values()) == {"Refused: OutOfResources"}
        recorded = [j for s in JobState for j in node.jobs.by_state(s)]
        assert len(recorded) == N // 2, "a job row for an instance the store never took"
        failed = [a for a in node.audit() if a["event"] == "failed" and a["reason"] == "object store unavailable"]
        assert len(failed) == len(second.refused)
        time.sleep(5)  # the workers meet the outage too

        store.start()  # same data folder and ports
        again = storescu(node.port, sorted(second.refused))
        assert len(again.ok) == len(second.refused), again.refused
        figures = finish(node, burst, digest, "object store restarted", t0)
        objects = open_objects(f"s3://{BUCKET}/node", store.endpoint, Spool(tmp_path / "check"))
        jobs = [j for s in JobState for j in node.jobs.by_state(s)]
        assert len(jobs) == N and all(objects.exists(j.path) for j in jobs)  # every instance is an object
        assert all(objects.exists(f"results/{j.id}/sr.dcm") for j in jobs)  # and so is every result
        assert figures["delivered"] == N
    finally:
        store.stop()
