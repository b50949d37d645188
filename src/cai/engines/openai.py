"""An engine for any OpenAI-compatible server (vLLM, llama.cpp, TGI, Ollama, hosted APIs).

Only the standard library: one HTTP/1.1 keep-alive connection per worker thread and
endpoint (``http.client``), a thread pool bounded by ``max_concurrency``. No client
package to install, and nothing here needs asyncio's event loop inside a stage.

Two ways to render a conversation, picked by whether a tokenizer is configured:

* **template mode** (``tokenizer`` set): the chat template is applied here, with the
  same code as the local engine, and the text goes to ``/completions``. A conversation
  ending in an assistant turn is then continued exactly as the local engine does. This
  is the mode for llama.cpp's servers, which ignore ``continue_final_message``.
* **chat mode** (no tokenizer): messages go to ``/chat/completions`` and the server
  applies its template. A final assistant turn is sent with vLLM's
  ``continue_final_message: true, add_generation_prompt: false``; servers that ignore
  these fields would answer it instead of continuing it (docs/engine.md).

``choice_logprobs`` reads the server's next-token ``top_logprobs`` and walks each
option's text token by token (one request per distinct option prefix), because
prompt log-probabilities (``echo``) are not available everywhere: llama-cpp-python
returns them shifted by one position, llama.cpp's C++ server not at all.

Several endpoints share the work: each request goes to the healthy endpoint with the
fewest requests in flight. Failures (429, 5xx, timeouts, refused connections) are
retried on the same endpoint with exponential backoff and jitter; an endpoint whose
retries all fail is taken out for ``cooldown_s`` and the request moves on to another.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import threading
import time
import urllib.parse
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Sequence

from cai.engines.base import (
    Batching,
    Conversation,
    Engine,
    OnResult,
    Progress,
    SamplingParams,
    finished,
    render_chat,
    request_seed,
    special_strings,
)
from cai.errors import CaiError

_RETRY_STATUS = {408, 409, 425, 429}  # and every 5xx
_SEED_RANGE = 2**31  # llama.cpp samplers take a 32-bit seed; vLLM and OpenAI accept this too


class _Failure(Exception):
    """One failed HTTP exchange; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


class _EndpointDown(Exception):
    pass


