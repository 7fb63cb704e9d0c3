"""Standard output whose reader may go away: ``mpigls inspect --json | head -1``.

When the reader of a pipe closes it, the next write raises ``BrokenPipeError`` (Python ignores
SIGPIPE). ``tolerate_closed_stdout()`` makes ``sys.stdout`` discard what nobody reads from then on
(the descriptor is pointed at ``os.devnull``), so a command finishes its work (``certify`` still
writes its per-sample results file after printing the accuracies) and exits with its own code,
without a traceback or an "Exception ignored" line at exit. stderr is left alone: errors go there.
``cli.main`` runs every command inside it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

__all__ = ["ClosedPipeTolerant", "tolerate_closed_stdout"]


class ClosedPipeTolerant:
    """A text stream that forwards to ``stream`` until its reader has gone, then discards."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self.reader_gone = False

    def _gone(self) -> None:
        if not self.reader_gone:
            self.reader_gone = True
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self._stream.fileno())  # buffered text now drains into /dev/null
                os.close(devnull)
            except (OSError, ValueError):  # no descriptor (a test's capture): dropping is enough
                pass

    def write(self, text: str) -> int:
        if self.reader_gone:
            return len(text)
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()
            try:
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                pass

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... of the real stream
        return getattr(self._stream, name)


@contextlib.contextmanager
def tolerate_closed_stdout() -> Iterator[None]:
    """``sys.stdout`` wrapped in ``ClosedPipeTolerant`` inside the block (restored after it)."""
    before = sys.stdout
    if before is None or isinstance(before, ClosedPipeTolerant):
        yield
        return
    wrapper = ClosedPipeTolerant(before)
    sys.stdout = wrapper
    try:
        yield
    finally:
        wrapper.flush()  # what the reader may still take, or its loss noted
        if sys.stdout is wrapper:
            sys.stdout = before
