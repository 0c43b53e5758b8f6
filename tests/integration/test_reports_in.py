"""Reports in over real sockets: a RIS sends ORU^R01 over MLLP (plain and TLS) to the node's report
listener (ris/inbound.py), built by worker.node.Node from [second_read]; the report is kept with
both labelers' labels, matched to its study's jobs by Study UID or the accession's keyed hash
(before or after the image), compared, and each discrepancy audited and notified to a test RIS
(tests/ris_peers.py) whose messages hl7apy checks against the 2.5.1 structure."""

from __future__ import annotations

import datetime as dt
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dicom_node.jobstore import JobState
from dicom_node.tls import client_context
from models.labels import LABELS
from models.prediction import Finding, ModelIdentity, Prediction
from ris import mllp
from ris.hl7v2 import validate
from tests.conftest import free_port, issue_server_certificate, require_peer, wait_for
from tests.ris_peers import Ris
from worker import pipeline
from worker.clock import ManualClock
from worker.node import Node
from worker.settings import Settings

pytestmark = pytest.mark.integration

STUDY, ACCESSION = "1.2.826.0.1.3680043.8.498.1", "ACC-20261202-7"
MODEL = ModelIdentity("tiny", "1", "ab" * 32, "medsam2-cxr", True, "phantoms", "research")
# the model: effusion (high) and cardiomegaly (medium) present, edema present but low, the rest absent
CALLED = {"Pleural Effusion": ("high", 0.91), "Cardiomegaly": ("medium", 0.7), "Edema": ("low", 0.52)}


def _prediction(ood: bool = False) -> Prediction:
    findings = tuple(Finding(label, CALLED.get(label, ("low", 0.1))[1], 0.5, CALLED.get(label, ("low", 0.1))[0], 0.01)
                     for label in LABELS)
    return Prediction(findings, ood_score=2.0 if ood else 0.0, ood_threshold=1.0, center=np.zeros(4),
                      radius=np.ones(4))


def _oru(control: str, text: list[str], *, study: str = STUDY, accession: str = ACCESSION, status: str = "F",
         kind: str = "ORU^R01^ORU_R01") -> bytes:
    """A RIS's final report: PID with a name and an ID (that must never reach the store), accession in
    OBR-18, the Study UID as IHE's OBX 113014, the text as TX lines under Findings and Impressions."""
    segs = [f"MSH|^~\\&|RIS|HOSP|MEDSAM2CXR|HOSP|20261202101500||{kind}|{control}|P|2.5.1|||AL|NE||UNICODE UTF-8",
            "PID|1||PID-99^^^HOSP^PI||Suzuki^Taro||19600101|M",
            f"ORC|RE||{accession}|||CM",
            f"OBR|1||{accession}|36643-5^XR Chest 2V^LN|||20261202090000|||||||||||{accession}||||20261202101000"
            f"||RAD|{status}"]
    n = 1
    if study:
        segs.append(f"OBX|{n}|HD|113014^DICOM Study^DCM||{study}||||||{status}")
        n += 1
    for i, line in enumerate(text):
        code = "59776-5^Findings^LN" if i == 0 else "19005-8^Impressions^LN"
        segs.append(f"OBX|{n}|TX|{code}||{line}||||||{status}")
        n += 1
    return ("\r".join(segs) + "\r").encode("utf-8")


def _node(tmp_path: Path, notify_port: int = 0, **inbound) -> Node:
    settings = Settings(paths={"spool": tmp_path / "spool"}, node={"lookup_secret": "site-secret"},
                        second_read={"enabled": True, "also_report_positive_model_negative": True,
                                     "inbound": {"host": "127.0.0.1", "port": free_port(), **inbound},
                                     "notify": {"hl7_host": "127.0.0.1" if notify_port else "",
                                                "hl7_port": notify_port or 2575, "timeout_s": 5}})
    return Node(settings, clock=ManualClock(dt.datetime(2026, 12, 2, 10, 0, tzinfo=dt.UTC)))


