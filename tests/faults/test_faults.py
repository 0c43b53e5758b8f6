"""Nothing lost, nothing duplicated: a batch of 100 phantom CXRs through the real node while
things break. Each scenario ends with the figure line and the same checks: every frontal image
has exactly one set of results (SR, SC, GSPS; a KOS when urgent) in Orthanc, no result arrived twice, nothing is in flight, no
partial file is left, and no patient identifier is in any log line, audit or quarantine record.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from dicom_node.jobstore import JobState
from tests.faults.harness import MODALITY, NODE_AET, STORESCU, Node, figure_line, storescu, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.integration]
SETTLE_S = 420  # generous: the machine is shared; a healthy run settles far sooner
CR, DX = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"


def finish(node: Node, sources, digest: str, scenario: str, t0: float) -> dict[str, int]:
    node.wait_settled(len(sources), SETTLE_S)
    time.sleep(2)  # let a late duplicate (if any) reach Orthanc before counting
    figures = node.account(sources, digest)
    counts = node.counts()
    # retransmitted: C-STOREs of a result sent again after the PACS took one and never answered
    # (it was stopped mid-operation); the PACS keeps one copy, so it is not a duplicate.
    print(f"[{scenario}] {figure_line(figures)} retransmitted={figures['retransmitted']} "
          f"in {time.monotonic() - t0:.0f} s; job states {counts}")
    assert figures["lost"] == 0 and figures["duplicates"] == 0, figures
    assert figures["delivered"] == figures["sent"] == len(sources)
    assert node.in_flight() == 0 and counts.get(str(JobState.DEAD), 0) == 0, counts
    assert counts.get(str(JobState.DONE), 0) == len(sources), counts
    node.no_partial_writes(60)  # a SIGKILLed writer's file is removed once stale (20 s here)
    assert node.phi_leaks(sources) == [], "patient identifiers in logs"
    return figures


def _sop(job) -> str:
    return job.sop_instance_uid


def test_gpu_worker_sigkilled_twice_mid_inference(rig, batch, sources, digest):
    node = rig(gpu_workers=1)  # every job in inference is the victim's
    t0 = time.monotonic()
    sender = threading.Thread(target=storescu, args=(node.port, [s.path for s in sources]))
    sender.start()
    killed = []
    for round_ in range(2):
        # Mid-inference: a job is claimed (INFERRING) and others already went through.
        wait_for(lambda round_=round_: node.counts().get("inferring", 0) > 0 and node.counts().get("inferred", 0)
                 + node.counts().get("sending", 0) + node.counts().get("done", 0) >= 5 * (round_ + 1),
                 240, "a job in inference")
        victim = "gpu#0"
        inferring = [j.id for j in node.jobs.by_state(JobState.INFERRING)]
        node.procs[victim].send_signal(signal.SIGKILL)
        node.procs[victim].wait()
        # The jobs the dead worker held (one that it finished just before the kill drops out).
        held = [j for j in inferring if node.jobs.get(j).state == JobState.INFERRING]
        killed.append((victim, held))
        node.start_gpu(0)  # what a supervisor does
    sender.join()
    finish(node, sources, digest, "gpu worker SIGKILL x2", t0)
    retried = {job_id for _, ids in killed for job_id in ids}
    assert retried, "no job was in inference when the workers were killed"
    assert all(node.jobs.get(j).attempts >= 2 for j in retried), "a killed job was not taken again"
    print(f"[gpu worker SIGKILL x2] jobs held by the killed workers: {[len(i) for _, i in killed]}; "
          f"all re-run once their lease ran out")


def test_redis_restarted_loses_every_queued_message(rig, batch, sources, digest):
    node = rig()
    t0 = time.monotonic()
    sender = threading.Thread(target=storescu, args=(node.port, [s.path for s in sources]))
    sender.start()
    wait_for(lambda: node.counts().get("done", 0) >= 10, 240, "the first results")
    node.broker.stop()  # keeps nothing on disk: the queues are gone
    time.sleep(3)
    node.broker.start()  # same port, empty
    sender.join()
    finish(node, sources, digest, "redis restart", t0)
    requeued = [line for line in (node.logs / "listen.log").read_text().splitlines() if "reconcile.requeued" in line]
    assert requeued, "nothing was re-enqueued from the job store after the broker lost its queues"


def test_pacs_down_for_60_s(rig, batch, sources, digest):
    node = rig()
    t0 = time.monotonic()
    sender = threading.Thread(target=storescu, args=(node.port, [s.path for s in sources]))
    sender.start()
    wait_for(lambda: node.counts().get("done", 0) >= 10, 240, "the first results")
    node.orthanc.stop()
    down = time.monotonic()
    time.sleep(60)
    node.orthanc.start()
    print(f"[pacs down] destination down for {time.monotonic() - down:.0f} s")
    sender.join()
    finish(node, sources, digest, "PACS down 60 s", t0)


def test_listener_restarted_with_associations_open(rig, batch, sources, digest):
    node = rig()
    t0 = time.monotonic()
    files = [s.path for s in sources]
    quarters = [files[i::4] for i in range(4)]
    first: list = [None] * 4

    def send(i: int) -> None:
        first[i] = storescu(node.port, quarters[i])

    senders = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in senders:
        t.start()
    wait_for(lambda: sum(node.counts().values()) >= 20, 120, "20 instances stored")
    node.procs["listen"].send_signal(signal.SIGKILL)  # mid-association, mid-write perhaps
    node.procs["listen"].wait()
    for t in senders:
        t.join()
    acknowledged = {p for sent in first for p in sent.ok}
    assert len(acknowledged) < len(files), "the listener was killed too late to cut any association"
    node.start_listener()
    assert list((node.spool / "tmp").iterdir()) == []
    # The modality sends again: the unacknowledged ones and, to prove idempotence, every one it
    # already had a success for (same SOP Instance UIDs).
    again = storescu(node.port, files)
    assert len(again.ok) == len(files), again.refused
    finish(node, sources, digest, "listener restart", t0)
    duplicates = [j for j in node.jobs.by_state(JobState.SKIPPED) if (j.reason or "").startswith("duplicate of job")]
    print(f"[listener restart] acknowledged before the kill: {len(acknowledged)}; resent with the same UIDs "
          f"and skipped as duplicates: {len(duplicates)}")
    assert len(duplicates) >= len(acknowledged)
    live = [j for s in JobState for j in node.jobs.by_state(s) if j.state != JobState.SKIPPED]
    assert sorted(j.sop_instance_uid for j in live) == sorted(s.sop_instance_uid for s in sources)


SPOOL_FS_MB = 512  # holds the batch and its results (a 1024-pixel RGB SC is 3 MB), then is filled


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of SPOOL_FS_MB for the spool, or None where mounting is not allowed (not root) or
    MEDSAM2_FAULTS_NO_TMPFS=1 asks for the watermark path.

    Request it before ``rig`` so that the node's processes are stopped before it is unmounted.
    """
    where = tmp_path / "spoolfs"
    where.mkdir()
    if os.environ.get("MEDSAM2_FAULTS_NO_TMPFS") == "1":
        yield None
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SPOOL_FS_MB}m", "tmpfs", str(where)],
                       capture_output=True, text=True)
    yield where if r.returncode == 0 else None
    if r.returncode == 0:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_spool_disk_full(small_fs, rig, batch, sources, digest):
    """The modality sends the batch onto a full spool: what fits is stored, the rest is refused
    with out-of-resources and leaves nothing behind; workers that cannot write their results give
    their jobs back. Once there is room, the modality sends the refused ones again."""
    if small_fs is not None:
        # A 4 MB watermark: below it the node refuses; what stays free above 0 holds the job
        # store's WAL index and the metric files of processes that start later (io pool children).
        node = rig(spool=small_fs / "spool", node={"min_free_mb": 4})
        filler = small_fs / "filler"
        free = shutil.disk_usage(small_fs).free
        # Room for about 20 instances above the watermark, then the spool is full.
        filler.write_bytes(b"\0" * (free - 4 * 2**20 - 20 * 140_000))
        how = f"a {SPOOL_FS_MB} MB tmpfs with {shutil.disk_usage(small_fs).free // 1024} KiB left"
    else:  # the free-space watermark stands in for the small filesystem
        node = rig(node={"min_free_mb": 10**9})
        how = "a free-space watermark above the disk's size"
    t0 = time.monotonic()
    first = storescu(node.port, [s.path for s in sources], extra=("--no-halt",))
    refused = set(first.refused)
    print(f"[disk full] spool on {how}: {len(first.ok)} stored, {len(refused)} refused "
          f"({sorted(set(first.refused.values()))})")
    assert refused and set(first.refused.values()) == {"Refused: OutOfResources"}
    incoming = sorted(p.stem for p in (node.spool / "incoming").iterdir())
    recorded = sorted(j.id for s in JobState for j in node.jobs.by_state(s))
    assert incoming == recorded, "a file in incoming/ that no job records (a partial store)"
    node.no_partial_writes(10)  # workers may be mid-write; a refused store left nothing
    full_events = [a for a in node.audit() if a["event"] == "failed" and a["reason"] == "spool full"]
    assert len(full_events) >= len(refused)
    if small_fs is not None:
        filler.unlink()
    else:  # every process reads the watermark from the configuration: restart them all
        node.stop()
        node.config.write_text(node.config.read_text().replace("min_free_mb = 1000000000", "min_free_mb = 1"))
        node.start()
    unacknowledged = sorted({s.path for s in sources} - set(first.ok))
    assert set(unacknowledged) == refused
    again = storescu(node.port, unacknowledged)
    assert len(again.ok) == len(unacknowledged), again.refused
    finish(node, sources, digest, "spool disk full", t0)


