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
* a connection only becomes an association once its whole first PDU (the A-ASSOCIATE-RQ) has
  arrived, within ``request_timeout`` seconds of the connect (a deadline for the whole PDU, not
  per read): port probes, health checks and peers that trickle their request a byte at a time
  (slow loris) never hold one of the ``max_associations`` slots, and are dropped after a few
  seconds;
* one address holds at most ``max_associations_per_address`` associations (further requests get
  an A-ASSOCIATE-RJ, transient, local-limit-exceeded) and at most ``max_pending_per_address``
  connections whose request is still incomplete: one more evicts that address's oldest, so a
  flood from behind a NAT cannot keep a modality at the same address from connecting; and at most
  ``max_pending`` such connections from all addresses together, likewise.

The guard wraps pynetdicom's ``AssociationSocket`` in a proxy (:class:`GuardedSocket`) installed
by :meth:`GuardedRequestHandler._create_association`, which hands pynetdicom the request bytes the
handler already read; tests send a 4 GiB header, garbage and a trickled request over real
sockets, so a pynetdicom change that bypasses it fails them.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, PDU_TYPES
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
# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected-transient, by the service provider (presentation
# related function), local-limit-exceeded; the same answer pynetdicom gives at max_associations.
REJECT_TRANSIENT, REJECT_SOURCE_PRESENTATION, REJECT_LOCAL_LIMIT = 0x02, 0x03, 0x02

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
    request_timeout : float
        Seconds a peer has, from the connect (or the end of the TLS handshake), to send its whole
        A-ASSOCIATE-RQ; only then is the connection an association and takes a slot.
    max_associations_per_address : int
        Associations one peer address may hold at once (0: no cap but ``max_associations``).
    max_pending_per_address : int
        Connections from one address whose request is still incomplete; one more evicts the
        oldest of them (0: no cap).
    max_pending : int
        The same for all addresses together (a flood from many addresses): one more evicts the
        oldest of all; it bounds the handler threads and sockets such peers cost (0: no cap).
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
    request_timeout: float = 5.0
    max_associations_per_address: int = 0
    max_pending_per_address: int = 16
    max_pending: int = 256
    on_refused: Callable[[str, str], None] = field(default=lambda peer, reason: None)
    on_violation: Callable[[str, str, bytes], None] = field(default=lambda peer, reason, data: None)


class PDURefused(OSError):
    """A PDU header broke the guard; raised inside pynetdicom's reader, which then closes."""


class GuardedSocket:
    """A proxy for pynetdicom's ``AssociationSocket`` whose ``recv`` checks each PDU header.

    pynetdicom's DUL reads a PDU as ``recv(6)`` then ``recv(length)``; the proxy sees the header
    first and refuses before any large read. ``prefix`` are bytes the request handler already
    read from the socket (the A-ASSOCIATE-RQ): they are served first, and ``ready`` says so.
    Everything else is delegated unchanged.
    """

    def __init__(self, inner: Any, guard: Guard, peer: str, prefix: bytes = b"") -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_guard", guard)
        object.__setattr__(self, "_peer", peer)
        object.__setattr__(self, "_pending", None)  # (type, header) while a body is due
        object.__setattr__(self, "_prefix", bytearray(prefix))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)

    @property
    def ready(self) -> bool:
        return bool(self._prefix) or self._inner.ready

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
        buf = bytearray(nr_bytes)
        got = 0
        if self._prefix:
            got = min(nr_bytes, len(self._prefix))
            buf[:got] = self._prefix[:got]
            del self._prefix[:got]
        raw = self._inner.socket
        if raw is None:
            return buf[:got] + (self._inner.recv(nr_bytes - got) if got < nr_bytes else b"")
        with memoryview(buf) as view:
            while got < nr_bytes:
                n = raw.recv_into(view[got:], min(nr_bytes - got, _READ_CHUNK))
                if not n:
                    break
                got += n
        del buf[got:]
        return buf

    def _check_header(self, header: bytes) -> None:
        pdu_type = check_header(self._inner.socket, self._guard, self._peer, header)
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