def _snippet(raw: bytes | str, n: int = 160) -> str:
    """A short one-line excerpt of a server's reply, safe to print in an error."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = " ".join(text.split())
    return repr(text[:n] + ("..." if len(text) > n else ""))


def normalize_url(url: str, field: str = "engine.endpoints") -> str:
    """The base URL requests are appended to: ``http://host:8000`` becomes ``.../v1``."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        shown = urllib.parse.urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", "")) or "(empty)"
        raise CaiError(f"config field '{field}': '{shown}' is not an http:// or https:// URL "
                       "(example: http://127.0.0.1:8000/v1)")
    if parts.username or parts.password or parts.query or parts.fragment:
        what = "a user or password" if parts.username or parts.password else "a query string"
        raise CaiError(
            f"config field '{field}': a URL with {what} would be written to config.yaml and every manifest "
            "(and a query string is not sent); put a key in the environment variable named by "
            "engine.api_key_env instead, and give the bare base URL (example: http://127.0.0.1:8000/v1)"
        )
    path = parts.path.rstrip("/")
    if not path:
        path = "/v1"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class Endpoint:
    """One server: its address, load, health and what it was found to support."""

    def __init__(self, url: str):
        self.url = normalize_url(url)
        parts = urllib.parse.urlsplit(self.url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port
        self.path = parts.path
        self.in_flight = 0
        self.down_until = 0.0
        self.last_error = ""
        self.ok = 0  # successful requests
        self.answered = False  # any HTTP reply at all since the engine was made
        self.logprobs_checked = False
        self.probe_lock = threading.Lock()
        self._local = threading.local()

    def connection(self, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's keep-alive connection, and whether it was just opened."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, False
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=timeout)
        self._local.conn = conn
        return conn, True

    def drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class EndpointPool:
    """Least-in-flight choice among the endpoints that are not taken out."""

    def __init__(self, urls: Sequence[str], cooldown_s: float = 60.0):
        if not urls:
            raise CaiError("config field 'engine.endpoints' is empty; kind=openai needs at least one server URL")
        self.endpoints = [Endpoint(u) for u in urls]
        self.cooldown_s = cooldown_s
        self._lock = threading.Lock()

    def acquire(self, wait_s: float = 0.0, abort: threading.Event | None = None) -> Endpoint:
        """The least busy endpoint that is not taken out. When every one is, wait for the
        first to come back (a taken-out endpoint is tried again after its cooldown), for at
        most ``wait_s`` seconds in all, then fail with every endpoint's last error. When
        none has ever given an HTTP reply, fail at once: each was already tried
        ``max_retries`` times, and an address that never answered is a mistake to fix."""
        give_up = time.monotonic() + wait_s
        while True:
            with self._lock:
                now = time.monotonic()
                live = [e for e in self.endpoints if e.down_until <= now]
                if live:
                    ep = min(live, key=lambda e: e.in_flight)
                    ep.in_flight += 1
                    return ep
                back = min(e.down_until for e in self.endpoints)
                answered = any(e.answered for e in self.endpoints)
            if not answered:
                # none has given any HTTP reply since the run began: a typo in a URL, a server never
                # started, which waiting does not mend (waiting is for servers that are there or were)
                why = "; ".join(f"{e.url}: {e.last_error}" for e in self.endpoints)
                raise CaiError(
                    f"no OpenAI endpoint has answered ({why}); check engine.endpoints (the URLs, the ports, that the "
                    "servers are started and serve /v1) and rerun"
                )
            if back > give_up or (abort is not None and abort.is_set()):
                why = "; ".join(f"{e.url}: {e.last_error}" for e in self.endpoints)
                raise CaiError(
                    f"every OpenAI endpoint failed ({why}) and none came back within engine.wait_for_endpoints_s="
                    f"{wait_s:g}; check the servers and engine.endpoints, then rerun (answers so far are cached)"
                )
            time.sleep(min(max(back - now, 0.05), 5.0))

    def release(self, ep: Endpoint, ok: bool) -> None:
        with self._lock:
            ep.in_flight -= 1
            ep.ok += ok

    def take_out(self, ep: Endpoint, reason: str) -> None:
        with self._lock:
            ep.last_error = reason
            ep.down_until = time.monotonic() + self.cooldown_s


class OpenAIEngine(Engine):
    @staticmethod
    def batching_for(max_concurrency: int) -> Batching:
        """Requests go one by one, ``max_concurrency`` in flight, and the server batches them.
        A prefix the requests share (the demonstrations) is counted as read once per
        ``max_concurrency`` requests: servers keep it cached (vLLM's prefix caching,
        llama.cpp's per-slot prompt cache); a server without a prompt cache reads it every time."""
        return Batching(generate=max_concurrency, score=max_concurrency, shared_prefix_once=True)

    @property
    def batching(self) -> Batching:
        return self.batching_for(self.max_concurrency)

    def __init__(
        self,
        endpoints: Sequence[str],
        model: str,
        api_key: str | None = None,
        tokenizer=None,
        tokenizer_name: str | None = None,
        max_concurrency: int = 16,
        timeout_s: float = 600.0,
        max_retries: int = 4,
        top_logprobs: int = 20,
        backoff_s: float = 0.5,
        cooldown_s: float = 60.0,
        wait_for_endpoints_s: float = 0.0,
        served: str = "",
        extra_body: dict | None = None,
    ):
        self.pool = EndpointPool(endpoints, cooldown_s)
        # Server-specific request fields (a managed llama.cpp server gets repeat_penalty=1:
        # llama-cpp-python's default of 1.1 would change greedy answers).
        self.extra_body = dict(extra_body or {})
        self.wait_for_endpoints_s = wait_for_endpoints_s
        self.model = model
        self._api_key = api_key or None  # never logged, never part of identity or repr
        self.tok = tokenizer
        self.max_concurrency = max(1, max_concurrency)
        self.timeout_s = timeout_s
        self.max_retries = max(0, max_retries)
        self.top_logprobs = top_logprobs
        self.backoff_s = backoff_s
        self._n_ignored = False  # set once a server returned fewer choices than asked
        self._abort = threading.Event()
        self.stats = {"requests": 0, "retries": 0, "probes": 0, "below_top_k": 0}
        self._stats_lock = threading.Lock()
        if tokenizer is not None and getattr(tokenizer, "chat_template", None) is None:
            raise CaiError(f"engine.tokenizer '{tokenizer_name}' has no chat template; use a chat model's tokenizer")
        mode = f"template={tokenizer_name}" if tokenizer is not None else "chat"
        # What the servers say they serve under this name (see served_model): another model
        # behind the same name then gets its own cache entries.
        self.identity = f"openai:{model}:{mode}:top{top_logprobs}" + (f":served={served}" if served else "")

    def __repr__(self) -> str:
        return f"OpenAIEngine({[e.url for e in self.pool.endpoints]}, model={self.model!r})"

    # -- HTTP ---------------------------------------------------------------------

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _exchange(self, ep: Endpoint, path: str, payload: bytes) -> tuple[int, bytes]:
        """One request; reopens a kept-alive connection the server closed meanwhile."""
        for _ in range(2):
            conn, fresh = ep.connection(self.timeout_s)
            try:
                conn.request("POST", ep.path + path, body=payload, headers=self._headers())
                resp = conn.getresponse()
                ep.answered = True  # a server is there (whatever its status: a 503 while it warms up)
                return resp.status, resp.read()
            except TimeoutError:
                ep.drop_connection()
                raise _Failure(f"no response within timeout_s={self.timeout_s:g}", True) from None
            except (OSError, http.client.HTTPException) as exc:
                ep.drop_connection()
                stale = isinstance(exc, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError))
                if fresh or not stale:
                    raise _Failure(f"connection failed ({type(exc).__name__}: {exc})", True) from None
        raise _Failure("connection failed (closed by the server twice)", True)

    def _send(self, ep: Endpoint, path: str, body: dict) -> dict:
        status, raw = self._exchange(ep, path, json.dumps(body).encode())
        if status != 200:
            retryable = status in _RETRY_STATUS or status >= 500
            raise _Failure(f"HTTP {status} {_snippet(raw)}", retryable)
        try:
            data = json.loads(raw)
        except ValueError:
            raise _Failure(f"reply is not JSON: {_snippet(raw)}", False) from None
        if not isinstance(data, dict):
            raise _Failure(f"reply is not a JSON object: {_snippet(raw)}", False)
        return data

    def _post_to(self, ep: Endpoint, path: str, body: dict) -> dict:
        """Send to one endpoint with retries; raises _EndpointDown when they run out."""
        last = None
        for attempt in range(self.max_retries + 1):
            if self._abort.is_set():
                raise CaiError("request cancelled: another request of this call failed")
            if attempt:
                self._count("retries")
                # Exponential backoff with full jitter, so retries from many threads spread out.
                time.sleep(self.backoff_s * (2 ** (attempt - 1)) * (0.5 + random.random()))
            self._count("requests")
            try:
                return self._send(ep, path, body)
            except _Failure as f:
                if not f.retryable:
                    raise CaiError(f"endpoint {ep.url}{path}: {f}") from None
                last = f
        raise _EndpointDown(f"{last} after {self.max_retries + 1} attempts")

    def _post(self, path: str, body: dict, before: Callable[[Endpoint], None] | None = None) -> dict:
        """Send to the least-busy healthy endpoint, moving on when one goes down."""
        while True:
            ep = self.pool.acquire(self.wait_for_endpoints_s, self._abort)
            ok = False
            try:
                if before is not None:
                    before(ep)
                data = self._post_to(ep, path, body)
                ok = True
                return data
            except _EndpointDown as exc:
                self.pool.take_out(ep, str(exc))
            finally:
                self.pool.release(ep, ok)

    # -- requests -----------------------------------------------------------------

    def render(self, conv: Conversation) -> str:
        """Template mode: the prompt text, continuing a final assistant turn."""
        text = render_chat(self.tok, conv, special_strings(self.tok))
        bos = getattr(self.tok, "bos_token", None)
        if bos and text.startswith(bos) and self._adds_bos():
            text = text[len(bos):]  # the server adds its own BOS where the model wants one
        return text

    def _adds_bos(self) -> bool:
        """Does the tokenizer put BOS in front by itself? Then so does the server (llama.cpp's
        GGUF and vLLM take add_bos from the same tokenizer), and a template's BOS would be a
        second one. SmolLM2's BOS is ``<|im_start|>``, which its template begins with and its
        tokenizer does not add: stripping it there changed every answer."""
        if not hasattr(self, "_bos_added"):
            try:
                ids = self.tok("x", add_special_tokens=True)["input_ids"]
                self._bos_added = bool(ids) and ids[0] == self.tok.bos_token_id
            except (TypeError, AttributeError, KeyError):
                self._bos_added = True  # a tokenizer we cannot ask: assume the usual
        return self._bos_added

    def _request(self, conv: Conversation, suffix: str = "") -> tuple[str, dict]:
        """(path, body) asking for what follows ``conv`` plus ``suffix`` of assistant text."""
        if not conv:
            raise ValueError("empty conversation")
        if self.tok is not None:
            body = {**self.extra_body, "model": self.model, "prompt": self.render(conv) + suffix}
            eos = getattr(self.tok, "eos_token", None)
            if eos:
                body["stop"] = [eos]
            return "/completions", body
        msgs = [dict(m) for m in conv]
        if suffix:
            if msgs[-1]["role"] == "assistant":
                msgs[-1]["content"] += suffix
            else:
                msgs.append({"role": "assistant", "content": suffix})
        body = {**self.extra_body, "model": self.model, "messages": msgs}
        if msgs[-1]["role"] == "assistant":
            body.update(continue_final_message=True, add_generation_prompt=False)
        return "/chat/completions", body

    def _choices(self, data: dict, path: str) -> list[dict]:
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
            raise CaiError(f"OpenAI endpoint reply to {path} has no 'choices' list: {_snippet(json.dumps(data))}")
        return sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c.get("index"), int) else 0)

    def _text(self, choice: dict, path: str) -> str:
        if path == "/completions":
            text = choice.get("text")
        else:
            msg = choice.get("message")
            text = msg.get("content", 0) if isinstance(msg, dict) else None
            text = "" if text is None else text  # content null: an empty answer (e.g. a refusal)
        if not isinstance(text, str):
            raise CaiError(f"OpenAI endpoint reply to {path} has a choice without text: {_snippet(json.dumps(choice))}")
        return text.strip()

    # -- generation ---------------------------------------------------------------

    def _generate_one(self, conv: Conversation, params: SamplingParams) -> list[str]:
        samples = params.n if params.temperature > 0 else 1
        texts: list[str] = []
        while len(texts) < samples:
            want = 1 if self._n_ignored else samples - len(texts)
            path, body = self._request(conv)
            body.update(
                n=want, temperature=params.temperature, top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                seed=request_seed(params.seed, conv, len(texts)) % _SEED_RANGE,
            )
            got = [self._text(c, path) for c in self._choices(self._post(path, body), path)][:want]
            if len(got) < want:
                self._n_ignored = True  # this server ignores n: ask one sample at a time
            texts += got
        return texts if params.temperature > 0 else texts * params.n

    def generate(self, conversations, params: SamplingParams, progress: Progress | None = None,
                 on_result: OnResult | None = None):
        return self._map(lambda conv: self._generate_one(conv, params), list(conversations), progress, on_result)

    # -- scoring ------------------------------------------------------------------

    def _dist(self, data: dict, path: str) -> dict[str, float]:
        """token text -> logprob of the first generated position, from either API."""
        choice = self._choices(data, path)[0]
        lp = choice.get("logprobs")
        out: dict[str, float] = {}
        try:
            # The legacy completions layout (OpenAI, vLLM, llama-cpp-python), or the chat
            # layout, which llama.cpp's C++ server also uses on /completions.
            if isinstance(lp, dict) and "content" not in lp:
                pairs = list(lp["top_logprobs"][0].items())
                pairs.append((lp["tokens"][0], lp["token_logprobs"][0]))
            else:
                first = lp["content"][0]
                pairs = [(t["token"], t["logprob"]) for t in first["top_logprobs"]]
                pairs.append((first["token"], first["logprob"]))
        except (KeyError, IndexError, TypeError, AttributeError):
            return {}
        for token, value in pairs:
            if isinstance(token, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[token] = max(float(value), -1e30) if not math.isnan(value) else -math.inf
        return out

    def _next_token_request(self, conv: Conversation, suffix: str) -> tuple[str, dict]:
        path, body = self._request(conv, suffix)
        body.update(max_tokens=1, temperature=0.0, n=1)
        if path == "/completions":
            body["logprobs"] = self.top_logprobs
        else:
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        return path, body

    def _check_logprobs(self, ep: Endpoint) -> None:
        """Once per endpoint: does it return a next-token top-k list at all?"""
        if ep.logprobs_checked:
            return
        with ep.probe_lock:
            if ep.logprobs_checked:
                return
            self._count("probes")
            path, body = self._next_token_request([{"role": "user", "content": "Say hello."}], "")
            dist = self._dist(self._post_to(ep, path, body), path)
            if len(dist) < min(2, self.top_logprobs):
                field = "logprobs" if path == "/completions" else "logprobs/top_logprobs"
                raise CaiError(
                    f"endpoint {ep.url}{path} returns no top-{self.top_logprobs} log-probabilities "
                    f"('{field}'), which choice_logprobs needs; use a server that does (vLLM, llama.cpp) "
                    "or score with engine.kind=local"
                )
            ep.logprobs_checked = True

    def _next_token(self, conv: Conversation, suffix: str) -> dict[str, float]:
        path, body = self._next_token_request(conv, suffix)
        dist = self._dist(self._post(path, body, before=self._check_logprobs), path)
        if not dist:
            raise CaiError(f"OpenAI endpoint reply to {path} lacks the requested log-probabilities")
        return dist

    def _score_one(self, conv: Conversation, options: Sequence[str]) -> list[float]:
        """Walk each option's text through the next-token top-k lists.

        At each step the longest top-k token that starts the rest of the option is
        taken (the tokenizer's own split in nearly every case). Options with a shared
        start share requests. A piece missing from the top-k list scores the smallest
        listed log-probability, an upper bound on its true value, and ends the walk.
        """
        if not options:
            raise ValueError("a conversation has no options to score")
        seen: dict[str, dict[str, float]] = {}
        scores = []
        for opt in options:
            if not opt:
                raise ValueError("an option is empty")
            total, done = 0.0, ""
            while len(done) < len(opt):
                if done not in seen:
                    seen[done] = self._next_token(conv, done)
                dist, rest = seen[done], opt[len(done):]
                match = max((t for t in dist if t and rest.startswith(t)), key=len, default=None)
                if match is None:
                    self._count("below_top_k")
                    total += min(dist.values())
                    break
                total += dist[match]
                done += match
            scores.append(total)
        return scores

    def choice_logprobs(self, conversations, options, progress: Progress | None = None,
                        on_result: OnResult | None = None):
        pairs = list(zip(conversations, options))
        return self._map(lambda p: self._score_one(p[0], p[1]), pairs, progress, on_result)

    def count_tokens(self, conversation: Conversation) -> int:
        if self.tok is None:
            return super().count_tokens(conversation)
        return len(self.tok(self.render(conversation), add_special_tokens=False)["input_ids"])

    # -- fan-out ------------------------------------------------------------------

    def _map(self, fn, items: list, progress: Progress | None, on_result: OnResult | None = None) -> list:
        """``fn`` over ``items`` with at most ``max_concurrency`` in flight, in order; each
        result is handed to ``on_result`` as soon as it arrives."""
        if not items:
            return []
        self._abort.clear()
        results: list = [None] * len(items)
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items)), thread_name_prefix="cai-openai")
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        pending = set(futures)

        def hand_back(done) -> BaseException | None:
            error = None
            for fut in done:
                if fut.cancelled():
                    continue
                if fut.exception() is not None:
                    error = error or fut.exception()
                    continue
                i = futures[fut]
                results[i] = fut.result()
                finished(i, results[i], progress, on_result)
            return error

        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                error = hand_back(done)
                if error is not None:
                    # No new request starts; the ones already sent finish and their answers are
                    # handed back (a server that answered them must not have answered in vain).
                    self._abort.set()
                    for fut in pending:
                        fut.cancel()
                    hand_back(wait(pending)[0])
                    pending = set()
                    raise error
        except BaseException:
            self._abort.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return results


