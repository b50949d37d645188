"""Are two runs' artifacts the same? The identity check of a change that must not change behaviour.

Every JSON, JSONL and YAML file of the two run folders is compared without its timing
fields (``seconds``, ``started``, ``*_s``, ``*_per_s``, ``versions``, the report's byte
count; a manifest without its file hashes, which cover the timings), and every
``*.safetensors`` file by sha256. The first run's folder path is read as the second's, so
two folders of the same run compare. Exit 0 when nothing differs.

    python benchmarks/compare_runs.py runs/before runs/after
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import yaml

TIMING = {"seconds", "started", "train_seconds", "measured", "versions", "bytes"}


def strip(obj):
    """``obj`` without its timing fields, at every depth."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items()
                if k not in TIMING and not k.endswith("_s") and not k.endswith("_per_s")}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def load(path: Path, same_as: tuple[str, str]):
    text = path.read_text(encoding="utf-8").replace(*same_as)
    if path.suffix == ".jsonl":
        return [strip(json.loads(line)) for line in text.splitlines() if line.strip()]
    if path.suffix == ".json":
        data = json.loads(text)
        if path.name == "manifest.json":
            data.pop("outputs", None)
        return strip(data)
    return strip(yaml.safe_load(text))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def compare(a: Path, b: Path) -> tuple[int, list[str]]:
    """(files that match, what differs)."""
    same_as = (str(a.resolve()), str(b.resolve()))
    files = sorted({p.relative_to(a) for p in a.rglob("*") if p.is_file()}
                   | {p.relative_to(b) for p in b.rglob("*") if p.is_file()})
    same, differ = 0, []
    for rel in files:
        if rel.suffix not in (".json", ".jsonl", ".yaml", ".safetensors") or rel == Path("config.yaml"):
            continue  # config.yaml holds run_dir; figures, the cache and the report page hold timings
        pa, pb = a / rel, b / rel
        if not pa.is_file() or not pb.is_file():
            differ.append(f"only in {'the first' if pa.is_file() else 'the second'}: {rel}")
            continue
        ok = sha256(pa) == sha256(pb) if rel.suffix == ".safetensors" else load(pa, same_as) == load(pb, same_as)
        same += ok
        if not ok:
            differ.append(f"differs: {rel}")
    return same, differ


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first", type=Path)
    ap.add_argument("second", type=Path)
    args = ap.parse_args()
    same, differ = compare(args.first, args.second)
    for line in differ:
        print(line)
    print(f"{same} identical, {len(differ)} differ (JSON/JSONL/YAML without timing fields, safetensors by sha256)")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
