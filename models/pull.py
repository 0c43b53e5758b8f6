"""`medsam2-cxr model pull`: fetch MedSAM2_latest.pt from Hugging Face and verify it before use.

The digest to verify against is, in order: one the user passes (pin it in deployment), else the
sha256 Hugging Face publishes for the LFS/Xet file (the `X-Linked-Etag` header of the resolve
URL, the value its own client verifies against). A download is written to a temporary file
beside the destination and renamed only after it matches, so a broken transfer never leaves a
file that looks like weights. Without network access it fails with where to put the file.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from models.digests import file_digest

REPO = "wanglab/MedSAM2"
FILENAME = "MedSAM2_latest.pt"
URL = f"https://huggingface.co/{REPO}/resolve/main/{FILENAME}"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class PullError(RuntimeError):
    """The checkpoint could not be fetched or verified; the message says what to do instead."""


@dataclass(frozen=True)
class Pulled:
    path: Path
    sha256: str
    verified_against: str  # "user" or "huggingface"
    downloaded: bool


def manual_instructions(dest: Path) -> str:
    return (f"Download {FILENAME} from https://huggingface.co/{REPO} (file {URL}) on a machine with network "
            f"access, check its sha256 against the one shown on that page, copy it to {dest}, and set "
            f"model.encoder_checkpoint = \"{dest}\" in the node's TOML (or MEDSAM2_CXR_MODEL__ENCODER_CHECKPOINT), "
            "or pass --checkpoint to `medsam2-cxr train` / `evaluate`. Re-run `medsam2-cxr model pull --sha256 "
            "<digest>` to verify a copied file.")


def _normalise(digest: str | None) -> str | None:
    if digest is None:
        return None
    d = digest.strip().strip('"').lower()
    if d.startswith("sha256:"):
        d = d[len("sha256:"):]
    return d if _SHA256.match(d) else None


def published_sha256(headers) -> str | None:
    """The sha256 Hugging Face states for an LFS/Xet file: X-Linked-Etag (or ETag when that is a sha256)."""
    for name in ("X-Linked-Etag", "x-linked-etag", "ETag", "etag"):
        d = _normalise(headers.get(name)) if headers is not None else None
        if d:
            return d
    return None


def pull(dest: Path, sha256: str | None = None, url: str = URL, timeout: float = 30.0,
         opener: Callable | None = None, token: str | None = None) -> Pulled:
    """Fetch `url` to `dest` (a file path) unless a verified copy is already there.

    Raises
    ------
    PullError
        No network, an HTTP error, no digest to verify against, or a digest mismatch; the
        message includes the manual route.
    """
    dest = Path(dest)
    want = _normalise(sha256) if sha256 else None
    if sha256 and not want:
        raise PullError(f"--sha256 {sha256!r} is not a 64-digit hex sha256")
    if dest.exists() and want:
        have = file_digest(dest)
        if have == want:
            return Pulled(dest, have, "user", downloaded=False)
        raise PullError(f"{dest}: sha256 {have} differs from the expected {want}; delete the file and pull again, "
                        "or check the digest you passed")
    headers = {"User-Agent": "medsam2-cxr"}
    if token or os.environ.get("HF_TOKEN"):
        headers["Authorization"] = f"Bearer {token or os.environ['HF_TOKEN']}"
    opener = opener or urllib.request.urlopen
    try:
        resp = opener(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise PullError(f"{url}: HTTP {exc.code} {exc.reason}. {manual_instructions(dest)}") from exc
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PullError(f"cannot reach {url} ({reason}): no network access from this machine? "
                        f"{manual_instructions(dest)}") from exc
    source = "user" if want else "huggingface"
    want = want or published_sha256(getattr(resp, "headers", None))
    if not want:
        resp.close()
        raise PullError(f"{url}: the server states no sha256 for the file and none was passed, so the download "
                        f"cannot be verified; pass --sha256 <digest from https://huggingface.co/{REPO}>")
    if dest.exists() and file_digest(dest) == want:  # already there and intact: no transfer
        resp.close()
        return Pulled(dest, want, source, downloaded=False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    total = int(resp.headers.get("Content-Length", 0) or 0) if getattr(resp, "headers", None) is not None else 0
    try:
        with resp, tmp.open("wb") as fh, tqdm(total=total or None, unit="B", unit_scale=True, desc=FILENAME) as bar:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                fh.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        tmp.unlink(missing_ok=True)
        raise PullError(f"{url}: the download broke off ({exc}); run the command again. "
                        f"{manual_instructions(dest)}") from exc
    got = h.hexdigest()
    if got != want:
        tmp.unlink(missing_ok=True)
        raise PullError(f"{url}: downloaded sha256 {got} differs from the expected {want} ({source}); nothing was "
                        "written. Try again; if it persists, the file changed upstream or the transfer is tampered with")
    tmp.replace(dest)
    return Pulled(dest, got, source, downloaded=True)
