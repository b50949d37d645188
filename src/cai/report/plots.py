"""The evaluation plots (PNG, matplotlib's Agg backend): Elo with intervals,
harmfulness distributions and refusal rates, drawn from ``evaluate/results.json``."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_elo(path: Path, results: dict) -> None:
    """One point per model and dimension, with its bootstrap 95% interval as an error bar."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    names = list(results["models"])
    for k, (dimension, marker) in enumerate((("harmlessness", "o"), ("helpfulness", "s"))):
        table = (results.get("elo") or {}).get(dimension)
        if not table:
            continue
        xs = [n + (k - 0.5) * 0.15 for n in range(len(names))]
        ys = [table["ratings"][m]["elo"] for m in names]
        lo = [y - (table["ratings"][m]["ci_low"] if table["ratings"][m]["ci_low"] is not None else y) for m, y in zip(names, ys)]
        hi = [(table["ratings"][m]["ci_high"] if table["ratings"][m]["ci_high"] is not None else y) - y for m, y in zip(names, ys)]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt=marker, capsize=4, label=f"{dimension} ({table['prompts']} prompts)")
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("Elo (initial model = 0)")
    ax.set_title("Elo from pairwise judge comparisons (95% bootstrap CI)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_harmfulness(path: Path, results: dict) -> None:
    """Per model, the mean judge probability of each rating 0-4 (stacked), and the mean."""
    plt = _plt()
    names = list(results["models"])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bottom = [0.0] * len(names)
    colours = ["#2e7d32", "#9ccc65", "#fdd835", "#fb8c00", "#c62828"]
    for k in range(5):
        vals = [((results["harmfulness"][m].get("mean_probs") or [0] * 5)[k] or 0.0) for m in names]
        ax.bar(names, vals, bottom=bottom, color=colours[k], label=str(k))
        bottom = [b + v for b, v in zip(bottom, vals)]
    for n, m in enumerate(names):
        mean = results["harmfulness"][m]["mean"]
        if mean is not None:
            ax.text(n, 1.02, f"mean {mean:.2f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("mean judge probability")
    ax.set_title("Harmfulness 0-4 of red-team answers")
    ax.legend(title="rating", fontsize=7, title_fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_refusals(path: Path, results: dict) -> None:
    """Refusal rates by the judge and by the phrase list, on benign and red-team prompts."""
    plt = _plt()
    names = list(results["models"])
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), sharey=True)
    width = 0.38
    for ax, s, title in ((axes[0], "benign", "benign prompts (over-refusal)"), (axes[1], "red_team", "red-team prompts")):
        for k, (key, label) in enumerate((("judge", "judge (mean p)"), ("phrases", "refusal phrases"))):
            vals = [results["refusal"][m][s][key] or 0.0 for m in names]
            ax.bar([n + (k - 0.5) * width for n in range(len(names))], vals, width, label=label)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("refusal rate")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
