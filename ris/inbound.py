"""The node's MLLP listener for first readers' reports: HL7 v2 ORU^R01 in, original-mode ACK out
(python-hl7's asyncio MLLP server in a thread of its own), optionally over TLS
(dicom_node.tls.server_context).

Each message is read (ris.report_in) and kept (``keep``, durable when it returns) before its ACK:
AA once kept (the same MSH-10 again is answered AA and kept once); AE with MSA-3 and ERR naming
why when it cannot be read as a report (a resend gets the same answer: nothing is lost by not
retrying it). When keeping fails (a full spool, a locked database) no ACK is sent and the
connection closes, so the RIS sends it again. The comparison with the study's predictions and
any notification run after the ACK, on a worker thread (``after``), so a slow hook never holds
the RIS up.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import hl7
import structlog
from hl7.mllp import InvalidBlockError, start_hl7_server

from dicom_node import metrics
from ris.hl7v2 import escape
from ris.report_in import IncomingReport, ReportUnreadable, decode, from_oru, parse_message

log = structlog.get_logger()


def _ack_text(ack: hl7.Message) -> str:
    return str(ack).replace("\n", "\r")


def ack_for(raw: bytes, code: str, *, application: str, error: ReportUnreadable | None = None,
            now: dt.datetime | None = None, message_id: str = "") -> bytes:
    """The ACK of one message: from the message's own MSH when it has one, else a minimal ACK
    whose MSA-2 is empty (the message had no control id to answer)."""
    now = now or dt.datetime.now(dt.UTC)
    reason = escape(str(error))[:200] if error is not None else ""
    err = f"ERR|||{error.code}^{escape(str(error))[:80]}^HL70357|E||||{reason}" if error is not None else ""
    try:
        msg = parse_message(decode(raw))
        ack = msg.create_ack(code, message_id=message_id or None, application=application, facility="")
        if reason:
            ack.segment("MSA").assign_field(reason, 3)
        text = _ack_text(ack)
    except (ReportUnreadable, KeyError, IndexError, ValueError):
        ts = now.strftime("%Y%m%d%H%M%S")
        text = f"MSH|^~\\&|{escape(application)}||||{ts}||ACK|{message_id or ts}|P|2.5.1\rMSA|{code}||{reason}"
    if err:
        text = text.rstrip("\r") + "\r" + err
    return (text.rstrip("\r") + "\r").encode("ascii", "replace")


@dataclass
class ReportListener:
    """MLLP server on (host, port). ``keep`` stores one report (raising on a storage failure);
    ``after`` runs on a worker thread with each kept report (the second read's comparison)."""

    host: str
    port: int
    keep: Callable[[IncomingReport], object]
    after: Callable[[Any], object] | None = None
    application: str = "MEDSAM2CXR"
    tls: ssl.SSLContext | None = None
    idle_timeout_s: float = 300.0
    _executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(2, "second-read"))

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"mllp@{self.port}", daemon=True)

    # -- one message ------------------------------------------------------------------------------
    def handle(self, raw: bytes) -> tuple[bytes | None, list[object]]:
        """(the ACK to send, or None when nothing could be kept; the kept rows for ``after``)."""
        try:
            reports = from_oru(parse_message(decode(raw)))
        except ReportUnreadable as exc:
            metrics.REPORTS_REFUSED.labels(reason=exc.code).inc()
            log.warning("report refused", code=exc.code, reason=str(exc))
            return ack_for(raw, "AE", application=self.application, error=exc), []
        kept = []
        try:
            for report in reports:
                kept.append(self.keep(report))
        except Exception as exc:  # noqa: BLE001 - no ACK: the RIS sends it again
            log.error("report not kept; no ACK, the RIS will resend", error=f"{type(exc).__name__}: {exc}")
            return None, kept
        return ack_for(raw, "AA", application=self.application), kept

    async def _client(self, reader, writer) -> None:
        try:
            while True:
                try:
                    raw = await asyncio.wait_for(reader.readblock(), self.idle_timeout_s)
                except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, InvalidBlockError, TimeoutError):
                    return
                ack, kept = await self._loop.run_in_executor(self._executor, self.handle, raw)
                if self.after is not None:
                    for row in kept:
                        self._executor.submit(self._after, row)
                if ack is None:
                    return
                writer.writeblock(ack)
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 2.0)

    def _after(self, row: object) -> None:
        try:
            assert self.after is not None
            self.after(row)
        except Exception:  # noqa: BLE001 - the report is kept; the next inference of its study compares it
            log.exception("second read after a report failed")

    # -- the server ---------------------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                start_hl7_server(self._client, self.host, self.port, ssl=self.tls))
        except BaseException as exc:  # noqa: BLE001 - said by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> ReportListener:
        """Listen; OSError (the port is taken) is raised here, not in the thread."""
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise OSError(f"the report listener cannot listen on {self.host}:{self.port}: {self._error}")
        log.info("report listener started", host=self.host, port=self.port, tls=self.tls is not None)
        return self

    def shutdown(self) -> None:
        async def stop() -> None:
            self._server.close()
            await self._server.wait_closed()

        if self._error is None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError, asyncio.TimeoutError, TimeoutError):
                asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._executor.shutdown(wait=True, cancel_futures=False)

    def __enter__(self) -> ReportListener:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()
