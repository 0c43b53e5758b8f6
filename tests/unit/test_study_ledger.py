"""ris.ledger's one report per (study, target): who sends it, who waits, and races between io workers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_node.jobstore import JobState, JobStore
from ris.ledger import Claim, Ledger, Report

STUDY, HL7, PACS = "1.2.826.0.1.3680043.8.498.7", "hl7:ris:2575", "dicom:PACS@pacs:104"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


MakeStore = Callable[[Path, Callable[[], float]], JobStore]


@pytest.fixture
def make_store() -> MakeStore:
    """An empty job store (its SQLite file in ``folder``; tests/integration/test_store_postgres.py
    runs these tests again with one in PostgreSQL)."""
    return lambda folder, clock: JobStore(folder / "jobs.sqlite", clock=clock)


def _store(make_store: MakeStore, tmp_path, clock, *jobs: tuple[str, JobState]) -> tuple[JobStore, Ledger]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    store = make_store(tmp_path, clock)
    for i, (job_id, state) in enumerate(jobs):
        store.add(job_id=job_id, sop_instance_uid=f"1.2.3.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                  study_instance_uid=STUDY, calling_aet="CR1", path=f"incoming/{job_id}.dcm", state=JobState.QUEUED)
        if state != JobState.QUEUED:
            with store._tx() as db:  # the state a test starts from
                db.execute("UPDATE jobs SET state=? WHERE id=?", (state, job_id))
    return store, Ledger(store.db, clock=clock)


def test_the_last_image_to_reach_the_pacs_sends_and_the_first_waits_for_it(make_store, tmp_path):
    clock = Clock()
    _, ledger = _store(make_store, tmp_path, clock, ("a", JobState.SENDING), ("b", JobState.INFERRED), ("c", JobState.FAILED))
    ledger.record("a", PACS)
    first = ledger.claim_study(STUDY, STUDY, HL7, "a", 60)
    assert first.state == Report.OWED and first.waiting_for == ("b",) and not first.ours("a")
    ledger.record("b", PACS)
    second = ledger.claim_study(STUDY, STUDY, HL7, "b", 60)
    assert second.ours("b"), "a failed image is not waited for"
    assert ledger.claim_study(STUDY, STUDY, HL7, "a", 60) == Claim(Report.SENDING, "b")
    ledger.study_sent(STUDY, HL7, "b", ["a", "b"], "AA")
    done = ledger.claim_study(STUDY, STUDY, HL7, "a", 60)
    assert done.state == Report.SENT and done.jobs == ("a", "b") and done.job_id == "b"
    late = ledger.claim_study(STUDY, STUDY, HL7, "d", 60)
    assert late.state == Report.SENT and "d" not in late.jobs, "a late image finds the study reported"
    assert ledger.claim_study(STUDY, STUDY, "fhir:x", "a", 60).ours("a"), "each target on its own"


def _finish_together(ledger: Ledger) -> dict[str, Claim]:
    """Jobs a and b reach the PACS and claim the study's report at the same moment, in two threads."""
    claims: dict[str, Claim] = {}
    go = threading.Barrier(2)

    def finish(job_id: str) -> None:
        go.wait()
        ledger.record(job_id, PACS)
        claims[job_id] = ledger.claim_study(STUDY, STUDY, HL7, job_id, 60)

    threads = [threading.Thread(target=finish, args=(j,)) for j in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return claims


def test_two_workers_finishing_a_study_at_once_claim_it_once(make_store, tmp_path):
    for round_ in range(20):
        _, ledger = _store(make_store, tmp_path / str(round_), Clock(), ("a", JobState.SENDING), ("b", JobState.SENDING))
        claims = _finish_together(ledger)
        ours = [j for j, c in claims.items() if c.ours(j)]
        assert len(claims) == 2 and len(ours) == 1, claims  # never both, never neither


def test_a_dead_claim_is_taken_over_and_a_refused_one_waits_for_a_resend(make_store, tmp_path):
    clock = Clock()
    _, ledger = _store(make_store, tmp_path, clock, ("a", JobState.SENDING), ("b", JobState.SENDING))
    ledger.record("a", PACS)
    ledger.record("b", PACS)
    assert ledger.claim_study(STUDY, STUDY, HL7, "a", 60).ours("a")
    assert ledger.claim_study(STUDY, STUDY, HL7, "b", 60).job_id == "a"
    clock.t += 61  # a's worker died: its lease ran out
    assert ledger.claim_study(STUDY, STUDY, HL7, "b", 60).ours("b")
    ledger.study_failed(STUDY, HL7, "a", "not ours any more: ignored")
    ledger.study_failed(STUDY, HL7, "b", "ACK AE")
    assert ledger.study_reports(STUDY)[HL7][:2] == ("failed", "b")
    assert ledger.owed(0) == [], "a refused report is not the reconciler's: it waits for the resend"
    assert ledger.claim_study(STUDY, STUDY, HL7, "b", 60).ours("b"), "the resend claims again"


def test_a_report_owed_to_an_image_that_failed_is_handed_back(make_store, tmp_path):
    clock = Clock()
    store, ledger = _store(make_store, tmp_path, clock, ("a", JobState.SENDING), ("b", JobState.INFERRING))
    ledger.record("a", PACS)
    assert ledger.claim_study(STUDY, STUDY, HL7, "a", 60).waiting_for == ("b",)
    store.advance("a", JobState.SENDING, JobState.DONE)
    clock.t += 600
    assert ledger.owed(300) == [], "b is still on its way"
    store.advance("b", JobState.INFERRING, JobState.FAILED, reason="poison image")
    assert ledger.owed(300) == ["a"] and ledger.owed(900) == []


def test_a_study_reported_per_job_by_an_earlier_release_is_not_reported_again(make_store, tmp_path):
    clock = Clock()
    _, ledger = _store(make_store, tmp_path, clock, ("a", JobState.DONE), ("b", JobState.SENDING))
    ledger.record("a", HL7, "{'control_id': 'OLD'}")
    claim = ledger.claim_study(STUDY, STUDY, HL7, "b", 60)
    assert claim.state == Report.SENT and claim.job_id == "a"
