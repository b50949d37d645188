"""The OpenAI-compatible engine against in-process stub servers (stdlib http.server).

Each stub answers from a Python function, records every request, and can fail on
purpose (429, 500, slow replies, bad JSON, no log-probabilities), so the retry,
failover and error paths run in milliseconds without a model.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cai.checks import check_config
from cai.config import load_config, to_dict
from cai.engines import build_engine
from cai.engines.base import SamplingParams
from cai.engines.openai import OpenAIEngine
from cai.errors import CaiError

USER = [{"role": "user", "content": "hello"}]
CONT = [{"role": "user", "content": "Which?"}, {"role": "assistant", "content": "The answer is: ("}]


class Stub:
    """An HTTP server on 127.0.0.1:0 whose replies come from ``reply(stub, path, body)``.

    ``reply`` returns (status, payload); payload is JSON-encoded unless it is bytes.
    """

    def __init__(self, reply):
        self.reply = reply
        self.models = None  # what GET /v1/models answers (None: 404)
        self.requests: list[tuple[str, dict, dict]] = []  # (path, body, headers)
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append((self.path, body, dict(self.headers)))
                status, payload = stub.reply(stub, self.path, body)
                raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                payload = stub.models if self.path.endswith("/models") and stub.models is not None else None
                raw = json.dumps(payload or {"error": "not found"}).encode()
                self.send_response(200 if payload else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stubs():
    made = []

    def make(reply):
        made.append(Stub(reply))
        return made[-1]

    yield make
    for s in made:
        s.close()


def chat_reply(text_of=lambda body, i: f"echo {body['messages'][-1]['content']} #{i}"):
    """A well-behaved chat server that honours n."""

    def reply(stub, path, body):
        n = body.get("n", 1)
        return 200, {"choices": [
            {"index": i, "message": {"role": "assistant", "content": text_of(body, i)}} for i in range(n)
        ]}

    return reply


def engine(*urls, **kw):
    kw.setdefault("backoff_s", 0.001)
    return OpenAIEngine(list(urls), "m", **kw)


def test_generate_sends_sampling_fields_and_keeps_order(stubs):
    s = stubs(chat_reply())
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(7)]
    calls = []
    out = engine(s.url, max_concurrency=3).generate(
        convs, SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=11, seed=5), progress=calls.append
    )
    assert out == [[f"echo q{i} #0", f"echo q{i} #1"] for i in range(7)]
    assert sum(calls) == 7
    path, body, _ = s.requests[0]
    assert path == "/v1/chat/completions"
    assert (body["model"], body["n"], body["temperature"], body["top_p"], body["max_tokens"]) == ("m", 2, 0.7, 0.9, 11)
    assert 0 <= body["seed"] < 2**31
    # The same request gets the same seed (reproducible where the server honours it).
    seeds = {b["messages"][0]["content"]: b["seed"] for _, b, _ in s.requests}
    engine(s.url).generate(convs, SamplingParams(n=2, temperature=0.7, max_new_tokens=11, seed=5))
    assert {b["messages"][0]["content"]: b["seed"] for _, b, _ in s.requests[7:]} == seeds


def test_progress_is_reported_as_each_conversation_finishes(stubs):
    """The last request is held until progress counted the others: batching it fails."""
    released = threading.Event()

    def reply(stub, path, body):
        if body["messages"][0]["content"] == "q0" and not released.wait(5):
            return 400, {"error": "progress was not reported before the end"}
        return chat_reply()(stub, path, body)

    s = stubs(reply)
    calls = []

    def progress(n):
        calls.append(n)
        if len(calls) == 4:
            released.set()

    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    assert len(engine(s.url, max_concurrency=5).generate(convs, SamplingParams(max_new_tokens=2), progress)) == 5
    assert calls == [1] * 5


def test_server_that_ignores_n_gets_one_request_per_sample(stubs):
    def reply(stub, path, body):
        return 200, {"choices": [{"index": 0, "message": {"content": f"seed {body['seed']}"}}]}

    s = stubs(reply)
    out = engine(s.url).generate([USER], SamplingParams(n=3, temperature=1.0, max_new_tokens=4))
    assert len(out[0]) == 3 and len(set(out[0])) == 3  # three different seeds
    assert [b["n"] for _, b, _ in s.requests] == [3, 1, 1]


def test_greedy_asks_once_and_repeats(stubs):
    s = stubs(chat_reply())
    out = engine(s.url).generate([USER], SamplingParams(n=3, temperature=0.0, max_new_tokens=4))
    assert out == [["echo hello #0"] * 3]
    assert len(s.requests) == 1 and s.requests[0][1]["n"] == 1


def test_chat_mode_continues_a_final_assistant_turn(stubs):
    s = stubs(chat_reply())
    engine(s.url).generate([CONT], SamplingParams(max_new_tokens=4))
    body = s.requests[0][1]
    assert body["messages"] == CONT
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False


def test_429_is_retried_then_succeeds(stubs):
    def reply(stub, path, body):
        if len(stub.requests) <= 2:
            return 429, {"error": "slow down"}
        return chat_reply()(stub, path, body)

    s = stubs(reply)
    eng = engine(s.url)
    assert eng.generate([USER], SamplingParams(max_new_tokens=4)) == [["echo hello #0"]]
    assert len(s.requests) == 3 and eng.stats["retries"] == 2


def test_500s_until_give_up_name_the_endpoint_and_status(stubs):
    s = stubs(lambda stub, path, body: (500, {"error": "boom"}))
    with pytest.raises(CaiError) as err:
        engine(s.url, max_retries=2).generate([USER], SamplingParams(max_new_tokens=4))
    msg = str(err.value)
    assert s.url in msg and "HTTP 500" in msg and "3 attempts" in msg and "\n" not in msg
    assert len(s.requests) == 3


def test_client_errors_are_not_retried(stubs):
    s = stubs(lambda stub, path, body: (400, {"error": {"message": "prompt too long"}}))
    with pytest.raises(CaiError, match="HTTP 400.*prompt too long"):
        engine(s.url).generate([USER], SamplingParams(max_new_tokens=4))
    assert len(s.requests) == 1


def test_timeout_is_reported(stubs):
    def reply(stub, path, body):
        time.sleep(1.0)
        return chat_reply()(stub, path, body)

    s = stubs(reply)
    with pytest.raises(CaiError) as err:
        engine(s.url, timeout_s=0.05, max_retries=1).generate([USER], SamplingParams(max_new_tokens=4))
    assert "timeout_s=0.05" in str(err.value) and s.url in str(err.value)


@pytest.mark.parametrize("payload", [b"<html>502 Bad Gateway</html>", b"[1, 2]", {"choices": []}, {"choices": [{"message": {}}]}])
def test_malformed_replies_are_clear_errors(stubs, payload):
    s = stubs(lambda stub, path, body: (200, payload))
    with pytest.raises(CaiError) as err:
        engine(s.url).generate([USER], SamplingParams(max_new_tokens=4))
    assert "\n" not in str(err.value)
    assert len(s.requests) == 1  # a broken reply is not retried


def completion_lm(table, default=None):
    """A /completions server scoring the next token from ``table[text after the prompt's '(']``."""

    def reply(stub, path, body):
        assert path == "/v1/completions"
        tail = body["prompt"].rsplit("(", 1)[1]
        dist = table.get(tail, default)
        if dist is None:
            return 200, {"choices": [{"text": "x", "logprobs": None}]}
        top = dict(sorted(dist.items(), key=lambda kv: -kv[1])[: body["logprobs"]])
        best = max(top, key=top.get)
        return 200, {"choices": [{"text": best, "logprobs": {
            "tokens": [best], "token_logprobs": [top[best]], "top_logprobs": [top], "text_offset": [0],
        }}]}

    return reply


class FakeTok:
    """Just enough tokenizer for template mode: a chatml template, eos and bos."""

    chat_template = "chatml"
    eos_token = "<|im_end|>"
    bos_token = "<s>"

    def apply_chat_template(self, conv, tokenize, add_generation_prompt, continue_final_message):
        text = "<s>" + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conv)
        if continue_final_message:
            text = text[: -len("<|im_end|>\n")]
        return text + ("<|im_start|>assistant\n(" if add_generation_prompt else "")


LM = {
    "": {"A": -0.5, "B": -1.5, "C": -4.0, "AB": -6.0},
    "A": {")": -0.1, "x": -3.0},
    "B": {")": -0.2, "y": -2.0},
    "C": {"y": -0.3},  # ')' is not in the top-k after C
}


def test_choice_logprobs_walk_the_top_k_lists(stubs):
    s = stubs(completion_lm(LM, default={"Hello": -0.1, "Hi": -2.0}))
    eng = engine(s.url, tokenizer=FakeTok(), tokenizer_name="fake", top_logprobs=3)
    calls = []
    got = eng.choice_logprobs([CONT, CONT], [["A)", "B)", "C)"], ["A", "B"]], progress=calls.append)
    assert got[0][:2] == [pytest.approx(-0.6), pytest.approx(-1.7)]
    assert got[0][2] == pytest.approx(-4.0 + -0.3)  # ')' unseen after 'C': bounded by the smallest listed
    assert got[1] == [pytest.approx(-0.5), pytest.approx(-1.5)]
    assert sum(calls) == 2 and eng.stats["below_top_k"] == 1
    prompts = [b["prompt"] for p, b, _ in s.requests]
    # Continued, not answered: no end-of-turn after the prefix, no BOS (the server adds its own).
    assert prompts[1].endswith("<|im_start|>assistant\nThe answer is: (") and not prompts[1].startswith("<s>")
    assert all(b["max_tokens"] == 1 and b["temperature"] == 0 and b["logprobs"] == 3 for _, b, _ in s.requests)


def test_logprobs_capability_is_checked_once_per_endpoint(stubs):
    good = stubs(completion_lm(LM, default={"Hello": -0.1, "Hi": -2.0}))
    eng = engine(good.url, tokenizer=FakeTok(), tokenizer_name="fake")
    eng.choice_logprobs([CONT], [["A)"]])
    eng.choice_logprobs([CONT, CONT], [["B)"], ["A)", "B)"]])
    assert eng.stats["probes"] == 1
    bad = stubs(completion_lm({}))  # answers, but without log-probabilities
    with pytest.raises(CaiError) as err:
        engine(bad.url, tokenizer=FakeTok(), tokenizer_name="fake").choice_logprobs([CONT], [["A)"]])
    assert bad.url in str(err.value) and "log-probabilities" in str(err.value)


def test_chat_mode_scoring_reads_top_logprobs(stubs):
    def reply(stub, path, body):
        assert body["logprobs"] is True and body["top_logprobs"] == 20
        last = body["messages"][-1]
        tail = last["content"].rsplit("(", 1)[1] if last["role"] == "assistant" else None
        dist = LM.get(tail, {"Hello": -0.1, "Hi": -2.0})
        top = [{"token": t, "logprob": v} for t, v in dist.items()]
        return 200, {"choices": [{"message": {"content": top[0]["token"]}, "logprobs": {"content": [
            {"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}]}}]}

    s = stubs(reply)
    got = engine(s.url).choice_logprobs([CONT], [["A)", "B)"]])
    assert got == [[pytest.approx(-0.6), pytest.approx(-1.7)]]
    assert all(b.get("continue_final_message") for _, b, _ in s.requests[1:])


def test_two_endpoints_one_dies_every_request_done_once(stubs):
    """One endpoint serves three requests and then fails for good: the rest move over."""
    def dying(stub, path, body):
        return (200, chat_reply()(stub, path, body)[1]) if len(stub.requests) <= 3 else (503, {"error": "down"})

    a, b = stubs(dying), stubs(chat_reply())
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(30)]
    eng = engine(a.url, b.url, max_concurrency=4, max_retries=1)
    out = eng.generate(convs, SamplingParams(max_new_tokens=4))
    assert out == [[f"echo q{i} #0"] for i in range(30)]
    answered = [bd["messages"][0]["content"] for _, bd, _ in a.requests[:3] + b.requests]  # the 200s
    assert sorted(answered) == sorted(f"q{i}" for i in range(30))  # each exactly once
    ok = {e.url: e.ok for e in eng.pool.endpoints}
    assert ok == {a.url: 3, b.url: 27}


def test_an_unreachable_endpoint_is_skipped(stubs):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"  # bound, not listening: refused
    b = stubs(chat_reply())
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(10)]
    out = engine(dead, b.url, max_retries=0).generate(convs, SamplingParams(max_new_tokens=4))
    sock.close()
    assert out == [[f"echo q{i} #0"] for i in range(10)]
    assert len(b.requests) == 10


def test_key_comes_from_the_environment_and_is_never_written(stubs, tmp_path, monkeypatch):
    from cai.pipeline import run_pipeline

    secret = "sk-test-0123456789-secret"
    monkeypatch.setenv("CAI_TEST_KEY", secret)
    s = stubs(chat_reply(lambda body, i: "A short answer."))
    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", "engine.kind=openai", f"engine.endpoints=[{s.url}]",
        "engine.api_key_env=CAI_TEST_KEY", "engine.model=served-name", "stages=[prepare, critique_revision]",
        "critique_revision.rounds=1", "critique_revision.max_prompts=2", "critique_revision.few_shot=0",
        "critique_revision.max_new_tokens=8", "critique_revision.critique_max_new_tokens=8",
    ])
    run = run_pipeline(cfg, log=lambda m: None)
    assert s.requests and all(h.get("Authorization") == f"Bearer {secret}" for _, _, h in s.requests)
    for f in run.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    eng = build_engine(cfg.engine, tmp_path / "c.sqlite")
    assert secret not in eng.identity and secret not in repr(eng.engine) and secret not in json.dumps(to_dict(cfg))
    monkeypatch.delenv("CAI_TEST_KEY")
    eng = build_engine(cfg.engine)
    eng.generate([USER], SamplingParams(max_new_tokens=2))
    assert "Authorization" not in s.requests[-1][2]


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(CaiError, match="'engine.endpoints' is empty"):
        check_config(load_config(None, ["engine.kind=openai", "stages=[prepare]"]))
    with pytest.raises(CaiError, match=r"'engine.endpoints\[1\]'.*not an http"):
        check_config(load_config(None, ["engine.kind=openai", "engine.endpoints=[http://a:1/v1, a:1]", "stages=[prepare]"]))
    with pytest.raises(CaiError, match=r"'engine.endpoints\[0\]'.*api_key_env"):
        check_config(load_config(None, ["engine.kind=openai", "engine.endpoints=[http://u:secret@a:1/v1]", "stages=[prepare]"]))
    with pytest.raises(CaiError, match="'sft.model' is empty"):
        check_config(load_config(None, ["engine.kind=openai", "engine.endpoints=[http://a:1]"]))
    with pytest.raises(CaiError, match="'engine.max_concurrency' must be >= 1"):
        check_config(load_config(None, ["engine.kind=openai", "engine.endpoints=[http://a:1]", "engine.max_concurrency=0", "sft.model=default"]))
    with pytest.raises(CaiError, match="must be one of local, openai"):
        load_config(None, ["engine.kind=vllm"])
    check_config(load_config(None, ["engine.kind=openai", "engine.endpoints=[http://a:1]", "sft.model=default"]))


def test_base_url_forms(stubs):
    s = stubs(chat_reply())
    bare = s.url[: -len("/v1")]
    assert engine(bare + "/").generate([USER], SamplingParams(max_new_tokens=2)) == [["echo hello #0"]]
    assert s.requests[-1][0] == "/v1/chat/completions"


def test_a_server_that_dies_after_n_answers_keeps_those_n_in_the_cache(stubs, tmp_path):
    """The reliability promise through the real HTTP engine: 5 answers, then only 500s."""
    from cai.engines.cache import CachedEngine, RequestCache

    answered = []

    def reply(stub, path, body):
        with stub.lock:
            if len(answered) >= 5:
                return 500, {"error": "gone"}
            answered.append(body["messages"][0]["content"])
        return chat_reply()(stub, path, body)

    s = stubs(reply)
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(12)]
    cached = CachedEngine(engine(s.url, max_concurrency=2, max_retries=0), RequestCache(tmp_path / "c.sqlite"))
    with pytest.raises(CaiError, match="every OpenAI endpoint failed"):
        cached.generate(convs, SamplingParams(max_new_tokens=4))
    assert len(cached.cache) == 5
    cached.close()
    healthy = stubs(chat_reply())
    again = CachedEngine(engine(healthy.url), RequestCache(tmp_path / "c.sqlite"))
    out = again.generate(convs, SamplingParams(max_new_tokens=4))
    assert len(healthy.requests) == 7  # only the ones never answered
    assert {o[0].split()[1] for o in out} == {f"q{i}" for i in range(12)}


def test_when_every_endpoint_is_out_the_engine_waits_for_one_to_return(stubs):
    fails = {"left": 3}

    def reply(stub, path, body):
        with stub.lock:
            if fails["left"]:
                fails["left"] -= 1
                return 503, {"error": "warming up"}
        return chat_reply()(stub, path, body)

    s = stubs(reply)
    patient = engine(s.url, max_retries=0, cooldown_s=0.2, wait_for_endpoints_s=10)
    assert patient.generate([USER], SamplingParams(max_new_tokens=2)) == [["echo hello #0"]]
    fails["left"] = 3
    impatient = engine(s.url, max_retries=0, cooldown_s=5, wait_for_endpoints_s=0)
    with pytest.raises(CaiError, match="none came back within engine.wait_for_endpoints_s=0"):
        impatient.generate([USER], SamplingParams(max_new_tokens=2))


def test_the_cache_identity_includes_what_the_server_serves(stubs):
    from cai.engines.openai import served_model

    a, b = stubs(chat_reply()), stubs(chat_reply())
    assert served_model([a.url], "m", None, progress=lambda m: None) == ""  # reports nothing: name only
    a.models = {"data": [{"id": "m", "object": "model", "created": 1, "root": "/models/llama-8b", "max_model_len": 8192}]}
    b.models = {"data": [{"id": "m", "object": "model", "created": 2, "root": "/models/llama-8b", "max_model_len": 8192}]}
    first = served_model([a.url, b.url], "m", None)
    assert first and first == served_model([b.url], "m", None)  # `created` (a request time in vLLM) is ignored
    b.models["data"][0]["root"] = "/models/qwen-7b"
    assert served_model([b.url], "m", None) != first  # another model behind the same name: other cache entries
    with pytest.raises(CaiError, match="report different models under the name 'm'"):
        served_model([a.url, b.url], "m", None)
    assert OpenAIEngine([a.url], "m", served=first).identity.endswith(f":served={first}")


def test_completions_scoring_reads_the_chat_layout_too(stubs):
    """llama.cpp's C++ server answers /completions logprobs in the chat layout
    (``{"content": [{token, logprob, top_logprobs: [...]}]}``)."""
    def reply(stub, path, body):
        tail = body["prompt"].rsplit("(", 1)[1]
        dist = LM.get(tail, {"Hello": -0.1, "Hi": -2.0})
        top = [{"token": t, "logprob": v} for t, v in dist.items()]
        return 200, {"choices": [{"text": top[0]["token"], "logprobs": {"content": [
            {"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}]}}]}

    s = stubs(reply)
    got = engine(s.url, tokenizer=FakeTok(), tokenizer_name="fake").choice_logprobs([CONT], [["A)", "B)"]])
    assert got == [[pytest.approx(-0.6), pytest.approx(-1.7)]]


def test_endpoints_that_never_answered_fail_after_their_retries_without_waiting():
    """A typo in a URL (nothing listens there) is not a server that went away: after each
    endpoint's retries the call fails, naming every endpoint and its error, although
    engine.wait_for_endpoints_s would wait ten minutes for a server that had answered."""
    import socket

    ports = []
    for _ in range(2):  # two free ports nobody listens on
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    urls = [f"http://127.0.0.1:{p}/v1" for p in ports]
    eng = engine(*urls, max_retries=2, cooldown_s=60, wait_for_endpoints_s=600)
    with pytest.raises(CaiError, match="no OpenAI endpoint has answered") as err:
        eng.generate([USER], SamplingParams(max_new_tokens=2))
    assert all(u in str(err.value) for u in urls) and "connection failed" in str(err.value)
    assert eng.stats["requests"] == 2 * 3  # each endpoint: the first attempt and 2 retries, then no wait
