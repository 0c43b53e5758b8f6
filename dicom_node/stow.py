"""STOW-RS in (DICOMweb, PS3.18 10.5): ``POST /dicomweb/studies[/{StudyInstanceUID}]`` on the node's
HTTP app (console/app.py; HTTPS with ``[node.tls]``), with the guarantee C-STORE gives.

Each part of the ``multipart/related; type="application/dicom"`` body streams into a file in the
spool's ``tmp/`` (never whole into memory; a partial write there, swept as every other one) and
then goes through the listener's own step,
:func:`dicom_node.listener.accept_instance`: durable in the spool, inspected, filtered, a job row,
enqueued. An instance is listed as stored only after that returned success. What C-STORE
refuses at association negotiation is refused here per instance: a SOP class the listener does
not accept (0x0122), a transfer syntax it does not accept (0xC122); an instance of another study
than the URL's is refused too (0xA900); nothing of those is kept. Own results, laterals and
other non-processed images are stored and skipped, as by C-STORE, and so are duplicates.

The answer is a PS3.18 Store Instances Response (application/dicom+json): 200 when every
instance was stored, 202 when some failed, 409 when none was stored, each failure in
FailedSOPSequence with its FailureReason. 401 without a valid bearer token, 415 for another
media type, 400 for a body that is not multipart/related or holds no instance.

Authentication: ``Authorization: Bearer <token>``; ``[[dicomweb.clients]]`` hold each token's
SHA-256 (``python -m dicom_node.stow token`` makes a token and its digest). The tokens are 256-bit
random strings, so a fast digest is enough (argon2 is for passwords people choose) and a request
costs one hash. The client's ``name`` becomes the job's calling AE title: routes, metrics and
the audit treat a STOW-RS client as they treat a modality.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import pydicom
import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydicom.dataset import Dataset
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from dicom_node import metrics
from dicom_node.audit import AuditLog
from dicom_node.inspect import inflate_limit
from dicom_node.jobstore import JobStore
from dicom_node.listener import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, Intake, ListenerConfig, accept_instance
from dicom_node.objects import Objects
from dicom_node.sop import IMAGE_STORAGE, STORED_AND_SKIPPED, TRANSFER_SYNTAXES
from dicom_node.spool import OutOfSpace, Spool

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

log = structlog.get_logger(__name__)

PREFIX = "/dicomweb"
DICOM = b"application/dicom"
DICOM_JSON = "application/dicom+json"
# PS3.18 10.5.3 Failure Reasons (the C-STORE status of the same failure, where there is one)
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_MISMATCH = 0xA900  # the instance is not of the study the URL names
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_TRANSFER_SYNTAX = 0xC122  # Referenced Transfer Syntax not supported
FAILURE_SOP_CLASS = 0x0122  # Referenced SOP Class not supported
FAILURE_PROCESSING = 0x0110
_FAILURE_OF_STATUS = {OUT_OF_RESOURCES: FAILURE_OUT_OF_RESOURCES, CANNOT_UNDERSTAND: FAILURE_CANNOT_UNDERSTAND}
ACCEPTED_CLASSES = frozenset(IMAGE_STORAGE + STORED_AND_SKIPPED)
ACCEPTED_SYNTAXES = frozenset(str(ts) for ts in TRANSFER_SYNTAXES)
SPACE_CHECK_BYTES = 1 << 20  # a part being written checks the spool's watermark this often


def hash_token(token: str) -> str:
    """The ``token_sha256`` of a bearer token."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """(a fresh 256-bit bearer token, its SHA-256 for ``[[dicomweb.clients]] token_sha256``)."""
    token = secrets.token_urlsafe(32)
    return token, hash_token(token)


class Tokens:
    """Bearer token -> client name, compared in constant time against every configured digest."""

    def __init__(self, clients: list) -> None:
        self._clients = [(bytes.fromhex(c.token_sha256), c.name) for c in clients]

    @property
    def names(self) -> list[str]:
        return [name for _, name in self._clients]

    def client(self, authorization: str | None) -> str | None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for want, name in self._clients:  # no early exit: the time does not say which matched
            if hmac.compare_digest(digest, want):
                found = name
        return found


@dataclass
class Part:
    """One body part: its file (None once discarded), and why it cannot be stored (None: it may)."""

    path: Path | None
    why: str | None = None
    failure: int = FAILURE_CANNOT_UNDERSTAND


class PartWriter:
    """python-multipart callbacks that write each ``application/dicom`` part to its own file in
    ``folder``, at most ``limit`` bytes each, checking the spool watermark as they grow."""

    def __init__(self, folder: Path, limit: int, spool: Spool) -> None:
        self.folder, self.limit, self.spool = folder, limit, spool
        self.finished: list[Part] = []
        self.ended = False  # the closing boundary was seen
        self._field, self._value = bytearray(), bytearray()
        self._type = b""
        self._fh: BinaryIO | None = None
        self._part: Part | None = None
        self._size = self._checked = 0
        self.callbacks: MultipartCallbacks = {"on_part_begin": self._begin, "on_header_field": self._header_field,
                          "on_header_value": self._header_value, "on_header_end": self._header_end,
                          "on_headers_finished": self._headers_finished, "on_part_data": self._data,
                          "on_part_end": self._end, "on_end": self._all_end}

    def _begin(self) -> None:
        self._type, self._size, self._checked = b"", 0, 0
        self._part = Part(None)

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if bytes(self._field).strip().lower() == b"content-type":
            self._type = parse_options_header(bytes(self._value))[0]
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        assert self._part is not None
        if self._type not in (DICOM, b""):  # a part without Content-Type has the root's type
            self._part.why = f"part of media type {self._type.decode('latin-1')[:60]!r}, not application/dicom"
            return
        self._part.path = self.folder / f"stow-{uuid.uuid4().hex}.dcm"
        self._fh = open(self._part.path, "wb")  # noqa: SIM115 - held open across callbacks, closed in _end/_discard

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._fh is None:
            return
        self._size += end - start
        try:
            if self._size > self.limit:
                raise _Refused(f"larger than {self.limit} bytes (the pixel limit's largest image)",
                               FAILURE_CANNOT_UNDERSTAND)
            if self._size - self._checked >= SPACE_CHECK_BYTES:
                self._checked = self._size
                self.spool.check_space(SPACE_CHECK_BYTES)
            self._fh.write(data[start:end])
        except OutOfSpace:
            self._discard("spool full", FAILURE_OUT_OF_RESOURCES)
        except _Refused as exc:
            self._discard(exc.why, exc.failure)
        except OSError as exc:  # e.g. ENOSPC below the watermark's check
            self._discard(f"spool write failed: {exc.strerror}", FAILURE_OUT_OF_RESOURCES)

    def _discard(self, why: str, failure: int) -> None:
        assert self._part is not None and self._fh is not None and self._part.path is not None
        self._fh.close()
        self._fh = None
        self._part.path.unlink(missing_ok=True)
        self._part.path, self._part.why, self._part.failure = None, why, failure

    def _end(self) -> None:
        assert self._part is not None
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.finished.append(self._part)
        self._part = None

    def _all_end(self) -> None:
        self.ended = True

    def take(self) -> list[Part]:
        done, self.finished = self.finished, []
        return done

    def abandon(self) -> None:
        """Remove the file of a part the body ended inside."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._part is not None and self._part.path is not None:
            self._part.path.unlink(missing_ok=True)


