"""Discrepancies to whoever follows them up: an HL7 v2.5.1 ORU^R01 to an MLLP target, or a JSON POST
to a hook URL (httpx). Neither carries a patient identifier: the study is named by its Study
Instance UID (OBX 110180, as in ris/hl7v2.py), the job by its id.

The ORU: MSH-10 derived from the report and the job (a resend carries the same control id),
OBR-4 the plain chest X-ray procedure, OBR-25 P, OBX 110180 the study, then per discrepancy a
coded OBX (the finding's code, present or absent as the model calls it, abnormal flag A) and an
NTE saying which way it goes. Checked against the 2.5.1 structure (ris.hl7v2.validate).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from dicom_node import codes
from ris import mllp
from ris.hl7v2 import STUDY_INSTANCE_UID, MessageInvalid, escape, validate
from ris.reportstore import StoredDiscrepancy
from ris.second_read import MODEL_POSITIVE

_WHAT = {MODEL_POSITIVE: "second read: the model calls {label} present ({tier}, p={p:.2f}); the report is {report} on it",
         "report_positive": "second read: the report calls {label} present; the model calls it absent ({tier}, "
                            "p={p:.2f})"}


class NotifyFailed(Exception):
    """The target did not take the notification (the reason says why)."""


def _cwe(code) -> str:
    return "^".join(escape(v) for v in (code.value, code.meaning, code.scheme_designator))


def control_id(report_id: int, job_id: str) -> str:
    return hashlib.sha256(f"medsam2-cxr/second-read/{report_id}/{job_id}".encode()).hexdigest()[:20].upper()


def oru(found: Sequence[StoredDiscrepancy], *, sending_application: str, receiving_application: str = "",
        sent_at: dt.datetime) -> tuple[str, str]:
    """(ER7 text, MSH-10) of the notification of one comparison's discrepancies."""
    first = found[0]
    control = control_id(first.report_id, first.job_id)
    ts = sent_at.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S") + "+0000"
    segs = [f"MSH|^~\\&|{escape(sending_application)}||{escape(receiving_application)}||{ts}||ORU^R01^ORU_R01|"
            f"{control}|P|2.5.1|||NE|AL",
            "|".join(["OBR", "1", "", "", _cwe(codes.PLAIN_CHEST_XRAY)] + [""] * 17 + [ts, "", "RAD", "P"]),
            f"OBX|1|ST|{_cwe(STUDY_INSTANCE_UID)}||{escape(first.study_instance_uid)}||||||P|||{ts}"]
    for i, d in enumerate(found, 1):
        present = d.direction == MODEL_POSITIVE
        value = _cwe(codes.PRESENT if present else codes.ABSENT)
        segs.append(f"OBX|{i + 1}|CWE|{_cwe(codes.LABEL_CODES[d.label])}|{i}|{value}|||A|||P|||{ts}")
        segs.append("NTE|{}|O|{}".format(i, escape(_WHAT[d.direction].format(
            label=d.label, tier=d.tier, p=d.probability, report=d.report_state))))
    er7 = "\r".join(segs) + "\r"
    validate(er7)
    return er7, control


@dataclass(frozen=True)
class Notifier:
    """Where discrepancies go: an MLLP target (host, port, optional TLS), a hook URL, or both."""

    sending_application: str
    hl7_host: str = ""
    hl7_port: int = 2575
    receiving_application: str = ""
    hl7_tls: ssl.SSLContext | None = None
    webhook_url: str = ""
    webhook_verify: str | bool = True  # a CA bundle path, or True for the system's CAs
    timeout_s: float = 10.0
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def configured(self) -> bool:
        return bool(self.hl7_host or self.webhook_url)

    def __call__(self, found: Sequence[StoredDiscrepancy], now: dt.datetime) -> str:
        """Send one comparison's discrepancies; "sent", else NotifyFailed naming the target and why."""
        errors = []
        if self.hl7_host:
            try:
                er7, control = oru(found, sending_application=self.sending_application,
                                   receiving_application=self.receiving_application, sent_at=now)
                mllp.send(self.hl7_host, self.hl7_port, er7.encode("utf-8"), control, tls=self.hl7_tls,
                          timeout=self.timeout_s)
            except (mllp.AckRejected, mllp.MllpUnavailable, MessageInvalid) as exc:
                errors.append(f"HL7 {self.hl7_host}:{self.hl7_port}: {exc}")
        if self.webhook_url:
            body = {"event": "discrepancy", "study_instance_uid": found[0].study_instance_uid,
                    "job": found[0].job_id, "report": found[0].report_id,
                    "discrepancies": [{"id": d.id, "label": d.label, "direction": d.direction, "tier": d.tier,
                                       "probability": round(d.probability, 4), "report": d.report_state}
                                      for d in found]}
            try:
                r = httpx.post(self.webhook_url, json=body, timeout=self.timeout_s, verify=self.webhook_verify,
                               headers=self.headers)
                if r.status_code >= 300:
                    errors.append(f"hook {self.webhook_url}: HTTP {r.status_code}")
            except httpx.HTTPError as exc:
                errors.append(f"hook {self.webhook_url}: {type(exc).__name__}: {exc}")
        if errors:
            raise NotifyFailed("; ".join(errors))
        return "sent"
