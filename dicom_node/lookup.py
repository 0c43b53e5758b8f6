"""Keyed hashes of patient identifiers, so a study can be found without the job table holding them.

The job table keeps HMAC-SHA256(site secret, value) of the Accession Number and the Patient ID,
never the values: whoever reads the table (or a copy of it) without the secret cannot test a
guess. The console hashes what an operator types with the same secret and looks the hash up.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from dicom_node.layout import SpoolLayout


def keyed_hash(key: bytes, value: object) -> str | None:
    """Hex HMAC-SHA256 of a header value as the PACS files it (surrounding spaces dropped);
    None for an empty or missing value."""
    text = str(value if value is not None else "").strip()
    if not text:
        return None
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def spool_secret(spool: Path, name: str, configured: str = "") -> bytes:
    """The configured secret, or a random 32-byte key made once in ``<spool>/secrets/<name>.key``
    (mode 0600) and read back on every later start, by every process of the node."""
    if configured:
        return configured.encode("utf-8")
    layout = SpoolLayout(Path(spool))
    folder, path = layout.secrets, layout.secret(name)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        tmp = folder / f".{name}.{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
            fh.flush()
            os.fsync(fh.fileno())
        try:  # a link never replaces: of two processes racing, the first one's key is everyone's
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return bytes.fromhex(path.read_text().strip())
