"""Atomic output helpers.

Every stage writes through these so that a killed stage never leaves a file or folder that a
later run (or DVC) would mistake for a finished one: content goes to a temporary sibling first
and is renamed into place only once it is complete (rename is atomic on POSIX filesystems).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = [
    "atomic_path",
    "atomic_directory",
    "replace_directory",
    "write_json",
    "write_text",
    "save_torch",
    "read_json",
]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary file keeps the final suffix (``.npz``, ``.png``...) so that libraries that
    pick a format from the name write the right one. On an exception the temporary is removed
    and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically and byte-reproducibly. torch names the zip
    archive's root folder after the file it writes to, which here would be the random temporary
    name: identical weights would give different bytes (and DVC hashes) run to run. Writing
    through a file object makes the root folder the fixed name ``archive``."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)
    return Path(path)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``path`` as a whole.

    A previous ``path`` is moved aside first and deleted only after the new one is in place,
    so at every instant either the old complete folder or the new complete folder exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, path)


def replace_directory(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the finished folder ``source`` onto ``target``. An old ``target`` is moved aside
    first and deleted only once the new one is in place (a folder cannot be renamed over a
    non-empty one in one step)."""
    source, target = Path(source), Path(target)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(source, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays appear in summaries; json cannot encode them natively.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON atomically (keys in insertion order, stable across runs)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, default=_json_default, ensure_ascii=False)
            f.write("\n")
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and rename the result onto ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