def test_32_associations_at_once_and_one_over_the_limit(rig, batch, sources, digest):
    # All 32 modalities share 127.0.0.1 here: no per-address cap, the node-wide limit is under test.
    node = rig(node={"max_associations": 32, "max_associations_per_address": 0})
    t0 = time.monotonic()
    files = [s.path for s in sources]
    shares = [files[i::32] for i in range(32)]
    barrier = threading.Barrier(33, timeout=120)
    results: list[list[int]] = [[] for _ in range(32)]
    errors: list[BaseException] = []
    opened = [False] * 32

    def modality(i: int) -> None:
        ae = AE(ae_title=f"{MODALITY}")
        for sop_class in (CR, DX):  # the phantom batch has both
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
        opened[i] = assoc.is_established
        try:
            barrier.wait()  # all 32 open together
            barrier.wait()  # ... while the 33rd is refused
            if assoc.is_established:
                for f in shares[i]:
                    results[i].append(assoc.send_c_store(f).Status)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            if assoc.is_established:
                assoc.release()

    threads = [threading.Thread(target=modality, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    barrier.wait()
    over = subprocess.run([STORESCU, "-v", "-aet", "MODALITY33", "-aec", NODE_AET, "127.0.0.1", str(node.port),
                           str(files[0])], capture_output=True, text=True, errors="replace", timeout=60)
    barrier.wait()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(opened), f"only {sum(opened)} of the 32 associations were accepted"
    statuses = [s for r in results for s in r]
    assert len(statuses) == len(files) and set(statuses) == {0x0000}, set(statuses)
    said = over.stdout + over.stderr  # DCMTK: "Reason: Local Limit Exceeded" (PS3.8 local-limit-exceeded)
    assert over.returncode != 0 and "local limit exceeded" in said.lower(), said
    refusals = [a for a in node.audit() if a["event"] == "refused"]
    assert [a["calling_aet"] for a in refusals] == ["MODALITY33"]
    assert refusals[0]["reason"] == "association limit of 32 reached"
    print(f"[32 associations] 32 open at once sent {len(statuses)} instances; the 33rd was refused: "
          f"{_rejection(over.stdout + over.stderr)}")
    finish(node, sources, digest, "32 associations + 1 over the limit", t0)


def _rejection(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if "Reason" in line or "Rejected" in line]
    return " / ".join(lines[:3])


def test_permanent_destination_failure_dead_letter_then_resend(rig, batch, sources, digest):
    few = sources[:5]
    node = rig(sender={"attempts": 2, "backoff_s": 0.5, "max_backoff_s": 0.5, "timeout_s": 5.0})
    node.orthanc.stop()  # the PACS is gone for good (as far as the node can tell)
    t0 = time.monotonic()
    assert len(storescu(node.port, [s.path for s in few]).ok) == len(few)
    wait_for(lambda: node.counts().get("dead", 0) == len(few), 240, "the results in the dead-letter folder")
    dead = sorted(p.name for p in (node.spool / "dead-letter").iterdir())
    assert len(dead) == len(few)
    for d in dead:
        folder = node.spool / "dead-letter" / d
        names = sorted(p.name for p in folder.iterdir())  # every result, and a KOS when the study is urgent
        assert names in (["pr.dcm", "reason.json", "sc.dcm", "sr.dcm"], ["ko.dcm", "pr.dcm", "reason.json", "sc.dcm",
                                                                         "sr.dcm"]), names
    audited = {a["job"] for a in node.audit() if a["event"] == "dead_letter"}
    assert audited == set(dead)
    node.orthanc.start()  # fixed
    r = subprocess.run([*node_cli(), "resend", "--config", str(node.config)], capture_output=True, text=True,
                       timeout=120, cwd=node.folder)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("requeued") == len(few)
    node.wait_settled(len(few), SETTLE_S)
    figures = node.account(few, digest)
    print(f"[dead letter + resend] {figure_line(figures)} in {time.monotonic() - t0:.0f} s")
    assert figures["delivered"] == len(few) and figures["duplicates"] == 0
    assert list((node.spool / "dead-letter").iterdir()) == []
    assert {a["job"] for a in node.audit() if a["event"] == "resent"} == set(dead)


def node_cli() -> list[str]:
    return [sys.executable, "-m", "worker.cli"]
