"""The SQL database the shared state lives in: one interface, the SQLite file of the spool behind it
by default (dicom_node.postgres for PostgreSQL). The job store, the RIS delivery ledger and the
report store write their SQL once, to this interface, and never learn which backend holds them.

The SQL they write is what both backends read alike: ``?`` placeholders, ``INSERT ... ON CONFLICT
DO NOTHING``, ``UPDATE ... RETURNING``, ``CASE`` instead of two-argument ``MAX``. Schemas name
their types as ``{real}`` (a timestamp in seconds) and ``{serial}`` (an integer key the database
assigns), which each backend fills in.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol


class StoreUnavailable(ConnectionError):
    """The database cannot be reached now (a server down, a network cut, the pool empty).

    Transient: the caller refuses or retries what it was doing (the listener answers Out of
    Resources, a worker gives the job back) and the next call reconnects by itself. ``in_doubt``:
    the connection broke while the transaction was committing, so it may have been written; keep
    what it refers to (an instance file the sweep at start removes when no row names it)."""

    def __init__(self, message: str, in_doubt: bool = False) -> None:
        super().__init__(message)
        self.in_doubt = in_doubt


class Rows(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx(Protocol):
    """One open transaction."""

    skip_locked: str  # appended to a SELECT of rows a claimer is about to take ("" in SQLite)

    def execute(self, sql: str, args: Sequence[object] = ()) -> Rows: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None: ...

    def lock(self, key: str) -> None:
        """Serialise this transaction with every other that locks ``key`` until it ends."""


class Database(Protocol):
    kind: str  # "sqlite" or "postgresql"
    # True: other hosts' nodes share these tables, so a claim in them may be another host's
    # (`up` gives back only claims it knows are its own: none, then; their leases run out instead)
    shared: bool

    def transaction(self) -> AbstractContextManager[Tx]: ...

    def create(self, schema: str, added: Mapping[str, tuple[tuple[str, str], ...]] | None = None,
               indexes: str = "") -> None:
        """Tables of ``schema`` (CREATE ... IF NOT EXISTS), then the columns ``added`` to a table
        since its first release (table -> (name, type)), then ``indexes``: safe to run by many
        processes at once, every time one opens the store."""

    def describe(self) -> str:
        """Where the data is, for messages and logs (never a password)."""


SQLITE_TYPES = {"real": "REAL", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"}


@contextmanager
def transaction(path: Path) -> Iterator[sqlite3.Connection]:
    """One write transaction on the SQLite file ``path`` (WAL, fsync on commit, taken at once).

    One short-lived connection per transaction: simple across threads and forked processes."""
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    finally:
        db.close()


class _SqliteTx:
    skip_locked = ""  # BEGIN IMMEDIATE already holds the whole file

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, args: Sequence[object] = ()) -> Rows:
        return self._db.execute(sql, tuple(args))

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self._db.executemany(sql, rows)

    def lock(self, key: str) -> None:
        """Nothing to do: BEGIN IMMEDIATE serialises every write transaction on the file."""


class SqliteDatabase:
    """A SQLite file (the embedded default: in the spool, one host)."""

    kind = "sqlite"
    shared = False

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        with transaction(self.path) as db:
            yield _SqliteTx(db)

    def create(self, schema: str, added: Mapping[str, tuple[tuple[str, str], ...]] | None = None,
               indexes: str = "") -> None:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(schema.format(**SQLITE_TYPES))  # executescript commits on its own
            for table, columns in (added or {}).items():
                have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                for name, kind in columns:  # the migration of a table made by an earlier release
                    if name not in have:
                        try:
                            db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
                        except sqlite3.OperationalError as exc:  # another process added it first
                            if "duplicate column" not in str(exc):
                                raise
            if indexes:
                db.executescript(indexes.format(**SQLITE_TYPES))
        finally:
            db.close()

    def describe(self) -> str:
        return f"sqlite:{self.path}"


def as_database(where: Database | Path | str) -> Database:
    """A Database as given, or the SQLite file at a path (what the stores took before backends)."""
    if isinstance(where, (str, Path)):
        return SqliteDatabase(Path(where))
    return where
