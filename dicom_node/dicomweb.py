"""The STOW-RS sender: result objects to a DICOMweb service (PS3.18 10.5), beside the C-STORE one.

:class:`WebDestination` is a :class:`dicom_node.sender.ResultDestination`, so
:func:`dicom_node.sender.send_with_retry` retries it, and the pipeline dead-letters its results,
exactly as for C-STORE. dicomweb-client builds the multipart request; its own retries are off
(ours count attempts, back off and dead-letter). Stored means: HTTP 200, or 202 with every SOP
instance in the response's ReferencedSOPSequence and none in its FailedSOPSequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pydicom
import requests
import structlog
from dicomweb_client import DICOMwebClient
from pydicom.errors import InvalidDicomError

from dicom_node.sender import DeliveryFailed

log = structlog.get_logger(__name__)

FAILED_SOP_SEQUENCE = "FailedSOPSequence"  # (0008,1198)
REFERENCED_SOP_SEQUENCE = "ReferencedSOPSequence"  # (0008,1199)


@dataclass(frozen=True)
class WebDestination:
    """A DICOMweb service: STOW-RS to ``<url>/studies[/<study>]``.

    ``ae_title`` names it in logs, metrics, pauses and the audit (as a DIMSE destination's does);
    ``token`` is sent as ``Authorization: Bearer``; ``ca`` (PEM) is what an https server's
    certificate must chain to (empty: the system's CAs), ``cert``/``key`` our client certificate.
    """

    url: str
    ae_title: str = "PACS"
    token: str = field(default="", repr=False, compare=False)
    ca: str = ""
    cert: str = ""
    key: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"DICOMweb url {self.url!r}: needs http(s)://host[:port]/path")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    def __str__(self) -> str:
        return f"{self.ae_title} {self.url.rstrip('/')} (DICOMweb)"

    def _session(self) -> requests.Session:
        session = requests.Session()
        if self.ca:
            session.verify = self.ca
        if self.cert:
            session.cert = (self.cert, self.key) if self.key else self.cert
        if self.token:
            session.headers["Authorization"] = f"Bearer {self.token}"
        return session

    def _client(self, timeout: float) -> DICOMwebClient:
        client = DICOMwebClient(self.url.rstrip("/"), session=self._session(), timeout=timeout)
        client.set_http_retry_params(retry=False)  # send_with_retry owns every retry
        return client

    def store(self, files: list[Path], calling_ae: str = "MEDSAM2CXR", timeout: float = 30) -> None:
        """STOW-RS every file in one request (to their study's URL when they share one).

        Raises
        ------
        DeliveryFailed
            A file could not be read; no connection, a timeout or TLS failure; an HTTP error
            status; or the response does not confirm every instance (FailedSOPSequence items are
            named with their FailureReason).
        """
        files = [Path(f) for f in files]
        if not files:
            return
        try:
            datasets = [pydicom.dcmread(f) for f in files]
        except (OSError, InvalidDicomError) as exc:
            raise DeliveryFailed(f"{self}: cannot read a result file: {exc}") from exc
        studies = {str(ds.get("StudyInstanceUID", "")) for ds in datasets}
        study = studies.pop() if len(studies) == 1 and "" not in studies else None
        wanted = {str(ds.SOPInstanceUID) for ds in datasets}
        try:
            answer = self._client(timeout).store_instances(datasets, study_instance_uid=study)
        except requests.HTTPError as exc:
            rsp = exc.response
            raise DeliveryFailed(f"{self}: HTTP {rsp.status_code if rsp is not None else '?'}"
                                 f"{_failures(_body(rsp))}") from exc
        except requests.RequestException as exc:  # no connection, timeout, TLS
            raise DeliveryFailed(f"{self}: {type(exc).__name__}: {exc}") from exc
        failed = _failures(answer)
        if failed:
            raise DeliveryFailed(f"{self}: not stored{failed}")
        referenced = {str(item.get("ReferencedSOPInstanceUID", ""))
                      for item in answer.get(REFERENCED_SOP_SEQUENCE, [])}
        if referenced and not wanted <= referenced:
            raise DeliveryFailed(f"{self}: {len(wanted - referenced)} of {len(wanted)} instances not confirmed")
        for item in answer.get(REFERENCED_SOP_SEQUENCE, []):
            if "WarningReason" in item:
                log.warning("stored with warning", destination=str(self),
                            sop_instance_uid=str(item.get("ReferencedSOPInstanceUID", "")),
                            warning=f"0x{int(item.WarningReason):04X}")

    def probe(self, calling_ae: str = "MEDSAM2CXR", timeout: float = 2.0) -> str | None:
        """None when the service answers ``GET <url>/studies?limit=1`` with 2xx, or 405 (a
        STOW-only service), with our token; else why not."""
        try:
            rsp = self._session().get(self.url.rstrip("/") + "/studies", params={"limit": "1"}, timeout=timeout,
                                      headers={"Accept": "application/dicom+json"})
        except requests.RequestException as exc:
            return f"cannot connect: {type(exc).__name__}: {exc}"
        if rsp.ok or rsp.status_code == 405:
            return None
        if rsp.status_code in (401, 403):
            return f"HTTP {rsp.status_code}: the DICOMweb service refused our token"
        return f"HTTP {rsp.status_code} from {self.url.rstrip('/')}/studies"


def _body(rsp: requests.Response | None) -> pydicom.Dataset:
    """The response dataset of an error answer (409 lists FailedSOPSequence), or an empty one."""
    if rsp is None or "json" not in rsp.headers.get("Content-Type", ""):
        return pydicom.Dataset()
    try:
        return pydicom.Dataset.from_json(rsp.json())
    except (ValueError, TypeError, KeyError):
        return pydicom.Dataset()


def _failures(answer: pydicom.Dataset) -> str:
    """'': no FailedSOPSequence; else ': <uid> 0xA700, ...' (UIDs and codes, never values)."""
    items = answer.get(FAILED_SOP_SEQUENCE, [])
    if not items:
        return ""
    said = [f"{item.get('ReferencedSOPInstanceUID', '?')} FailureReason 0x{int(item.get('FailureReason', 0)):04X}"
            for item in items[:5]]
    return ": " + ", ".join(said) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
