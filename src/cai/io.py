"""Atomic, durable writes (a temp file flushed to disk, then renamed into place) and reads
that turn bad bytes into one-line errors.

A file written here is either the old version or the whole new one, even after a crash
or a full disk: the temporary file is removed when a write fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _atomic(path: Path, write) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    _atomic(path, lambda fh: fh.write(text))


def write_json(path: Path, obj) -> None:
    _atomic(path, lambda fh: fh.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n"))


def write_jsonl(path: Path, records) -> None:
    def write(fh):
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")

    _atomic(path, write)


def file_sha256(path: Path, sync: bool = False) -> str:
    """A file's sha256; with ``sync``, also flush it to disk (fsync) first."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if sync:
            os.fsync(fh.fileno())
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_text(path: Path, what: str = "file") -> str:
    """A UTF-8 text file's content; bytes that are not UTF-8 are a one-line error naming the file."""
    from cai.errors import CaiError

    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CaiError(f"{path}: this {what} is not UTF-8 text (bad byte at offset {exc.start}); "
                       "save it as UTF-8") from None


def read_jsonl(path: Path) -> list[dict]:
    from cai.errors import CaiError

    if not Path(path).is_file():
        raise CaiError(f"'{path}' does not exist")
    out = []
    for n, line in enumerate(read_text(path, "JSONL file").split("\n"), 1):  # not splitlines(): U+2028 is text
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise CaiError(f"{path}:{n}: malformed JSON line ({exc.msg})") from None
    return out
