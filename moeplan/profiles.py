"""Result and profile files: written atomically (temporary file in the same folder, then rename),
so an interrupted run never leaves half a file. The calibration profile format lives here too."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike[str], text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike[str], data) -> Path:
    return write_atomic(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def write_csv(path: str | os.PathLike[str], rows: list[dict]) -> Path:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return write_atomic(path, buf.getvalue())


def _jsonable(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