def build_openai_engine(cfg, progress=print) -> OpenAIEngine:
    """The engine for ``engine.kind=openai``; the API key comes from the environment only."""
    check_openai_config(cfg)
    tok = None
    if cfg.tokenizer:
        from transformers import AutoTokenizer

        from cai.models import resolve_model

        path = resolve_model(cfg.tokenizer, cfg.revision, progress=progress)
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise CaiError(f"config field 'engine.tokenizer': cannot load '{cfg.tokenizer}': {str(exc).splitlines()[0]}") from None
    api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    return OpenAIEngine(
        cfg.endpoints, cfg.model, api_key=api_key,
        tokenizer=tok, tokenizer_name=cfg.tokenizer, max_concurrency=cfg.max_concurrency,
        timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, top_logprobs=cfg.top_logprobs,
        wait_for_endpoints_s=cfg.wait_for_endpoints_s,
        served=served_model(cfg.endpoints, cfg.model, api_key, progress),
    )


#: Fields of a ``/v1/models`` entry that say what is behind a name (vLLM: ``root``,
#: ``parent``, ``max_model_len``; llama.cpp: ``meta`` with the vocabulary, context and
#: parameter counts). ``created`` is left out: vLLM stamps it with the time of the request.
SERVED_FIELDS = ("root", "parent", "max_model_len", "meta", "owned_by")


