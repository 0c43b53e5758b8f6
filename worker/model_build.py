"""The first-start bootstrap: the default model bundle and similar-cases index of a fresh node,
and the progress file `status` reads while they are built.

`ensure_bundle` (the GPU worker, `infer`) builds them in the foreground when they are missing;
`ensure_default_index` builds the index alone for a given bundle.

`up` runs the build in a child process (`medsam2-cxr build-default`) while its listener already
accepts and spools; its GPU worker starts once the build is done, and the images received
meanwhile wait in the queue. The build writes into `<folder>.partial` and renames it when
complete, so a build stopped half way (SIGTERM, power loss) leaves nothing that looks finished;
the encoder feature cache (`<spool>/cache/features`) keeps what was computed, so the next start
goes on from there. One build at a time per spool (a file lock), whoever asks for it.

The progress file, `<spool>/model-build.json` (SpoolLayout.model_build_progress), written atomically at most once a second:
``{"state": "building" | "ready" | "failed", "stage", "done", "total", "started", "updated",
"finished", "device", "error"}`` (error: the exception's type and message when the build failed).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import structlog

from dicom_node.layout import SpoolLayout
from worker.settings import Settings

log = structlog.get_logger()

CARD_FILE = "model_card.json"  # models.bundle.CARD, named here so that `up` and `status` need not import torch


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def bundle_missing(settings: Settings) -> bool:
    """True when the default bundle is to be used and is not built (or not intact)."""
    from models.bundle import read_card

    if settings.model.bundle:
        return False
    try:
        read_card(settings.bundle_path)
        return False
    except (ValueError, OSError) as exc:  # BundleError (no card, or altered), a half-written card, unreadable
        log.info("model_build.bundle_missing", bundle=str(settings.bundle_path), why=str(exc),
                 action="the default bundle is built (again)")
        return True


def index_missing(settings: Settings) -> bool:
    """True when a node on the default bundle has no similar-cases index yet (a configured
    bundle or index is the site's own business: nothing is built for it)."""
    return not settings.model.bundle and not settings.index.path and settings.index_path is None


def looks_ready(settings: Settings) -> bool:
    """Cheap (no torch): the default bundle's card is there (it is written last, and the folder
    renamed into place whole) and so is the default index. The card's digests are checked by
    whoever loads it (the GPU worker)."""
    if settings.model.bundle:
        return True
    return (settings.bundle_path / CARD_FILE).is_file() and not index_missing(settings)


def needed(settings: Settings) -> list[str]:
    """What is still to build: "bundle" and/or "index" (empty: ready)."""
    return [name for name, missing in (("bundle", bundle_missing(settings)), ("index", index_missing(settings)))
            if missing]


def read_progress(spool: Path) -> dict | None:
    """The progress file's content, or None when there is none (or it cannot be read)."""
    try:
        return json.loads(SpoolLayout(Path(spool)).model_build_progress.read_text())
    except (OSError, ValueError):
        return None


class Progress:
    """Writes the progress file: at most once a second, and at every change of stage or state."""

    def __init__(self, spool: Path, device: str, every_s: float = 1.0) -> None:
        self.path = SpoolLayout(Path(spool)).model_build_progress
        self.every_s = every_s
        self.body: dict = {"state": "building", "stage": "starting", "done": 0, "total": 0, "started": _now(),
                           "updated": _now(), "finished": None, "device": device, "error": None}
        self._last = 0.0
        self._write()

    def _write(self) -> None:
        self.body["updated"] = _now()
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.body, sort_keys=True) + "\n")
        os.replace(tmp, self.path)
        self._last = time.monotonic()

    def __call__(self, stage: str, done: int, total: int) -> None:
        changed = stage != self.body["stage"] or done >= total
        self.body.update(stage=stage, done=int(done), total=int(total))
        if changed or time.monotonic() - self._last >= self.every_s:
            self._write()

    def finish(self) -> None:
        self.body.update(state="ready", stage="done", finished=_now())
        self._write()

    def fail(self, reason: str) -> None:
        self.body.update(state="failed", finished=_now(), error=reason)
        self._write()


def announce(spool: Path) -> None:
    """`up` says a build starts before the builder process (seconds of imports) writes its own."""
    body = {"state": "building", "stage": "starting", "done": 0, "total": 0, "started": _now(), "updated": _now(),
            "finished": None, "device": None, "error": None}
    path = SpoolLayout(Path(spool)).model_build_progress
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, sort_keys=True) + "\n")
    os.replace(tmp, path)