class _Refused(Exception):
    def __init__(self, why: str, failure: int) -> None:
        super().__init__(why)
        self.why, self.failure = why, failure


@dataclass
class Outcome:
    """One instance's line in the response."""

    sop_class: str | None
    sop_instance: str | None
    failure: int | None = None  # None: stored
    why: str = ""

    def item(self) -> Dataset:
        ds = Dataset()
        if self.sop_class:
            ds.ReferencedSOPClassUID = self.sop_class
        if self.sop_instance:
            ds.ReferencedSOPInstanceUID = self.sop_instance
        if self.failure is not None:
            ds.FailureReason = self.failure
        return ds


def _header(path: Path) -> tuple[str | None, str | None, str | None, str | None]:
    """(SOP class, SOP instance, transfer syntax, study) from the file meta and header; Nones
    when it cannot be read, which :func:`accept_instance` then quarantines with the reason."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"])
        meta = ds.file_meta
        sop_class = str(meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", "") or "")
        sop_instance = str(ds.get("SOPInstanceUID", "") or meta.get("MediaStorageSOPInstanceUID", "") or "")
        return (sop_class or None, sop_instance or None, str(meta.get("TransferSyntaxUID", "") or "") or None,
                str(ds.get("StudyInstanceUID", "") or "") or None)
    except Exception:  # noqa: BLE001 - any parse failure: the full inspection says why and quarantines it
        return None, None, None, None


@dataclass
class Receiver:
    """STOW-RS's side of :func:`accept_instance`: one per HTTP app."""

    intake: Intake

    def accept(self, part: Part, client: str, peer: str, study: str | None) -> Outcome:
        """Check what C-STORE's negotiation would, then accept it as C-STORE does (blocking: fsync)."""
        if part.path is None:
            return self._refused(client, peer, Outcome(None, None, part.failure, part.why or "not stored"))
        try:
            sop_class, sop_instance, ts, in_study = _header(part.path)
            if sop_class is not None and sop_class not in ACCEPTED_CLASSES:
                return self._refused(client, peer, Outcome(sop_class, sop_instance, FAILURE_SOP_CLASS,
                                                           "SOP class not accepted"))
            if ts is not None and ts not in ACCEPTED_SYNTAXES:
                return self._refused(client, peer, Outcome(sop_class, sop_instance, FAILURE_TRANSFER_SYNTAX,
                                                           "transfer syntax not accepted"))
            if study is not None and in_study is not None and in_study != study:
                return self._refused(client, peer, Outcome(sop_class, sop_instance, FAILURE_MISMATCH,
                                                           "Study Instance UID differs from the request URL's"))
            done = accept_instance(self.intake, part.path, client, peer, sop_class)
        finally:
            part.path.unlink(missing_ok=True)  # accepted: the spool holds its own link
        if done.status == SUCCESS and done.job is not None:
            return Outcome(done.job.sop_class_uid, done.job.sop_instance_uid)
        return Outcome(sop_class, sop_instance, _FAILURE_OF_STATUS.get(done.status, FAILURE_PROCESSING),
                       done.comment)

    def _refused(self, client: str, peer: str, outcome: Outcome) -> Outcome:
        log.warning("stow.instance_refused", calling_aet=client, peer=peer, sop_instance_uid=outcome.sop_instance,
                    failure=f"0x{outcome.failure:04X}", reason=outcome.why)
        metrics.INSTANCES_REFUSED.labels(calling_aet=self.intake.ae_label(client),
                                         reason="out_of_resources" if outcome.failure == FAILURE_OUT_OF_RESOURCES
                                         else "not_accepted").inc()
        _audit(self.intake.audit, "refused", calling_aet=client, peer=peer, sop_instance_uid=outcome.sop_instance,
               reason=outcome.why)
        return outcome


