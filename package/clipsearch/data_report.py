"""The count of what a data path skipped (by reason) and converted (by image mode)."""
from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping

logger = logging.getLogger(__name__)

# Conversions share the counter with skips; this prefix is how the two are told apart.
CONVERSION_PREFIX = "converted "


class DataReport:
    """Counts skipped items by reason and image conversions by source mode.

    Holds only a Counter, so it pickles, and the counts of DataLoader workers come back to the
    main process as plain dicts in each batch, to be folded in with `merge`.
    """

    def __init__(self, counts: Mapping[str, int] | None = None):
        self.counts: Counter[str] = Counter()
        if counts:
            self.merge(counts)

    def add(self, reason: str, path: str | os.PathLike | None = None, count: int = 1) -> None:
        """Record `count` occurrences of `reason`; skips are logged, conversions only at debug level."""
        self.counts[reason] += count
        where = f": {path}" if path is not None else ""
        times = f" ({count} items)" if count != 1 else ""
        if reason.startswith(CONVERSION_PREFIX):
            logger.debug("%s%s%s", reason, times, where)
        else:
            logger.warning("skipped, %s%s%s", reason, times, where)

    def add_conversion(self, mode: str, path: str | os.PathLike | None = None) -> None:
        self.add(f"{CONVERSION_PREFIX}{mode}", path)

    def merge(self, other: DataReport | Mapping[str, int]) -> DataReport:
        """Add another report's counts (without logging again: the other side already did)."""
        counts = other.counts if isinstance(other, DataReport) else other
        for reason, count in counts.items():
            self.counts[reason] += int(count)
        return self

    def as_dict(self) -> dict[str, int]:
        return {reason: count for reason, count in sorted(self.counts.items()) if count}

    def skipped(self) -> dict[str, int]:
        return {r: c for r, c in self.as_dict().items() if not r.startswith(CONVERSION_PREFIX)}

    def conversions(self) -> dict[str, int]:
        return {r: c for r, c in self.as_dict().items() if r.startswith(CONVERSION_PREFIX)}

    def total_skipped(self) -> int:
        return sum(self.skipped().values())

    def summary(self) -> str:
        skipped = self.skipped()
        if skipped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.items())
            lines = [f"skipped {self.total_skipped()} items: {reasons}"]
        else:
            lines = ["skipped 0 items"]
        conversions = self.conversions()
        if conversions:
            lines.append("image conversions: " + ", ".join(f"{count} {reason}" for reason, count in conversions.items()))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"DataReport({self.as_dict()})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DataReport):
            return self.as_dict() == other.as_dict()
        return NotImplemented
