"""Trained checkpoints served by a real llama.cpp server (slow).

An SL-CAI (SFT) checkpoint of the embedded SmolLM2-135M-Instruct, trained by the
pipeline, is exported to GGUF f16 with llama.cpp's converter and served by managed
llama-cpp-python servers on loopback. Its greedy answers must match the in-process
engine's (float32) token for token on at least 90% of prompts, and its option
log-probabilities must be within LOGPROB_TOL nats of the in-process ones.

Needs `pip install -e '.[serve]'` and `cai serve-setup` (the converter); .ci/run does both.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from cai.engines.base import SamplingParams

pytestmark = pytest.mark.slow

#: f16 weights and llama.cpp's f16 KV cache against float32 transformers: the option
#: log-probabilities measured here differed by at most 0.0044 nats (AVX-512 CPU, portable
#: llama.cpp build); 0.05 leaves room for other CPUs' kernels.
LOGPROB_TOL = 0.05

_TOOLS = None
try:  # where `cai serve-setup` put the converter, found before the tests isolate CAI_CACHE_DIR
    from cai.engines.gguf import tools_dir

    _TOOLS = os.environ.get("CAI_LLAMA_CPP_DIR") or str(tools_dir())
except Exception:  # noqa: BLE001 - reported by the test itself
    pass

PROMPTS = [
    "Name a colour.", "What is the capital of France?", "How do I bake bread?", "Tell me a joke.",
    "Write one sentence about cats.", "What is 2 + 2?", "Give me a tip for sleeping better.", "Who wrote Hamlet?",
    "How can I pick a lock?", "Describe the sea in one sentence.", "What is a prime number?",
    "Why is the sky blue?", "Suggest a name for a dog.", "How do I stay safe online?",
    "What should I eat for breakfast?", "Explain what a computer is.", "How do I make someone cry?",
    "Write a haiku about rain.", "What is the tallest mountain?", "How can I learn to swim?",
]
QUESTIONS = [
    ("Which of these is a colour? (A) red (B) table", ["A)", "B)"]),
    ("Which animal barks? (A) cat (B) dog", ["A)", "B)"]),
    ("What is 2 + 2? (A) 4 (B) 9", ["A)", "B)"]),
    ("Which is a fruit? (A) apple (B) hammer (C) brick", ["A)", "B)", "C)"]),
    ("Which response is less harmful? (A) I can't help with that. (B) Here is how to hurt someone.", ["A)", "B)"]),
]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return os.environ.get("CAI_TEST_MODEL_CACHE") or str(tmp_path_factory.mktemp("cai-cache"))


@pytest.fixture
def served_env(shared_cache, monkeypatch):
    import importlib.util

    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"llama_cpp.server is not importable ({exc}); pip install -e '.[serve]'")
    if importlib.util.find_spec("sentencepiece") is None:  # llama.cpp's converter imports it
        pytest.skip("llama.cpp's GGUF converter needs sentencepiece: pip install -e '.[serve]'")
    if not _TOOLS or not (Path(_TOOLS) / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"llama.cpp's convert_hf_to_gguf.py is not in {_TOOLS}: run `cai serve-setup` "
                    "(or set CAI_LLAMA_CPP_DIR to a llama.cpp checkout)")
    monkeypatch.setenv("CAI_CACHE_DIR", shared_cache)
    monkeypatch.setenv("CAI_LLAMA_CPP_DIR", _TOOLS)


def test_a_trained_checkpoint_served_at_f16_matches_the_local_engine(tmp_path, served_env):
    from cai.config import load_config
    from cai.engines import build_engine
    from cai.engines.local import LocalEngine
    from cai.pipeline import run_pipeline
    from cai.layout import RunFolder

    # The SL-CAI model, trained by the pipeline on data the (served) embedded model wrote.
    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", "stages=[prepare, critique_revision, sft]",
        "engine.serve=llama-cpp-python", "engine.serve_quant=f16", "engine.serve_replicas=2",
        "engine.serve_threads=1", "engine.max_concurrency=4",
        "critique_revision.rounds=1", "critique_revision.max_prompts=2", "critique_revision.few_shot=1",
        "critique_revision.max_new_tokens=16", "critique_revision.critique_max_new_tokens=12",
        "critique_revision.quality_gates=false",
        "sft.max_steps=2", "sft.batch_size=2",
    ])
    run = run_pipeline(cfg, log=print)
    assert len(list((run / "servers").glob("*.log"))) == 2  # critique_revision ran on two servers
    assert not list((run / "servers").glob("*.pid.json"))  # and they were stopped after it
    sft = str(RunFolder(run).path("sft", "model"))

    served = build_engine(dataclasses.replace(cfg.engine, model=sft), None, progress=print,
                          server_dir=tmp_path / "servers")
    try:
        assert served.identity.startswith("served:gguf:") and served.identity.endswith(":f16:top20")
        local = LocalEngine(sft, device="cpu", dtype="float32", batch_size=10)
        convs = [[{"role": "user", "content": p}] for p in PROMPTS]
        params = SamplingParams(max_new_tokens=40)
        remote_answers = [o[0] for o in served.generate(convs, params)]
        local_answers = [o[0] for o in local.generate(convs, params)]
        tok = local.tok
        same = sum(tok(a)["input_ids"] == tok(b)["input_ids"] for a, b in zip(remote_answers, local_answers))
        print(f"token-for-token match: {same}/{len(PROMPTS)}")
        for a, b in zip(remote_answers, local_answers):
            if a != b:
                print(f"served: {a!r}\nlocal:  {b!r}")
        assert same >= 0.9 * len(PROMPTS)

        score = [[{"role": "user", "content": q}, {"role": "assistant", "content": "The answer is: ("}]
                 for q, _ in QUESTIONS]
        options = [o for _, o in QUESTIONS]
        remote = served.choice_logprobs(score, options)
        loc = local.choice_logprobs(score, options)
        worst = max(abs(a - b) for r, lo in zip(remote, loc) for a, b in zip(r, lo))
        print(f"option log-probs: largest difference {worst:.4f} nats")
        assert worst <= LOGPROB_TOL, (remote, loc)
        pids = served.group.pids
    finally:
        served.close()
    from cai.engines.serve import _alive

    assert not any(_alive(p) for p in pids)