def _audit(audit: AuditLog, event: str, **fields: object) -> None:
    try:
        audit.record(event, **fields)
    except OSError:  # a full disk must not change the answer
        log.exception("audit record failed", audit_event=event)


def response(outcomes: list[Outcome]) -> JSONResponse:
    """PS3.18 10.5.3: 200 all stored, 202 some failed, 409 none stored; the Store Instances Response."""
    ds = Dataset()
    stored = [o.item() for o in outcomes if o.failure is None]
    failed = [o.item() for o in outcomes if o.failure is not None]
    if stored:
        ds.ReferencedSOPSequence = stored
    if failed:
        ds.FailedSOPSequence = failed
    status = 409 if not stored else 202 if failed else 200
    return JSONResponse(ds.to_json_dict(), status_code=status, media_type=DICOM_JSON)


def _problem(status: int, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)


def _accepts_json(accept: str | None) -> bool:
    if not accept:
        return True
    kinds = {parse_options_header(a.strip())[0] for a in accept.split(",")}
    return bool(kinds & {b"application/dicom+json", b"application/json", b"application/*", b"*/*"})


def build_router(settings, cfg: ListenerConfig, spool: Spool, jobs: JobStore, audit: AuditLog, lookup_key: bytes,
                 *, enqueue: Callable[[str], None],
                 new_id: Callable[[], str] = lambda: uuid.uuid4().hex, objects: Objects | None = None) -> APIRouter:
    """The STOW-RS routes for the node these settings describe; the spool, job store, audit log and
    listener configuration are the node's own (worker.node.Node), shared with its C-STORE listener.

    ``enqueue``: the inference enqueuer (worker.node.Node.enqueue_infer: the node's broker);
    ``objects``: where instances are kept (worker.node.Node.objects; None: the spool itself).
    """
    tokens = Tokens(settings.dicomweb.clients)
    intake = Intake(cfg, spool, jobs, audit, enqueue, new_id, lookup_key, metrics.AeLabels(tokens.names),
                    objects=objects)
    receiver = Receiver(intake)
    limit = inflate_limit(cfg.max_pixels)
    router = APIRouter(prefix=PREFIX, tags=["dicomweb"])

    async def store(request: Request, study: str | None) -> Response:
        peer = f"{request.client.host}:{request.client.port}" if request.client else "?"
        client = tokens.client(request.headers.get("authorization"))
        if client is None:
            reason = "no valid bearer token" if tokens.names else "no [[dicomweb.clients]] configured"
            log.warning("stow.unauthorized", peer=peer, reason=reason)
            _audit(intake.audit, "refused", peer=peer, reason=f"STOW-RS: {reason}")
            return _problem(401, f"STOW-RS needs a bearer token ({reason})",
                            **{"WWW-Authenticate": 'Bearer realm="medsam2-cxr"'})
        kind, params = parse_options_header(request.headers.get("content-type"))
        if kind != b"multipart/related" or params.get(b"type", b"").strip().lower() != DICOM:
            return _problem(415, 'STOW-RS takes multipart/related; type="application/dicom"')
        if not params.get(b"boundary"):
            return _problem(400, "multipart/related without a boundary parameter")
        if not _accepts_json(request.headers.get("accept")):
            return _problem(406, f"the response is {DICOM_JSON}")
        # Part files in tmp/, as partial writes are (hard-linked into incoming/ when accepted): the
        # listener's start and the reconciler sweep what a killed process left there.
        writer = PartWriter(spool.tmp, limit, spool)
        outcomes: list[Outcome] = []
        t0 = time.perf_counter()
        try:
            parser = MultipartParser(params[b"boundary"], writer.callbacks)
            async for chunk in request.stream():
                parser.write(chunk)
                for part in writer.take():
                    outcomes.append(await run_in_threadpool(receiver.accept, part, client, peer, study))
            parser.finalize()
        except FormParserError as exc:
            log.warning("stow.bad_body", calling_aet=client, peer=peer, error=str(exc))
            if not outcomes:
                return _problem(400, f"not a multipart/related body: {exc}")
            outcomes.append(Outcome(None, None, FAILURE_CANNOT_UNDERSTAND, "body not multipart/related after here"))
        finally:
            writer.abandon()
            for part in writer.take():  # parts finished by the last write, if it raised
                if part.path is not None:
                    part.path.unlink(missing_ok=True)
        if not writer.ended and outcomes:
            outcomes.append(Outcome(None, None, FAILURE_CANNOT_UNDERSTAND, "the body ended before its closing boundary"))
        if not outcomes:
            return _problem(400, "no application/dicom part in the body")
        failed = sum(o.failure is not None for o in outcomes)
        log.info("stow.stored", calling_aet=client, peer=peer, instances=len(outcomes), failed=failed,
                 seconds=round(time.perf_counter() - t0, 3))
        return response(outcomes)

    @router.post("/studies", response_class=JSONResponse)
    async def store_instances(request: Request) -> Response:
        """STOW-RS: store the instances of any studies (PS3.18 10.5)."""
        return await store(request, None)

    @router.post("/studies/{study}", response_class=JSONResponse)
    async def store_study_instances(study: str, request: Request) -> Response:
        """STOW-RS: store instances of one study; an instance of another is refused (0xA900)."""
        return await store(request, study)

    return router


def main(argv: list[str] | None = None) -> None:
    """``python -m dicom_node.stow token``: a new bearer token and the line for the configuration."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args != ["token"]:
        raise SystemExit("usage: python -m dicom_node.stow token")
    token, digest = new_token()
    print(f"bearer token (give it to the client, keep it secret): {token}")
    print(f'[[dicomweb.clients]]\nname = "VNA"\ntoken_sha256 = "{digest}"')


if __name__ == "__main__":
    main()
