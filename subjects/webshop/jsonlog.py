"""JSON log lines (one object per line) appended to <data-dir>/logs/app.log."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, TextIO

LOG_NAME = "app.log"
ROTATE_BYTES = 4 * 1024 * 1024  # keeps a healthy log dir far below the log_disk invariant
BACKUPS = 2


class JsonLog:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / LOG_NAME
        self._file: TextIO = self.path.open("a", encoding="utf-8")

    def write(self, level: str, msg: str, **fields: Any) -> None:
        if self._file.closed:
            return  # a straggling request during shutdown
        record = {"ts": round(time.time(), 3), "level": level, "msg": msg, **fields}
        self._file.write(json.dumps(record, default=str, separators=(",", ":")) + "\n")
        self._file.flush()
        if self._file.tell() >= ROTATE_BYTES:
            self.rotate()

    def rotate(self) -> None:
        """Size-based rotation: app.log -> app.log.1 -> app.log.2, the oldest dropped."""
        self._file.close()
        for n in range(BACKUPS, 0, -1):
            src = self.path.with_name(f"{LOG_NAME}.{n - 1}" if n > 1 else LOG_NAME)
            if src.exists():
                src.replace(self.path.with_name(f"{LOG_NAME}.{n}"))
        self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        self._file.close()


def dir_bytes(directory: Path, max_entries: int = 10_000) -> int:
    """Bytes held by regular files directly in `directory` (bounded scan)."""
    total = 0
    try:
        with os.scandir(directory) as it:
            for i, entry in enumerate(it):
                if i >= max_entries:
                    break
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    except FileNotFoundError:
        return 0
    return total
