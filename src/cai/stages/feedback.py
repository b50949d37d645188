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
* **Contrast pairs** (``mode: contrast``, RLCD, beyond the paper: :mod:`cai.contrast`).
  Instead of the above, the policy answers each prompt once under a positive and once
  under a negative system prompt derived from a sampled principle; the positive answer is
  chosen by construction with the soft label ``contrast_label``, and no judge is asked
  unless ``contrast_judge`` asks the feedback model too, as a measure of it.

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
  ``feedback_model``; a contrast pair adds ``label_source``, its two prompts and the judge's
  own label;
* ``stats.json``: totals, position consistency, mean |p - 0.5|, per-principle numbers; in
  contrast mode the judge's agreement with the construction and each principle's prompts.
"""

from __future__ import annotations

from cai.constitution import load_constitution
from cai.conversations import comparison_demos, principle_texts, question
from cai.engines.base import SamplingParams
from cai import seeds
from cai.datafiles import read_data
from cai.io import write_json, write_jsonl
from cai import contrast
from cai.judge import (
    SOURCES,
    Comparison,
    build_queries,
    consistency,
    demonstrations,
    label,
    make_pairs,
    p_a_by_order,
    pref_record,
    principle_pool,
)
from cai.judge_stats import judge_reliability, wilson, yes_no
from cai.prompts import SPLITS
from cai.cost import Cost, PlanInputs
from cai.inputs import prepared_prompts, red_team_prompts, with_expansion
from cai.stage import StageContext, StageSpec
from cai.stage_names import SL_CAI


def _ci(agree: list[bool]) -> list[float] | None:
    ci = wilson(sum(agree), len(agree))
    return [round(ci[0], 4), round(ci[1], 4)] if ci else None


# -- the stage --------------------------------------------------------------------------


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


def _contrast_record(cp: contrast.ContrastPair, contrast_label: float) -> dict:
    """A contrast pair in ``comparisons/``: the judge mode's fields, answer a being the positive
    prompt's answer and ``p_a`` the constructed label (the judge's questions, when it was asked,
    in ``queries``), then ``label_source``, the two prompts and the judge's own label and status."""
    rec = _comparison_record(cp.judged or cp.comparison())
    judge = {"p_a": rec["p_a"], "p_a_unclamped": rec["p_a_unclamped"], "status": rec["status"]}
    rec.update(p_a=None if cp.identical else contrast_label, p_a_unclamped=None if cp.identical else contrast_label,
               status="identical" if cp.identical else "labelled")
    rec["label_source"] = "contrast"
    rec["contrast_prompts"] = {"positive": cp.positive, "negative": cp.negative, "origin": cp.origin}
    rec["judge"] = judge if cp.judged is not None else None
    return rec


def contrast_statistics(pairs: list[contrast.ContrastPair], contrast_label: float) -> dict:
    """``stats.json`` of mode=contrast: counts, the judge's agreement with the construction
    (:func:`cai.contrast.agreement`), overall and per source; per principle its two prompts and
    where they come from; and the judge's own reliability (:func:`statistics`) when it was asked."""

    def counts(subset: list[contrast.ContrastPair]) -> dict:
        return {"comparisons": len(subset), "labelled": sum(not cp.identical for cp in subset),
                "identical_pairs": sum(cp.identical for cp in subset), "judge_agreement": contrast.agreement(subset)}

    by_principle: dict[str, list[contrast.ContrastPair]] = {}
    for cp in pairs:
        by_principle.setdefault(cp.principle.id, []).append(cp)
    judged = [cp.judged for cp in pairs if cp.judged is not None]
    return {
        "mode": "contrast",
        **counts(pairs),
        "contrast_label": contrast_label,
        "by_source": {src: counts([cp for cp in pairs if cp.source == src]) for src in SOURCES},
        "contrast_prompts": {
            pid: {"source": ps[0].source, "origin": ps[0].origin, "positive": ps[0].positive,
                  "negative": ps[0].negative, **counts(ps)}
            for pid, ps in sorted(by_principle.items())
        },
        "judge": statistics(judged) if judged else None,
    }


