"""Every pair of models on every prompt, asked to the judge in both orders.

The question is the feedback stage's multiple-choice comparison (its demonstrations and
its ``The answer is: (`` turn); the soft outcome of a pair is the mean probability over the
two orders that model a's answer is the better one. Identical answers are not asked: they
tie at 0.5.
"""

from __future__ import annotations

import itertools

from cai.conversations import OPTIONS, answer_turn, question, softmax2
from cai.judge_stats import yes_no


def pairwise(judge, names, answers, prompts, principle, demos, progress) -> tuple[list[dict], dict]:
    """Every pair of models on every prompt, asked in both orders; returns the records and
    the games grouped by prompt for the Elo fit."""
    records, queries = [], []
    for k, p in enumerate(prompts):
        for a, b in itertools.combinations(range(len(names)), 2):
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
