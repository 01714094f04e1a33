"""Durable writes: fsync, then an atomic rename, so a crash leaves the old thing or the new, never half of one;
and the fingerprints that markers and checkpoints record to say what they belong to.

A rename is atomic on POSIX file systems, but without the fsyncs a power cut can leave the new
name pointing at files whose data never reached the disk. Plain Python (no torch): any layer may use it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable


def fsync_dir(path: str | Path) -> None:
    """Make the entries of a folder (a rename into it, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file and folder under `path` (a file or a folder), `path` included."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for sub in sorted(path.iterdir()):
        fsync_tree(sub)
    fsync_dir(path)


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically and durably: a temp file beside it, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def publish_dir(tmp: str | Path, dest: str | Path) -> Path:
    """Move a fully written folder `tmp` to `dest` (replacing it) once its contents are on disk.

    A crash between removing the old `dest` and the rename leaves no `dest`, never a partial one.
    """
    tmp, dest = Path(tmp), Path(dest)
    fsync_tree(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
    return dest


def holds(marker: str | Path, key: str) -> bool:
    """Whether the marker file holds `key` (as `write_text(marker, key)` left it): a stage's or an expert's DONE, a
    checkpoint folder's key, a score file's key. A missing marker holds nothing."""
    marker = Path(marker)
    return marker.is_file() and marker.read_text().strip() == key


def fingerprint(obj) -> str:
    """A short stable key of a JSON-able value (anything else by its str): what a marker says was written."""
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint_dir(path: str | Path) -> str:
    """Identity of a saved model folder: the key in the DONE marker beside it where a stage made it, else its files'
    sizes and mtimes."""
    path = Path(path)
    done = path.parent / "DONE"
    if done.is_file():
        return done.read_text().strip()
    if not path.exists():
        return "missing"
    files = sorted((str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in path.rglob("*") if p.is_file())
    return fingerprint(files)


def kept(path: str | Path, key: str, make: Callable[[], Any], write: Callable[[Any, Path], None],
         read: Callable[[Path], Any], compute: bool = True) -> Any:
    """The value kept at `path` if its key file (`path` with the suffix `.key`, written last) holds `key`; else
    `make()`, written there by `write(value, path)` (which must leave it durable) and kept under `key` (None
    instead, with compute=False). What a stage computes once and reads back after a restart. Until a new value is
    made, an old value and its key stay together; a crash while the new one is written leaves no key that holds."""
    path = Path(path)
    key_path = path.with_suffix(".key")
    if holds(key_path, key):
        return read(path)
    if not compute:
        return None
    value = make()
    key_path.unlink(missing_ok=True)
    write(value, path)
    write_text(key_path, key)
    return value


def kept_json(path: str | Path, key: str, make: Callable[[], Any], compute: bool = True) -> Any:
    """`kept` for a JSON value: scores of a model under the model's and the evaluation's key."""
    return kept(path, key, make, lambda value, p: write_text(p, json.dumps(value, indent=2)),
                lambda p: json.loads(p.read_text()), compute)