def _inferred_job(node: Node, job_id: str, *, study: str = STUDY, accession: str | None = ACCESSION,
                  ood: bool = False):
    from dicom_node.lookup import keyed_hash

    key = node.secret("lookup", node.settings.node.lookup_secret)
    node.jobs.add(job_id=job_id, sop_instance_uid=f"{study}.{job_id[-1]}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                  study_instance_uid=study, calling_aet="PACS", path=f"incoming/{job_id}.dcm",
                  state=JobState.INFERRED, accession_hash=keyed_hash(key, accession))
    pipeline.save_prediction(node.spool, node.spool.result_dir(job_id), _prediction(ood), MODEL)
    return node.jobs.get(job_id)


def _send(node: Node, data: bytes, control: str, tls=None) -> str:
    port = node.settings.second_read.inbound.port
    return mllp.send("127.0.0.1" if tls is None else "localhost", port, data, control, tls=tls, timeout=10)


def test_a_report_before_the_image_is_matched_when_the_job_infers_and_notified_over_hl7(tmp_path):
    with Ris() as ris:
        node = _node(tmp_path, notify_port=ris.port)
        reader = node.second_reader()
        assert reader is not None
        listener = node.report_listener(reader)
        assert listener is not None
        with listener:
            text = ["The heart is enlarged. Consolidation in the right lower lobe.", "No pneumothorax."]
            assert _send(node, _oru("MSG1", text), "MSG1") == "AA"
            assert _send(node, _oru("MSG1", text), "MSG1") == "AA"  # a resend: kept once
        assert node.reports.counts() == {"reports": 1, "waiting": 1, "comparisons": 0, "discrepancies": 0}
        report = node.reports.for_study(STUDY, None)[0]
        labels = report.labels
        assert labels["lexicon"]["Cardiomegaly"] == 1 and labels["grammar"]["Cardiomegaly"] == 1
        assert labels["agree"]["Pneumothorax"] is True and 0 < labels["agreement"] <= 1
        job = _inferred_job(node, "job1")
        found = reader.job_inferred(job)
        # effusion: called high, the report is silent; consolidation (and so its parent Lung Opacity): the
        # report calls it, the model does not; cardiomegaly is in the report, edema is called only at a low tier
        assert {(d.label, d.direction) for d in found} == {("Pleural Effusion", "model_positive"),
                                                            ("Consolidation", "report_positive"),
                                                            ("Lung Opacity", "report_positive")}
        assert reader.job_inferred(job) == []  # compared once
        wait_for(lambda: ris.stored, 10, "the notification at the RIS")
    msg = validate(next(iter(ris.stored.values())))
    assert STUDY in msg.to_er7() and "Pleural Effusion" in msg.to_er7()
    assert {d.notified for d in node.reports.discrepancies()} == {"sent"}
    events = [e for e in node.audit.read() if e["event"] in ("report_received", "discrepancy")]
    assert [e["event"] for e in events] == ["report_received"] + ["discrepancy"] * 3
    # the accession number and the patient's name and ID are nowhere in the report store
    raw = b"".join(p.read_bytes() for p in node.layout.root.glob("reports.sqlite*"))
    for secret in (ACCESSION, "PID-99", "Suzuki"):
        assert secret.encode() not in raw
    with sqlite3.connect(node.layout.reports) as db:
        assert db.execute("SELECT accession_hash FROM reports").fetchone()[0] is not None


def test_a_report_after_the_image_is_matched_by_accession_alone(tmp_path):
    node = _node(tmp_path)
    reader = node.second_reader()
    assert reader is not None
    _inferred_job(node, "job2", study="1.2.3.4.5")  # another UID: only the accession matches
    _inferred_job(node, "job3", study="1.2.3.4.6", accession="OTHER", ood=True)
    listener = node.report_listener(reader)
    assert listener is not None
    with listener:
        assert _send(node, _oru("MSG2", ["Normal heart size. Small left pleural effusion."], study=""), "MSG2") == "AA"
        wait_for(lambda: node.reports.counts()["comparisons"] == 1, 10, lambda: str(node.reports.counts()))
    # effusion is in the report, cardiomegaly (medium) is not
    assert [(d.label, d.job_id) for d in node.reports.discrepancies()] == [("Cardiomegaly", "job2")]
    assert node.reports.discrepancies()[0].notified == ""  # no target configured


