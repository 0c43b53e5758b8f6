import pytest

from dicom_node.jobstore import JobState, JobStore


def test_constructor_creates_and_reopens(tmp_path):
    # regression: executescript inside BEGIN IMMEDIATE broke __init__ on Python < 3.12
    JobStore(tmp_path / "jobs.sqlite")
    assert JobStore(tmp_path / "jobs.sqlite").counts() == {}


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(tmp_path, clock):
    return JobStore(tmp_path / "jobs.sqlite", clock=clock)


def _add(store, job_id, sop="1.2.3.4", state=JobState.QUEUED, reason=None):
    return store.add(
        job_id=job_id, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        study_instance_uid="1.2.3", calling_aet="MODALITY", path=f"incoming/{job_id}.dcm",
        state=state, reason=reason,
    )


def test_add_and_get(store, clock):
    job, earlier = _add(store, "a")
    assert earlier is None
    assert job.state == JobState.QUEUED and job.created_at == clock.t and job.attempts == 0
    assert store.get("a") == job
    assert store.get("missing") is None


def test_dedup_by_sop_instance_uid(store):
    first, _ = _add(store, "a")
    dup, earlier = _add(store, "b")
    assert earlier == first
    assert dup.state == JobState.SKIPPED and dup.reason == "duplicate of job a"
    other, earlier = _add(store, "c", sop="9.9.9")
    assert other.state == JobState.QUEUED and earlier is None
    assert store.counts() == {"queued": 2, "skipped": 1}


def test_skipped_earlier_does_not_block(store):
    _add(store, "a", state=JobState.SKIPPED, reason="lateral view")
    job, earlier = _add(store, "b")
    assert earlier is None and job.state == JobState.QUEUED


def test_claim_compare_and_set(store):
    _add(store, "a")
    won = store.claim("a", JobState.QUEUED, JobState.INFERRING, lease_s=60)
    assert won is not None and won.state == JobState.INFERRING and won.attempts == 1
    assert store.claim("a", JobState.QUEUED, JobState.INFERRING, lease_s=60) is None
    assert store.advance("a", JobState.INFERRING, JobState.INFERRED)
    assert not store.advance("a", JobState.INFERRING, JobState.INFERRED)
    assert store.claim("a", JobState.QUEUED, JobState.INFERRING, lease_s=60) is None


def test_lease_expiry_lets_second_claim_win(store, clock):
    _add(store, "a")
    first = store.claim("a", JobState.QUEUED, JobState.INFERRING, lease_s=60)
    assert first is not None
    clock.advance(30)
    assert store.claim("a", JobState.QUEUED, JobState.INFERRING, lease_s=60) is None
    clock.advance(31)  # the first worker died; its lease ran out
    second = store.claim("a", JobState.QUEUED, JobState.INFERRING, lease_s=60)
    assert second is not None and second.attempts == 2 and second.lease_until == clock.t + 60
    # the dead worker's late advance from a different state does not apply twice
    assert store.advance("a", JobState.INFERRING, JobState.INFERRED)
    assert not store.advance("a", JobState.INFERRING, JobState.INFERRED)


def test_stale(store, clock):
    _add(store, "queued-old", sop="1")
    _add(store, "claimed", sop="2")
    store.claim("claimed", JobState.QUEUED, JobState.INFERRING, lease_s=100)
    _add(store, "skipped", sop="3", state=JobState.SKIPPED, reason="lateral view")
    clock.advance(50)
    _add(store, "queued-new", sop="4")
    assert [j.id for j in store.stale(older_than_s=40)] == ["queued-old"]
    clock.advance(60)  # lease of "claimed" (until +100) has run out
    assert {j.id for j in store.stale(older_than_s=40)} == {"queued-old", "claimed", "queued-new"}
    store.touch("queued-old")
    assert [j.id for j in store.stale(older_than_s=40)] == ["claimed", "queued-new"]


