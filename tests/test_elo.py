"""Bradley-Terry strengths, Elo and their bootstrap intervals (cai.evaluation.elo), on
tables worked by hand."""

from __future__ import annotations

import math

import pytest

from cai.evaluation.elo import ELO_SCALE, bootstrap_elo, elo_table, fit_bradley_terry


def test_bradley_terry_by_hand():
    """Two models, model 1 wins every game with probability 0.75. The soft-label likelihood
    s log sig(d) + (1-s) log sig(-d) peaks where sig(d) = 0.75, i.e. d = ln 3, which is
    400 log10(3) = 190.85 Elo. A chain 0 > 1 > 2 at 0.75 each (no direct 0-2 game) puts
    model 2 at -2 ln 3 without a prior."""
    theta = fit_bradley_terry(2, [(1, 0, 0.75)] * 4, prior=0.0)
    assert theta[0] == 0.0
    assert theta[1] == pytest.approx(math.log(3))
    assert theta[1] * ELO_SCALE == pytest.approx(400 * math.log10(3))
    chain = fit_bradley_terry(3, [(0, 1, 0.75), (1, 2, 0.75)], prior=0.0)
    assert list(chain) == pytest.approx([0.0, -math.log(3), -2 * math.log(3)])
    # Order of a game does not matter: (i, j, s) is the same game as (j, i, 1 - s).
    assert fit_bradley_terry(2, [(0, 1, 0.25)] * 4, prior=0.0)[1] == pytest.approx(math.log(3))


def test_prior_keeps_a_clean_sweep_finite():
    theta = fit_bradley_terry(2, [(1, 0, 1.0)] * 10)
    assert 3 < theta[1] < 20  # without the prior the maximum is at infinity