@pytest.mark.parametrize("data, why", [
    (b"this is no HL7 message", "does not start with an MSH"),
    (_oru("MSG3", ["No acute disease."], kind="ADT^A01^ADT_A01"), "MSH-9"),
    (_oru("MSG4", ["No acute disease."], study="", accession=""), "cannot be matched"),
    (_oru("MSG5", []), "no report text"),
])
def test_a_message_that_is_no_report_gets_ae_naming_why(tmp_path, data, why):
    node = _node(tmp_path)
    reader = node.second_reader()
    assert reader is not None
    listener = node.report_listener(reader)
    assert listener is not None
    control = data.split(b"|")[9].decode() if data.startswith(b"MSH") else ""
    with listener:
        with pytest.raises(mllp.AckRejected) as err:
            _send(node, data, control)
    assert err.value.code == "AE" and why in err.value.text
    assert node.reports.counts()["reports"] == 0


def test_a_preliminary_report_is_kept_and_not_compared(tmp_path):
    node = _node(tmp_path)
    reader = node.second_reader()
    assert reader is not None
    _inferred_job(node, "job5")
    listener = node.report_listener(reader)
    assert listener is not None
    with listener:
        assert _send(node, _oru("MSG6", ["No acute disease."], status="P"), "MSG6") == "AA"
    assert node.reports.counts()["reports"] == 1
    assert node.reports.counts()["comparisons"] == 0



def test_reports_over_tls(tmp_path):
    issue_server_certificate(tmp_path, "node")
    node = _node(tmp_path, tls={"cert": str(tmp_path / "node.crt"), "key": str(tmp_path / "node.key")})
    reader = node.second_reader()
    assert reader is not None
    listener = node.report_listener(reader)
    assert listener is not None
    with listener:
        assert _send(node, _oru("MSG7", ["No acute disease."]), "MSG7", tls=client_context(tmp_path / "ca.crt")) == "AA"
        with pytest.raises(mllp.MllpUnavailable):  # plain MLLP to the TLS port gets no ACK
            _send(node, _oru("MSG8", ["No acute disease."]), "MSG8")
    assert node.reports.counts()["reports"] == 1


