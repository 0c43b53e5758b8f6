"""The transport edge of the listener: who may connect, TLS, and how big a PDU may say it is.

pynetdicom reads whatever length a PDU header declares (up to 4 GiB) into memory, does the TLS
handshake in the thread that accepts connections (one silent client stalls every other one) and
leaves accepted sockets without a timeout. :class:`GuardedServer` fixes these from outside
pynetdicom:

* the address allow list and the TLS handshake run in the connection's own thread, with a
  handshake timeout, before any DICOM byte is read;
* every PDU header is checked before its body is read: an unknown PDU type or a declared length
  above ``max_pdu_length`` gets an A-ABORT, and the bytes seen land in the quarantine with the
  reason; a PDU that pynetdicom cannot decode is quarantined the same way (pynetdicom aborts it);
* the accepted socket gets ``network_timeout``, so a peer that stops mid-PDU is dropped;
* a connection only becomes an association once the peer sends its first byte, so port probes
  and health checks that connect and leave do not hold one of the ``max_associations`` slots.

The guard wraps pynetdicom's ``AssociationSocket`` in a proxy (:class:`GuardedSocket`) installed
by :meth:`GuardedRequestHandler._create_association`; tests send a 4 GiB header and garbage over a
real socket, so a pynetdicom change that bypasses it fails them.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import ssl
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from pynetdicom.pdu import PDU_TYPES, A_ABORT_RQ
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

log = structlog.get_logger(__name__)

_HEADER = 6  # PDU type (1), reserved (1), length (4), PS3.8 9.3.1
_READ_CHUNK = 1 << 20  # bytes per socket read
P_DATA_TF_TYPE = 0x04
_DECODERS = {code: cls for cls, code in PDU_TYPES.items()}
QUARANTINE_BYTES = 65536  # at most this much of an offending PDU is kept
# A-ABORT reasons (PS3.8 9.3.8), service-provider initiated.
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_INVALID_PDU_PARAMETER = 0x06

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Sequence[str]) -> tuple[Network, ...]:
    """``["10.0.0.0/8", "192.168.1.7"]`` -> networks; a bad entry fails naming itself.

    Raises
    ------
    ValueError
        An entry is neither an address nor a network, e.g. ``"10.0.0.300"``.
    """
    out = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"allowed_addresses: {entry!r} is not an IP address or network: {exc}") from exc
    return tuple(out)


def address_allowed(address: str, networks: Sequence[Network]) -> bool:
    """True when no allow list is set, or the address falls in one of its networks."""
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks if net.version == ip.version)


@dataclass(frozen=True)
class Guard:
    """What the transport edge enforces, and whom it tells.

    Parameters
    ----------
    max_pdu_length : int
        Largest PDU length field (bytes after the 6-byte header) accepted. The listener
        advertises a Maximum Length Received no larger than this, so a conforming peer never
        comes near it.
    allowed_networks : tuple
        Peer addresses allowed to connect (empty: any), from :func:`parse_networks`.
    tls : ssl.SSLContext or None
        Server-side TLS context (see :mod:`dicom_node.tls`); None for plain DICOM.
    handshake_timeout : float
        Seconds a peer has to finish the TLS handshake.
    network_timeout : float
        Socket timeout for every read and write of an association.
    on_refused : callable
        ``(peer, reason)``: a connection was refused before any association (audit it).
    on_violation : callable
        ``(peer, reason, data)``: a PDU was refused; ``data`` are the bytes seen (quarantine).
    """

    max_pdu_length: int
    allowed_networks: tuple[Network, ...] = ()
    tls: ssl.SSLContext | None = None
    handshake_timeout: float = 10.0
    network_timeout: float = 60.0
    on_refused: Callable[[str, str], None] = field(default=lambda peer, reason: None)
    on_violation: Callable[[str, str, bytes], None] = field(default=lambda peer, reason, data: None)


class PDURefused(OSError):
    """A PDU header broke the guard; raised inside pynetdicom's reader, which then closes."""


