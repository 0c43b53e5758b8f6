"""prometheus-client's multiprocess folder, prepared before prometheus-client is first imported.

prometheus-client picks its multiprocess mode when it is imported, from ``PROMETHEUS_MULTIPROC_DIR``,
so this module imports nothing of it: a command calls :func:`prepare` first (`up`, `listen`,
`worker`, `console`), and a Celery prefork child calls :func:`reserve` when it starts.

The folder is ``<spool>/metrics`` and the spool is meant to fill up (the listener then answers
out of resources). prometheus-client writes each process's values into memory-mapped files it
creates sparse: a new series on a full filesystem touches a page that cannot be allocated, and
the process dies of SIGBUS. So each process's files are allocated for real when the process
starts (:func:`reserve`, half a MiB per process), before prometheus-client opens them; it
takes their size as its capacity. A process whose files cannot be allocated (the spool is full
as it starts) keeps its metrics to itself rather than risk that.
"""

from __future__ import annotations

import fcntl
import os
import re
import sys
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
# The files prometheus-client writes per process, <type>[_<gauge mode>]_<pid>.db, for the types
# and gauge modes dicom_node.metrics uses (tests/unit/test_node_metrics.py checks the list), and
# the bytes each gets: the listener's counters with 64 calling AE titles take about 95 KB, its
# histograms with 5 destinations 20 KB. Past that, prometheus-client grows the file sparse.
FILES = {"counter": 256 << 10, "histogram": 128 << 10, "gauge_livesum": 64 << 10, "gauge_livemax": 64 << 10}


def reserve(folder: Path, pid: int | None = None) -> None:
    """Allocate this process's metric files in ``folder`` (a no-op for files that exist).

    Raises
    ------
    OSError
        The filesystem has no room for them (ENOSPC) or the folder is not writable.
    """
    pid = os.getpid() if pid is None else pid
    for prefix, size in FILES.items():
        path = Path(folder) / f"{prefix}_{pid}.db"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            if os.fstat(fd).st_size < size:
                os.posix_fallocate(fd, 0, size)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)


_PID = re.compile(r"_(\d+)\.db$")


def pids(folder: Path) -> set[int]:
    """The processes that have metric files in ``folder``."""
    return {int(m.group(1)) for f in Path(folder).glob("*.db") if (m := _PID.search(f.name))}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare(folder: Path, clean: bool = False) -> bool:
    """Make ``folder`` this process's (and its children's) multiprocess folder. It is emptied
    first with ``clean`` (`up`, whose processes are all new), or when every process that wrote
    there is gone (`listen` and `worker` started apart: the files of processes that ended would
    pile up, one set per restart; all counters then start again from 0 together, as after a
    restart of `up`). False, with an error logged, when this process runs with its metrics to
    itself (prometheus-client was imported already, or no room)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # One process at a time from the check to its own files: two starting together (systemd)
        # must not both find the folder idle, and the second empty it of the first one's files.
        with open(folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if clean or not any(alive(pid) for pid in pids(folder)):
                for f in folder.glob("*.db"):
                    f.unlink()
            if "prometheus_client" in sys.modules and os.environ.get(ENV) != str(folder):
                log.error("metrics.single_process", why="prometheus_client was imported before its folder was set")
                return False
            reserve(folder)
    except OSError as exc:
        log.error("metrics.single_process", why=f"cannot allocate the metric files in {folder}: {exc}")
        os.environ.pop(ENV, None)
        return False
    os.environ[ENV] = str(folder)
    return True


def reserve_in_child() -> None:
    """For a forked child (Celery's worker_process_init): its own files, before its first metric."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    try:
        reserve(Path(folder))
    except OSError as exc:
        log.error("metrics.reserve_failed", folder=folder, error=str(exc))
