"""The listener with [store] url on a PostgreSQL server that goes away: C-STORE is answered Out of
Resources (0xA700) with no instance file left behind, and succeeds again once the server is back,
with the same listener and store (nothing restarted, nothing lost)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from dicom_node.audit import AuditLog
from dicom_node.jobstore import JobState
from dicom_node.listener import OUT_OF_RESOURCES, SUCCESS, start_listener
from dicom_node.spool import Spool
from tests.conftest import free_port, pg_database
from tests.integration.test_listener import CR_IMAGE, SCU_AET, make_image
from worker import node as node_root
from worker.settings import Settings

pytestmark = pytest.mark.integration


def _c_store(port: int, path: Path) -> int:
    ae = AE(ae_title=SCU_AET)
    ae.add_requested_context(CR_IMAGE, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDSAM2CXR")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def test_store_down_answers_out_of_resources_then_recovers(pg_server, tmp_path):
    with pg_database(pg_server.admin) as url:
        settings = Settings(paths={"spool": str(tmp_path / "spool")}, store={"url": url, "timeout_s": 2},
                            node={"lookup_secret": "site-key"})
        node = node_root.Node(settings)
        jobs = node.jobs
        assert jobs.db.kind == "postgresql" and not settings.layout.jobs.exists()  # no SQLite file made
        spool, audit = Spool(settings.spool, 0), AuditLog(settings.layout.audit)
        enqueued: list[str] = []
        port = free_port()
        cfg = node.listener_config(host="127.0.0.1", port=port, allowed_calling_aets=(SCU_AET,), network_timeout=10)
        server = start_listener(cfg, spool, jobs, audit, enqueued.append)
        try:
            first, second = make_image(tmp_path / "a.dcm"), make_image(tmp_path / "b.dcm")
            assert _c_store(port, first) == SUCCESS

            pg_server.stop()
            assert _c_store(port, second) == OUT_OF_RESOURCES
            assert sorted(p.name for p in spool.incoming.glob("*.dcm")) == [f"{enqueued[0]}.dcm"]  # none half-kept
            assert any(r["event"] == "failed" and r.get("reason") == "job store unavailable" for r in audit.read())

            pg_server.start()
            deadline = time.monotonic() + 30
            while (status := _c_store(port, second)) != SUCCESS:  # the sender's retry; the pool reconnects
                assert status == OUT_OF_RESOURCES and time.monotonic() < deadline, hex(status)
                time.sleep(0.5)
        finally:
            server.shutdown()
        queued = jobs.by_state(JobState.QUEUED)
        assert [j.id for j in queued] == enqueued and len(queued) == 2
        assert {(spool.root / j.path).is_file() for j in queued} == {True}
