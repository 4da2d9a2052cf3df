"""Bad input: name the file and the record, then stop or skip (``data.on_error``).

A loader that meets a malformed record calls :meth:`RecordPolicy.bad`. With ``on_error=raise``
(the default) that raises :class:`DataError` naming the file and the record; with
``on_error=skip`` the record is counted and remembered, and the stage writes the list of
skipped ids next to its outputs with :meth:`RecordPolicy.write_skipped`.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.common.files import write_json

log = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("raise", "skip")


class DataError(Exception):
    """Input data that the pipeline cannot use, with the file and record that caused it."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, record: object = None):
        self.path = None if path is None else str(path)
        self.record = record
        where = ""
        if self.path is not None:
            where += f"{self.path}: "
        if record is not None:
            where += f"record {record}: "
        super().__init__(where + message)


class MissingDataError(DataError):
    """Required input files are absent; the message lists them and where they come from."""


@dataclass
class SkippedRecord:
    kind: str
    record: object
    path: str | None
    reason: str


@dataclass
class RecordPolicy:
    """What to do with a bad record: ``raise`` (stop with a clear message) or ``skip``."""

    on_error: str = "raise"
    skipped: list[SkippedRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"data.on_error must be one of {ON_ERROR_CHOICES}, got {self.on_error!r}")

    def bad(self, kind: str, record: object, reason: str, path: str | os.PathLike | None = None) -> None:
        """Report a bad record of ``kind`` (``question``, ``image``, ``hat_map``...)."""
        if self.on_error == "raise":
            raise DataError(f"{kind}: {reason} (set data.on_error=skip to skip such records)", path, record)
        self.skipped.append(SkippedRecord(kind, record, None if path is None else str(path), reason))
        log.warning("skipping %s %s: %s%s", kind, record, reason, f" ({path})" if path else "")

    def skip_dependent(self, kind: str, record: object, reason: str) -> None:
        """Record a record dropped because another one it needs was bad (a question whose image
        was skipped). Never raises: the bad record itself was already reported."""
        self.skipped.append(SkippedRecord(kind, record, None, reason))

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(s.kind for s in self.skipped).items()))

    def write_skipped(self, path: str | os.PathLike) -> Path:
        """Write the skipped records (kind, id, file, reason) and their counts as JSON."""
        return write_json(
            path,
            {
                "counts": self.counts(),
                "skipped": [s.__dict__ for s in self.skipped],
            },
        )
