"""How much a judge's answers can be trusted on a run, and how sure a rate is: pure
functions over numbers (no torch, no numpy), shared by the evaluation, the feedback
stage's statistics and the report.

* :func:`wilson`: the Wilson 95% interval of a proportion k/n.
* :func:`judge_reliability`: from a judge's option probabilities, asked in one or more
  orders (the yes/no questions with Yes shown as (A), then as (B); the pairwise
  comparisons with each answer shown first; XSTest's three rotations), its **position
  consistency** (the share of questions whose most probable option is the same in every
  order) with its Wilson interval, its **decisiveness, one order** (mean of the most
  probable option's probability minus 1/k, per order: |p - 0.5| for a yes/no question)
  and its **decisiveness over all orders** (the same of the probabilities averaged over
  the orders first). A question asked in one order only has no consistency: it says so.
* :func:`at_chance`: the judge is at chance unless the consistency interval's lower bound
  is above 0.5. A judge that always picks one letter (consistency near 0) and one that
  picks at random (near 0.5) are both at chance.
* :func:`rate`: a share of answers with its Wilson interval, and ``too_small`` when that
  interval is wider than :data:`MAX_CI_WIDTH` (the held-out set is too small for the rate).
"""

from __future__ import annotations

import math

#: A rate whose Wilson 95% interval is wider than this (25 points) is flagged: the held-out
#: set is too small for it. At a rate near 0.5 that takes about 60 answers; near 0.1, 20.
MAX_CI_WIDTH = 0.25

#: Said of a question the judge was asked in one order only.
NOT_MEASURED = "asked in one order only: position consistency not measured"


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson 95% interval of a proportion k/n (None for n = 0)."""
    if n <= 0:
        return None
    p = k / n
    mid, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # clamped: at k = 0 or k = n float rounding can put a bound a hair outside [0, 1] (-0.0)
    return max(0.0, (mid - half) / (1 + z * z / n)), min(1.0, (mid + half) / (1 + z * z / n))


def at_chance(ci_low: float | None) -> bool:
    """The rule: a judge is at chance unless its position consistency's Wilson lower bound is
    above 0.5 (no interval, no evidence: at chance)."""
    return ci_low is None or ci_low <= 0.5


def too_small(k: int, n: int) -> bool:
    """Too few answers for the rate k/n: none, or a Wilson 95% interval wider than
    :data:`MAX_CI_WIDTH`."""
    ci = wilson(k, n)
    return ci is None or ci[1] - ci[0] > MAX_CI_WIDTH


def rate(k: int, n: int) -> dict:
    """``{"k", "n", "rate", "ci": [low, high], "too_small"}`` of k successes in n."""
    ci = wilson(k, n)
    return {"k": k, "n": n, "rate": round(k / n, 4) if n else None,
            "ci": [round(ci[0], 4), round(ci[1], 4)] if ci else None, "too_small": too_small(k, n)}


def share_ci(share: float | None, n: int | None) -> dict:
    """:func:`rate` of a share already computed over n answers (k = round(share * n))."""
    if share is None or not n:
        return rate(0, 0)
    return rate(round(share * n), n)


def _top(v: list[float]) -> int:
    return max(range(len(v)), key=lambda k: (v[k], -k))  # a tie goes to the earlier option


def judge_reliability(items: list[list[list[float]]]) -> dict | None:
    """The judge's reliability on one kind of question, from ``items``: per question asked,
    its option probabilities in each order it was asked, each vector in one fixed option
    order (for a yes/no question ``[p_yes, p_no]`` whichever letter Yes was shown as).

    Returns ``orders`` (how many orders each question was asked in), ``n`` (questions),
    ``decisiveness_one_order``, and with two orders or more ``position_consistency``, its
    Wilson interval ``position_consistency_ci``, ``decisiveness_all_orders`` and
    ``at_chance``; with one order those are None and ``note`` says consistency was not
    measured. None without questions.

    Example (yes/no, both orders): p_yes 0.9 shown as (A) and 0.1 shown as (B) (a judge
    that says (A) either way) is inconsistent; averaged, p = 0.5, decisiveness 0 over both
    orders though 0.4 in each order.
    """
    items = [it for it in items if it]
    if not items:
        return None
    orders = min(len(it) for it in items)
    one = [max(v) - 1 / len(v) for it in items for v in it]
    out = {"orders": orders, "n": len(items), "decisiveness_one_order": round(sum(one) / len(one), 4)}
    if orders < 2:
        return {**out, "position_consistency": None, "position_consistency_ci": None,
                "decisiveness_all_orders": None, "at_chance": None, "note": NOT_MEASURED}
    agree = sum(len({_top(v) for v in it}) == 1 for it in items)
    lo, hi = wilson(agree, len(items))
    avg = [[sum(v[k] for v in it) / len(it) for k in range(len(it[0]))] for it in items]
    both = [max(v) - 1 / len(v) for v in avg]
    return {**out, "position_consistency": round(agree / len(items), 4),
            "position_consistency_ci": [round(lo, 4), round(hi, 4)],
            "decisiveness_all_orders": round(sum(both) / len(both), 4), "at_chance": at_chance(lo)}


def yes_no(p_yes_by_order: list[float]) -> list[list[float]]:
    """One yes/no (or A-better) question's item for :func:`judge_reliability`: p(yes) in
    each order as ``[p_yes, p_no]`` vectors."""
    return [[p, 1 - p] for p in p_yes_by_order]
