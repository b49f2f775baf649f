"""Follow a log file between scrapes: new lines only, bounded in count and size."""

from __future__ import annotations

import os
from pathlib import Path

MAX_LINES = 50
MAX_LINE_CHARS = 500
MAX_READ_BYTES = 256 * 1024  # per scrape; a flood beyond it skips to the newest bytes
FIRST_READ_BYTES = 16 * 1024  # the first scrape sees a short tail, not the whole history
_NOTABLE = ('"level":"error"', '"level":"warn', '"level":"critical"')


class LogTail:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._inode: int | None = None
        self._offset: int | None = None

    def read_new(self) -> list[str]:
        """Lines appended since the last call (from the start after a rotation)."""
        if self.path is None:
            return []
        try:
            with self.path.open("rb") as f:
                st = os.fstat(f.fileno())
                if self._offset is None:
                    start = max(0, st.st_size - FIRST_READ_BYTES)
                    aligned = start == 0
                elif st.st_ino != self._inode or st.st_size < self._offset:
                    start, aligned = 0, True  # rotated or truncated
                else:
                    start, aligned = self._offset, True
                if st.st_size - start > MAX_READ_BYTES:
                    start, aligned = st.st_size - MAX_READ_BYTES, False
                f.seek(start)
                data = f.read(st.st_size - start)
                # A partial last line waits for the next scrape.
                end = data.rfind(b"\n") + 1
                self._inode, self._offset = st.st_ino, start + end
        except OSError:
            return []
        lines = data[:end].decode("utf-8", "replace").splitlines()
        if not aligned and lines:
            lines = lines[1:]  # starts mid-line
        return pick(lines)


def pick(lines: list[str]) -> list[str]:
    """At most MAX_LINES, in order, warnings and errors kept before routine lines."""
    lines = [ln for ln in lines if ln.strip()]
    if len(lines) > MAX_LINES:
        notable = {i for i, ln in enumerate(lines) if any(m in ln for m in _NOTABLE)}
        keep = sorted(notable)[-MAX_LINES:]
        room = MAX_LINES - len(keep)
        if room:
            rest = [i for i in range(len(lines)) if i not in notable]
            keep = sorted(keep + rest[-room:])
        lines = [lines[i] for i in keep]
    return [ln[:MAX_LINE_CHARS] for ln in lines]
