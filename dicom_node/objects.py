"""Where received instances, predictions and result objects live: the spool, or an S3 object store.

One small interface, two backends, opened by :func:`open_objects` from ``[objects]``:

- :class:`SpoolObjects` (``url = ""``, the embedded default): a key *is* the file's path relative
  to the spool (``incoming/<job>.dcm``, ``results/<job>/sr.dcm``), so nothing moves and nothing is
  copied; every process shares the one spool folder, as before.
- :class:`S3Objects` (``url = "s3://bucket/prefix"``, ``endpoint``): the keys are objects in an
  S3-compatible store (SeaweedFS, MinIO, Ceph) reached with boto3. The spool is then only this
  host's private scratch: :meth:`Objects.fetch` downloads a key to the same relative path in it,
  :meth:`Objects.evict` drops that copy again. A GPU worker on another host needs nothing of the
  listener's folder: the job row's ``path`` is the instance's key.

Every ``put`` is durable when it returns (the spool: fsync'd and renamed into place; S3: the
store answered the PUT, whose bytes it checked against their Content-MD5), so a caller may say
"stored" after it. A store that cannot be reached (refused, timed out, 5xx, a wrong bucket or
credentials) raises :class:`ObjectsUnavailable`: a ``ConnectionError``, so the pipeline treats it
as transient (worker.failures) and the listener answers Out of Resources, as for a full spool.
A missing key raises ``FileNotFoundError``, as a missing file does.

Folders built once and used by every host (the model bundle, the similar-cases index) are
published as objects with a manifest of sha256 digests (:func:`publish_folder`); each host
fetches them into its spool and checks every file before it is used (:func:`fetch_folder`).
Dead letters and the quarantine stay in the spool of the host that made them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from dicom_node.spool import Spool
from models.digests import file_digest

_PART = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_CHUNK = 1 << 20


class ObjectsUnavailable(ConnectionError):
    """The object store cannot be reached or refused the request; nothing was stored. Try later."""


def check_key(key: str) -> str:
    """A key is a relative path of node-made names (``incoming/<id>.dcm``): no ``..``, no root."""
    parts = key.split("/") if isinstance(key, str) else []
    if not parts or any(not _PART.match(p) or p in (".", "..") for p in parts):
        raise ValueError(f"not an object key: {key!r} (relative, names of letters, digits, . _ -)")
    return key


def _prefix(prefix: str) -> str:
    return check_key(prefix.rstrip("/")) + "/"


class Objects(Protocol):
    """The node's object store. ``local`` is this host's spool: where :meth:`fetch` puts a key."""

    local: Spool

    def put(self, key: str, data: bytes | Path) -> None:
        """Store ``data`` (bytes, or a finished file left where it is) under ``key``, durably."""

    def fetch(self, key: str) -> Path:
        """The local file holding ``key`` (downloaded into the scratch when remote)."""

    def fetch_prefix(self, prefix: str) -> list[Path]:
        """:meth:`fetch` of every key under ``prefix`` (a folder such as ``results/<job>``)."""

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove ``key`` (and its local copy); a missing key is no error."""

    def keys(self, prefix: str) -> list[str]:
        """The keys under ``prefix``, sorted."""

    def evict(self, key: str) -> None:
        """Drop the local copy of ``key`` (the spool backend keeps it: it is the object)."""

    def stale(self, prefix: str, older_than_s: float) -> list[str]:
        """The keys under ``prefix`` not written for ``older_than_s`` seconds (by the store's clock)."""


@dataclass
class SpoolObjects:
    """The keys are the spool's own files (the embedded default): one folder shared by every process."""

    local: Spool

    def path(self, key: str) -> Path:
        return self.local.root / check_key(key)

    def put(self, key: str, data: bytes | Path) -> None:
        dest = self.path(key)
        if isinstance(data, Path):
            if Path(data).resolve() != dest.resolve():
                self.local.adopt(data, dest)
            # else: the file is the object already, written there durably by the spool
        else:
            self.local.write_atomic(dest, data)

    def fetch(self, key: str) -> Path:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no object {key} in the spool {self.local.root}")
        return path

    def fetch_prefix(self, prefix: str) -> list[Path]:
        return [self.path(k) for k in self.keys(prefix)]

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def keys(self, prefix: str) -> list[str]:
        folder = self.local.root / _prefix(prefix)
        if not folder.is_dir():
            return []
        return sorted(str(p.relative_to(self.local.root)) for p in folder.rglob("*") if p.is_file())

    def evict(self, key: str) -> None:
        check_key(key)

    def stale(self, prefix: str, older_than_s: float) -> list[str]:
        cutoff = time.time() - older_than_s
        return [k for k in self.keys(prefix) if self.path(k).stat().st_mtime < cutoff]