class GuardedSocket:
    """A proxy for pynetdicom's ``AssociationSocket`` whose ``recv`` checks each PDU header.

    pynetdicom's DUL reads a PDU as ``recv(6)`` then ``recv(length)``; the proxy sees the header
    first and refuses before any large read. Everything else is delegated unchanged.
    """

    def __init__(self, inner: Any, guard: Guard, peer: str) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_guard", guard)
        object.__setattr__(self, "_peer", peer)
        object.__setattr__(self, "_pending", None)  # (type, header) while a body is due

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)

    def recv(self, nr_bytes: int) -> bytearray:
        pending = self._pending
        if pending is None and nr_bytes == _HEADER:
            header = self._read(nr_bytes)
            if len(header) == _HEADER:
                self._check_header(bytes(header))
            return header
        data = self._read(nr_bytes)
        if pending is not None:
            object.__setattr__(self, "_pending", None)
            pdu_type, header = pending
            if len(data) == nr_bytes:
                self._check_body(pdu_type, header, data)
        return data

    def _read(self, nr_bytes: int) -> bytearray:
        """What ``AssociationSocket.recv`` does (block until ``nr_bytes`` or the peer closes), but
        straight into one buffer in large reads: pynetdicom reads 4 KiB per call, which made a
        10 MB image 2,500 Python-level reads and the listener slower than storescp."""
        raw = self._inner.socket
        if raw is None:
            return self._inner.recv(nr_bytes)
        buf = bytearray(nr_bytes)
        got = 0
        with memoryview(buf) as view:
            while got < nr_bytes:
                n = raw.recv_into(view[got:], min(nr_bytes - got, _READ_CHUNK))
                if not n:
                    break
                got += n
        del buf[got:]
        return buf

    def _check_header(self, header: bytes) -> None:
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in _DECODERS:
            self._refuse(header, f"unknown PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNIZED_PDU)
        if length > self._guard.max_pdu_length:
            self._refuse(header, f"declared PDU length {length} exceeds the limit of "
                                 f"{self._guard.max_pdu_length} bytes", ABORT_INVALID_PDU_PARAMETER)
        object.__setattr__(self, "_pending", (pdu_type, header))

    def _check_body(self, pdu_type: int, header: bytes, body: bytearray) -> None:
        """Decode as pynetdicom will; a failure is quarantined here (pynetdicom then aborts).

        P-DATA-TF, nearly all the bytes, gets a walk over its item lengths instead of a decode
        (which would copy every image twice more)."""
        try:
            if pdu_type == P_DATA_TF_TYPE:
                _check_pdvs(body)
            else:
                _DECODERS[pdu_type]().decode(header + body)
        except Exception as exc:  # noqa: BLE001 - any decode failure is a hostile/broken PDU
            name = _DECODERS[pdu_type].__name__
            self._guard.on_violation(self._peer, f"undecodable {name} PDU: {type(exc).__name__}",
                                     header + bytes(body[:QUARANTINE_BYTES - len(header)]))

    def _refuse(self, header: bytes, reason: str, abort_reason: int) -> None:
        data = header + self._peek(QUARANTINE_BYTES - len(header))
        self._guard.on_violation(self._peer, reason, data)
        abort = A_ABORT_RQ()
        abort.source = 0x02  # service provider
        abort.reason_diagnostic = abort_reason
        raw = self._inner.socket
        try:
            if raw is not None:
                raw.sendall(abort.encode())
                raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise PDURefused(reason)

    def _peek(self, limit: int) -> bytes:
        """Whatever of the body has already arrived, without waiting for more."""
        raw = self._inner.socket
        if raw is None or limit <= 0:
            return b""
        try:
            if isinstance(raw, ssl.SSLSocket):
                return raw.recv(min(limit, raw.pending())) if raw.pending() else b""
            ready, _, _ = select.select([raw], [], [], 0)
            return raw.recv(limit, socket.MSG_DONTWAIT) if ready else b""
        except (OSError, ValueError):
            return b""


def _check_pdvs(body: bytearray) -> None:
    """Each presentation data value item (PS3.8 9.3.5.1): a 4-byte length of at least 2 (context
    id and message control header) that ends inside the PDU, the last one exactly at its end."""
    offset, end = 0, len(body)
    if end == 0:
        raise ValueError("a P-DATA-TF PDU with no presentation data value item")
    while offset < end:
        if offset + 6 > end:
            raise ValueError("a presentation data value item header runs past the PDU")
        (length,) = struct.unpack_from(">L", body, offset)
        if length < 2 or offset + 4 + length > end:
            raise ValueError("a presentation data value item's length runs past the PDU")
        offset += 4 + length


class GuardedRequestHandler(RequestHandler):
    """Per-connection thread: address check, TLS handshake, socket timeout, PDU guard."""

    server: "GuardedServer"

    def handle(self) -> None:
        guard = self.server.guard
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        if not address_allowed(str(self.client_address[0]), guard.allowed_networks):
            self._close()
            guard.on_refused(peer, "address not allowed")
            return
        if guard.tls is not None:
            try:
                self.request.settimeout(guard.handshake_timeout)
                self.request = guard.tls.wrap_socket(self.request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self._close()
                guard.on_refused(peer, f"TLS handshake failed: {_tls_reason(exc)}")
                return
        if not self._peer_speaks(guard):
            self._close()  # a port probe or a health check: never an association
            return
        self.request.settimeout(guard.network_timeout)
        super().handle()

    def _peer_speaks(self, guard: Guard) -> bool:
        """Wait (up to the ACSE timeout) for the peer's first byte before pynetdicom makes an
        association of the connection.

        pynetdicom's acceptor waits the whole ACSE timeout for an A-ASSOCIATE-RQ even when the
        peer has already closed, and that idle association counts against max_associations: a
        port probe or a load balancer's health check would hold a slot for half a minute. The
        first byte is peeked, not read; over TLS (after a completed handshake, so not a bare
        probe) readability is all that is checked.
        """
        sock = self.request
        timeout = self.server.ae.acse_timeout or guard.network_timeout
        try:
            if isinstance(sock, ssl.SSLSocket):
                return bool(sock.pending()) or bool(select.select([sock], [], [], timeout)[0])
            sock.settimeout(timeout)
            return bool(sock.recv(1, socket.MSG_PEEK))
        except (OSError, ValueError):  # timed out, reset
            return False

    def _create_association(self):
        assoc = super()._create_association()
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        assoc.dul.socket = GuardedSocket(assoc.dul.socket, self.server.guard, peer)
        return assoc

    def _close(self) -> None:
        try:
            self.request.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.request.close()


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc.__class__.__name__)
    return type(exc).__name__


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with :class:`GuardedRequestHandler` and no TLS in accept()."""

    def __init__(self, *args: Any, guard: Guard, **kwargs: Any) -> None:
        self.guard = guard
        super().__init__(*args, request_handler=GuardedRequestHandler, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # The TLS handshake is done by the handler thread (see GuardedRequestHandler.handle).
        assert self.socket is not None
        return self.socket.accept()