def served_model(endpoints, model: str, api_key: str | None, progress=print, timeout_s: float = 10.0) -> str:
    """A short hash of what the servers report about ``model`` at ``/v1/models``, or "".

    It goes into the engine's identity, so the request cache tells apart two different
    models served under the same name, where the server says anything beyond the name.
    A server that reports only the name cannot be told apart (docs/engine.md). Servers
    that disagree about the same name are an error: their answers would mix in one cache.
    """
    import hashlib

    seen = {}
    for url in endpoints:
        base = normalize_url(url)
        parts = urllib.parse.urlsplit(base)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        try:
            conn = cls(parts.hostname, parts.port, timeout=timeout_s)
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            conn.request("GET", parts.path + "/models", headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            conn.close()
            entries = json.loads(raw).get("data", []) if resp.status == 200 else []
        except (OSError, http.client.HTTPException, ValueError, AttributeError):
            entries = []
        entry = next((e for e in entries if isinstance(e, dict) and e.get("id") == model), None)
        if entry is None:
            continue
        seen[base] = json.dumps({k: entry.get(k) for k in SERVED_FIELDS if entry.get(k) is not None}, sort_keys=True)
    if not seen:
        progress(f"engine: no endpoint described model '{model}' at /v1/models; the request cache keys on its name only")
        return ""
    if len(set(seen.values())) > 1:
        urls = ", ".join(seen)
        raise CaiError(f"config field 'engine.endpoints': the servers ({urls}) report different models under the name "
                       f"'{model}'; point every endpoint at the same model")
    only = next(iter(seen.values()))
    return hashlib.sha256(only.encode()).hexdigest()[:12] if only != "{}" else ""


def check_openai_config(cfg) -> None:
    """One-line errors for an ``EngineConfig`` with kind=openai, naming the field."""
    if not cfg.endpoints:
        raise CaiError(
            "config field 'engine.endpoints' is empty; engine.kind=openai needs at least one server URL "
            "(e.g. engine.endpoints=[http://127.0.0.1:8000/v1])"
        )
    for i, url in enumerate(cfg.endpoints):
        normalize_url(url, f"engine.endpoints[{i}]")
    for name, low in (("max_concurrency", 1), ("max_retries", 0), ("top_logprobs", 1)):
        if getattr(cfg, name) < low:
            raise CaiError(f"config field 'engine.{name}' must be >= {low}; got {getattr(cfg, name)}")
    if not cfg.timeout_s > 0:
        raise CaiError(f"config field 'engine.timeout_s' must be > 0; got {cfg.timeout_s}")
    if cfg.wait_for_endpoints_s < 0:
        raise CaiError(f"config field 'engine.wait_for_endpoints_s' must be >= 0; got {cfg.wait_for_endpoints_s}")
