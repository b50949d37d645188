"""Bradley-Terry strengths and Elo from soft pairwise outcomes, with bootstrap intervals.

The judge's comparisons give soft outcomes: ``(i, j, s)`` says model i beat model j with
probability ``s``. :func:`fit_bradley_terry` fits strengths to them, :func:`bootstrap_elo`
resamples prompts for 95% intervals and :func:`elo_table` puts both in the layout of
``results.json["elo"][dimension]``. numpy only: no torch, no engine.
"""

from __future__ import annotations

import itertools
import math

ELO_SCALE = 400.0 / math.log(10.0)  # 400 Elo points = odds of 10:1


def fit_bradley_terry(n: int, games: list[tuple[int, int, float]], prior: float = 0.01, anchor: int = 0,
                      iters: int = 100):
    """Strengths ``theta`` (natural-log odds units) from soft outcomes, ``theta[anchor] = 0``.

    Each game ``(i, j, s)`` says model i beat model j with probability ``s`` (a soft label
    in [0, 1]). We maximise ``sum s log sig(t_i - t_j) + (1 - s) log sig(t_j - t_i)
    - prior/2 * sum t^2`` by Newton's method: the soft cross-entropy is concave, and the
    weak Gaussian prior keeps the strengths finite when one model wins every game outright
    (a hard 1.0) and fixes the overall offset. Elo is ``theta * 400 / ln 10``.
    """
    import numpy as np

    theta = np.zeros(n)
    if not games:
        return theta
    i = np.array([g[0] for g in games])
    j = np.array([g[1] for g in games])
    s = np.array([g[2] for g in games], dtype=float)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(theta[i] - theta[j])))
        r = s - p
        grad = np.bincount(i, r, n) - np.bincount(j, r, n) - prior * theta
        w = p * (1 - p)
        hess = np.zeros((n, n))
        np.add.at(hess, (i, i), -w)
        np.add.at(hess, (j, j), -w)
        np.add.at(hess, (i, j), w)
        np.add.at(hess, (j, i), w)
        hess -= (prior + 1e-9) * np.eye(n)
        step = np.linalg.solve(hess, grad)
        theta = theta - step
        if np.max(np.abs(step)) < 1e-10:
            break
    return theta - theta[anchor]


def bootstrap_elo(n: int, games_by_prompt: dict[str, list[tuple[int, int, float]]], resamples: int, seed: int,
                  prior: float = 0.01) -> list[tuple[float, float]]:
    """95% percentile intervals of each model's Elo, resampling prompts with replacement
    (a prompt carries all of its comparisons, since they share the prompt's difficulty)."""
    import numpy as np

    keys = sorted(games_by_prompt)
    if resamples <= 0 or not keys:
        return [(float("nan"), float("nan"))] * n
    rng = np.random.default_rng(seed)
    fits = []
    for _ in range(resamples):
        pick = rng.integers(0, len(keys), len(keys))
        games = [g for k in pick for g in games_by_prompt[keys[k]]]
        fits.append(fit_bradley_terry(n, games, prior) * ELO_SCALE)
    arr = np.array(fits)
    lo, hi = np.percentile(arr, 2.5, axis=0), np.percentile(arr, 97.5, axis=0)
    return [(float(a), float(b)) for a, b in zip(lo, hi)]


def elo_table(names: list[str], games_by_prompt: dict, resamples: int, seed: int) -> dict:
    """Elo (relative to ``names[0]``), its interval, and the pairwise win rates."""
    games = [g for gs in games_by_prompt.values() for g in gs]
    theta = fit_bradley_terry(len(names), games)
    cis = bootstrap_elo(len(names), games_by_prompt, resamples, seed)
    win: dict[str, dict[str, float]] = {a: {} for a in names}
    for a, b in itertools.permutations(range(len(names)), 2):
        ss = [s if (i, j) == (a, b) else 1 - s for i, j, s in games if {i, j} == {a, b}]
        if ss:
            win[names[a]][names[b]] = round(sum(ss) / len(ss), 4)
    return {
        "ratings": {
            name: {"elo": round(float(theta[k] * ELO_SCALE), 2),
                   "ci_low": None if math.isnan(cis[k][0]) else round(cis[k][0], 2),
                   "ci_high": None if math.isnan(cis[k][1]) else round(cis[k][1], 2)}
            for k, name in enumerate(names)
        },
        "win_rate": win,
        "comparisons": len(games),
        "prompts": len(games_by_prompt),
        "bootstrap": resamples,
    }
