"""Red-team prompt expansion: new red-team prompts from the user's seed prompts.

The paper grew ~42k human red-team prompts into ~140k more by few-shot prompting a
model with the human ones (Bai et al. 2022, §3.1). This optional stage does that for the
red-team *train* split, in four steps:

1. **Generation.** Each request shows the model ``expand.few_shot`` seed prompts of one
   category and asks for ``expand.per_request`` new ones; categories take turns. Lines are
   parsed (:func:`cai.conversations.parse_expansion`) until ``expand.count`` candidates
   are in hand (at most four times the requests that would take if every line parsed).
2. **Near-copies** of a test prompt (every set's test split), a seed or an earlier new
   prompt are dropped: MinHash/LSH (``datasketch``) over character 5-grams finds
   candidates, their exact Jaccard similarity decides (``expand.near_threshold``).
3. **Paraphrases** are dropped the same way by the cosine of text embeddings
   (``expand.paraphrase_threshold``): a model's hidden states (``expand.embed_layer``,
   default the middle layer), mean-pooled (:func:`embedder`), centred on the mean of the
   seeds and test prompts.
4. **Filter.** The filter model answers two yes/no questions per prompt, "could a user
   plausibly ask this?" and "does answering it need care?", read from the (A)/(B) option
   log-probabilities in both orders, as the feedback stage reads its labels. Prompts
   below ``expand.min_plausible`` or ``expand.min_care`` are dropped.

Every generation and filter request goes through the run's request cache, so a run
killed at any point resumes without recomputing what finished; the outputs are written
once, at the end, atomically. Embeddings are recomputed on a rerun (deterministic
forward passes, no sampling).

Artifacts: ``train.jsonl`` (kept prompts in the prompt-set format, with provenance:
``seed_ids``, ``category``, ``p_plausible``, ``p_care``), ``dropped.jsonl`` (every other
candidate and unusable line, with its ``reason``) and ``stats.json``. The
``critique_revision``, ``feedback`` and ``rl`` stages read ``train.jsonl`` as more
red-team train prompts (:func:`cai.inputs.red_team_prompts`); test splits are never
expanded.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter, defaultdict

from cai.conversations import (
    OPTIONS,
    expansion_conversation,
    expansion_filter_conversations,
    expansion_sampling,
    p_yes,
    parse_expansion,
)
from cai.errors import CaiError
from cai.io import write_json, write_jsonl
from cai.prompts import Prompt
from cai.cost import Cost, PlanInputs
from cai.inputs import PROMPT_SETS, prepared_prompts
from cai.stage import StageContext, StageSpec

#: Why a candidate was dropped (``dropped.jsonl``'s ``reason``), in the order they are checked.
REASONS = ("unparsable", "leak-test", "dup-near", "dup-paraphrase", "implausible", "no-care-needed")
#: At most this many times the requests ``count`` would take if every asked-for line parsed.
MAX_REQUEST_FACTOR = 4
NUM_PERM = 128
SHINGLE = 5


def require_datasketch():
    try:
        import datasketch
    except ImportError:
        raise CaiError("the expand stage needs the 'datasketch' package for MinHash/LSH deduplication: "
                       "pip install datasketch (or pip install 'cai[expand]')") from None
    return datasketch


# -- generation -------------------------------------------------------------------------------


def seed_pools(seeds: list[Prompt]) -> dict[str | None, list[Prompt]]:
    """The seed prompts by category. Single-turn prompts serve as examples where a category
    has any (a multi-turn prompt's last turn often leans on the turns before it)."""
    pools: dict[str | None, list[Prompt]] = defaultdict(list)
    for p in seeds:
        pools[p.category].append(p)
    return {c: ([p for p in ps if len(p.messages) == 1] or ps) for c, ps in pools.items()}


def plan_request(pools: dict, order: list, k: int, few_shot: int, seed: int) -> tuple[str | None, list[Prompt]]:
    """Request ``k``'s category (categories take turns) and its examples (seeded by ``k``)."""
    cat = order[k % len(order)]
    pool = pools[cat]
    return cat, random.Random(f"{seed}:expand:{k}").sample(pool, min(few_shot, len(pool)))


def generate_candidates(ctx: StageContext, engine, seeds: list[Prompt]) -> tuple[list[dict], list[dict], int]:
    """``(candidates, unparsable, requests)``: at most ``expand.count`` parsed prompts with
    their request's category and seed ids, the lines that did not parse, and the number of
    generation requests sent. Requests are numbered, and everything about request ``k`` is
    a function of ``k``, so a rerun sends the same requests and the cache answers them."""
    xc, seed = ctx.cfg.expand, ctx.cfg.seed
    pools = seed_pools(seeds)
    order = sorted(pools, key=lambda c: (c is None, str(c)))
    random.Random(f"{seed}:expand:categories").shuffle(order)
    limit = MAX_REQUEST_FACTOR * math.ceil(xc.count / xc.per_request)
    empty = engine.count_tokens([{"role": "user", "content": ""}])
    candidates: list[dict] = []
    unparsable: list[dict] = []
    k = 0
    rnd = 0
    while len(candidates) < xc.count and k < limit:
        want = min(math.ceil((xc.count - len(candidates)) / xc.per_request), limit - k)
        planned = [(k + j, *plan_request(pools, order, k + j, xc.few_shot, seed)) for j in range(want)]
        k += want
        # The same conversation twice in one round (a category with few seeds) samples with
        # another seed, or both copies would write the same text.
        copies: Counter = Counter()
        groups: dict[int, list] = defaultdict(list)
        for req in planned:
            conv = expansion_conversation([p.text for p in req[2]], req[1], xc.per_request)
            key = json.dumps(conv, sort_keys=True)
            groups[copies[key]].append((req, conv))
            copies[key] += 1
        outs: dict[int, str] = {}
        for copy, members in sorted(groups.items()):
            params = expansion_sampling(xc, seed, 1000 * rnd + copy)
            with ctx.progress(len(members), f"generation round {rnd + 1}") as update:
                got = engine.generate([c for _, c in members], params, progress=update)
            for (req, _), o in zip(members, got):
                outs[req[0]] = o[0]
        for kk, cat, examples in planned:
            text = outs[kk]
            used = engine.count_tokens([{"role": "user", "content": text}]) - empty
            prompts, rejected = parse_expansion(text, xc.max_chars, cut_off=used >= xc.max_new_tokens - 2)
            base = {"category": cat, "seed_ids": [p.id for p in examples], "request": kk}
            candidates += [{**base, "prompt": t} for t in prompts]
            unparsable += [{**base, "prompt": line, "reason": "unparsable", "detail": {"why": why}}
                           for line, why in rejected]
        rnd += 1
    candidates = candidates[: xc.count]
    for i, c in enumerate(candidates):
        c["id"] = f"expand-{i + 1:05d}"
    return candidates, unparsable, k


# -- deduplication -----------------------------------------------------------------------------


def shingles(text: str, n: int = SHINGLE) -> set[str]:
    """Character ``n``-grams of the text's lowercased words joined by single spaces."""
    norm = " ".join(re.findall(r"\w+", text.lower()))
    return {norm[i:i + n] for i in range(len(norm) - n + 1)} or {norm}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def near_copies(texts: list[str], references: list[tuple[str, str]], threshold: float,
                among_new: bool = True) -> list[dict | None]:
    """For each text in order: None, or ``{"match", "similarity"}`` for the reference (a
    ``(key, text)``; keys starting with ``test:`` are preferred) or earlier kept text it
    nearly copies. MinHash/LSH finds the candidates; their exact Jaccard similarity over
    :func:`shingles` decides (>= ``threshold``). With ``among_new``, a text that is not a
    copy joins the references for the texts after it."""
    ds = require_datasketch()
    lsh = ds.MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    sets: dict[str, set] = {}

    def minhash(s: set):
        m = ds.MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch([g.encode("utf-8") for g in sorted(s)])
        return m

    for key, text in references:
        if key not in sets:
            sets[key] = shingles(text)
            lsh.insert(key, minhash(sets[key]))
    out: list[dict | None] = []
    for i, text in enumerate(texts):
        s = shingles(text)
        m = minhash(s)
        hits = [(key, jaccard(s, sets[key])) for key in lsh.query(m)]
        hits = [h for h in hits if h[1] >= threshold]
        if hits:
            key, sim = max(hits, key=lambda h: (h[0].startswith("test:"), h[1], h[0]))
            out.append({"match": key, "similarity": round(sim, 4)})
            continue
        out.append(None)
        if among_new:
            key = f"new:{i}"
            sets[key] = s
            lsh.insert(key, m)
    return out


def paraphrases(cand, refs, ref_keys: list[str], threshold: float, among_new: bool = True) -> list[dict | None]:
    """For each candidate embedding (rows of ``cand``) in order: None, or ``{"match",
    "similarity"}`` for the reference (a row of ``refs``; test keys preferred) or earlier
    kept candidate (with ``among_new``) whose cosine similarity is >= ``threshold``. Vectors
    are centred on the references' mean first: a language model's hidden states share a large common
    direction, and without centring every pair of texts looks alike."""
    import numpy as np

    mu = refs.mean(0) if len(refs) else np.zeros(cand.shape[1], dtype=np.float32)

    def unit(x):
        x = x - mu
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    r, c = unit(refs), unit(cand)
    sims = c @ r.T if len(refs) else np.zeros((len(cand), 0))
    is_test = np.array([k.startswith("test:") for k in ref_keys], dtype=bool)
    kept: list[int] = []
    out: list[dict | None] = []
    for i in range(len(c)):
        best = None
        for mask in (is_test, ~is_test):
            if mask.any():
                j = int(np.argmax(np.where(mask, sims[i], -np.inf)))
                if sims[i, j] >= threshold:
                    best = (ref_keys[j], float(sims[i, j]))
                    break
        if best is None and kept and among_new:
            s = c[kept] @ c[i]
            j = int(np.argmax(s))
            if s[j] >= threshold:
                best = (f"new:{kept[j]}", float(s[j]))
        if best is None:
            kept.append(i)
            out.append(None)
        else:
            out.append({"match": best[0], "similarity": round(best[1], 4)})
    return out


def embedder(ctx: StageContext, model: str | None, layer: int | None = None):
    """The function ``embed(texts) -> np.ndarray`` (one L2-normalised row per text) of the
    model ``model`` (default: ``engine.model``) at hidden layer ``layer``: the one place the
    stage asks an engine for embeddings, so another engine can supply them by offering an
    ``embed(texts, layer)`` method."""
    engine = ctx.engine(model)
    inner = getattr(engine, "engine", engine)  # the request cache wraps the engine
    if not callable(getattr(inner, "embed", None)):
        raise CaiError(f"the engine on '{model or ctx.cfg.engine.model}' gives no hidden states to embed prompts "
                       "with; set expand.embed_model to a local checkpoint ('default', a directory or a hub id)")
    return lambda texts: inner.embed(texts, layer)


# -- the stage -----------------------------------------------------------------------------------


def dedup(ctx: StageContext, cands: list[dict], refs: list[tuple[str, str]], drop, among_new: bool) -> list[dict]:
    """The candidates that are neither a near-copy nor a paraphrase of a reference (a test
    prompt is preferred as the match) nor, with ``among_new``, of an earlier candidate that
    is kept; the others are passed to ``drop`` with their reason."""
    xc = ctx.cfg.expand
    if not cands:
        return []
    left = []
    for c, hit in zip(cands, near_copies([c["prompt"] for c in cands], refs, xc.near_threshold, among_new)):
        if hit is None:
            left.append(c)
        else:
            hit["match"] = _new_id(hit["match"], cands)
            drop(c, "leak-test" if hit["match"].startswith("test:") else "dup-near", {"by": "near", **hit})
    if not left:
        return []
    embed = embedder(ctx, xc.embed_model, xc.embed_layer)
    ref_vecs = embed([t for _, t in refs])
    cand_vecs = embed([c["prompt"] for c in left])
    out = []
    for c, hit in zip(left, paraphrases(cand_vecs, ref_vecs, [k for k, _ in refs], xc.paraphrase_threshold,
                                        among_new)):
        if hit is None:
            out.append(c)
        else:
            hit["match"] = _new_id(hit["match"], left)
            drop(c, "leak-test" if hit["match"].startswith("test:") else "dup-paraphrase", {"by": "paraphrase", **hit})
    return out


def run(ctx: StageContext) -> dict:
    cfg, xc = ctx.cfg, ctx.cfg.expand
    if xc.count <= 0:
        raise CaiError("config field 'expand.count' is 0 (off); set it to the number of new prompts to generate")
    require_datasketch()
    seeds = prepared_prompts(ctx, "red_team")["train"]
    if not seeds:
        raise CaiError(f"{ctx.artifact('prepare', 'prompts', set='red_team', split='train')}: the red-team train "
                       "split is empty; expand needs seed prompts")
    tests = [(name, p) for name in PROMPT_SETS for p in prepared_prompts(ctx, name)["test"]]
    refs = [(f"test:{name}:{p.id}", p.text) for name, p in tests] + [(f"seed:{p.id}", p.text) for p in seeds]

    engine = ctx.engine()
    candidates, dropped, requests = generate_candidates(ctx, engine, seeds)
    ctx.log(f"[expand] {len(candidates)} candidates from {requests} requests ({len(dropped)} unusable lines)")

    def drop(c: dict, reason: str, detail: dict) -> None:
        dropped.append({**c, "reason": reason, "detail": detail})

    # Copies of seed and test prompts go first; then the filter; then copies among the new
    # prompts the filter kept, so that no prompt is dropped as the copy of one the filter
    # drops anyway.
    left = dedup(ctx, candidates, refs, drop, among_new=False)

    kept = []
    if left:
        judge = ctx.engine(xc.filter_model)
        convs = []
        for c in left:
            qs = expansion_filter_conversations(c["prompt"])
            convs += qs["plausible"] + qs["care"]
        with ctx.progress(len(convs), "filter questions") as update:
            lps = judge.choice_logprobs(convs, [OPTIONS] * len(convs), progress=update)
        for n, c in enumerate(left):
            lp = lps[4 * n: 4 * n + 4]
            c["p_plausible"] = round(p_yes(lp[0], lp[1]), 6)
            c["p_care"] = round(p_yes(lp[2], lp[3]), 6)
            if c["p_plausible"] < xc.min_plausible:
                drop(c, "implausible", {"threshold": xc.min_plausible})
            elif c["p_care"] < xc.min_care:
                drop(c, "no-care-needed", {"threshold": xc.min_care})
            else:
                kept.append(c)
    # (the references again: none of these matches one, and they centre the embeddings the same way)
    kept = dedup(ctx, kept, refs, drop, among_new=True)

    rows = [{"id": c["id"], "category": c["category"], "prompt": c["prompt"],
             "messages": [{"role": "user", "content": c["prompt"]}], "source": "expand",
             "seed_ids": c["seed_ids"], "request": c["request"], "p_plausible": c["p_plausible"],
             "p_care": c["p_care"]} for c in kept]
    write_jsonl(ctx.output("prompts", split="train"), rows)
    write_jsonl(ctx.output("dropped"), [
        {"id": d.get("id"), "category": d["category"], "prompt": d["prompt"], "reason": d["reason"],
         "detail": d["detail"], "seed_ids": d["seed_ids"], "request": d["request"],
         "p_plausible": d.get("p_plausible"), "p_care": d.get("p_care")} for d in dropped])
    by_reason = Counter(d["reason"] for d in dropped)
    counts = {"requests": requests, "generated": len(candidates), "unparsable": by_reason["unparsable"],
              "dup_near": by_reason["dup-near"], "dup_paraphrase": by_reason["dup-paraphrase"],
              "leak_test": by_reason["leak-test"], "implausible": by_reason["implausible"],
              "no_care_needed": by_reason["no-care-needed"], "kept": len(kept)}
    scored = [c for c in candidates if "p_plausible" in c]
    write_json(ctx.output("stats"), {
        **counts,
        "deduplicated": counts["dup_near"] + counts["dup_paraphrase"] + counts["leak_test"],
        "filtered": counts["implausible"] + counts["no_care_needed"],
        "dropped_by_reason": {r: by_reason[r] for r in REASONS},
        "kept_by_category": dict(sorted(Counter(str(c["category"]) for c in kept).items())),
        "mean_p_plausible": round(sum(c["p_plausible"] for c in scored) / len(scored), 4) if scored else None,
        "mean_p_care": round(sum(c["p_care"] for c in scored) / len(scored), 4) if scored else None,
        "seeds": len(seeds), "test_prompts": len(tests),
        "thresholds": {"near": xc.near_threshold, "paraphrase": xc.paraphrase_threshold,
                       "min_plausible": xc.min_plausible, "min_care": xc.min_care},
        "embed_model": xc.embed_model or cfg.engine.model, "embed_layer": xc.embed_layer, "filter_model": xc.filter_model or cfg.engine.model,
    })
    return counts


def _new_id(key: str, pool: list[dict]) -> str:
    """``new:I`` (the I-th text of ``pool``) as that candidate's id; other keys as they are."""
    return pool[int(key[4:])]["id"] if key.startswith("new:") else key


def estimate(inputs: PlanInputs) -> Cost:
    xc, count = inputs.cfg.expand, inputs.count
    if xc.count <= 0:
        return Cost(note="off (expand.count is 0)")
    seeds = inputs.sets["red_team"].get("train", [])
    pools = seed_pools(seeds) if seeds else {None: []}
    order = sorted(pools, key=lambda c: (c is None, str(c)))
    requests = math.ceil(xc.count / xc.per_request)
    convs = [expansion_conversation([p.text for p in plan_request(pools, order, k, xc.few_shot, inputs.cfg.seed)[1]],
                                    order[k % len(order)], xc.per_request) for k in range(requests)] if seeds else []
    qs = 4 * xc.count
    avg_q = count(expansion_filter_conversations("x " * 20)["plausible"][0])
    return Cost(generate=requests, score=qs, prompt_tokens=sum(count(c) for c in convs) + qs * avg_q,
                new_tokens=requests * xc.max_new_tokens,
                note=f"{xc.count} candidates from at least {requests} requests (more when lines do not parse, "
                     f"up to {MAX_REQUEST_FACTOR}x); plus one embedding pass over seeds, test prompts and candidates")


STAGE = StageSpec(
    name="expand",
    run=run,
    config_keys=("seed", "engine", "expand"),
    needs=("prepare",),
    help="Optional: grow the red-team train split with new prompts (few-shot generation, dedup, filter).",
    estimate=estimate,
)