def statistics(comparisons: list[Comparison]) -> dict:
    labelled = [c for c in comparisons if c.status == "labelled"]
    agree = [x for c in labelled for x in consistency(c).values()]
    per: dict[str, dict] = {}
    for c in labelled:
        for q in c.queries:
            if "p_a" not in q:
                continue
            d = per.setdefault(q["principle_id"], {"questions": 0, "abs_margin": 0.0, "agree": [], "pairs": []})
            d["questions"] += 1
            d["abs_margin"] += abs(q["p_a"] - 0.5)
        for k, ok in consistency(c).items():
            per[c.principles[k].id]["agree"].append(ok)
        for k, orders in p_a_by_order(c).items():
            per[c.principles[k].id]["pairs"].append(yes_no(orders))
    decisive = round(sum(abs(c.p_a - 0.5) for c in labelled) / len(labelled), 4) if labelled else None
    return {
        "comparisons": len(comparisons),
        "labelled": len(labelled),
        "abstained": sum(c.status == "abstained" for c in comparisons),
        "identical_pairs": sum(c.status == "identical" for c in comparisons),
        "abstained_questions": sum(1 for c in comparisons for q in c.queries if q.get("abstained")),
        "position_consistency": round(sum(agree) / len(agree), 4) if agree else None,
        # |p - 0.5| of each comparison's label (p averaged over its questions: both orders, every principle)
        "decisiveness_all_orders": decisive,
        "position_consistency_ci": _ci(agree),
        "mean_abs_p_minus_half": decisive,  # the old name of decisiveness_all_orders, kept for old readers
        "mean_abs_p_minus_half_unclamped": (
            round(sum(abs(c.p_a_raw - 0.5) for c in labelled) / len(labelled), 4) if labelled else None
        ),
        "per_principle": {
            pid: {
                "questions": d["questions"],
                # |p - 0.5| of each question on its own (one order)
                "decisiveness_one_order": round(d["abs_margin"] / d["questions"], 4),
                "position_consistency": round(sum(d["agree"]) / len(d["agree"]), 4) if d["agree"] else None,
                "position_consistency_ci": _ci(d["agree"]),
                "consistency_pairs": len(d["agree"]),
                "decisiveness_all_orders": (judge_reliability(d["pairs"]) or {}).get("decisiveness_all_orders"),
                "mean_abs_p_minus_half": round(d["abs_margin"] / d["questions"], 4),  # old name, one order
            }
            for pid, d in sorted(per.items())
        },
    }


def run(ctx: StageContext) -> dict:
    """The prompts, their pairs as ``feedback.mode`` makes them, the human pairs mixed in, the files."""
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
    feedback_model = fb.model or cfg.engine.model
    make = _contrast_pairs if fb.mode == "contrast" else _judged_pairs
    records, prefs, stats = make(ctx, const, items, feedback_model)

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
        write_jsonl(ctx.output("comparisons", split=s), [r for r in records if r["split"] == s])
        write_jsonl(ctx.output("prefs", split=s), prefs[s])
    stats["human_pairs"] = n_human
    stats["feedback_model"] = feedback_model
    stats["policy"] = fb.policy
    stats["chain_of_thought"] = fb.chain_of_thought
    write_json(ctx.output("stats"), stats)
    counts = {"comparisons": stats["comparisons"], "labelled": stats["labelled"]}
    if fb.mode == "contrast":
        counts.update(identical_pairs=stats["identical_pairs"], judge_agreement=stats["judge_agreement"]["rate"])
    else:
        counts.update({k: stats[k] for k in ("abstained", "identical_pairs", "position_consistency",
                                              "mean_abs_p_minus_half")})
    return {**counts, "prefs_train": len(prefs["train"]), "prefs_test": len(prefs["test"]),
            "human_pairs": n_human["train"] + n_human["test"]}


def _feedback_engine(ctx: StageContext, feedback_model: str):
    """The feedback model's engine. One model at a time: the policy's engine is released first
    when it is another model, so the feedback model loads into the room it leaves."""
    if ctx.model_path(ctx.cfg.feedback.policy) != ctx.model_path(feedback_model):
        ctx.release_engine(ctx.cfg.feedback.policy)
    return ctx.engine(feedback_model)


