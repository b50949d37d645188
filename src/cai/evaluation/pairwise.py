"""Pairs of models on every prompt, asked to the judge in both orders.

Which pairs is the design (:func:`comparison_pairs`): every pair, or the anchor design, in
which every model meets a fixed set of anchors (the initial model among them) and no other
non-anchor model, so that adding a model to an evaluation costs one comparison per anchor
per prompt instead of one per model. The question is the feedback stage's multiple-choice
comparison (its demonstrations and its ``The answer is: (`` turn); the soft outcome of a
pair is the mean probability over the two orders that model a's answer is the better one.
Identical answers are not asked: they tie at 0.5.
"""

from __future__ import annotations

import itertools

from cai.conversations import OPTIONS, answer_turn, question, softmax2
from cai.judge_stats import yes_no


def comparison_pairs(names: list[str], anchors: list[str] | None = None) -> list[tuple[int, int]]:
    """The design: the pairs of models the judge compares, as indices ``(a, b)`` into
    ``names`` with ``a < b``, in the order of ``itertools.combinations``. ``anchors`` None:
    every pair. Otherwise a pair is compared when one of its models is an anchor: the
    anchors meet each other and every other model, the others meet the anchors only, so
    one more model adds ``len(anchors)`` pairs whatever the number of models."""
    keep = set(range(len(names))) if anchors is None else {names.index(a) for a in anchors}
    return [(a, b) for a, b in itertools.combinations(range(len(names)), 2) if a in keep or b in keep]


def opponents(names: list[str], pairs: list[tuple[int, int]]) -> dict[str, list[str]]:
    """Whom each model meets in the design ``pairs``, in the order of ``names``."""
    met: dict[str, set[int]] = {n: set() for n in names}
    for a, b in pairs:
        met[names[a]].add(b)
        met[names[b]].add(a)
    return {n: [names[k] for k in sorted(met[n])] for n in names}


def pairwise(judge, names, answers, prompts, principle, demos, progress,
             pairs: list[tuple[int, int]] | None = None) -> tuple[list[dict], dict]:
    """The pairs of models in ``pairs`` (default: every pair, :func:`comparison_pairs`) on
    every prompt, asked in both orders; returns the records and the games grouped by prompt
    for the Elo fit."""
    records, queries = [], []
    pairs = comparison_pairs(names) if pairs is None else pairs
    for k, p in enumerate(prompts):
        for a, b in pairs:
            ra, rb = answers[names[a]][k], answers[names[b]][k]
            rec = {"id": p.id, "model_a": names[a], "model_b": names[b], "principle_id": principle.id,
                   "response_a": ra, "response_b": rb, "queries": [], "p_a": 0.5, "status": "identical"}
            if ra.strip() != rb.strip():
                rec["status"] = "judged"
                for order, (x, y) in (("ab", (ra, rb)), ("ba", (rb, ra))):
                    conv = demos + [{"role": "user", "content": question(p.messages, principle.text, x, y)},
                                    {"role": "assistant", "content": answer_turn(None)}]
                    queries.append((rec, order, conv))
            records.append(rec)
    with progress(len(queries), "comparisons") as update:
        lps = judge.choice_logprobs([q[2] for q in queries], [OPTIONS] * len(queries), progress=update) if queries else []
    for (rec, order, _), lp in zip(queries, lps):
        p_first = softmax2(lp)
        rec["queries"].append({"order": order, "logprobs": lp, "p_first": round(p_first, 6)})
    games: dict[str, list] = {}
    for rec in records:
        if rec["queries"]:
            p_a = [q["p_first"] if q["order"] == "ab" else 1 - q["p_first"] for q in rec["queries"]]
            rec["p_a"] = round(sum(p_a) / len(p_a), 6)
            rec["position_consistent"] = (p_a[0] >= 0.5) == (p_a[1] >= 0.5)
        games.setdefault(rec["id"], []).append((names.index(rec["model_a"]), names.index(rec["model_b"]), rec["p_a"]))
    return records, games


def comparison_items(records: list[dict]) -> list[list[list[float]]]:
    """Each judged pairwise comparison's p(model_a's answer is better) in each order it was
    asked, for :func:`cai.judge_stats.judge_reliability` (identical answers were not asked)."""
    return [yes_no([q["p_first"] if q["order"] == "ab" else 1 - q["p_first"] for q in r["queries"]])
            for r in records if r.get("queries")]
