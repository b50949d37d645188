"""AI feedback (Bai et al. 2022, §4.1): pairs of answers labelled by a feedback model.

For every red-team prompt the policy (the SL-CAI model by default) samples a few
answers at temperature 1, and every pair of them becomes a comparison. The feedback
model (the original model by default, as in the paper) reads a multiple-choice question:
the conversation, a comparison principle sampled for this pair, the options "(A) ..." and
"(B) ...". Its assistant turn is opened with ``The answer is: (`` and the label is the
normalised probability of the next token being ``A`` or ``B``, read with
``Engine.choice_logprobs`` in one forward pass; nothing is generated or parsed.

* **Both orders.** Each question is asked again with the answers swapped; the two
  probabilities that the same answer is better are averaged. How often both orders
  prefer the same answer is reported as the position-consistency rate.
* **Ensembles.** ``principles_per_comparison`` samples several principles per pair and
  averages their labels.
* **Chain of thought.** The feedback model first continues ``Let's think step by
  step:``; the options are then scored after its reasoning, and the label is clamped to
  ``cot_clamp`` (40-60% by default: the paper found unclamped CoT labels too extreme). An
  empty reasoning is an abstention, counted and recorded, never a crash.
* **Helpfulness.** Pairs of answers to helpfulness prompts are labelled under the
  constitution's helpfulness questions, and a human preference file can be mixed in with
  hard labels (p = 1), as the paper's PM mixed human helpfulness with AI harmlessness.

Answers are hostile data: they are only ever placed inside the question, the label is
read at a fixed position after the fixed suffix, and the engine defangs special-token
strings, so an answer that says "(A)" or "The answer is: (B)" cannot move the label
position or forge a turn.

Artifacts, JSONL with train/test splits that follow the prompt splits:

* ``comparisons/``: every comparison with both answers, each question's principle,
  order, probabilities and reasoning, and its status (labelled/abstained/identical);
* ``prefs/``: TRL's ``prompt``/``chosen``/``rejected`` plus ``p_chosen`` (the soft label),
  ``margin`` (p_chosen - p_rejected), ``principle_ids``, the probability of the chosen
  answer when shown first and when shown second, ``position_consistent``, ``source`` and
  ``feedback_model``;
* ``stats.json``: totals, position consistency, mean |p - 0.5|, per-principle numbers.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

from cai import seeds
from cai.constitution import ComparisonPrinciple, load_constitution
from cai.conversations import (
    COT_CUE,
    OPTIONS,
    answer_turn,
    clean_reasoning,
    comparison_demos,
    is_abstention,
    principle_texts,
    question,
    softmax2,
)
from cai.engines.base import SamplingParams
from cai.datafiles import read_data
from cai.io import write_json, write_jsonl
from cai.prompts import SPLITS, Prompt
from cai.cost import Cost, PlanInputs
from cai.inputs import prepared_prompts, red_team_prompts, with_expansion
from cai.stage import StageContext, StageSpec
from cai.stage_names import SL_CAI


# -- comparisons ----------------------------------------------------------------------


@dataclass
class Comparison:
    id: str
    split: str
    source: str  # harmlessness | helpfulness | human
    prompt: Prompt
    a: str
    b: str
    principles: list[ComparisonPrinciple] = field(default_factory=list)
    queries: list[dict] = field(default_factory=list)
    p_a: float | None = None  # label: probability that answer a is the better one
    p_a_raw: float | None = None  # before the chain-of-thought clamp
    status: str = "labelled"


def make_pairs(split: str, source: str, prompt: Prompt, answers: list[str], pool, n_principles, seed) -> list[Comparison]:
    out = []
    for i, j in itertools.combinations(range(len(answers)), 2):
        cid = f"{prompt.id}/{i}-{j}"
        rng = random.Random(f"{seed}:feedback:{source}:{cid}")
        c = Comparison(cid, split, source, prompt, answers[i], answers[j],
                       principles=[rng.choice(pool) for _ in range(n_principles)])
        if answers[i].strip() == answers[j].strip():
            c.status = "identical"
        out.append(c)
    return out


def build_queries(comparisons: list[Comparison], both_orders: bool) -> None:
    for c in comparisons:
        if c.status != "labelled":
            continue
        for k, principle in enumerate(c.principles):
            for order in ("ab", "ba") if both_orders else ("ab",):
                first, second = (c.a, c.b) if order == "ab" else (c.b, c.a)
                c.queries.append({
                    "principle_id": principle.id,
                    "k": k,
                    "order": order,
                    "question": question(c.prompt.messages, principle.text, first, second),
                })


def label(engine, comparisons, demos, cot: bool, fb, seed: int, progress) -> None:
    """Fill in every query's probabilities (and reasoning) and each comparison's label."""
    queries = [q for c in comparisons for q in c.queries]
    if cot:
        convs = [demos + [{"role": "user", "content": q["question"]}, {"role": "assistant", "content": COT_CUE}]
                 for q in queries]
        params = SamplingParams(temperature=0.0, max_new_tokens=fb.cot_max_new_tokens, seed=seed + seeds.FEEDBACK_COT)
        with progress(len(convs), "reasoning") as update:
            outs = engine.generate(convs, params, progress=update) if convs else []
        for q, out in zip(queries, outs):
            q["reasoning"] = clean_reasoning(out[0])
            q["abstained"] = is_abstention(q["reasoning"])
    scored = [q for q in queries if not q.get("abstained")]
    convs = [demos + [{"role": "user", "content": q["question"]},
                      {"role": "assistant", "content": answer_turn(q.get("reasoning"))}] for q in scored]
    with progress(len(convs), "labels") as update:
        lps = engine.choice_logprobs(convs, [OPTIONS] * len(convs), progress=update) if convs else []
    for q, lp in zip(scored, lps):
        q["logprobs"] = lp
        q["p_first"] = softmax2(lp)
        q["p_a"] = q["p_first"] if q["order"] == "ab" else 1.0 - q["p_first"]
    lo, hi = fb.cot_clamp if cot else (0.0, 1.0)
    for c in comparisons:
        if c.status != "labelled":
            continue
        usable = _usable(c.queries, fb.both_orders)
        if not usable:
            c.status = "abstained"
            continue
        c.p_a_raw = sum(q["p_a"] for q in usable) / len(usable)
        c.p_a = min(max(c.p_a_raw, lo), hi)


def _usable(queries: list[dict], both_orders: bool) -> list[dict]:
    """Scored queries; with both orders, only principles whose two orders were both scored."""
    ok = [q for q in queries if "p_a" in q]
    if not both_orders:
        return ok
    by_k: dict[int, list[dict]] = {}
    for q in ok:
        by_k.setdefault(q["k"], []).append(q)
    return [q for qs in by_k.values() if len(qs) == 2 for q in qs]


def consistency(c: Comparison) -> dict[int, bool]:
    """Per principle (by index) scored in both orders: did both orders prefer the same answer?"""
    by_k: dict[int, dict[str, float]] = {}
    for q in c.queries:
        if "p_a" in q:
            by_k.setdefault(q["k"], {})[q["order"]] = q["p_a"]
    return {k: (o["ab"] >= 0.5) == (o["ba"] >= 0.5) for k, o in by_k.items() if len(o) == 2}


# -- the stage --------------------------------------------------------------------------


def _pref_record(c: Comparison, feedback_model: str, both_orders: bool) -> dict:
    a_wins = c.p_a >= 0.5
    p_chosen = c.p_a if a_wins else 1.0 - c.p_a
    chosen, rejected = (c.a, c.b) if a_wins else (c.b, c.a)
    usable = _usable(c.queries, both_orders)
    # Probability that the chosen answer is better, when it was shown first / second.
    shown_first = [q["p_a"] if a_wins else 1 - q["p_a"] for q in usable if (q["order"] == "ab") == a_wins]
    shown_second = [q["p_a"] if a_wins else 1 - q["p_a"] for q in usable if (q["order"] == "ab") != a_wins]
    agree = list(consistency(c).values())
    return {
        "id": c.id,
        "source": c.source,
        "category": c.prompt.category,
        "prompt": c.prompt.messages,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "p_chosen": round(p_chosen, 6),
        "margin": round(2 * p_chosen - 1, 6),
        "principle_ids": [p.id for p in c.principles],
        "p_chosen_shown_first": _mean(shown_first),
        "p_chosen_shown_second": _mean(shown_second),
        "position_consistent": all(agree) if agree else None,
        "feedback_model": feedback_model,
    }


def _mean(xs):
    return round(sum(xs) / len(xs), 6) if xs else None


def _comparison_record(c: Comparison) -> dict:
    return {
        "id": c.id, "split": c.split, "source": c.source, "category": c.prompt.category,
        "prompt": c.prompt.messages, "response_a": c.a, "response_b": c.b,
        "principle_ids": [p.id for p in c.principles],
        "queries": [{k: v for k, v in q.items() if k != "question"} for q in c.queries],
        "p_a": None if c.p_a is None else round(c.p_a, 6),
        "p_a_unclamped": None if c.p_a_raw is None else round(c.p_a_raw, 6),
        "position_consistent": list(consistency(c).values()),
        "status": c.status,
    }


def statistics(comparisons: list[Comparison]) -> dict:
    labelled = [c for c in comparisons if c.status == "labelled"]
    agree = [x for c in labelled for x in consistency(c).values()]
    per: dict[str, dict] = {}
    for c in labelled:
        for q in c.queries:
            if "p_a" not in q:
                continue
            d = per.setdefault(q["principle_id"], {"questions": 0, "abs_margin": 0.0, "agree": []})
            d["questions"] += 1
            d["abs_margin"] += abs(q["p_a"] - 0.5)
        for k, ok in consistency(c).items():
            per[c.principles[k].id]["agree"].append(ok)
    return {
        "comparisons": len(comparisons),
        "labelled": len(labelled),
        "abstained": sum(c.status == "abstained" for c in comparisons),
        "identical_pairs": sum(c.status == "identical" for c in comparisons),
        "abstained_questions": sum(1 for c in comparisons for q in c.queries if q.get("abstained")),
        "position_consistency": round(sum(agree) / len(agree), 4) if agree else None,
        "mean_abs_p_minus_half": round(sum(abs(c.p_a - 0.5) for c in labelled) / len(labelled), 4) if labelled else None,
        "mean_abs_p_minus_half_unclamped": (
            round(sum(abs(c.p_a_raw - 0.5) for c in labelled) / len(labelled), 4) if labelled else None
        ),
        "per_principle": {
            pid: {
                "questions": d["questions"],
                "mean_abs_p_minus_half": round(d["abs_margin"] / d["questions"], 4),
                "position_consistency": round(sum(d["agree"]) / len(d["agree"]), 4) if d["agree"] else None,
            }
            for pid, d in sorted(per.items())
        },
    }


def run(ctx: StageContext) -> dict:
    cfg, fb = ctx.cfg, ctx.cfg.feedback
    const = load_constitution(ctx.artifact("prepare", "constitution"))
    red = red_team_prompts(ctx, fb.max_prompts)  # with the expand stage's prompts in train
    helpful = prepared_prompts(ctx, "helpful")
    n_help = {s: min(len(helpful[s]), round(fb.helpful_ratio * len(red[s]))) for s in SPLITS}
    if not const.helpfulness_principles and any(n_help.values()):
        ctx.log("[feedback] the constitution has no helpfulness_principles: no helpfulness comparisons")
        n_help = {s: 0 for s in SPLITS}
    items = [(s, "harmlessness", p) for s in SPLITS for p in red[s]]
    items += [(s, "helpfulness", p) for s in SPLITS for p in helpful[s][: n_help[s]]]

    policy = ctx.engine(fb.policy)
    params = SamplingParams(n=fb.samples_per_prompt, temperature=fb.temperature, top_p=fb.top_p,
                            max_new_tokens=fb.max_new_tokens, seed=cfg.seed + seeds.FEEDBACK_ANSWERS)
    with ctx.progress(len(items), "answers") as update:
        answers = policy.generate([p.messages for _, _, p in items], params, progress=update)

    comparisons: list[Comparison] = []
    for (split, source, p), outs in zip(items, answers):
        pool = const.comparison_principles if source == "harmlessness" else const.helpfulness_principles
        comparisons += make_pairs(split, source, p, outs, pool, fb.principles_per_comparison, cfg.seed)
    build_queries(comparisons, fb.both_orders)

    feedback_model = fb.model or cfg.engine.model
    del policy
    if ctx.model_path(fb.policy) != ctx.model_path(feedback_model):
        ctx.release_engine(fb.policy)  # one model at a time: the feedback model loads into the room it leaves
    engine = ctx.engine(feedback_model)
    examples = const.comparison_examples if fb.few_shot < 0 else const.comparison_examples[: fb.few_shot]
    if fb.chain_of_thought:
        examples = [e for e in examples if e.reasoning]
    demos = comparison_demos(examples, principle_texts(const), fb.chain_of_thought)
    label(engine, comparisons, demos, fb.chain_of_thought, fb, cfg.seed, ctx.progress)

    prefs = {s: [] for s in SPLITS}
    for c in comparisons:
        if c.status == "labelled":
            prefs[c.split].append(_pref_record(c, feedback_model, fb.both_orders))
    n_human = {"train": 0, "test": 0}
    if fb.human_preferences:
        ctx.record_data()
        human = read_data(cfg, "feedback")
        for s in SPLITS:
            want = round(fb.human_ratio * len(red[s]))
            for h in human[s][:want]:  # hard labels (p = 1), whatever the file says
                prefs[s].append({
                    "id": f"human/{h['id']}", "source": "human", "category": None, "prompt": h["prompt"],
                    "chosen": h["chosen"], "rejected": h["rejected"],
                    "p_chosen": 1.0, "margin": 1.0, "principle_ids": [],
                    "p_chosen_shown_first": None, "p_chosen_shown_second": None,
                    "position_consistent": None, "feedback_model": "human",
                })
                n_human[s] += 1

    for s in SPLITS:
        write_jsonl(ctx.output("comparisons", split=s), [_comparison_record(c) for c in comparisons if c.split == s])
        write_jsonl(ctx.output("prefs", split=s), prefs[s])
    stats = statistics(comparisons)
    stats["by_source"] = {src: statistics([c for c in comparisons if c.source == src])
                          for src in ("harmlessness", "helpfulness")}
    stats["human_pairs"] = n_human
    stats["feedback_model"] = feedback_model
    stats["policy"] = fb.policy
    stats["chain_of_thought"] = fb.chain_of_thought
    write_json(ctx.output("stats"), stats)
    return {
        "comparisons": stats["comparisons"],
        "labelled": stats["labelled"],
        "abstained": stats["abstained"],
        "identical_pairs": stats["identical_pairs"],
        "position_consistency": stats["position_consistency"],
        "mean_abs_p_minus_half": stats["mean_abs_p_minus_half"],
        "prefs_train": len(prefs["train"]),
        "prefs_test": len(prefs["test"]),
        "human_pairs": n_human["train"] + n_human["test"],
    }


def _needs(cfg) -> tuple[str, ...]:
    return with_expansion(cfg, ("prepare", "sft") if cfg.feedback.policy == SL_CAI else ("prepare",))


def estimate(inputs: PlanInputs) -> Cost:
    import math

    fb, count = inputs.cfg.feedback, inputs.count
    reds = inputs.capped("red_team", fb.max_prompts)
    prompts = [p for s in reds for p in reds[s]] + inputs.helpful_beside(reds, fb.helpful_ratio)
    pairs = math.comb(fb.samples_per_prompt, 2)
    examples = inputs.constitution.comparison_examples
    ex = examples if fb.few_shot < 0 else examples[: fb.few_shot]
    demo = count(comparison_demos(ex, principle_texts(inputs.constitution), fb.chain_of_thought)) if ex else 0
    qs = len(prompts) * pairs * fb.principles_per_comparison * (2 if fb.both_orders else 1)
    q_tokens = sum(count([{"role": "user", "content": question(p.messages, "Which is better?", "", "")}])
                   for p in prompts) / max(1, len(prompts)) + demo + 2 * fb.max_new_tokens
    cot = fb.chain_of_thought
    # memory: the policy that samples, then the feedback model that labels; the larger phase counts
    e, policy, judge = inputs.cfg.engine, inputs.shape(fb.policy), inputs.shape(fb.model)
    batching = inputs.batching
    memory, loads = None, 0
    if judge is not None or policy is not None:
        from cai.memory import generation, largest

        ib, int8 = inputs.engine_bytes(), e.quantize == "int8"
        local = inputs.local_batching  # the models in this process (a served one's memory is its server's)
        answer = int(sum(count(p.messages) for p in prompts) / max(1, len(prompts))) + fb.max_new_tokens
        phases = []
        if policy is not None:
            phases.append(generation(policy, ib, local.in_flight(max(1, len(prompts)) * fb.samples_per_prompt),
                                     answer, int8))
        if judge is not None:
            phases.append(generation(judge, ib, local.in_flight(qs, "score"), int(q_tokens), int8,
                                     shared=local.kept_prefix(demo)))
        # the policy is released before the feedback model loads (one model at a time)
        memory = largest(*phases)
        loads = len(phases) if fb.policy != (fb.model or e.model) else 1
    return Cost(
        loads=loads, memory=memory,
        generate=len(prompts) * fb.samples_per_prompt + (qs if cot else 0), score=qs,
        # the shared demonstrations are read as often as the engine reads a shared prefix: once a
        # scoring batch, and with CoT also once a generation batch, on the local engine
        prompt_tokens=sum(count(p.messages) for p in prompts)
        + int(qs * (q_tokens - demo)) + batching.prefix_reads(qs, "score") * demo
        + (int(qs * (q_tokens - demo)) + batching.prefix_reads(qs) * demo if cot else 0),
        new_tokens=len(prompts) * fb.samples_per_prompt * fb.max_new_tokens + (qs * fb.cot_max_new_tokens if cot else 0),
        decode_steps=batching.decode_steps(len(prompts) * fb.samples_per_prompt, fb.max_new_tokens)
        + (batching.decode_steps(qs, fb.cot_max_new_tokens) if cot else 0),
        note=f"{len(prompts) * pairs} pairs, {qs} questions",
    )


STAGE = StageSpec(
    name="feedback",
    run=run,
    config_keys=("seed", "engine", "feedback", "data"),
    needs=_needs,
    help="AI feedback: sample answer pairs, label them with option log-probabilities in both orders.",
    estimate=estimate,
)
