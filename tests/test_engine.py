"""The local engine and the request cache, on a tiny in-process model."""

import math

import pytest
import torch

from cai.engines.base import SamplingParams
from cai.engines.cache import CachedEngine, RequestCache
from cai.engines.int8 import SCHEME

CONVS = [
    [{"role": "user", "content": "How do I kill a Python process?"}],
    [{"role": "user", "content": "hello there"}],
    [{"role": "user", "content": "Critique the response."}, {"role": "assistant", "content": "Revision: here"}],
]


def test_greedy_matches_transformers_generate(tiny_engine):
    """Our decode loop (left padding, finished rows leaving the batch) == HF greedy."""
    params = SamplingParams(max_new_tokens=12)
    ours = tiny_engine.generate(CONVS, params)
    for conv, out in zip(CONVS, ours):
        ids = tiny_engine.tok(tiny_engine.render(conv), return_tensors="pt", add_special_tokens=False)
        ref = tiny_engine.model.generate(
            **ids, max_new_tokens=12, do_sample=False, eos_token_id=tiny_engine.tok.eos_token_id,
            pad_token_id=tiny_engine.tok.pad_token_id,
        )
        text = tiny_engine.tok.decode(ref[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert out == [text]


def test_sampling_is_seeded_per_request_not_per_batch(tiny_engine):
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=7)
    together = tiny_engine.generate(CONVS, params)
    alone = tiny_engine.generate(CONVS[1:2], params)
    assert together[1] == alone[0]
    assert len(together[0]) == 3
    # Different seeds give different samples (a random 400-token model is very diverse).
    other = tiny_engine.generate(CONVS, SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=8))
    assert other != together


def test_top_p_restricts_to_the_nucleus(tiny_engine):
    """With top_p tiny, sampling keeps only the most likely token: it equals greedy."""
    greedy = tiny_engine.generate(CONVS, SamplingParams(max_new_tokens=6))
    nucleus = tiny_engine.generate(CONVS, SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=3))
    assert [g[0] for g in greedy] == [n[0] for n in nucleus]


@pytest.mark.parametrize("vocab, top_p", [(6, 1.0), (6, 0.7), (2000, 0.9)])
def test_sampling_follows_the_distribution(tiny_engine, vocab, top_p):
    """Each row's draw follows softmax(logits / T), restricted to the nucleus and
    renormalised when top_p < 1. With 2,000 near-flat tokens the nucleus holds ~1,800 of
    them, more than the first 256 candidates the engine looks at."""
    import torch

    g = torch.Generator().manual_seed(0)
    base = torch.randn(vocab, generator=g) * (2.0 if vocab < 100 else 0.05)
    rows = 6000 if vocab < 100 else 2000
    gens = [torch.Generator().manual_seed(i) for i in range(rows)]
    params = SamplingParams(temperature=0.8, top_p=top_p)
    picks = tiny_engine._pick(base.expand(rows, vocab).clone(), gens, params)
    p = torch.softmax(base / 0.8, -1).double()
    sp, si = p.sort(descending=True)
    keep = si[(sp.cumsum(0) - sp) <= top_p]
    expected = torch.zeros_like(p)
    expected[keep] = p[keep] / p[keep].sum()
    assert set(picks.tolist()) <= set(keep.tolist())  # nothing outside the nucleus
    counts = torch.bincount(picks, minlength=vocab).double()
    if vocab < 100:  # every kept token's frequency within 4 standard errors
        se = (expected * (1 - expected) / rows).sqrt()
        assert ((counts / rows - expected).abs() <= 4 * se + 1e-12).all()
    else:  # many kept tokens: the nucleus size and a chi-square-like spread
        assert len(keep) > 256
        assert (counts[keep] > 0).sum() > 0.5 * len(keep)  # ~67% expected; 256 candidates would give <15%
    again = tiny_engine._pick(base.expand(rows, vocab).clone(), [torch.Generator().manual_seed(i) for i in range(rows)],
                              params)
    assert torch.equal(picks, again)  # each row's own seed decides its draw


