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
    """A UTF-8 text file's content, without a leading byte-order mark (Windows editors and
    Excel write one; ``datasets`` and pandas read such files too); bytes that are not UTF-8
    are a one-line error naming the file."""
    from cai.errors import CaiError

    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CaiError(f"{path}: this {what} is not UTF-8 text (bad byte at offset {exc.start}); "
                       "save it as UTF-8") from None


def read_json(path: Path):
    """A JSON file a stage wrote, or None when it is absent; bad bytes or JSON are a one-line
    error naming the file."""
    from cai.errors import CaiError

    if not Path(path).is_file():
        return None
    try:
        return json.loads(read_text(path, "artifact"))
    except json.JSONDecodeError as exc:
        raise CaiError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); rebuild the stage that wrote it") from None


def no_duplicate_keys(where: str):
    """A ``json.loads`` ``object_pairs_hook`` that refuses a key given twice in one object
    (``json`` keeps the last silently), with a one-line error naming the key."""
    from cai.errors import CaiError

    def hook(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                raise CaiError(f"{where}: key '{key}' is given twice in one JSON object; keep one")
            out[key] = value
        return out

    return hook


def load_yaml(text: str, where: str):
    """YAML text as plain data (safe types only), where a key given twice in one mapping is
    a one-line error naming the key and both lines (PyYAML would keep the last silently),
    and bad YAML one naming the line. ``where``: the file (or override) for the message."""
    import yaml

    from cai.errors import CaiError

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the constructor below says so
                continue
            if first is not None:
                lines = f"lines {first} and {line}" if first != line else f"both on line {line}"
                raise CaiError(f"{where}: key '{key}' is given twice ({lines}); keep one")
            seen[key] = line
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise CaiError(f"{where}{line}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None


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