def test_release_and_by_state(store):
    _add(store, "a")
    store.claim("a", JobState.QUEUED, JobState.INFERRING, lease_s=60)
    assert store.release("a", JobState.INFERRING, JobState.QUEUED, reason="gpu busy")
    assert [j.id for j in store.by_state(JobState.QUEUED)] == ["a"]
    assert store.get("a").reason == "gpu busy" and store.get("a").lease_until == 0
    assert store.get("a").attempts == 0  # its worker came back: not an attempt toward the give-up
    for _ in range(10):  # a destination paused for a long time: claimed and given back again and again
        store.claim("a", JobState.QUEUED, JobState.INFERRING, lease_s=60)
        store.release("a", JobState.INFERRING, JobState.QUEUED)
    assert store.get("a").attempts == 0


def test_old_table_gains_the_hash_columns(tmp_path):
    """A job table made before the keyed hashes existed is migrated on open; its rows keep."""
    import sqlite3

    path = tmp_path / "jobs.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""CREATE TABLE jobs (id TEXT PRIMARY KEY, sop_instance_uid TEXT NOT NULL,
        sop_class_uid TEXT NOT NULL, study_instance_uid TEXT NOT NULL, calling_aet TEXT NOT NULL,
        path TEXT NOT NULL, state TEXT NOT NULL, reason TEXT, attempts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL, updated_at REAL NOT NULL, lease_until REAL NOT NULL DEFAULT 0);
        INSERT INTO jobs VALUES ('old', '1.2', '1.2.840', '1.3', 'MOD', 'incoming/old.dcm', 'done', NULL, 1, 5, 6, 0);""")
    db.commit()
    db.close()
    store = JobStore(path)
    old = store.get("old")
    assert old.state == JobState.DONE and old.accession_hash is None and old.patient_hash is None
    job, _ = store.add(job_id="new", sop_instance_uid="1.4", sop_class_uid="1.2.840", study_instance_uid="1.5",
                       calling_aet="MOD", path="incoming/new.dcm", state=JobState.QUEUED,
                       accession_hash="a" * 64, patient_hash="b" * 64)
    assert job.accession_hash == "a" * 64
    assert [j.id for j in store.search(accession_hash="a" * 64)] == ["new"]
    assert [j.id for j in store.search(states=(JobState.DONE,))] == ["old"]
    assert [j.id for j in store.search(since=5, until=6)] == ["old"]
    assert store.callers()[0][:2] == ("MOD", 2)
    JobStore(path)  # opening again changes nothing


def test_keyed_hash_and_spool_secret(tmp_path):
    from dicom_node.lookup import keyed_hash, spool_secret

    key = spool_secret(tmp_path, "lookup")
    assert len(key) == 32 and spool_secret(tmp_path, "lookup") == key  # made once, read back
    assert (tmp_path / "secrets" / "lookup.key").stat().st_mode & 0o777 == 0o600
    assert spool_secret(tmp_path, "lookup", "configured") == b"configured"
    assert keyed_hash(key, " ACC1 ") == keyed_hash(key, "ACC1") != keyed_hash(b"other", "ACC1")
    assert keyed_hash(key, "") is None and keyed_hash(key, None) is None
    assert "ACC1" not in keyed_hash(key, "ACC1")


def test_release_claims_gives_every_claim_back_uncounted(store):
    for job_id, sop in (("a", "1.1"), ("b", "1.2"), ("c", "1.3")):
        _add(store, job_id, sop=sop)
    assert store.claim("a", JobState.QUEUED, JobState.INFERRING, 600)
    assert store.claim("b", JobState.QUEUED, JobState.INFERRING, 600)
    assert store.advance("b", JobState.INFERRING, JobState.INFERRED)
    assert store.claim("b", JobState.INFERRED, JobState.SENDING, 600)
    assert sorted(store.release_claims()) == ["a", "b"]
    assert [(store.get(j).state, store.get(j).attempts) for j in "abc"] == [
        (JobState.QUEUED, 0), (JobState.INFERRED, 1), (JobState.QUEUED, 0)]
    assert store.release_claims() == []
