"""JSON log lines, one object per line, appended to a file (the nodes' and the manager's)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, TextIO

ROTATE_BYTES = 4 * 1024 * 1024


class JsonLog:
    def __init__(self, path: Path, **context: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.context = context
        self._file: TextIO = path.open("a", encoding="utf-8")

    def write(self, level: str, msg: str, **fields: Any) -> None:
        if self._file.closed:
            return
        record = {"ts": round(time.time(), 3), "level": level, "msg": msg, **self.context,
                  **fields}
        self._file.write(json.dumps(record, default=str, separators=(",", ":")) + "\n")
        self._file.flush()
        if self._file.tell() >= ROTATE_BYTES:  # one backup is enough for a demo subject
            self._file.close()
            self.path.replace(self.path.with_name(self.path.name + ".1"))
            self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        self._file.close()
