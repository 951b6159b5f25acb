"""Atomic writes: a crash or Ctrl-C leaves the previous file or folder, never a half-written one.

Every file and folder the project writes for later use (summaries, results, demonstrations,
policies, the converted model, the warm-up cache) goes through these helpers: write to a
temporary name in the same folder, then `os.replace`, which is atomic on one file system.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _write_atomically(path: str | os.PathLike, mode: str, write) -> Path:
    """Call `write(fh)` on a temporary file in `path`'s folder, then move it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder."""
    return _write_atomically(path, "w", lambda fh: fh.write(text))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """`obj` as indented JSON with sorted keys (numpy scalars written as floats)."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float))


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """One JSON object a line."""
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_npy(path: str | os.PathLike, array) -> Path:
    """A numpy array as `.npy`, through a temporary file in the same folder."""
    import numpy as np

    return _write_atomically(path, "wb", lambda fh: np.save(fh, array))


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path`.

    An exception inside the block removes the temporary folder and leaves `path` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
