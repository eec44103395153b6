"""The collection a server answers from, replaced whole when an update of its embedding folder lands."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from clipsearch.errors import UserError
from clipsearch.search import source_signature
from clipsearch.store import update_in_progress

logger = logging.getLogger(__name__)

# How often the folder's records are looked at: a stat of each shard and record, milliseconds.
RELOAD_POLL_SECONDS = 2.0


@dataclass(frozen=True)
class Generation:
    """What an engine served, kept after a reload so the ids in its results still name images."""

    update: int | None
    paths: list[str]


class LiveCollection:
    """Holds the engine requests use, and swaps in a new one when the folder's update changes.

    Each request reads `engine` once and finishes on that engine, so a reload never fails a
    request in flight: the new engine is loaded beside the old one (memory for both, for that
    time) and replaces it in one assignment. The folder is watched through its records: nothing
    is loaded while an encoding run is writing (no manifest yet), and a new update that cannot
    be served (an index or querybank built for the rows before it) is said in one line while the
    old one stays in service. An engine not loaded from a folder (tests, benchmarks) never reloads.
    """

    def __init__(self, engine, poll_seconds: float = RELOAD_POLL_SECONDS):
        self.engine = engine
        self.previous: Generation | None = None
        self.poll_seconds = poll_seconds
        self._refused: tuple | None = None
        self._reloading = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """Reload if the folder changed since the engine was loaded; True when a new engine took over."""
        with self._reloading:
            source = getattr(self.engine, "source", None)
            if source is None:
                return False
            signature = source_signature(source)
            if signature in (self.engine.signature, self._refused):
                return False
            if update_in_progress(source.emb_path):  # wait for the run's manifest
                return False
            try:
                engine = self.engine.reload()
            except (UserError, OSError, ValueError) as error:
                self._refused = signature
                logger.warning("%s changed, but the new collection cannot be served (%s); still serving update %s",
                               source.emb_path, str(error).splitlines()[0] if str(error) else type(error).__name__,
                               self.engine.update)
                return False
            self.previous = Generation(self.engine.update, self.engine.searcher.paths)
            self.engine = engine
            logger.info("reloaded %s: now serving update %s, %d images", source.emb_path, engine.update,
                        len(engine.searcher))
            return True

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a failed look must not end the watching
                logger.exception("checking %s for updates failed; serving what is loaded", self.engine.source.emb_path)

    def start(self) -> None:
        if getattr(self.engine, "source", None) is None or self._thread is not None or self.poll_seconds <= 0:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="collection-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
