"""A finished stage's artifacts: its manifest, the hashes of its files, and their check.

Every stage folder holds ``manifest.json``, written last, with the sha256 and size of
every file the stage wrote. Before a stage reads an upstream stage's folder, and before
``cai report`` reads a run, those files are checked against it, so an artifact that was
cut short, edited or lost is a one-line error naming the file and the stage to rebuild,
never silently used.
"""

from __future__ import annotations

import json
from pathlib import Path

from cai.errors import CaiError
from cai.io import file_sha256
from cai.layout import MANIFEST

#: The file in ``<stage>.partial/`` that says which configuration an interrupted run had.
PARTIAL_STAMP = ".fingerprint"
#: A training stage's resumable state in ``<stage>.partial/``: not an artifact (no hash in the
#: manifest), kept until the finished folder is in place and removed then, so a run killed
#: after training but before that (while the weights are hashed, say) resumes from it.
CHECKPOINT = "checkpoint"
#: Files a later stage may delete from a finished stage's folder: the files of the frontier
#: points of rl and dpo (``points/step-NNNNNN/...``: weights, config, tokenizer), which the
#: evaluate stage removes once it has scored them (``evaluate.frontier_keep_weights=false``),
#: leaving a README.md card. One that is missing is not an error; one that is there must
#: still match its hash. The points index (``points/index.json``) is not disposable.
DISPOSABLE = "points/step-"


def disposable(rel: str) -> bool:
    return rel.startswith(DISPOSABLE)


def read_manifest(run_dir: Path, name: str) -> dict | None:
    path = Path(run_dir) / name / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # not a finished stage: it is run again
    return data if isinstance(data, dict) else None


_verified: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256, for this process


def hash_outputs(folder: Path) -> dict[str, dict]:
    """``{relative path: {"sha256", "bytes"}}`` of every file in a stage folder, each one
    flushed to disk (fsync) on the way, so a manifest never names data still in a cache."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(path.relative_to(folder))
        if rel in ("manifest.json", PARTIAL_STAMP) or path.relative_to(folder).parts[0] == CHECKPOINT:
            continue
        out[rel] = {"sha256": file_sha256(path, sync=True), "bytes": path.stat().st_size}
    return out


def verify_stage(run_dir: Path, name: str, only: tuple[str, ...] | None = None) -> None:
    """Check a finished stage's files (those ending in one of ``only``, default all) against
    the hashes its manifest recorded; a file that is missing, cut short or changed is a
    one-line error naming it and what to rerun. Each file is hashed once per process."""
    manifest = read_manifest(run_dir, name)
    outputs = (manifest or {}).get("outputs")
    if not isinstance(outputs, dict):  # a run directory from before hashes were recorded
        return
    folder = run_dir / name
    for rel, want in outputs.items():
        if only is not None and not rel.endswith(only):
            continue
        path = folder / rel
        fix = f"delete {folder} and run again to rebuild stage '{name}'"
        if not path.is_file():
            if disposable(rel):
                continue
            raise CaiError(f"{path}: missing from the finished stage '{name}'; {fix}")
        st = path.stat()
        if st.st_size != want.get("bytes"):
            raise CaiError(f"{path}: {st.st_size} bytes where stage '{name}' wrote {want.get('bytes')} "
                           f"(cut short or changed); {fix}")
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in _verified:
            _verified[key] = file_sha256(path)
        if _verified[key] != want.get("sha256"):
            raise CaiError(f"{path}: its content changed since stage '{name}' wrote it (sha256 differs); {fix}")