def mark(spool: Path, state: str, reason: str) -> None:
    """Set the progress file's state from outside the build ("failed": the build process died
    without saying why; "interrupted": stopped with the node)."""
    path = SpoolLayout(Path(spool)).model_build_progress
    body = read_progress(spool) or {"stage": None, "done": 0, "total": 0, "started": None, "device": None}
    body.update(state=state, error=reason if state == "failed" else None, note=reason if state != "failed" else None,
                finished=_now(), updated=_now())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(spool: Path) -> Iterator[None]:
    with SpoolLayout(spool).model_build_lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _replace(partial: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)  # a bundle that failed its check, or an index of an older bundle
    partial.rename(final)


def build(settings: Settings, device: str | None = None) -> list[str]:
    """Build what `needed` names (nothing when another process just built it); returns what was
    built. A failure is written to the progress file and logged with its reason, then raised."""
    from dicom_node.identifiers import describe

    spool = settings.spool
    spool.mkdir(parents=True, exist_ok=True)
    with _locked(spool):
        todo = needed(settings)
        if not todo:
            return []
        if device is None:
            import torch

            device = settings.model.device or ("cuda" if torch.cuda.is_available() else "cpu")
        progress = Progress(spool, device)
        log.info("model_build.started", building=todo, device=device, spool=str(spool))
        t0 = time.monotonic()
        try:
            if "bundle" in todo:
                _build_bundle(settings, device, progress)
            if "index" in todo:
                build_index(settings, device, progress)
        except Exception as exc:
            reason = describe(exc)
            progress.fail(reason)
            log.error("model_build.failed", reason=reason, stage=progress.body["stage"], progress=str(progress.path))
            raise
        progress.finish()
        log.info("model_build.done", built=todo, seconds=round(time.monotonic() - t0, 1))
        return todo


def _build_bundle(settings: Settings, device: str, progress: Progress) -> None:
    from model_training.default_bundle import build_default_bundle

    final = settings.bundle_path
    partial = settings.layout.partial(final)
    shutil.rmtree(partial, ignore_errors=True)
    ckpt = Path(settings.model.encoder_checkpoint) if settings.model.encoder_checkpoint else None
    if ckpt is not None and not ckpt.is_file():
        raise FileNotFoundError(f"[model] encoder_checkpoint {ckpt}: no such file")
    progress("bundle: phantoms", 0, settings.model.default_images)
    card = build_default_bundle(partial, n=settings.model.default_images, spec=settings.model.default_encoder,
                                checkpoint=ckpt, cache_dir=settings.layout.feature_cache, device=device,
                                on_progress=lambda stage, done, total: progress(f"bundle: {stage}", done, total))
    _replace(partial, final)
    log.info("model_build.bundle", digest=card["digest"][:12], folder=str(final),
             test_macro_auroc=round(card["metrics"]["test"]["macro_auroc"], 3))


def build_index(settings: Settings, device: str | None = None, progress=None) -> None:
    """A similar-cases index of phantom cases (other patients than the bundle's training set), so
    a node on its defaults already drafts reports with similar cases; a site replaces it with its
    own de-identified cases (`medsam2-cxr index build` / `index add`)."""
    import phantoms
    from index.build import build_index, phantom_items
    from models.bundle import load_bundle

    n = settings.model.default_index_cases
    progress = progress or (lambda stage, done, total: None)
    final = settings.layout.index
    partial = settings.layout.partial(final)
    shutil.rmtree(partial, ignore_errors=True)
    progress("index cases", 0, n)
    cases = phantoms.sample_cases(n, seed=1000)
    result = build_index(partial, load_bundle(settings.bundle_path),
                         list(phantom_items(cases, seed=1000, size=512, source="phantoms")),
                         cache_dir=settings.layout.feature_cache, progress=False, device=device,
                         on_progress=lambda stage, done, total: progress(f"index: {stage}", done, total))
    _replace(partial, final)
    log.info("model_build.index", cases=result.added, folder=str(final))


def ensure_bundle(settings: Settings) -> Path:
    """The configured bundle, or the default one, built here when it is not yet (minutes, once:
    a progress file in the spool, one build at a time). A configured bundle must exist and be
    intact (models.bundle.BundleError otherwise)."""
    from models.bundle import read_card

    path = settings.bundle_path
    if settings.model.bundle:
        read_card(path)
        return path
    if needed(settings):
        print(f"Building the default model bundle and similar-cases index in {settings.spool} (first start "
              f"only; progress: medsam2-cxr status)...", file=sys.stderr, flush=True)
        build(settings)
    return path


def ensure_default_index(settings: Settings, bundle_path: Path, n: int = 200) -> Path:
    """The default similar-cases index of n phantom cases for ``bundle_path``, in <spool>/index."""
    settings = settings.model_copy(update={"model": settings.model.model_copy(
        update={"bundle": str(bundle_path), "default_index_cases": n})})
    build_index(settings)
    return settings.layout.index