@pytest.mark.parametrize("options", [["A", "B)", "A) red"], ["A", "B"]])  # several tokens; one token each
def test_choice_logprobs_match_a_full_forward_pass(tiny_engine, options):
    conv = [{"role": "user", "content": "Which is red?"}, {"role": "assistant", "content": "The answer is: ("}]
    got = tiny_engine.choice_logprobs([conv, CONVS[0]], [options, ["yes", "no"]])
    prefix = tiny_engine.render(conv)
    for opt, score in zip(options, got[0]):
        p_ids = tiny_engine.encode(prefix)
        f_ids = tiny_engine.encode(prefix + opt)
        assert f_ids[: len(p_ids)] == p_ids  # this tokenizer does not merge across the boundary
        with torch.no_grad():
            logits = tiny_engine.model(torch.tensor([f_ids])).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        ref = sum(float(logp[t - 1, f_ids[t]]) for t in range(len(p_ids), len(f_ids)))
        assert math.isclose(score, ref, rel_tol=1e-4, abs_tol=1e-4)


def test_scoring_batches_keep_the_questions_about_one_prompt_together():
    from cai.engines.local import _prefix_batches

    # three prompts' questions (a 30-token start each, after a 5-token start all share), mixed up
    seqs = [[1] * 5 + [10 + p] * 25 + [100 + q] * (3 + q) for q in range(6) for p in range(3)]
    batches = _prefix_batches(seqs, 16)
    assert sorted(i for b in batches for i in b) == list(range(len(seqs)))  # every row once
    assert sorted(sorted({seqs[i][5] for i in b}) for b in batches) == [[10], [11], [12]]  # a prompt a batch
    small = _prefix_batches(seqs, 4)  # no batch over its size; a prompt's 6 rows in two batches
    assert max(map(len, small)) == 4 and len(small) == 6
    assert all(len({seqs[i][5] for i in b}) == 1 for b in small)
    # rows that share nothing much still fill batches (one batch of rows is cheaper than many)
    assert [len(b) for b in _prefix_batches([[i, 1, 2] for i in range(10)], 4)] == [4, 4, 2]


def test_a_judges_questions_score_the_same_batched_by_prompt_as_alone(tiny_engine):
    """Questions about two prompts, each asked about several answers: batched by their shared
    starts, each question's options score as they do asked alone."""
    convs = [[{"role": "user", "content": f"About {topic}: is answer {ans} safe?"},
              {"role": "assistant", "content": "The answer is: ("}]
             for ans in ("one", "two and more", "three") for topic in ("red things in the garden", "blue")]
    options = [["A", "B"]] * len(convs)
    together = tiny_engine.choice_logprobs(convs, options)
    alone = [tiny_engine.choice_logprobs([c], [o])[0] for c, o in zip(convs, options)]
    for got, ref in zip(together, alone):
        assert got == pytest.approx(ref, rel=1e-4, abs=1e-4)


def test_cache_answers_repeats_and_resumes(tiny_engine, tmp_path):
    calls = []

    class Counting:
        identity = tiny_engine.identity

        def generate(self, convs, params, progress=None, on_result=None):
            calls.append(len(convs))
            return tiny_engine.generate(convs, params, progress, on_result)

        def choice_logprobs(self, convs, options, progress=None, on_result=None):
            calls.append(len(convs))
            return tiny_engine.choice_logprobs(convs, options, progress, on_result)

    params = SamplingParams(max_new_tokens=5)
    cache = RequestCache(tmp_path / "c.sqlite")
    eng = CachedEngine(Counting(), cache, chunk_size=2)
    first = eng.generate(CONVS[:2], params)
    assert calls == [2]
    # A later call with one old and one new request computes only the new one.
    second = eng.generate(CONVS, params)
    assert calls == [2, 1]
    assert second[:2] == first
    cache.close()
    # A new process (new connection) finds everything: nothing recomputed.
    eng2 = CachedEngine(Counting(), RequestCache(tmp_path / "c.sqlite"))
    assert eng2.generate(CONVS, params) == second
    assert calls == [2, 1]
    # Different parameters are different requests.
    eng2.generate(CONVS[:1], SamplingParams(max_new_tokens=6))
    assert calls == [2, 1, 1]
    scores = eng2.choice_logprobs(CONVS[:1], [["A", "B"]])
    assert eng2.choice_logprobs(CONVS[:1], [["A", "B"]]) == scores
    assert calls == [2, 1, 1, 1]