def _judged_pairs(ctx: StageContext, const, items, feedback_model: str) -> tuple[list[dict], dict, dict]:
    """mode=judge (the paper): every pair of the policy's answers to a prompt, labelled by the
    feedback model. Returns the ``comparisons`` records, the ``prefs`` rows by split, the stats."""
    cfg, fb = ctx.cfg, ctx.cfg.feedback
    policy = ctx.engine(fb.policy)
    params = SamplingParams(n=fb.samples_per_prompt, temperature=fb.temperature, top_p=fb.top_p,
                            max_new_tokens=fb.max_new_tokens, seed=cfg.seed + seeds.FEEDBACK_ANSWERS)
    with ctx.progress(len(items), "answers") as update:
        answers = policy.generate([p.messages for _, _, p in items], params, progress=update)

    comparisons: list[Comparison] = []
    for (split, source, p), outs in zip(items, answers):
        comparisons += make_pairs(split, source, p, outs, principle_pool(const, source), fb.principles_per_comparison,
                                  cfg.seed)
    build_queries(comparisons, fb.both_orders)

    del policy
    engine = _feedback_engine(ctx, feedback_model)
    label(engine, comparisons, demonstrations(const, fb), fb.chain_of_thought, fb, cfg.seed, ctx.progress)

    prefs = {s: [] for s in SPLITS}
    for c in comparisons:
        if c.status == "labelled":
            prefs[c.split].append(pref_record(c, feedback_model, fb.both_orders))
    stats = statistics(comparisons)
    stats["by_source"] = {src: statistics([c for c in comparisons if c.source == src]) for src in SOURCES}
    return [_comparison_record(c) for c in comparisons], prefs, stats


def _contrast_pairs(ctx: StageContext, const, items, feedback_model: str) -> tuple[list[dict], dict, dict]:
    """mode=contrast (RLCD, beyond the paper; :mod:`cai.contrast`): one pair per prompt, the
    policy's answers under the positive and the negative prompt of a sampled principle,
    labelled by construction; with ``contrast_judge`` the feedback model labels them too.
    Returns what :func:`_judged_pairs` returns."""
    cfg, fb = ctx.cfg, ctx.cfg.feedback
    pairs = contrast.draw_pairs(items, const, cfg.seed)
    policy = ctx.engine(fb.policy)
    params = SamplingParams(n=1, temperature=fb.temperature, top_p=fb.top_p,
                            max_new_tokens=fb.max_new_tokens, seed=cfg.seed + seeds.FEEDBACK_ANSWERS)
    convs = [conv for cp in pairs for conv in cp.conversations()]  # positive, negative, positive...
    with ctx.progress(len(convs), "contrast answers") as update:
        answers = policy.generate(convs, params, progress=update)
    for cp, positive, negative in zip(pairs, answers[0::2], answers[1::2]):
        cp.chosen, cp.rejected = positive[0], negative[0]

    del policy
    if fb.contrast_judge:
        contrast.judge_pairs(_feedback_engine(ctx, feedback_model), pairs, const, fb, cfg.seed, ctx.progress)

    prefs = {s: [contrast.pref_record(cp, fb.contrast_label, feedback_model, fb.both_orders)
                 for cp in pairs if cp.split == s and not cp.identical] for s in SPLITS}
    return [_contrast_record(cp, fb.contrast_label) for cp in pairs], prefs, contrast_statistics(pairs, fb.contrast_label)


def _needs(cfg) -> tuple[str, ...]:
    return with_expansion(cfg, ("prepare", "sft") if cfg.feedback.policy == SL_CAI else ("prepare",))


