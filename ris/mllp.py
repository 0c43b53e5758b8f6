"""One ORU^R01 over MLLP (python-hl7's asyncio streams), optionally over TLS, and its original-mode ACK.

AA (or CA) accepts. AE and AR are the RIS's answer to this message: sending it again gets the same
answer, so they end the delivery (AckRejected) with MSA-3 / ERR as the reason. No answer, a broken
connection or an ACK for another message (MSA-2 is not our MSH-10) may go away: MllpUnavailable,
retried by the caller with the same MSH-10, which lets the RIS drop a message it already has.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import hl7
from hl7.mllp import InvalidBlockError, open_hl7_connection


class AckRejected(Exception):
    """The RIS answered AE (application error) or AR (application reject)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"ACK {code}" + (f": {text}" if text else ""))
        self.code, self.text = code, text


class MllpUnavailable(Exception):
    """No ACK for the message: connection refused or lost, timeout, or an answer that is no ACK of it."""


async def _exchange(host: str, port: int, data: bytes, tls: ssl.SSLContext | None, timeout: float) -> bytes:
    extra = {"ssl": tls, "server_hostname": host} if tls is not None else {}
    reader, writer = await asyncio.wait_for(open_hl7_connection(host, port, **extra), timeout)
    try:
        writer.writeblock(data)
        await asyncio.wait_for(writer.drain(), timeout)
        return await asyncio.wait_for(reader.readblock(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError, ssl.SSLError):
            await asyncio.wait_for(writer.wait_closed(), 2.0)


def _field(segment, n: int) -> str:
    try:
        return str(segment[n]).strip()
    except IndexError:
        return ""


def send(host: str, port: int, data: bytes, control_id: str, codec: str = "utf-8",
         tls: ssl.SSLContext | None = None, timeout: float = 30.0) -> str:
    """Send one encoded message and read its ACK; the ACK code (AA or CA) when accepted.

    Raises AckRejected (AE, AR, CE, CR) or MllpUnavailable.
    """
    try:
        block = asyncio.run(_exchange(host, port, data, tls, timeout))
    except (TimeoutError, OSError, asyncio.IncompleteReadError, InvalidBlockError, ValueError) as exc:
        # OSError covers refused and reset connections and TLS failures (ssl.SSLError)
        raise MllpUnavailable(f"no ACK: {type(exc).__name__}: {exc}") from exc
    try:
        ack = hl7.parse(block.decode(codec, "replace"))
        msa = ack.segment("MSA")
    except (KeyError, ValueError, IndexError) as exc:
        raise MllpUnavailable(f"the answer is no ACK: {type(exc).__name__}") from exc
    code, ref, text = _field(msa, 1).upper(), _field(msa, 2), _field(msa, 3)
    if ref != control_id:
        raise MllpUnavailable(f"ACK {code} for message {ref!r}, not for {control_id!r}")
    if code in ("AA", "CA"):
        return code
    if code in ("AE", "AR", "CE", "CR"):
        with contextlib.suppress(KeyError):
            err = ack.segment("ERR")
            detail = " ".join(x for x in (_field(err, 3), _field(err, 8)) if x)  # error code, user message
            text = "; ".join(x for x in (text, detail) if x)
        raise AckRejected(code, text)
    raise MllpUnavailable(f"ACK with unknown code {code!r}")
