"""Results to the RIS and a FHIR server through worker.pipeline.deliver_job, over real sockets.

The RIS is python-hl7's MLLP server, the FHIR server http.server, both in this process
(tests/ris_peers.py). Each message the RIS gets is parsed by hl7apy against the 2.5.1 ORU^R01
structure and each resource the FHIR server gets is validated by fhir.resources.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import pydicom
import pytest
import structlog
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from dicom_node.audit import AuditLog
from dicom_node.jobstore import JobState, JobStore
from dicom_node.sender import Destination
from dicom_node.spool import Spool
from dicom_node.tls import client_context, server_context
from models.bundle import load_bundle
from models.labels import LABELS
from models.predictor import Predictor
from ris import delivery
from ris.ledger import Ledger
from tests.conftest import issue_server_certificate
from tests.ris_peers import FhirServer, Ris
from worker import pipeline
from worker.clock import ManualClock

pytestmark = pytest.mark.integration

PACS = Destination("PACS", "127.0.0.1", 4242)
NAME, PATIENT_ID, ACCESSION = "Yamada^Hanako", "PID-4711", "ACC-0815"


@pytest.fixture(scope="module")
def predictor(tiny_bundle):
    return Predictor(load_bundle(tiny_bundle), device="cpu")


@pytest.fixture
def ctx(tmp_path):
    spool = tmp_path / "spool"
    jobs = JobStore(spool / "jobs.sqlite")
    return pipeline.Context(spool=Spool(spool), jobs=jobs, audit=AuditLog(spool / "audit.jsonl"), lease_s=60,
                            clock=ManualClock(dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)))


def _reports(ctx, targets, urgent: bool = False) -> delivery.Reports:
    r = delivery.Reports(targets_for=lambda aet: list(targets), ledger=Ledger(ctx.jobs.path), attempts=3,
                         backoff_s=0.05, max_backoff_s=0.1, timeout_s=5, urgency=lambda p: urgent)
    ctx.reports = r
    return r


def _inferred(ctx, predictor, phantom_dir, job_id: str, i: int = 0, name: str = NAME,
              charset="ISO_IR 100", study: str | None = None, sop: str | None = None) -> pydicom.Dataset:
    """A phantom with patient identifiers and an accession number, received and inferred (``study``,
    ``sop``: the Study and SOP Instance UIDs it is given instead of its own)."""
    src = sorted((phantom_dir / "images").glob("*.dcm"))[i]
    ds = pydicom.dcmread(src)
    ds.SpecificCharacterSet = charset
    if study:
        ds.StudyInstanceUID = study
    if sop:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.PatientName, ds.PatientID, ds.AccessionNumber = name, PATIENT_ID, ACCESSION
    ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
    path = ctx.spool.incoming_path(job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    ctx.jobs.add(job_id=job_id, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                 study_instance_uid=ds.StudyInstanceUID, calling_aet="MODALITY", path=ctx.spool.relative(path),
                 state=JobState.QUEUED)
    assert pipeline.infer_jobs([job_id], ctx, predictor, lambda j: None) == [job_id]
    return ds


class Pacs:
    """The DICOM send the pipeline is given: counts what reached the PACS."""

    def __init__(self) -> None:
        self.sent: list[list[str]] = []

    def __call__(self, files, dest) -> None:
        self.sent.append([Path(f).name for f in files])


def _parse(text: str):
    msg = parse_message(text.replace("\n", "\r").strip("\r"), validation_level=VALIDATION_LEVEL.STRICT,
                        find_groups=True)
    msg.validate()  # raises on anything the 2.5.1 ORU^R01 structure does not allow
    return msg


def _segments(text: str, name: str) -> list[list[str]]:
    return [s.split("|") for s in text.split("\r") if s.startswith(name + "|")]


def test_one_oru_per_study_with_a_dropped_connection_and_a_duplicate(ctx, predictor, phantom_dir):
    ds = _inferred(ctx, predictor, phantom_dir, "job1")
    pacs = Pacs()
    with Ris(drop=1) as ris, structlog.testing.capture_logs() as logs:
        target = delivery.Hl7Target(ris.host, ris.port, "RIS", "HOSPITAL")
        _reports(ctx, [target], urgent=True)
        assert pipeline.deliver_job("job1", ctx, lambda aet: PACS, pacs) == JobState.DONE, ctx.jobs.get("job1").reason
        # a duplicate task does nothing; a delivery the ledger already has sends nothing either
        assert pipeline.deliver_job("job1", ctx, lambda aet: PACS, pacs) is None
        job = ctx.jobs.get("job1")
        delivery.deliver_results(ctx, job, [], PACS, pacs, lambda reports, jobs: pipeline.report_content(ctx, jobs, reports))
    assert len(ris.received) == 2, "the first connection was dropped without an ACK: one retry"
    assert ris.received[0] == ris.received[1], "the retry is the same message, same MSH-10"
    assert len(ris.stored) == 1 and len(pacs.sent) == 1
    (text,) = ris.stored.values()
    msg = _parse(text)
    assert msg.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and msg.msh.msh_12.to_er7() == "2.5.1"
    assert msg.msh.msh_18.to_er7() == "8859/1"  # the study's ISO_IR 100
    pid = _segments(text, "PID")[0]
    assert pid[3].split("^")[0] == PATIENT_ID and pid[5].startswith("Yamada^Hanako") and pid[7:9] == ["19700101", "F"]
    orc, obr = _segments(text, "ORC")[0], _segments(text, "OBR")[0]
    assert orc[3] == obr[3] == obr[18] == ACCESSION
    assert obr[25] == "P" and obr[27] == "^^^^^S" and _segments(text, "TQ1")[0][9].startswith("S^")
    obx = _segments(text, "OBX")
    assert [o[5] for o in obx if o[3].startswith("110180^")] == [ds.StudyInstanceUID]
    coded = [o for o in obx if o[2] == "CWE" and o[17].startswith("Newcode1")]
    assert len(coded) == len(LABELS)
    probs = [o for o in obx if o[3].startswith("122157^")]
    assert len(probs) == len(coded) and all(0 <= float(o[5]) <= 1 for o in probs)
    assert any(o[2] == "TX" and o[3].startswith("59776-5^") for o in obx)
    assert any(o[2] == "TX" and o[3].startswith("19005-8^") for o in obx)
    events = [r["event"] for r in ctx.audit.read()]
    assert events == ["inferred", "report_sent", "sent"]
    sent = next(r for r in ctx.audit.read() if r["event"] == "report_sent")
    assert sent["attempts"] == 2 and sent["ack"] == "AA" and sent["priority"] == "S"
    logged = json.dumps(logs, default=str)
    assert PATIENT_ID not in logged and "Yamada" not in logged and ACCESSION not in logged


@pytest.mark.parametrize("code", ["AE", "AR"])
def test_ae_and_ar_dead_letter_with_the_reason_and_resend_sends_the_ris_only(ctx, predictor, phantom_dir, code):
    _inferred(ctx, predictor, phantom_dir, "job2", i=1)
    pacs = Pacs()
    with Ris(answer=code, answer_text=f"unknown patient {PATIENT_ID}") as ris:
        _reports(ctx, [delivery.Hl7Target(ris.host, ris.port)])
        assert pipeline.deliver_job("job2", ctx, lambda aet: PACS, pacs) == JobState.DEAD, ctx.jobs.get("job2").reason
        assert len(ris.received) == 1, "a rejection is not retried"
        job = ctx.jobs.get("job2")
        reason = json.loads((ctx.spool.dead / "job2" / "reason.json").read_text())["reason"]
        assert f"ACK {code}" in job.reason and f"ACK {code}" in reason and "RIS" in reason
        assert PATIENT_ID not in reason and "***" in reason  # the RIS's text, the source's identifiers redacted
        ris.answer, ris.answer_text = "AA", ""
        pipeline.resend("job2", ctx, lambda j: None)
        assert pipeline.deliver_job("job2", ctx, lambda aet: PACS, pacs) == JobState.DONE, ctx.jobs.get("job2").reason
    assert len(pacs.sent) == 1, "the PACS had the results already: not sent again"
    assert len(ris.received) == 2 and ris.received[0] == ris.received[1] and len(ris.stored) == 1
    events = [r["event"] for r in ctx.audit.read()]
    assert events == ["inferred", "dead_letter", "resent", "report_sent", "sent"]


def test_the_ris_not_answering_dead_letters_after_the_last_attempt(ctx, predictor, phantom_dir):
    _inferred(ctx, predictor, phantom_dir, "job3", i=2)
    with Ris(drop=10) as ris:
        _reports(ctx, [delivery.Hl7Target(ris.host, ris.port)])
        assert pipeline.deliver_job("job3", ctx, lambda aet: PACS, Pacs()) == JobState.DEAD, ctx.jobs.get("job3").reason
    assert len(ris.received) == 3 and "no answer after 3 attempts" in ctx.jobs.get("job3").reason


def test_a_japanese_study_reaches_the_ris_in_iso_2022(ctx, predictor, phantom_dir):
    _inferred(ctx, predictor, phantom_dir, "job6", name="Yamada^Hanako=山田^花子=やまだ^はなこ",
              charset=["", "ISO 2022 IR 87"])
    with Ris() as ris:
        _reports(ctx, [delivery.Hl7Target(ris.host, ris.port)])
        assert pipeline.deliver_job("job6", ctx, lambda aet: PACS, Pacs()) == JobState.DONE, ctx.jobs.get("job6").reason
    (raw,) = ris.received
    assert b"\x1b$B" in raw  # JIS X 0208 switched to by an ISO 2022 escape, as MSH-18/20 say
    (text,) = ris.stored.values()
    _parse(text)
    assert _segments(text, "PID")[0][5].split("~")[1] == "山田^花子^^^^^L^I"



def test_oru_over_tls(ctx, predictor, phantom_dir, tmp_path):
    issue_server_certificate(tmp_path, "ris")
    _inferred(ctx, predictor, phantom_dir, "job4", i=3)
    with Ris(tls=server_context(tmp_path / "ris.crt", tmp_path / "ris.key")) as ris:
        _reports(ctx, [delivery.Hl7Target(ris.host, ris.port, tls=client_context(tmp_path / "ca.crt"))])
        assert pipeline.deliver_job("job4", ctx, lambda aet: PACS, Pacs()) == JobState.DONE, ctx.jobs.get("job4").reason
    assert len(ris.stored) == 1


def test_one_fhir_report_per_study_with_retries_and_a_duplicate(ctx, predictor, phantom_dir):
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    from fhir.resources.R4B.observation import Observation

    ds = _inferred(ctx, predictor, phantom_dir, "job5")
    pacs = Pacs()
    # 503 before processing, then a Bundle processed whose answer is lost, then the answer
    with FhirServer(fail=["503", "drop"]) as server:
        target = delivery.FhirTarget(server.url, token=server.token)
        reports = _reports(ctx, [target])
        assert pipeline.deliver_job("job5", ctx, lambda aet: PACS, pacs) == JobState.DONE, ctx.jobs.get("job5").reason
        assert len(server.posts) == 3 and server.posts[0] == server.posts[1] == server.posts[2]
        # a second delivery the ledger did not record (say its worker died first): conditional creates
        content = pipeline.report_content(ctx, [ctx.jobs.get("job5")], reports)
        assert delivery.send_fhir(content, target, reports)["entries"] == {"200 OK": len(server.posts[0]["entry"])}
        # a wrong token is refused at once and named
        with pytest.raises(delivery.ReportUndelivered, match="401"):
            delivery.send_fhir(content, delivery.FhirTarget(server.url, token="wrong"), reports)
    assert server.statuses[0] == ["201 Created"] * len(server.posts[0]["entry"]) and server.statuses[1][0] == "200 OK"
    Bundle.model_validate(server.posts[0])
    (report,) = server.of_type("DiagnosticReport")
    DiagnosticReport.model_validate(report)
    observations = server.of_type("Observation")
    for o in observations:
        Observation.model_validate(o)
    assert len(observations) == len(report["result"]) == len(content.findings) + len(content.images) == len(LABELS) + 1
    assert report["imagingStudy"][0]["identifier"] == {"system": "urn:dicom:uid",
                                                       "value": f"urn:oid:{ds.StudyInstanceUID}"}
    assert report["conclusion"] == content.draft.impression and report["status"] == "preliminary"
    assert report["subject"]["identifier"]["value"] == PATIENT_ID
    assert report["basedOn"][0]["identifier"]["value"] == ACCESSION
    form = report["presentedForm"][0]
    assert form["contentType"].startswith("text/plain")
    text = base64.b64decode(form["data"]).decode("utf-8")
    assert "FINDINGS:" in text and "IMPRESSION:" in text and "not for primary diagnosis" in text
    assert len(pacs.sent) == 1
    assert [r["event"] for r in ctx.audit.read()] == ["inferred", "report_sent", "sent"]


def test_ris_and_fhir_of_the_route_from_the_configuration(tmp_path):
    from worker.settings import Settings

    s = Settings(destination={"ris": {"host": "ris.local", "port": 2576},
                              "routes": {"CT1": {"ae_title": "PACS2", "fhir": {"url": "https://fhir.local/r4",
                                                                               "token": "t"}},
                                         "CR1": {"ae_title": "PACS3"}}})
    reports = delivery.from_settings(s, tmp_path / "jobs.sqlite")
    assert reports is not None
    assert [t.key for t in reports.targets_for("OTHER")] == ["hl7:ris.local:2576"]
    assert [t.key for t in reports.targets_for("CT1")] == ["fhir:https://fhir.local/r4"]
    assert reports.targets_for("CR1") == []
    assert delivery.window_s(s) > 0
    assert delivery.from_settings(Settings(), tmp_path / "jobs.sqlite") is None


def test_the_worker_runtime_carries_the_reports_and_a_lease_that_covers_their_retries(tmp_path):
    from worker.runtime import Runtime
    from worker.settings import Settings

    plain = Runtime.from_settings(Settings(paths={"spool": str(tmp_path / "a")}))
    assert plain.ctx.reports is None
    rt = Runtime.from_settings(Settings(paths={"spool": str(tmp_path / "b")},
                                        destination={"ris": {"host": "127.0.0.1", "port": 2575},
                                                     "fhir": {"url": "http://127.0.0.1:1/fhir"}}))
    assert [t.key for t in rt.ctx.reports.targets_for("ANY")] == ["hl7:127.0.0.1:2575", "fhir:http://127.0.0.1:1/fhir"]
    assert rt.ctx.send_lease_s > plain.ctx.send_lease_s + 2 * rt.settings.sender.attempts * rt.settings.sender.timeout_s
    assert rt.ctx.reports.ledger.path == rt.ctx.jobs.path


STUDY = "1.2.826.0.1.3680043.8.498.20261128"


def _msh10(raw: bytes) -> str:
    return raw.split(b"\r", 1)[0].decode("ascii", "replace").split("|")[9]


def test_one_oru_and_one_bundle_per_study_of_two_images_a_duplicate_and_a_lost_ack(ctx, predictor, phantom_dir):
    from pydicom.uid import generate_uid

    pa = _inferred(ctx, predictor, phantom_dir, "s1", i=0, study=STUDY)
    ap = _inferred(ctx, predictor, phantom_dir, "s2", i=1, study=STUDY)
    pacs = Pacs()
    with Ris(drop=1) as ris, FhirServer(fail=["drop"]) as server:
        targets = [delivery.Hl7Target(ris.host, ris.port, "RIS", "HOSPITAL"),
                   delivery.FhirTarget(server.url, token=server.token)]
        _reports(ctx, targets)
        # the first image reaches the PACS while the second is still owed: the report waits for it
        assert pipeline.deliver_job("s1", ctx, lambda aet: PACS, pacs) == JobState.DONE, ctx.jobs.get("s1").reason
        assert ris.received == [] and server.posts == []
        # the second is the study's last: one report of both images, retried after a lost ACK / answer
        assert pipeline.deliver_job("s2", ctx, lambda aet: PACS, pacs) == JobState.DONE, ctx.jobs.get("s2").reason
        # the same image sent again under a new SOP Instance UID after the report went
        _inferred(ctx, predictor, phantom_dir, "s3", i=0, study=STUDY, sop=generate_uid())
        assert pipeline.deliver_job("s3", ctx, lambda aet: PACS, pacs) == JobState.DONE, ctx.jobs.get("s3").reason
        # a duplicate task, and a resend of a job whose study went: nothing more
        assert pipeline.deliver_job("s2", ctx, lambda aet: PACS, pacs) is None
        job = ctx.jobs.get("s1")
        delivery.deliver_results(ctx, job, [], PACS, pacs, lambda reports, jobs: pipeline.report_content(ctx, jobs, reports))
    assert len(pacs.sent) == 3, "the PACS gets every image's results"
    assert len(ris.received) == 2 and len({_msh10(m) for m in ris.received}) == 1, "one ORU, sent twice (lost ACK)"
    assert len(ris.stored) == 1
    assert len(server.posts) == 2 and server.posts[0] == server.posts[1], "one Bundle, posted twice (lost answer)"
    n = len(server.posts[0]["entry"])
    assert server.statuses == [["201 Created"] * n, ["200 OK"] * n], "the repeat is recognised: nothing new"
    assert len(server.of_type("DiagnosticReport")) == 1

    (text,) = ris.stored.values()
    _parse(text)
    obx = _segments(text, "OBX")
    assert [o[5] for o in obx if o[3].startswith("110180^")] == [STUDY]
    assert len([o for o in obx if o[2] == "CWE" and o[17].startswith("Newcode1")]) == len(LABELS)
    sources = {o[5] for o in obx if o[3].startswith("SRCIMG^")}
    assert sources <= {pa.SOPInstanceUID, ap.SOPInstanceUID}
    ood = [o for o in obx if o[3].startswith("OODIMG^")]
    assert [next(s[5] for s in obx if s[3].startswith("SRCIMG^") and s[4] == o[4]) for o in ood] == [
        pa.SOPInstanceUID, ap.SOPInstanceUID], "out of distribution stated per image"
    observations = server.of_type("Observation")
    assert len(observations) == len(LABELS) + 2
    events = [(r["event"], r.get("job")) for r in ctx.audit.read() if r["event"] != "inferred"]
    assert events == [("report_deferred", "s1"), ("report_deferred", "s1"), ("sent", "s1"),
                      ("report_sent", "s2"), ("report_sent", "s2"), ("sent", "s2"),
                      ("study_already_reported", "s3"), ("study_already_reported", "s3"), ("sent", "s3")]
    sent = [r for r in ctx.audit.read() if r["event"] == "report_sent"]
    assert all(r["jobs"] == ["s1", "s2"] for r in sent)
    assert {r["reported_by"] for r in ctx.audit.read() if r["event"] == "study_already_reported"} == {"s2"}


def test_two_io_workers_finishing_a_study_at_once_send_one_report(ctx, predictor, phantom_dir):
    import threading

    _inferred(ctx, predictor, phantom_dir, "c1", i=0, study=STUDY)
    _inferred(ctx, predictor, phantom_dir, "c2", i=1, study=STUDY)
    both_at_the_pacs = threading.Barrier(2, timeout=30)
    stored: list[str] = []

    def pacs(files, dest) -> None:  # each worker reaches the PACS, then both go on at once
        stored.append(str(files[0]))
        both_at_the_pacs.wait()

    states: dict[str, JobState | None] = {}
    with Ris() as ris, FhirServer() as server:
        _reports(ctx, [delivery.Hl7Target(ris.host, ris.port), delivery.FhirTarget(server.url, token=server.token)])

        def worker(job_id: str) -> None:
            states[job_id] = pipeline.deliver_job(job_id, ctx, lambda aet: PACS, pacs)

        threads = [threading.Thread(target=worker, args=(j,)) for j in ("c1", "c2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert states == {"c1": JobState.DONE, "c2": JobState.DONE} and len(stored) == 2
    assert len(ris.received) == 1 and len(ris.stored) == 1, "one ORU, not two and not none"
    assert len(server.posts) == 1 and len(server.of_type("DiagnosticReport")) == 1
    sent = [r for r in ctx.audit.read() if r["event"] == "report_sent"]
    assert len({r["target"] for r in sent}) == len(sent) == 2, "one report per target, whichever worker sent it"
    assert all(r["jobs"] == ["c1", "c2"] for r in sent), "each describes both images"


def test_a_report_left_to_an_image_that_then_failed_goes_after_the_reconciler(ctx, predictor, phantom_dir):
    _inferred(ctx, predictor, phantom_dir, "f1", i=0, study=STUDY)
    _inferred(ctx, predictor, phantom_dir, "f2", i=1, study=STUDY)
    with Ris() as ris:
        _reports(ctx, [delivery.Hl7Target(ris.host, ris.port)])
        assert pipeline.deliver_job("f1", ctx, lambda aet: PACS, Pacs()) == JobState.DONE
        assert ris.received == [], "owed to f2"
        # f2 fails at encoding (say a broken source): it never comes to the report step
        assert ctx.jobs.claim("f2", JobState.INFERRED, JobState.SENDING, 60) is not None
        assert ctx.jobs.advance("f2", JobState.SENDING, JobState.FAILED, reason="cannot encode results: test")
        requeued: list[str] = []
        assert pipeline.reconcile(ctx, 0, lambda j: None, requeued.append) == 1 and requeued == ["f1"]
        assert pipeline.deliver_job("f1", ctx, lambda aet: PACS, Pacs()) == JobState.DONE, ctx.jobs.get("f1").reason
        assert pipeline.reconcile(ctx, 0, lambda j: None, requeued.append) == 0
    assert len(ris.received) == 1
    (sent,) = [r for r in ctx.audit.read() if r["event"] == "report_sent"]
    assert sent["job"] == "f1" and sent["jobs"] == ["f1", "f2"], "the failed image's prediction is in the report"
