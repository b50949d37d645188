"""Every plot cai draws (PNG, matplotlib's Agg backend), in one module.

* training curves (:func:`plot_curve`: loss, reward, KL per optimizer step);
* the preference model's reliability diagram and reward histograms;
* the evaluation: Elo with intervals, harmfulness distributions and refusal rates,
  drawn from ``evaluate/results.json`` (a :class:`cai.evaluation.results.Results`);
* the PM score against the number of revisions and per principle (the paper's Fig. 5),
  drawn from ``evaluate/revisions.json`` (a ``Revisions``);
* the harmlessness-helpfulness frontier of the policies kept along training (the paper's
  Fig. 2), drawn from ``evaluate/frontier.json`` (a ``Frontier``).

Each function writes one file and closes its figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the records are only annotations here: plotting needs no import of them
    from cai.evaluation.results import Frontier, Rating, Results, Revisions


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def plot_curve(path: Path, series: dict[str, list[tuple[int, float]]], title: str, ylabel: str = "loss") -> None:
    """One line per named series of (optimizer step, value) points."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, points in series.items():
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=name, marker="." if len(points) < 30 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_calibration(path: Path, q: list[float], p: list[float], title: str) -> None:
    """Reliability diagram: the PM's probability against the mean AI label, per bin."""
    from cai.reward import reliability

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    bins = reliability(q, p)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect calibration")
    ax.plot([b["mean_q"] for b in bins], [b["mean_p"] for b in bins], marker="o", label="preference model")
    for b in bins:
        ax.annotate(str(b["count"]), (b["mean_q"], b["mean_p"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("PM probability sigmoid(r_chosen - r_rejected)")
    ax.set_ylabel("mean AI label p_chosen")
    ax.set_title(title)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_scores(path: Path, scores: list[tuple[float, float]], title: str) -> None:
    """Histograms of the rewards of chosen and rejected answers."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([s[0] for s in scores], bins=20, alpha=0.6, label="chosen")
    ax.hist([s[1] for s in scores], bins=20, alpha=0.6, label="rejected")
    ax.set_xlabel("reward")
    ax.set_ylabel("answers")
    ax.set_title(title)
    ax.legend()
    _save(fig, path)


def _yerr(points) -> list[list[float]]:
    """Error bar lengths below and above each ``(value, ci_low, ci_high)`` (0 where there is
    no interval)."""
    return [[v - lo if lo is not None else 0.0 for v, lo, _ in points],
            [hi - v if hi is not None else 0.0 for v, _, hi in points]]


def _rating_err(ratings: list[Rating]) -> list[list[float]]:
    """Error bar lengths of Elo ratings from their 95% intervals."""
    return _yerr([(r.elo, r.ci_low, r.ci_high) for r in ratings])


def plot_elo(path: Path, results: Results) -> None:
    """One point per model and dimension, with its bootstrap 95% interval as an error bar."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    names = list(results.models)
    dimensions = (("harmlessness", results.elo.harmlessness, "o"), ("helpfulness", results.elo.helpfulness, "s"))
    for k, (dimension, table, marker) in enumerate(dimensions):
        if not table:
            continue
        xs = [n + (k - 0.5) * 0.15 for n in range(len(names))]
        ratings = [table.ratings[m] for m in names]
        ax.errorbar(xs, [r.elo for r in ratings], yerr=_rating_err(ratings), fmt=marker, capsize=4,
                    label=f"{dimension} ({table.prompts} prompts)")
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("Elo (initial model = 0)")
    ax.set_title("Elo from pairwise judge comparisons (95% bootstrap CI)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def plot_harmfulness(path: Path, results: Results) -> None:
    """Per model, the mean judge probability of each rating 0-4 (stacked), and the mean."""
    plt = _plt()
    names = list(results.models)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bottom = [0.0] * len(names)
    colours = ["#2e7d32", "#9ccc65", "#fdd835", "#fb8c00", "#c62828"]
    for k in range(5):
        vals = [((results.harmfulness[m].mean_probs or [0] * 5)[k] or 0.0) for m in names]
        ax.bar(names, vals, bottom=bottom, color=colours[k], label=str(k))
        bottom = [b + v for b, v in zip(bottom, vals)]
    for n, m in enumerate(names):
        mean = results.harmfulness[m].mean
        if mean is not None:
            ax.text(n, 1.02, f"mean {mean:.2f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("mean judge probability")
    ax.set_title("Harmfulness 0-4 of red-team answers")
    ax.legend(title="rating", fontsize=7, title_fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
    _save(fig, path)


def plot_refusals(path: Path, results: Results) -> None:
    """The judge's mean p(refusal) (a probability, not a rate) beside the phrase list's
    refusal rate (a share of answers, with its Wilson 95% interval), on benign and red-team prompts."""
    from cai.judge_stats import share_ci

    plt = _plt()
    names = list(results.models)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), sharey=True)
    width = 0.38
    for ax, s, title in ((axes[0], "benign", "benign prompts (over-refusal)"), (axes[1], "red_team", "red-team prompts")):
        blocks = [results.refusal[m].named()[s] for m in names]
        judge = [x.judge or 0.0 for x in blocks]
        phrases = [x.phrases or 0.0 for x in blocks]
        cis = [share_ci(x.phrases, x.n)["ci"] for x in blocks]
        err = _yerr([(v, c[0], c[1]) if c else (v, None, None) for v, c in zip(phrases, cis)])
        for k, (vals, label, yerr) in enumerate(((judge, "judge: mean p(refusal)", None),
                                                 (phrases, "refusal phrases: rate [95% CI]", err))):
            ax.bar([n + (k - 0.5) * width for n in range(len(names))], vals, width, label=label, yerr=yerr, capsize=3)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("mean p(refusal) / share of answers")
    axes[0].legend(fontsize=8)
    _save(fig, path)


def _label(text, width: int = 40) -> str:
    """A data string (a principle id) as a plain matplotlib label: ``$`` escaped, so that
    it is never parsed as mathtext, and cut to ``width`` characters."""
    text = str(text)
    text = text if len(text) <= width else text[: width - 1] + "\u2026"
    return text.replace("$", r"\$")


def _chance_note(rev: Revisions) -> str:
    h = rev.pm_heldout
    if h is not None and h.at_chance:
        return f"\nPM held-out accuracy {h.accuracy:.2f} on {h.pairs} pairs: not distinguishable from chance"
    return ""


def plot_revisions(path: Path, rev: Revisions) -> None:
    """The mean PM score of the answer in effect after 0..R revision rounds, and its mean
    change from the first answer, each with its 95% bootstrap interval over prompts."""
    plt = _plt()
    rows = [r for r in rev.rounds if r.mean is not None]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    x = [r.round for r in rows]
    axes[0].errorbar(x, [r.mean for r in rows], yerr=_yerr([(r.mean, r.mean_ci_low, r.mean_ci_high) for r in rows]),
                     marker="o", capsize=4)
    axes[0].set_ylabel("mean PM score")
    axes[0].set_title("PM score of the answer", fontsize=10)
    axes[1].errorbar(x, [r.change for r in rows],
                     yerr=_yerr([(r.change, r.change_ci_low, r.change_ci_high) for r in rows]), marker="o",
                     capsize=4, color="C1")
    axes[1].axhline(0, color="grey", lw=0.8, ls="--")
    axes[1].set_ylabel("mean change from the first answer")
    axes[1].set_title("paired change (same prompts)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("critique/revision rounds (0: first answer)")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    fig.suptitle(f"PM score vs number of revisions ({rev.chains or 0} chains, "
                 f"{'+'.join(rev.splits)}; 95% bootstrap CI){_chance_note(rev)}", fontsize=10)
    _save(fig, path)


def plot_revision_principles(path: Path, rev: Revisions) -> None:
    """Per principle, the mean change in PM score its revisions cause (after minus before
    the round), with its 95% bootstrap interval and the number of revisions."""
    plt = _plt()
    rows = sorted((p for p in rev.principles if p.delta is not None), key=lambda p: p.delta)
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.32 * max(len(rows), 1)))
    ys = list(range(len(rows)))
    # pale: too few prompts for an interval (revision_effects' min_prompts)
    ax.barh(ys, [p.delta for p in rows], xerr=_yerr([(p.delta, p.delta_ci_low, p.delta_ci_high) for p in rows]),
            capsize=3, color=[("#2e7d32" if p.delta >= 0 else "#c62828")
                              + ("ff" if p.delta_ci_low is not None else "55") for p in rows])
    ax.set_yticks(ys, [f"{_label(p.id)} (n={p.revised})" for p in rows], fontsize=8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel("mean PM score change per revision (after - before)")
    few = f"; pale: < {rev.min_ci_prompts} prompts, no CI" if rev.min_ci_prompts else ""
    ax.set_title(f"Effect of each principle's revisions (95% bootstrap CI{few}){_chance_note(rev)}", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    _save(fig, path)


def plot_frontier(path: Path, frontier: Frontier) -> None:
    """The harmlessness-helpfulness frontier (the paper's Fig. 2): every frontier point's
    harmlessness Elo against its helpfulness Elo, each against the initial model alone, with
    95% bootstrap intervals on both axes; one line per stage in step order (from SL-CAI when
    the stage started there), the initial model and SL-CAI as reference points."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ok = lambda e: e is not None and e.harmlessness and e.helpfulness  # noqa: E731
    ref = {n: e for n, e in frontier.reference.items() if ok(e)}
    for (name, e), (marker, colour) in zip(ref.items(), (("s", "black"), ("D", "grey"))):
        ax.errorbar([e.helpfulness.elo], [e.harmlessness.elo], xerr=_rating_err([e.helpfulness]),
                    yerr=_rating_err([e.harmlessness]), fmt=marker, color=colour, capsize=3, ms=7, label=_label(name))
    for k, stage in enumerate(dict.fromkeys(p.stage for p in frontier.points)):
        kept = [p for p in frontier.points if p.stage == stage and ok(p.scores)]
        if not kept:
            continue
        pts = [p.scores for p in kept]
        start = ref.get(kept[0].start or "")
        line = ([start] if start else []) + pts
        colour = f"C{k}"
        ax.plot([e.helpfulness.elo for e in line], [e.harmlessness.elo for e in line], "-", color=colour, alpha=0.6)
        ax.errorbar([e.helpfulness.elo for e in pts], [e.harmlessness.elo for e in pts],
                    xerr=_rating_err([e.helpfulness for e in pts]), yerr=_rating_err([e.harmlessness for e in pts]),
                    fmt="o", color=colour, capsize=3, label=_label(stage))
        for p in kept:
            ax.annotate(str(p.step), (p.scores.helpfulness.elo, p.scores.harmlessness.elo), fontsize=7,
                        xytext=(4, 4), textcoords="offset points", color=colour)
    ax.axhline(0, color="grey", lw=0.6, ls="--")
    ax.axvline(0, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("helpfulness Elo (against the initial model)")
    ax.set_ylabel("harmlessness Elo (against the initial model)")
    ax.set_title("Harmlessness vs helpfulness along training\n(labels: optimizer step; 95% bootstrap CI)", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