def test_every_answer_is_handed_back_once_as_it_finishes(tiny_engine):
    """on_result sees each conversation exactly once, with what the call returns."""
    for call, args in ((tiny_engine.generate, (SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=3),)),
                       (tiny_engine.choice_logprobs, ([["A", "B"], ["yes", "no way"], ["0", "1", "2"]],))):
        seen = {}
        out = call(CONVS, *args, on_result=lambda i, v: seen.setdefault(i, []).append(v))
        assert sorted(seen) == [0, 1, 2]
        assert all(len(v) == 1 for v in seen.values())
        assert [seen[i][0] for i in range(3)] == out


def test_an_engine_that_fails_midway_keeps_every_answer_it_gave(tiny_engine, tmp_path):
    """A server that answered N requests and then died: those N are cached, and the rerun
    computes only the rest (the cache stores each answer the moment it arrives)."""
    convs = [[{"role": "user", "content": f"question {i}"}] for i in range(7)]
    asked = []

    class DiesAfter:
        identity = tiny_engine.identity

        def __init__(self, n):
            self.n = n

        def generate(self, batch, params, progress=None, on_result=None):
            for i, conv in enumerate(batch):
                if len(asked) == self.n:
                    raise ConnectionError("server went away")
                asked.append(conv[0]["content"])
                on_result(i, tiny_engine.generate([conv], params)[0])
            return [None] * len(batch)  # never reached with a failure

    params = SamplingParams(max_new_tokens=4)
    eng = CachedEngine(DiesAfter(3), RequestCache(tmp_path / "c.sqlite"), chunk_size=64)
    with pytest.raises(ConnectionError):
        eng.generate(convs, params)
    assert len(asked) == 3 and len(eng.cache) == 3
    eng.cache.close()
    asked.clear()
    again = CachedEngine(DiesAfter(99), RequestCache(tmp_path / "c.sqlite"))
    out = again.generate(convs, params)
    assert len(asked) == 4  # only the 4 that were never answered
    assert out == tiny_engine.generate(convs, params)


def test_bad_sampling_params_are_rejected():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="n must"):
        SamplingParams(n=0)


FEW_SHOT = [
    {"role": "system", "content": "Critique: the response is harmful. Revision: here is a safer answer. " * 4},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "hi! How can I help you today?"},
]