def estimate(inputs: PlanInputs) -> Cost:
    import math

    fb, count = inputs.cfg.feedback, inputs.count
    reds = inputs.capped("red_team", fb.max_prompts)
    red = [p for s in reds for p in reds[s]]
    helpful = inputs.helpful_beside(reds, fb.helpful_ratio)
    prompts = red + helpful
    asks_judge = fb.mode == "judge" or fb.contrast_judge
    if fb.mode == "contrast":
        # one pair per prompt: an answer under each of its two prompts (each request its own conversation)
        if not inputs.constitution.helpfulness_principles:  # the stage then makes no helpfulness pairs
            prompts, helpful = red, []
        items = [("", "harmlessness", p) for p in red] + [("", "helpfulness", p) for p in helpful]
        convs = [conv for cp in contrast.draw_pairs(items, inputs.constitution, inputs.cfg.seed)
                 for conv in cp.conversations()]
        per_prompt, n_pairs = 2, len(prompts)
        qs = n_pairs * (2 if fb.both_orders else 1) if asks_judge else 0
    else:
        convs = [p.messages for p in prompts]  # samples_per_prompt answers to each
        per_prompt, n_pairs = fb.samples_per_prompt, len(prompts) * math.comb(fb.samples_per_prompt, 2)
        qs = n_pairs * fb.principles_per_comparison * (2 if fb.both_orders else 1)
    answers = len(prompts) * per_prompt
    examples = inputs.constitution.comparison_examples
    ex = examples if fb.few_shot < 0 else examples[: fb.few_shot]
    demo = count(comparison_demos(ex, principle_texts(inputs.constitution), fb.chain_of_thought)) if ex and asks_judge else 0
    q_tokens = sum(count([{"role": "user", "content": question(p.messages, "Which is better?", "", "")}])
                   for p in prompts) / max(1, len(prompts)) + demo + 2 * fb.max_new_tokens
    cot = fb.chain_of_thought
    # memory: the policy that samples, then the feedback model that labels; the larger phase counts
    e, policy, judge = inputs.cfg.engine, inputs.shape(fb.policy), inputs.shape(fb.model) if asks_judge else None
    batching = inputs.batching
    memory, loads = None, 0
    if judge is not None or policy is not None:
        from cai.memory import generation, largest

        ib, int8 = inputs.engine_bytes(), e.quantize == "int8"
        local = inputs.local_batching  # the models in this process (a served one's memory is its server's)
        answer = int(sum(count(c) for c in convs) / max(1, len(convs))) + fb.max_new_tokens
        phases = []
        if policy is not None:
            phases.append(generation(policy, ib, local.in_flight(max(1, len(prompts)) * per_prompt), answer, int8))
        if judge is not None:
            phases.append(generation(judge, ib, local.in_flight(qs, "score"), int(q_tokens), int8,
                                     shared=local.kept_prefix(demo)))
        # the policy is released before the feedback model loads (one model at a time)
        memory = largest(*phases)
        loads = len(phases) if fb.policy != (fb.model or e.model) else 1
    note = f"{n_pairs} pairs, {qs} questions"
    return Cost(
        loads=loads, memory=memory,
        generate=answers + (qs if cot else 0), score=qs,
        # the shared demonstrations are read as often as the engine reads a shared prefix: once a
        # scoring batch, and with CoT also once a generation batch, on the local engine
        prompt_tokens=sum(count(c) for c in convs)
        + int(qs * (q_tokens - demo)) + batching.prefix_reads(qs, "score") * demo
        + (int(qs * (q_tokens - demo)) + batching.prefix_reads(qs) * demo if cot else 0),
        new_tokens=answers * fb.max_new_tokens + (qs * fb.cot_max_new_tokens if cot else 0),
        decode_steps=batching.decode_steps(answers, fb.max_new_tokens)
        + (batching.decode_steps(qs, fb.cot_max_new_tokens) if cot else 0),
        note=f"{n_pairs} contrast pairs, {qs} judge questions" if fb.mode == "contrast" else note,
    )


STAGE = StageSpec(
    name="feedback",
    run=run,
    config_keys=("seed", "engine", "feedback", "data"),
    needs=_needs,
    help="AI feedback: sample answer pairs, label them with option log-probabilities in both orders "
         "(mode=contrast: answers under a principle's positive and negative prompt, labelled by construction).",
    estimate=estimate,
)
