"""Where the shared state is opened: the one place that knows which database backend holds it.

``[store] url`` empty: the SQLite files of the spool (the embedded default, one host). A
``postgresql://`` URL: one PostgreSQL database for the job table, the delivery ledger and the
report store of every node that names it (dicom_node.postgres). Everything else asks for a
:class:`dicom_node.database.Database` or a :class:`JobStore` here and stays backend-blind.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from dicom_node.database import Database, SqliteDatabase
from dicom_node.jobstore import JobStore

SCHEMES = ("postgresql", "postgres")


def check_url(url: str) -> str:
    """``url`` when it is empty or names PostgreSQL; else a ValueError saying what is accepted."""
    if url and urlsplit(url).scheme not in SCHEMES:  # the URL itself is not repeated: it may hold a password
        scheme = urlsplit(url).scheme
        raise ValueError(f"[store] url: {scheme + '://' if scheme else 'a URL without a scheme'} is not supported: "
                         f"leave it empty (SQLite in the spool) or give postgresql://user@host:5432/dbname")
    return url


def open_database(url: str, sqlite_path: Path, pool_size: int = 4, timeout_s: float = 5.0) -> Database:
    """The database of ``url``; empty: the SQLite file ``sqlite_path`` (in the spool)."""
    if not check_url(url):
        return SqliteDatabase(sqlite_path)
    from dicom_node.postgres import PostgresDatabase  # psycopg only where PostgreSQL is configured

    return PostgresDatabase(url, pool_size=pool_size, timeout_s=timeout_s)


def open_jobs(url: str, sqlite_path: Path, clock: Callable[[], float] = time.time, pool_size: int = 4,
              timeout_s: float = 5.0) -> JobStore:
    """The job store of ``url`` (empty: the SQLite file ``sqlite_path``); its tables made on first open."""
    return JobStore(open_database(url, sqlite_path, pool_size, timeout_s), clock=clock)