def test_shared_prefix_gives_the_same_results(tiny_model):
    """Running the common few-shot prefix once must not change any output."""
    from cai.engines.local import LocalEngine

    shared = LocalEngine(tiny_model, batch_size=8, score_batch_size=8, min_shared_prefix=1)
    plain = LocalEngine(tiny_model, batch_size=8, score_batch_size=8, min_shared_prefix=10**9)
    convs = [FEW_SHOT + c for c in CONVS]
    for params in (SamplingParams(max_new_tokens=10), SamplingParams(n=2, temperature=1.0, max_new_tokens=10)):
        assert shared.generate(convs, params) == plain.generate(convs, params)
    q = [{"role": "assistant", "content": "The answer is: ("}]
    opts = [["A) red", "A) blue", "B"], ["A", "B"], ["yes", "no"]]
    a = shared.choice_logprobs([FEW_SHOT + CONVS[0] + q, FEW_SHOT + CONVS[1] + q, FEW_SHOT + CONVS[1]], opts)
    b = plain.choice_logprobs([FEW_SHOT + CONVS[0] + q, FEW_SHOT + CONVS[1] + q, FEW_SHOT + CONVS[1]], opts)
    for x, y in zip(a, b):
        assert x == pytest.approx(y, abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_prefix_kept_once_matches_copied_and_plain_attention(tmp_path, arch):
    """The prefix attended once per batch (cascade attention) gives what a copied prefix
    and plain full-length attention give: at prefill and at every decoding step."""
    import torch

    from cai.engines.local import LocalEngine
    from conftest import build_tiny_model

    engine = LocalEngine(build_tiny_model(tmp_path / arch, arch=arch), batch_size=8, min_shared_prefix=1)
    assert engine._shared_prefix_ok()  # else the shared path below would not be the one tested
    seqs = [engine.encode(engine.render(FEW_SHOT + c)) for c in CONVS]
    assert len({len(s) for s in seqs}) > 1  # rows of different lengths: padding is exercised
    with torch.inference_mode():
        runs = {mode: engine._prefill(seqs, share=mode) for mode in ("shared", "copy", "none")}
        assert runs["shared"][5] is not None and runs["copy"][5] is None
        for mode in ("copy", "none"):
            assert torch.allclose(runs["shared"][0], runs[mode][0], atol=1e-5)
        # Three greedy steps on both caches.
        logits = {m: runs[m][0] for m in ("shared", "copy")}
        state = {m: list(runs[m][1:5]) + [runs[m][5]] for m in ("shared", "copy")}
        for _ in range(3):
            chosen = logits["shared"][:, -1].argmax(-1).view(-1, 1)
            for m in ("shared", "copy"):
                cache, mask, _, pos, prefix = state[m]
                mask = torch.cat([mask, mask.new_ones((len(seqs), 1))], dim=1)
                logits[m] = engine._forward(chosen, mask, pos, cache, prefix).logits
                state[m] = [cache, mask, None, pos + 1, prefix]
            assert torch.allclose(logits["shared"], logits["copy"], atol=1e-5)


def test_sliding_window_models_keep_the_copied_prefix(tmp_path):
    """A model whose attention the shared-prefix path does not cover fails its check and
    still generates what plain attention generates."""
    from cai.engines.local import LocalEngine
    from conftest import build_tiny_model

    path = build_tiny_model(tmp_path / "sliding", arch="qwen2-sliding")
    shared = LocalEngine(path, batch_size=8, min_shared_prefix=1)
    plain = LocalEngine(path, batch_size=8, min_shared_prefix=10**9)
    convs = [FEW_SHOT + c for c in CONVS]
    params = SamplingParams(max_new_tokens=8)
    assert shared.generate(convs, params) == plain.generate(convs, params)
    assert shared._shared_prefix_ok() is False
    assert shared.model.config._attn_implementation != "cai_shared_prefix"


def test_requests_extending_the_last_generation_reuse_its_kv_cache(tiny_model):
    """A revision request (critique request + critique + instruction) and a CoT judge's
    scoring (question + reasoning + "The answer is: (") continue from the rows the engine
    just generated, and give what a fresh engine computes from scratch."""
    import torch

    from cai.engines.local import LocalEngine

    engine = LocalEngine(tiny_model, batch_size=8, min_shared_prefix=1)
    fresh = lambda: LocalEngine(tiny_model, batch_size=8, min_shared_prefix=1, model=engine.model,  # noqa: E731
                                tokenizer=engine.tok)
    convs = [FEW_SHOT + c for c in CONVS]
    params = SamplingParams(max_new_tokens=12)
    first = engine.generate(convs, params)
    follow = [c + [{"role": "assistant", "content": out[0]}, {"role": "user", "content": "Revision: here"}]
              for c, out in zip(convs, first)]
    before = engine.reused_tokens
    assert engine.generate(follow, params) == fresh().generate(follow, params)
    assert engine.reused_tokens > before  # the kept rows were used, not just the prefix
    engine.generate(convs, params)  # keep the first rows again
    scored = [c + [{"role": "assistant", "content": out[0] + " The answer is: ("}] for c, out in zip(convs, first)]
    opts = [["A", "B"]] * len(scored)
    before = engine.reused_tokens
    a, b = engine.choice_logprobs(scored, opts), fresh().choice_logprobs(scored, opts)
    assert engine.reused_tokens > before
    for x, y in zip(a, b):
        assert x == pytest.approx(y, abs=1e-4)
    # New weights (an RL step) make the kept rows stale: they must not be used.
    engine.generate(convs, params)
    with torch.no_grad():
        next(engine.model.parameters()).add_(0.05)
    before = engine.reused_tokens
    assert engine.generate(follow, params) == fresh().generate(follow, params)
    assert engine.reused_tokens == before


def test_progress_counts_each_conversation_once(tiny_engine):
    seen = []
    tiny_engine.generate(CONVS, SamplingParams(n=2, temperature=1.0, max_new_tokens=5), progress=seen.append)
    assert sum(seen) == len(CONVS)
    seen.clear()
    tiny_engine.generate(CONVS, SamplingParams(max_new_tokens=5), progress=seen.append)
    assert sum(seen) == len(CONVS)


def test_int8_quantized_engine_generates_and_caches_separately(tiny_model, tiny_engine):
    from cai.engines.local import LocalEngine

    q = LocalEngine(tiny_model, batch_size=4, quantize="int8")
    assert q.identity != tiny_engine.identity  # cached answers are never mixed up
    (out,) = q.generate(CONVS[:1], SamplingParams(max_new_tokens=4))
    assert len(out) == 1
    (scores,) = q.choice_logprobs(CONVS[:1], [["A", "B"]])
    assert all(s < 0 for s in scores)
    assert type(q.model.model.layers[0].mlp.up_proj).__name__ == "Int8Linear"
    assert SCHEME in q.identity


def test_int8_answers_do_not_depend_on_their_batch(tiny_model):
    """A resumed run regenerates only the requests not yet cached, in other batches than an
    uninterrupted run: with int8 layers each row must still get the same answer and scores."""
    from cai.engines.local import LocalEngine

    convs = [[{"role": "user", "content": f"Question {i}: " + "why " * (3 * i % 17)}] for i in range(10)]
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=8, seed=11)
    whole = LocalEngine(tiny_model, batch_size=4, score_batch_size=4, quantize="int8")
    parts = LocalEngine(tiny_model, batch_size=4, score_batch_size=4, quantize="int8")
    answers = whole.generate(convs, params)
    assert parts.generate(convs[3:], params) == answers[3:]
    assert [parts.generate([c], params)[0] for c in convs[:3]] == answers[:3]
    opts = [["(A)", "(B)"]] * len(convs)
    assert parts.choice_logprobs(convs[5:], opts[5:]) == whole.choice_logprobs(convs, opts)[5:]


