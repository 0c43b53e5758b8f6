"""The similar-cases drafter a worker opens on its first draft (index/), or none when there is no index."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from index.draft import Draft, Drafter, Reporter
    from models.prediction import Prediction

log = structlog.get_logger()


class LazyReporter:
    """The similar cases index and drafter, opened on the first draft in the process that uses them.

    An index that cannot be opened does not stop the node: drafts are written from the findings
    alone and say why there are no similar cases; the error is logged once.
    """

    def __init__(self, folder: Path, extractor: str = "lexicon", language: str = "en") -> None:
        from index.wording import wording_for

        self.folder, self.extractor = folder, extractor
        self.wording = wording_for(language)  # an unknown language fails here, not on the first draft
        self._reporter: Reporter | Drafter | None = None
        self._why = ""
        self._lock = threading.Lock()

    def _load(self) -> Reporter | Drafter:
        from index.draft import Drafter, open_reporter
        from index.labelers import get_extractor

        try:
            return open_reporter(self.folder, self.extractor, language=self.wording)
        except (ValueError, OSError) as exc:  # StoreError is a ValueError
            log.error("index.cannot_open", folder=str(self.folder), error=str(exc))
            self._why = self.wording.index_unopenable.format(folder=self.folder)
            return Drafter(get_extractor(self.extractor), wording=self.wording)

    def __call__(self, prediction: Prediction, digest: str) -> Draft:
        from index.draft import Reporter

        with self._lock:
            if self._reporter is None:
                self._reporter = self._load()
            reporter = self._reporter
        if isinstance(reporter, Reporter):
            return reporter(prediction, digest)
        return reporter.draft(prediction, None, why_none=self._why)  # the index could not be opened