def _md5(data: bytes | Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    if isinstance(data, Path):
        with open(data, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    else:
        h.update(data)
    return base64.b64encode(h.digest()).decode()


class S3Objects:
    """The keys are objects under ``s3://bucket/prefix``; ``local`` is this host's private scratch.

    ``client`` is a boto3 S3 client (:func:`open_objects` makes one with short timeouts and
    credentials from the usual AWS_* variables). Downloads go to the scratch's ``tmp/`` and are
    renamed into place whole, so a half-fetched object is never read.
    """

    def __init__(self, client: Any, bucket: str, prefix: str, local: Spool) -> None:
        self.client, self.bucket, self.local = client, bucket, local
        self.prefix = _prefix(prefix) if prefix.strip("/") else ""

    def __repr__(self) -> str:
        return f"S3Objects(s3://{self.bucket}/{self.prefix})"

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _call(self, what: str, key: str, fn: Any, **kwargs: Any) -> Any:
        """One request; the store's failures as ObjectsUnavailable, a missing key as FileNotFoundError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"no object {key} in s3://{self.bucket}/{self.prefix}") from exc
            raise ObjectsUnavailable(
                f"object store s3://{self.bucket}/{self.prefix}: {what} {key} refused ({code or status}: "
                f"{err.get('Message', '')}); check [objects] url, endpoint and the AWS_* credentials") from exc
        except BotoCoreError as exc:  # refused, timed out, connection closed: the store is not there
            raise ObjectsUnavailable(f"object store s3://{self.bucket}/{self.prefix} unreachable ({what} {key}): "
                                     f"{type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise ObjectsUnavailable(f"object store s3://{self.bucket}/{self.prefix}: {what} {key}: {exc}") from exc

    def put(self, key: str, data: bytes | Path) -> None:
        name = self._name(key)
        if isinstance(data, Path):
            with open(data, "rb") as body:
                self._call("put", key, self.client.put_object, Key=name, Body=body, ContentMD5=_md5(data))
        else:
            self._call("put", key, self.client.put_object, Key=name, Body=data, ContentMD5=_md5(data))

    def fetch(self, key: str) -> Path:
        dest = self.local.root / check_key(key)
        tmp = self.local.tmp / uuid.uuid4().hex
        try:
            body = self._call("get", key, self.client.get_object, Key=self._name(key))["Body"]
            try:
                with open(tmp, "wb") as out:
                    for chunk in self._chunks(key, body):
                        out.write(chunk)
            finally:
                body.close()
            self.local.adopt(tmp, dest)  # renamed into place whole (a hard link, no copy)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def _chunks(self, key: str, body: Any) -> Iterator[bytes]:
        from botocore.exceptions import BotoCoreError

        try:
            yield from body.iter_chunks(_CHUNK)
        except BotoCoreError as exc:  # the store went away mid-download
            raise ObjectsUnavailable(f"object store s3://{self.bucket}/{self.prefix}: get {key} cut off: "
                                     f"{type(exc).__name__}") from exc

    def fetch_prefix(self, prefix: str) -> list[Path]:
        return [self.fetch(k) for k in self.keys(prefix)]

    def exists(self, key: str) -> bool:
        try:
            self._call("head", key, self.client.head_object, Key=self._name(key))
        except FileNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Key=self._name(key))
        self.evict(key)

    def _listing(self, prefix: str) -> Iterator[dict]:
        start = self.prefix + _prefix(prefix)
        token: dict[str, str] = {}
        while True:
            page = self._call("list", prefix, self.client.list_objects_v2, Prefix=start, **token)
            yield from page.get("Contents", [])
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def keys(self, prefix: str) -> list[str]:
        return sorted(o["Key"][len(self.prefix):] for o in self._listing(prefix))

    def stale(self, prefix: str, older_than_s: float) -> list[str]:
        cutoff = time.time() - older_than_s
        return sorted(o["Key"][len(self.prefix):] for o in self._listing(prefix)
                      if o["LastModified"].timestamp() < cutoff)

    def evict(self, key: str) -> None:
        (self.local.root / check_key(key)).unlink(missing_ok=True)


@dataclass(frozen=True)
class Location:
    """``[objects] url`` parsed: the bucket and the key prefix inside it."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Location:
        parts = urlsplit(url)
        bucket = parts.netloc
        if parts.scheme != "s3" or not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", bucket) or parts.query:
            raise ValueError(f"[objects] url = {url!r}: use \"s3://bucket\" or \"s3://bucket/prefix\" "
                             "(a bucket name of 3-63 lower-case letters, digits, dots and hyphens), or \"\" for the spool")
        prefix = parts.path.strip("/")
        if prefix:
            _prefix(prefix)
        return cls(bucket, prefix)


def s3_client(endpoint: str, connect_timeout_s: float = 3.0, read_timeout_s: float = 30.0) -> Any:
    """A boto3 S3 client for ``endpoint`` (empty: AWS itself), credentials and region from the AWS_*
    variables. Timeouts are short and retries few: an unreachable store must turn into a prompt
    Out of Resources at the listener, not a sender's association timing out."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
                    retries={"max_attempts": 2, "mode": "standard"}, s3={"addressing_style": "path"})
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # a session of its own: boto3's default one keeps the credentials it found first
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None, region_name=region, config=config)


def open_objects(url: str, endpoint: str, local: Spool) -> SpoolObjects | S3Objects:
    """``[objects]`` as the node uses it: ``""`` the spool itself, ``s3://bucket/prefix`` an S3 store."""
    if not url:
        return SpoolObjects(local)
    where = Location.parse(url)
    return S3Objects(s3_client(endpoint), where.bucket, where.prefix, local)


# ---------------------------------------------------------------- folders built once, fetched by every host

class DigestMismatch(ValueError):
    """A fetched file's sha256 is not the one its manifest states: nothing of it was put in place."""


UNRECORDED_AFTER_S = 3600.0  # an instance object older than this with no job row was never acknowledged


def sweep_unrecorded(objects: Objects, known: Callable[[str], bool],
                     older_than_s: float = UNRECORDED_AFTER_S) -> int:
    """Delete ``incoming/<id>.dcm`` objects no job records (``known(id)`` false) that are older than
    ``older_than_s``; returns how many. A listener leaves one when the job row failed after the PUT
    and the store then refused the delete too: the sender got no success and sends again. The age
    keeps a second listener's instance, between its PUT and its row, out of reach."""
    n = 0
    for key in objects.stale("incoming", older_than_s):
        stem = key.rsplit("/", 1)[-1].removesuffix(".dcm")
        if key.count("/") == 1 and key.endswith(".dcm") and not known(stem):
            objects.delete(key)
            n += 1
    return n


def manifest_path(folder: Path) -> Path:
    """Where a fetched folder's manifest is kept beside it (``<folder>.manifest.json``)."""
    return folder.with_name(folder.name + ".manifest.json")


def publish_folder(objects: Objects, folder: Path, prefix: str) -> dict[str, str]:
    """Put every file of ``folder`` (a model bundle, a similar-cases index) under ``prefix``, then
    ``<prefix>/manifest.json``: name -> sha256. The manifest goes last, so a host that finds it
    finds every file it names. Returns the manifest."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: nothing to publish (no files)")
    manifest = {str(p.relative_to(folder)): file_digest(p) for p in files}
    for p in files:
        objects.put(f"{_prefix(prefix)}files/{p.relative_to(folder)}", p)
    objects.put(f"{_prefix(prefix)}manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def fetch_folder(objects: Objects, prefix: str, dest: Path) -> Path:
    """This host's copy of the folder published under ``prefix``: each file fetched, checked
    against the manifest's sha256 and the whole renamed into place at ``dest`` (a reader never sees
    half of it). Kept as it is when its manifest is the store's. ``DigestMismatch`` when a file
    differs from its manifest (the old copy stays); ``FileNotFoundError`` when nothing is published."""
    dest = Path(dest)
    mine = manifest_path(dest)
    staged = objects.fetch(f"{_prefix(prefix)}manifest.json")
    text = staged.read_text()
    objects.evict(f"{_prefix(prefix)}manifest.json")
    if dest.is_dir() and mine.is_file() and mine.read_text() == text:
        return dest
    manifest: dict[str, str] = json.loads(text)
    partial = dest.with_name(dest.name + ".fetching")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for name, digest in sorted(manifest.items()):
            key = f"{_prefix(prefix)}files/{check_key(name)}"
            got = objects.fetch(key)
            have = file_digest(got)
            if have != digest:
                objects.evict(key)
                raise DigestMismatch(f"{key}: sha256 {have}, its manifest says {digest}; nothing replaced. "
                                     f"Publish the folder again from the host that built it")
            (partial / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(got, partial / name)
        old = dest.with_name(dest.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            os.replace(dest, old)
        os.replace(partial, dest)
        shutil.rmtree(old, ignore_errors=True)
        objects.local.write_atomic(mine, text.encode())
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dest
