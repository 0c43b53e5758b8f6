"""DICOM TLS contexts after PS3.15 Annex B.9, the "Non-Downgrading BCP 195" secure transport profile.

What BCP 195 (RFC 9325) asks and these contexts do: TLS 1.2 minimum (1.3 preferred, negotiated
when both ends have it), no TLS compression, no renegotiation, forward-secret AEAD cipher suites
only (ECDHE/DHE with AES-GCM or ChaCha20-Poly1305 for 1.2; the 1.3 suites are all AEAD), and the
peer certificate verified against a CA. Client certificates are optional at the listener
(``require_client_cert``); when a CA is configured, a presented client certificate is verified.
A calling AE title is not authentication: pair the AE allow list with client certificates or an
address allow list (``[node] allowed_addresses``).
"""

from __future__ import annotations

import ssl
from pathlib import Path

# TLS 1.2 suites BCP 195 recommends (forward secrecy + AEAD), in OpenSSL names.
BCP195_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES256-GCM-SHA384",
])
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = MINIMUM_VERSION
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def _need(path: Path | str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"TLS {what} {p} does not exist; set the path in the [node]/[destination] tls section")
    return p


def server_context(cert: Path | str, key: Path | str, ca: Path | str | None = None,
                   require_client_cert: bool = False) -> ssl.SSLContext:
    """The listener's context: our certificate and key, and optionally the CA for client certificates.

    Parameters
    ----------
    cert, key : path
        PEM certificate chain and private key of this node.
    ca : path, optional
        PEM CA bundle that client certificates must chain to. Without it no client certificate
        is asked for.
    require_client_cert : bool
        Refuse the handshake when the client presents no valid certificate (needs ``ca``).

    Raises
    ------
    ValueError
        ``require_client_cert`` without a CA to check against.
    FileNotFoundError
        A configured file is missing (named in the message).
    """
    if require_client_cert and not ca:
        raise ValueError("require_client_cert needs tls.ca: the CA that client certificates must chain to")
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(_need(cert, "certificate"), _need(key, "private key"))
    if ca:
        ctx.load_verify_locations(cafile=_need(ca, "CA bundle"))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(ca: Path | str, cert: Path | str | None = None, key: Path | str | None = None,
                   check_hostname: bool = True) -> ssl.SSLContext:
    """The sender's context: verify the PACS against ``ca``; present our certificate if given.

    ``check_hostname`` compares the destination host with the certificate's subjectAltName;
    turn it off only for a PACS addressed by a name its certificate does not carry.
    """
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.load_verify_locations(cafile=_need(ca, "CA bundle"))
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cert:
        ctx.load_cert_chain(_need(cert, "certificate"), _need(key, "private key") if key else None)
    return ctx