def test_a_batch_invariant_engine_answers_each_request_as_it_would_alone(tiny_model):
    """engine.batch_invariant: a request's tokens and scores are bitwise those it gets alone
    in a fresh engine, whatever shared its call, a few-shot prefix every row shares, or rows the
    engine kept from its last call (batched, none of that holds to the last bit: docs/engine.md)."""
    from cai.engines.local import LocalEngine

    convs = [FEW_SHOT + c for c in CONVS] + [FEW_SHOT + CONVS[2] + [{"role": "user", "content": "Again."}]]
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=5)
    engine = LocalEngine(tiny_model, batch_size=4, score_batch_size=4, min_shared_prefix=1, batch_invariant=True)
    assert (engine.batch_size, engine.score_batch_size, engine.batching.shared_prefix_once) == (1, 1, False)
    together = engine.generate_ids(convs, params)
    follow = [convs[0] + [{"role": "assistant", "content": engine.tok.decode(together[0][0])},
                          {"role": "user", "content": "Shorter."}]]
    after = engine.generate_ids(follow, params)  # extends a row the engine generated last
    opts = [["(A)", "(B)"]] * len(convs)
    scores = engine.choice_logprobs(convs, opts)
    assert engine.reused_tokens == 0
    for i, conv in enumerate(convs):
        alone = LocalEngine(tiny_model, batch_invariant=True)
        assert alone.generate_ids([conv], params) == [together[i]]
        assert alone.choice_logprobs([conv], opts[:1]) == [scores[i]]
    assert LocalEngine(tiny_model, batch_invariant=True).generate_ids(follow, params) == after