def check_header(raw: Any, guard: Guard, peer: str, header: bytes) -> int:
    """The PDU type of a 6-byte PDU header, or an A-ABORT, the quarantine and :class:`PDURefused`
    when the type is unknown or the declared length is above ``guard.max_pdu_length``."""
    pdu_type, _, length = struct.unpack(">BBL", header)
    if pdu_type not in _DECODERS:
        _refuse(raw, guard, peer, header, f"unknown PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNIZED_PDU)
    if length > guard.max_pdu_length:
        _refuse(raw, guard, peer, header, f"declared PDU length {length} exceeds the limit of "
                                          f"{guard.max_pdu_length} bytes", ABORT_INVALID_PDU_PARAMETER)
    return pdu_type


def _refuse(raw: Any, guard: Guard, peer: str, header: bytes, reason: str, abort_reason: int) -> None:
    data = header + _peek(raw, QUARANTINE_BYTES - len(header))
    guard.on_violation(peer, reason, data)
    abort = A_ABORT_RQ()
    abort.source = 0x02  # service provider
    abort.reason_diagnostic = abort_reason
    try:
        if raw is not None:
            raw.sendall(abort.encode())
            raw.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    raise PDURefused(reason)


def _peek(raw: Any, limit: int) -> bytes:
    """Whatever of the body has already arrived, without waiting for more."""
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


class RequestIncomplete(Exception):
    """The peer closed, or ran out of ``request_timeout``, before its first PDU was complete."""

    def __init__(self, reason: str, received: int) -> None:
        super().__init__(reason)
        self.received = received  # bytes seen: 0 is a port probe, not worth an audit record


class GuardedRequestHandler(RequestHandler):
    """Per-connection thread: address check, TLS handshake, the whole A-ASSOCIATE-RQ within a
    deadline, the per-address caps, then pynetdicom's association with the PDU guard."""

    server: GuardedServer

    def handle(self) -> None:
        guard = self.server.guard
        address = str(self.client_address[0])
        peer = f"{address}:{self.client_address[1]}"
        if not address_allowed(address, guard.allowed_networks):
            self._close()
            guard.on_refused(peer, "address not allowed")
            return
        self._raw = self.request  # the TCP socket, for an eviction from another thread
        self._evicted: str | None = None
        for old, why in self.server.admit_pending(address, self):
            old.evict(why)
        try:
            if guard.tls is not None:
                try:
                    self.request.settimeout(guard.handshake_timeout)
                    self.request = guard.tls.wrap_socket(self.request, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    self._close()
                    guard.on_refused(peer, self._evicted or f"TLS handshake failed: {_tls_reason(exc)}")
                    return
            try:
                request = self._read_request(guard, peer)
            except PDURefused:
                self._close()
                return
            except RequestIncomplete as exc:
                self._close()
                if exc.received or self._evicted:
                    guard.on_refused(peer, self._evicted or str(exc))
                return
        finally:
            still_pending = self.server.leave_pending(address, self)
        if not still_pending:  # evicted just as its request completed: the socket is shut down
            self._close()
            guard.on_refused(peer, self._evicted or "evicted")
            return
        self.request.settimeout(guard.network_timeout)
        with self.server.slots:  # count and start under one lock, so two requests cannot both pass
            cap = guard.max_associations_per_address
            if cap and self.server.associations_from(address) >= cap:
                self._reject(REJECT_TRANSIENT, REJECT_SOURCE_PRESENTATION, REJECT_LOCAL_LIMIT)
                refusal = f"association limit of {cap} per address reached"
            else:
                self._request_bytes = request
                super().handle()  # creates the association (see _create_association) and starts it
                return
        guard.on_refused(peer, refusal)

    def _read_request(self, guard: Guard, peer: str) -> bytes:
        """The peer's first PDU, whole, within ``guard.request_timeout`` in all (a peer that
        trickles a byte at a time gets no more time than one that sends nothing). The header is
        checked before the body is waited for.

        Raises
        ------
        RequestIncomplete
            The peer closed or the deadline passed first.
        PDURefused
            The header broke the guard (it has been aborted and quarantined).
        """
        deadline = time.monotonic() + guard.request_timeout
        header = self._read_until(_HEADER, deadline, b"")
        check_header(self.request, guard, peer, header)
        (length,) = struct.unpack_from(">L", header, 2)
        return self._read_until(_HEADER + length, deadline, header)

    def _read_until(self, total: int, deadline: float, have: bytes) -> bytes:
        buf = bytearray(have)
        sock = self.request
        while len(buf) < total:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestIncomplete(f"association request incomplete after {self.server.guard.request_timeout:g} s "
                                        f"({len(buf)} bytes received)", len(buf))
            try:
                sock.settimeout(left)
                chunk = sock.recv(min(total - len(buf), _READ_CHUNK))
            except TimeoutError:
                continue
            except (OSError, ValueError) as exc:  # reset, or evicted (shut down from another thread)
                raise RequestIncomplete(f"connection lost before the association request was complete "
                                        f"({type(exc).__name__})", len(buf)) from exc
            if not chunk:
                raise RequestIncomplete(f"connection closed before the association request was complete "
                                        f"({len(buf)} bytes received)", len(buf))
            buf += chunk
        return bytes(buf)

    def evict(self, reason: str) -> None:
        """Drop this connection (another thread's call): too many requests are pending."""
        self._evicted = reason
        try:
            self._raw.shutdown(socket.SHUT_RDWR)  # wakes the handler's blocked recv
        except OSError:
            pass

    def _reject(self, result: int, source: int, reason: int) -> None:
        rj = A_ASSOCIATE_RJ()
        rj.result, rj.source, rj.reason_diagnostic = result, source, reason
        try:
            self.request.sendall(rj.encode())
        except OSError:
            pass
        self._close()

    def _create_association(self):
        assoc = super()._create_association()
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        assoc.dul.socket = GuardedSocket(assoc.dul.socket, self.server.guard, peer,  # type: ignore[assignment]  # wraps it
                                         prefix=getattr(self, "_request_bytes", b""))
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
    """pynetdicom's threaded server with :class:`GuardedRequestHandler`, no TLS in accept(), and
    the book-keeping for the per-address caps."""

    # socketserver's listen backlog is 5: a burst of connects (a flood, or a PACS opening its
    # associations at once) beyond it has its SYNs dropped, and the kernel retries them after
    # 1, 3, 7 s, so a real sender waited seconds before the handler even saw it.
    request_queue_size = socket.SOMAXCONN

    def __init__(self, *args: Any, guard: Guard, reuse_port: bool = False, **kwargs: Any) -> None:
        self.guard = guard
        self.reuse_port = reuse_port
        self.slots = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: dict[str, list[GuardedRequestHandler]] = {}
        self._arrivals: dict[GuardedRequestHandler, str] = {}  # every pending one, oldest first
        super().__init__(*args, request_handler=GuardedRequestHandler, **kwargs)  # type: ignore[misc]  # args stop before it

    def server_bind(self) -> None:
        # SO_REUSEPORT ([node] processes > 1): several listener processes bind the one port and the
        # kernel spreads the connections across them. Each process keeps its own association and
        # per-address caps, so with N processes a peer may hold up to N times its cap.
        if self.reuse_port:
            assert self.socket is not None
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # The TLS handshake is done by the handler thread (see GuardedRequestHandler.handle).
        assert self.socket is not None
        return self.socket.accept()

    def admit_pending(self, address: str, handler: GuardedRequestHandler
                      ) -> list[tuple[GuardedRequestHandler, str]]:
        """Count ``handler`` as pending for ``address``; returns the oldest ones to evict, each
        with the reason."""
        with self._pending_lock:
            queue = self._pending.setdefault(address, [])
            queue.append(handler)
            self._arrivals[handler] = address
            evicted = []
            cap = self.guard.max_pending_per_address
            if cap and len(queue) > cap:
                why = f"evicted: more than {cap} connections from this address with an incomplete association request"
                evicted = [(old, why) for old in queue[:-cap]]
            total = self.guard.max_pending
            if total and len(self._arrivals) - len(evicted) > total:
                why = f"evicted: more than {total} connections with an incomplete association request"
                gone = {old for old, _ in evicted}
                for old in self._arrivals:
                    if len(self._arrivals) - len(evicted) <= total:
                        break
                    if old not in gone:
                        evicted.append((old, why))
            for old, _ in evicted:
                self._forget(old)
            return evicted

    def _forget(self, handler: GuardedRequestHandler) -> bool:
        address = self._arrivals.pop(handler, None)
        if address is None:
            return False
        queue = self._pending.get(address, [])
        if handler in queue:
            queue.remove(handler)
        if not queue:
            self._pending.pop(address, None)
        return True

    def leave_pending(self, address: str, handler: GuardedRequestHandler) -> bool:
        """Stop counting ``handler``; False when it had been evicted meanwhile."""
        with self._pending_lock:
            return self._forget(handler)

    def pending(self) -> dict[str, int]:
        """Connections per address whose association request is still incomplete."""
        with self._pending_lock:
            return {address: len(q) for address, q in self._pending.items()}

    def associations_from(self, address: str) -> int:
        """Live associations (acceptors) whose peer is ``address``."""
        return sum(1 for a in self.ae.active_associations
                   if a.is_acceptor and a.requestor.address_info is not None and a.requestor.address == address)