def _pacs_text_sr(path: Path, study: str, accession: str, text: dict[str, str]) -> Path:
    """A first reader's report as a PACS stores it: a Basic Text SR with Findings and Impression containers."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from dicom_node.sop import BASIC_TEXT_SR

    def code(value: str, scheme: str, meaning: str) -> Dataset:
        c = Dataset()
        c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
        return c

    def item(kind: str, concept: Dataset, **values) -> Dataset:
        i = Dataset()
        i.RelationshipType, i.ValueType, i.ConceptNameCodeSequence = "CONTAINS", kind, [concept]
        for k, v in values.items():
            setattr(i, k, v)
        return i

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = BASIC_TEXT_SR, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.Modality, ds.Manufacturer, ds.AccessionNumber = "SR", "Reporting Co", accession
    ds.PatientName, ds.PatientID = "Suzuki^Taro", "PID-99"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = [code("18748-4", "LN", "Diagnostic Imaging Report")]
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "VERIFIED"
    sections = []
    for (value, meaning), body in zip((("121070", "Findings"), ("121072", "Impressions")), text.values()):
        c = item("CONTAINER", code(value, "DCM", meaning), ContinuityOfContent="SEPARATE")
        c.ContentSequence = [item("TEXT", code(value, "DCM", meaning[:-1] if meaning.endswith("s") else meaning),
                                  TextValue=body)]
        sections.append(c)
    ds.ContentSequence = sections
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_basic_text_sr_from_the_pacs_goes_to_report_intake(tmp_path):
    storescu = require_peer("storescu")
    from dicom_node.listener import start_listener
    from worker.cli.serve import _sr_intake

    node = _node(tmp_path)
    reader = node.second_reader()
    assert reader is not None
    _inferred_job(node, "job6")
    port = free_port()
    server = start_listener(node.listener_config(host="127.0.0.1", port=port, network_timeout=10), node.spool,
                            node.jobs, node.audit, lambda job_id: None, on_report=_sr_intake(reader))
    try:
        sr = _pacs_text_sr(tmp_path / "report.dcm", STUDY, ACCESSION,
                           {"findings": "Large right pleural effusion.", "impression": "Effusion. Heart normal."})
        done = subprocess.run([storescu, "-aec", "MEDSAM2CXR", "127.0.0.1", str(port), str(sr)], capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, done.stderr
    finally:
        server.shutdown()
    (report,) = node.reports.for_study(STUDY, None)
    assert report.source == "sr" and report.status == "F" and "FINDINGS:" in report.text
    # the report has the effusion; it is silent on the cardiomegaly the model calls at medium
    assert [d.label for d in node.reports.discrepancies()] == ["Cardiomegaly"]
    assert [j.state for j in node.jobs.search() if j.sop_class_uid != "1.2.840.10008.5.1.4.1.1.1.1"] == [
        JobState.SKIPPED]  # the SR itself is stored and skipped, as before


def test_discrepancies_to_a_hook(tmp_path):
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    posts: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204 if len(posts) == 1 else 500)
            self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        node = _node(tmp_path)
        node.settings.second_read.notify.webhook_url = f"http://127.0.0.1:{httpd.server_address[1]}/hook"
        reader = node.second_reader()
        assert reader is not None
        _inferred_job(node, "job7")
        _inferred_job(node, "job8", study="1.2.3.9", accession="ACC-2")
        from ris.report_in import IncomingReport

        reader.receive(IncomingReport("hl7", "M1", STUDY, "", "F", "FINDINGS: No acute disease."))
        reader.receive(IncomingReport("hl7", "M2", "1.2.3.9", "", "F", "FINDINGS: No acute disease."))
    finally:
        httpd.shutdown()
    assert [sorted(d["label"] for d in p["discrepancies"]) for p in posts] == [["Cardiomegaly", "Pleural Effusion"]] * 2
    assert "ACC" not in json.dumps(posts) and posts[0]["study_instance_uid"] == STUDY
    notified = {d.job_id: d.notified for d in node.reports.discrepancies()}
    assert notified["job7"] == "sent" and notified["job8"].startswith("failed: hook") and "HTTP 500" in notified["job8"]


def test_the_pipeline_compares_a_new_prediction_with_the_report_that_came_first(tmp_path, tiny_bundle, phantom_dir):
    import pydicom

    from models.bundle import load_bundle
    from models.predictor import Predictor
    from ris.report_in import IncomingReport

    node = _node(tmp_path)
    node.settings.second_read.tiers = ["medium", "high", "not validated"]  # a phantom-trained bundle
    reader = node.second_reader()
    assert reader is not None
    ds = pydicom.dcmread(sorted((phantom_dir / "images").glob("*.dcm"))[0])
    reader.keep(IncomingReport("hl7", "EARLY", str(ds.StudyInstanceUID), "", "F", "FINDINGS: No acute disease."))
    ctx = node.context()
    assert ctx.second_read is not None
    path = ctx.spool.incoming_path("jobp")
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    ctx.jobs.add(job_id="jobp", sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                 study_instance_uid=ds.StudyInstanceUID, calling_aet="PACS", path=ctx.spool.relative(path),
                 state=JobState.QUEUED)
    assert pipeline.infer_jobs(["jobp"], ctx, Predictor(load_bundle(tiny_bundle), device="cpu"), lambda j: None) == ["jobp"]
    assert node.reports.counts()["comparisons"] == 1 and node.reports.compared(1, "jobp")
    prediction = node.load_prediction("jobp")
    assert prediction is not None
    called = {f.label for f in prediction.findings
              if f.present and f.label != "No Finding" and f.tier in ("medium", "high", "not validated")}
    assert {d.label for d in node.reports.discrepancies()} == (set() if prediction.out_of_distribution else called)