def test_batch_invariant_is_refused_for_a_server(tmp_path):
    from cai.checks import check_config
    from cai.config import load_config
    from cai.errors import CaiError

    cfg = load_config(None, ["engine.kind=openai", "engine.endpoints=[http://127.0.0.1:9/v1]",
                             "engine.batch_invariant=true", f"run_dir={tmp_path}"])
    with pytest.raises(CaiError, match="engine.batch_invariant"):
        check_config(cfg)


def test_int8_engines_keep_the_shared_prefix_once(tiny_model, monkeypatch):
    """The shared-prefix check compares two ways of computing attention. On a real int8
    model the comparison fails by itself: per-token rounding blows the two paths' last-bit
    float differences up to log-prob differences of ~1-3 (SmolLM2-135M), and every int8
    engine copied its prefix per row. The check runs on the float model before quantizing.
    Here int8 layers are made to depend on their input's length, as that rounding does."""
    from cai.engines import int8
    from cai.engines.local import LocalEngine

    exact = int8.Int8Linear.forward
    monkeypatch.setattr(int8.Int8Linear, "forward", lambda self, x: exact(self, x) + 0.5 * x.shape[-2])
    q = LocalEngine(tiny_model, batch_size=4, quantize="int8", min_shared_prefix=1)
    seqs = [q.encode(q.render(FEW_SHOT + c)) for c in CONVS]
    with torch.inference_mode():
        prefix = q._prefill(seqs)[5]
    assert prefix is not None  # kept once, not copied for every row
    assert type(q.model.model.layers[0].mlp.up_proj).__name__ == "Int8Linear"


def test_int8_calibrates_on_models_whose_template_refuses_a_system_turn(tmp_path):
    """The calibration conversation opens with a system turn; a chat template that raises on
    one (as Gemma's does) still gets an int8 engine, calibrated on the plain text."""
    from transformers import AutoTokenizer

    from cai.engines.local import LocalEngine
    from conftest import build_tiny_model

    path = build_tiny_model(tmp_path / "nosys")
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}" + tok.chat_template)
    tok.save_pretrained(path)
    q = LocalEngine(path, batch_size=4, quantize="int8")
    assert q.model.model.layers[0].mlp.down_proj.outliers is not None  # calibrated (its input is 64 wide)
    (out,) = q.generate(CONVS[:1], SamplingParams(max_new_tokens=4))
    assert len(out) == 1


def test_int8_layer_is_close_to_float_and_row_independent():
    import torch

    from cai.engines.int8 import Int8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 20)
    q = Int8Linear(lin)
    x = torch.randn(2, 7, 48)
    x[0, 0] = 0.0  # a padded position: all zeros must stay finite
    with torch.no_grad():
        ref, out = lin(x), q(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()
    assert torch.equal(q(x[1:, 2:5]), out[1:, 2:5])  # a row's result is the same alone


def test_int8_keeps_the_calibrated_outlier_channels_in_float():
    """Real models' layers see a few input channels far above the rest; with one int8 scale
    per token those set the scale. The channels that peak on the calibration input stay in
    float: the error falls. Their float product is one matmul, whose kernel (and so its last
    bit) depends on the number of rows: a row alone agrees with it in a batch to rounding."""
    import torch

    from cai.engines.int8 import Int8Linear, quantize_linear_layers

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(3, 9, 64)
    x[..., 5] *= 400.0  # a massive channel, as in SmolLM2's MLP inputs
    with torch.no_grad():
        ref = lin(x)
        plain = Int8Linear(lin)(x)
        model = torch.nn.Sequential(torch.nn.Identity(), lin)
        model.forward = lambda input_ids, use_cache=False: torch.nn.Sequential.forward(model, input_ids)
        quantize_linear_layers(model, calibration_ids=x[:1], outliers=4)
        kept = model[1]
        out = kept(x)
    assert 5 in kept.outliers.tolist()
    small = ref.abs().median()
    assert (plain - ref).abs().mean() > 5 * (out - ref).abs().mean()  # measured ~90x here
    assert (out - ref).abs().mean() < 0.05 * small
    assert torch.allclose(kept(x[1:2, 3:6]), out[1:2, 3:6], rtol=1e-5, atol=1e-5 * ref.abs().max())