def test_bootstrap_intervals_cover_the_fit_and_are_seeded():
    games = {f"p{k}": [(1, 0, 0.6 + 0.03 * k)] for k in range(10)}
    table = elo_table(["initial", "sl-cai"], games, resamples=200, seed=0)
    r = table["ratings"]["sl-cai"]
    assert r["ci_low"] < r["elo"] < r["ci_high"] and r["ci_low"] > 0
    assert table["ratings"]["initial"] == {"elo": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert table["win_rate"]["sl-cai"]["initial"] == pytest.approx(0.735)
    assert table["win_rate"]["initial"]["sl-cai"] == pytest.approx(0.265)
    assert elo_table(["initial", "sl-cai"], games, resamples=200, seed=0) == table
    # every prompt the same: no spread at all
    flat = elo_table(["a", "b"], {f"p{k}": [(1, 0, 0.75)] for k in range(5)}, resamples=50, seed=1)
    assert flat["ratings"]["b"]["ci_low"] == pytest.approx(flat["ratings"]["b"]["ci_high"], abs=1e-6)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_a_full_table_of_exact_win_probabilities_gives_back_the_strengths():
    """Strengths 0, ln 2, ln 4 (odds 1 : 2 : 4). Every pair meets once with the outcome
    the model predicts: 1 beats 0 with 2/3, 2 beats 1 with 2/3, 2 beats 0 with 4/5. The
    soft likelihood's gradient is zero there, so the fit without a prior returns exactly
    those strengths: 400 log10(2) = 120.41 and 400 log10(4) = 240.82 Elo."""
    games = [(1, 0, 2 / 3), (2, 1, 2 / 3), (2, 0, 4 / 5)]
    theta = fit_bradley_terry(3, games, prior=0.0)
    assert list(theta) == pytest.approx([0.0, math.log(2), math.log(4)])
    assert list(theta * ELO_SCALE) == pytest.approx([0.0, 120.412, 240.824], abs=1e-3)
    # The anchor moves the zero, not the gaps.
    assert list(fit_bradley_terry(3, games, prior=0.0, anchor=2)) == pytest.approx(
        [-math.log(4), -math.log(2), 0.0])


def test_the_prior_balances_a_clean_sweep_at_a_worked_point():
    """Model 1 wins 10 of 10 games outright. With the Gaussian prior (0.01) on both
    strengths the optimum is symmetric, t1 = -t0 = d/2, where the gradient in t1 is zero:
    10 (1 - sig(d)) = 0.01 d / 2, i.e. about 10 e^-d = 0.005 d, whose root is d = 5.83
    (e^-5.83 = 0.00294 = 0.005 x 5.83 / 10; bisection here finds it exactly). So model 1 sits
    5.83 natural-log units, 1013 Elo, above model 0: far, but finite."""
    lo, hi = 0.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 10 * (1 - _sig(mid)) - 0.005 * mid > 0 else (lo, mid)
    theta = fit_bradley_terry(2, [(1, 0, 1.0)] * 10, prior=0.01)
    assert theta[1] == pytest.approx(lo, rel=1e-6)
    assert theta[1] == pytest.approx(5.834, abs=1e-3)
    assert theta[1] * ELO_SCALE == pytest.approx(1013.5, abs=0.1)


def test_win_rates_read_a_game_from_either_side():
    """Two prompts: a beats b with 0.75 on one, b beats a with 0.75 on the other (the game
    written (1, 0, 0.75)). Each side's win rate is (0.75 + 0.25) / 2 = 0.5 and both Elos 0."""
    table = elo_table(["a", "b"], {"p1": [(0, 1, 0.75)], "p2": [(1, 0, 0.75)]}, resamples=0, seed=0)
    assert table["win_rate"] == {"a": {"b": 0.5}, "b": {"a": 0.5}}
    assert table["ratings"]["b"]["elo"] == pytest.approx(0.0, abs=1e-9)
    assert table["ratings"]["b"]["ci_low"] is None and table["ratings"]["b"]["ci_high"] is None
    assert (table["comparisons"], table["prompts"], table["bootstrap"]) == (2, 2, 0)


def test_no_games_and_no_resamples():
    assert list(fit_bradley_terry(3, [])) == [0.0, 0.0, 0.0]
    nan = bootstrap_elo(2, {}, resamples=100, seed=0)
    assert len(nan) == 2 and all(math.isnan(x) for pair in nan for x in pair)
    assert all(math.isnan(x) for pair in bootstrap_elo(2, {"p": [(1, 0, 0.7)]}, 0, 0) for x in pair)


def test_the_anchor_design_recovers_known_strengths_with_intervals_that_cover_them():
    """Thirteen models with known strengths (natural-log units), the first three the anchors:
    the anchors meet each other and the ten others meet the anchors only (33 of 78 pairs).
    On each of P = 100 prompts every pair of the design plays one soft game, the mean of two
    draws (the two orders) of a coin with p = sig(t_a - t_b), so E[s] = p and the soft
    likelihood's score is unbiased. A non-anchor model's standard error is then about
    1 / sqrt(2 P sum p(1 - p)) over its three anchors: 16-18 Elo here (p(1 - p) 0.12-0.25).
    The fit must be within 60 Elo (over 3 standard errors) of every strength, also for the
    gap between two models that never met (inferred through the anchors). A 95% interval
    misses about 0.6 of 12; we allow two misses (three or more: 2% under nominal coverage)."""
    import numpy as np

    from cai.evaluation.pairwise import comparison_pairs

    names = ["initial", "sl-cai", "dpo"] + [f"x{k}" for k in range(10)]
    truth = np.array([0.0, 0.4, -0.3, 1.2, -1.0, 0.7, 0.1, -0.5, 1.5, -1.4, 0.3, 0.9, -0.2])
    pairs = comparison_pairs(names, names[:3])
    assert len(pairs) == 3 + 10 * 3
    rng = np.random.default_rng(0)
    games = {f"p{k}": [(a, b, rng.binomial(2, _sig(truth[a] - truth[b])) / 2) for a, b in pairs] for k in range(100)}
    table = elo_table(names, games, resamples=200, seed=0)
    elo = {n: table["ratings"][n]["elo"] for n in names}
    want = {n: float(t * ELO_SCALE) for n, t in zip(names, truth)}
    assert all(abs(elo[n] - want[n]) < 60 for n in names), {n: round(elo[n] - want[n]) for n in names}
    assert abs((elo["x5"] - elo["x6"]) - (want["x5"] - want["x6"])) < 60  # never compared head to head
    assert "x6" not in table["win_rate"]["x5"]
    covered = [table["ratings"][n]["ci_low"] <= want[n] <= table["ratings"][n]["ci_high"] for n in names[1:]]
    assert sum(covered) >= 10, covered
