"""A SQLite request cache around any engine.

Each request (one conversation with its sampling parameters, or one conversation with
its options) is keyed by a hash of the engine identity and the request. The wrapper
sends only missing requests to the engine, in chunks, and commits each answer the moment
the engine hands it back (``on_result``), so a run killed at any point, or an engine that
fails halfway through a chunk, resumes without recomputing what finished, and a rerun is
free.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Sequence

from cai.engines.base import Engine, OnResult, Progress, SamplingParams, finished
from cai.errors import CaiError


def _key(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class RequestCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._errors():
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS requests (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.commit()

    @contextlib.contextmanager
    def _errors(self):
        """SQLite failures as one line: a corrupt file names the way out; a full disk is the
        OSError the CLI reports as such."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if "full" in str(exc):
                raise OSError(errno.ENOSPC, "database or disk is full", str(self.path)) from None
            raise CaiError(f"{self.path}: the request cache cannot be used ({exc})") from None
        except (sqlite3.DatabaseError, ValueError) as exc:
            raise CaiError(
                f"{self.path}: not a readable request cache ({exc}); move it away (mv {self.path.name} "
                f"{self.path.name}.bad) and rerun: finished stages are kept, unfinished requests are recomputed"
            ) from None

    def get_many(self, keys: Sequence[str]) -> dict[str, object]:
        out = {}
        with self._lock, self._errors():
            for start in range(0, len(keys), 500):
                chunk = list(keys[start:start + 500])
                q = f"SELECT key, value FROM requests WHERE key IN ({','.join('?' * len(chunk))})"
                for k, v in self._db.execute(q, chunk):
                    out[k] = json.loads(v)
        return out

    def put_many(self, items: dict[str, object]) -> None:
        with self._lock, self._errors():
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
    """Wraps an engine; answers from the cache and stores every new answer as it arrives.

    It is an :class:`Engine` and nothing more: the wrapped engine's other attributes are
    not passed through (``engine`` is there for code that built it and knows its kind).
    """

    def __init__(self, engine: Engine, cache: RequestCache, chunk_size: int = 64):
        self.engine = engine
        self.cache = cache
        self.chunk_size = chunk_size
        self.identity = engine.identity
        self.hits = 0
        self.misses = 0

    @property
    def batching(self):
        """The wrapped engine's (:class:`cai.engines.base.Batching`): the cache does not batch."""
        return self.engine.batching

    def _run(self, keys, requests, compute, progress: Progress | None, on_result: OnResult | None):
        cached = self.cache.get_many(keys)
        self.hits += len(cached)
        for i, k in enumerate(keys):
            if k in cached:
                finished(i, cached[k], progress, on_result)
        missing = [i for i, k in enumerate(keys) if k not in cached]
        # Longest first, so each chunk holds requests of similar length (less padding).
        missing.sort(key=lambda i: -len(json.dumps(requests[i], ensure_ascii=False)))
        self.misses += len(missing)
        for start in range(0, len(missing), self.chunk_size):
            idx = missing[start:start + self.chunk_size]

            def arrived(j: int, value, idx=idx) -> None:  # stored the moment it arrives
                key = keys[idx[j]]
                self.cache.put_many({key: value})
                cached[key] = value
                if on_result is not None:
                    on_result(idx[j], value)

            outs = compute([requests[i] for i in idx], progress, arrived)
            late = {keys[i]: o for i, o in zip(idx, outs) if keys[i] not in cached}
            if late:  # an engine that returned results without handing them back one by one
                self.cache.put_many(late)
                cached.update(late)
                if on_result is not None:
                    for i in idx:
                        if keys[i] in late:
                            on_result(i, late[keys[i]])
        return [cached[k] for k in keys]

    def generate(self, conversations, params: SamplingParams, progress: Progress | None = None,
                 on_result: OnResult | None = None):
        keys = [_key("generate", self.identity, c, params.to_dict()) for c in conversations]
        return self._run(
            keys, list(conversations),
            lambda convs, p, got: self.engine.generate(convs, params, p, got), progress, on_result,
        )

    def choice_logprobs(self, conversations, options, progress: Progress | None = None,
                        on_result: OnResult | None = None):
        keys = [_key("choice", self.identity, c, list(o)) for c, o in zip(conversations, options)]
        reqs = list(zip(conversations, options))
        return self._run(
            keys, reqs,
            lambda rs, p, got: self.engine.choice_logprobs([r[0] for r in rs], [r[1] for r in rs], p, got),
            progress, on_result,
        )

    def count_tokens(self, conversation) -> int:
        return self.engine.count_tokens(conversation)

    def close(self) -> None:
        self.engine.close()
        self.cache.close()
