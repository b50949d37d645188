"""A SQLite request cache around any engine.

Each request (one conversation with its sampling parameters, or one conversation with
its options) is keyed by a hash of the engine identity and the request. The wrapper
sends only missing requests to the engine, in chunks, and commits each chunk, so a run
killed at any point resumes without recomputing what finished, and a rerun is free.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Sequence

from cai.engines.base import Engine, Progress, SamplingParams


def _key(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class RequestCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS requests (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.commit()
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[str]) -> dict[str, object]:
        out = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start:start + 500])
                q = f"SELECT key, value FROM requests WHERE key IN ({','.join('?' * len(chunk))})"
                for k, v in self._db.execute(q, chunk):
                    out[k] = json.loads(v)
        return out

    def put_many(self, items: dict[str, object]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO requests (key, value) VALUES (?, ?)",
                [(k, json.dumps(v, ensure_ascii=False)) for k, v in items.items()],
            )
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CachedEngine(Engine):
    """Wraps an engine; answers from the cache and stores every new answer."""

    def __init__(self, engine: Engine, cache: RequestCache, chunk_size: int = 64):
        self.engine = engine
        self.cache = cache
        self.chunk_size = chunk_size
        self.identity = engine.identity
        self.hits = 0
        self.misses = 0

    def __getattr__(self, name):  # expose the wrapped engine's extras (tok, render...)
        return getattr(self.engine, name)

    def _run(self, keys, requests, compute, progress: Progress | None):
        cached = self.cache.get_many(keys)
        self.hits += len(cached)
        if progress and cached:
            progress(len(cached))
        missing = [i for i, k in enumerate(keys) if k not in cached]
        # Longest first, so each chunk holds requests of similar length (less padding).
        missing.sort(key=lambda i: -len(json.dumps(requests[i], ensure_ascii=False)))
        self.misses += len(missing)
        for start in range(0, len(missing), self.chunk_size):
            idx = missing[start:start + self.chunk_size]
            outs = compute([requests[i] for i in idx], progress)
            new = {keys[i]: o for i, o in zip(idx, outs)}
            self.cache.put_many(new)
            cached.update(new)
        return [cached[k] for k in keys]

    def generate(self, conversations, params: SamplingParams, progress: Progress | None = None):
        keys = [_key("generate", self.identity, c, params.to_dict()) for c in conversations]
        return self._run(
            keys, list(conversations),
            lambda convs, p: self.engine.generate(convs, params, p), progress,
        )

    def choice_logprobs(self, conversations, options, progress: Progress | None = None):
        keys = [_key("choice", self.identity, c, list(o)) for c, o in zip(conversations, options)]
        reqs = list(zip(conversations, options))
        return self._run(
            keys, reqs,
            lambda rs, p: self.engine.choice_logprobs([r[0] for r in rs], [r[1] for r in rs], p),
            progress,
        )

    def close(self) -> None:
        self.engine.close()
        self.cache.close()
