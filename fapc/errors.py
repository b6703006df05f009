"""Error types that the CLI turns into one-line messages."""

from __future__ import annotations


class FapcError(Exception):
    """A user-facing error: bad input, unwritable output, refused model.

    ``str(err)`` is one line naming the file (when there is one) and the reason.
    """

    def __init__(self, reason: str, *, path: object | None = None) -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


class FormatError(FapcError):
    """A file that cannot be parsed (corrupt, truncated, lying header, unknown format)."""
