"""The PM score against the number of critique/revision rounds (the paper's Fig. 5).

The run's preference model scores each SL-CAI chain's first answer and the answer in
effect after every round (:func:`texts_after_rounds`); :func:`revision_effects` gives the
mean per round and each principle's effect with bootstrap intervals over prompts, and
:func:`pm_by_revision` writes them for the evaluate stage.
"""

from __future__ import annotations

import json
from pathlib import Path

from cai import seeds
from cai.io import read_jsonl, write_json, write_jsonl
from cai.evaluation.results import Revisions
from cai.judge_stats import wilson
from cai.layout import RunFolder
from cai.revision_loop import REVISED
from cai.stage import StageContext



def texts_after_rounds(chain: dict) -> list[str]:
    """The answer in effect after 0, 1, ..., R rounds of a critique/revision chain: the
    first answer, then after each round its revision when the round revised (status
    ``revised``), else the text before it: a skipped, empty or gate-rejected round keeps the
    previous answer, as the critique_revision stage does (a rejected round's ``revision``
    and its ``attempts`` are the texts it did *not* keep)."""
    texts = [chain.get("initial_response") or ""]
    for r in chain.get("rounds") or []:
        kept = r.get("status") == REVISED and isinstance(r.get("revision"), str)
        texts.append(r["revision"] if kept else texts[-1])
    return texts


def score_chain_texts(pm, chains: list[dict], batch_size: int = 8, progress=None) -> list[list[float]]:
    """Each chain's PM score after 0..R rounds (``pm.score_many(prompts, answers)``); a text
    that a chain keeps over several rounds is scored once."""
    jobs: list[tuple[list, str]] = []
    index: list[list[int]] = []
    for c in chains:
        seen: dict[str, int] = {}
        mine = []
        for text in texts_after_rounds(c):
            if text not in seen:
                seen[text] = len(jobs)
                jobs.append((c.get("messages") or c.get("prompt") or "", text))
            mine.append(seen[text])
        index.append(mine)
    scores: list[float] = []
    step = 8 * batch_size  # score_many sorts each chunk by length: long chunks pad less
    for k in range(0, len(jobs), step):
        chunk = jobs[k:k + step]
        scores += pm.score_many([j[0] for j in chunk], [j[1] for j in chunk], batch_size=batch_size)
        if progress:
            progress(len(chunk))
    return [[float(scores[j]) for j in mine] for mine in index]


def bootstrap_ratio_ci(clusters: list[tuple[float, int]], resamples: int, seed: int) -> tuple[float, float] | None:
    """95% percentile interval of ``sum(values) / count(values)``, resampling clusters (a
    prompt's ``(sum, count)``) with replacement: a prompt carries all of its values, as in
    :func:`bootstrap_elo`. None without resamples or clusters."""
    import numpy as np

    clusters = [c for c in clusters if c[1] > 0]
    if resamples <= 0 or not clusters:
        return None
    sums = np.array([c[0] for c in clusters], dtype=float)
    counts = np.array([c[1] for c in clusters], dtype=float)
    pick = np.random.default_rng(seed).integers(0, len(clusters), (resamples, len(clusters)))
    stats = sums[pick].sum(1) / counts[pick].sum(1)
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


#: Fewer prompts than this get no interval: a percentile bootstrap over 1-4 prompts only
#: re-shuffles the few values there are (one prompt gives [v, v]) and looks far surer than it is.
MIN_CI_PROMPTS = 5


def _with_ci(prefix: str, values: list[tuple[float, int]], resamples: int, seed: int, min_prompts: int) -> dict:
    n = sum(c for _, c in values)
    enough = sum(1 for _, c in values if c > 0) >= min_prompts
    ci = bootstrap_ratio_ci(values, resamples, seed) if enough else None
    return {prefix: round(sum(v for v, _ in values) / n, 6) if n else None,
            f"{prefix}_ci_low": round(ci[0], 6) if ci else None, f"{prefix}_ci_high": round(ci[1], 6) if ci else None}


def revision_effects(chains: list[dict], scores: list[list[float]], resamples: int, seed: int,
                     min_prompts: int = MIN_CI_PROMPTS) -> dict:
    """From each chain's PM scores after 0..R rounds (:func:`score_chain_texts`):

    * per round r: the mean score of the answers in effect (``mean``), the mean change
      from the first answer (``change``: the paired difference, which leaves out how
      hard each prompt is), each with a 95% bootstrap interval over prompts, and how many
      chains revised in round r;
    * per principle: the mean change its revisions cause, score after minus before the
      round, over the rounds it revised (``delta``), with a 95% bootstrap interval over
      prompts (a prompt carries all its rounds under the principle), how many rounds
      sampled it and how many of those revised.

    Intervals are None with fewer than ``min_prompts`` prompts behind a number.
    """
    depth = max((len(s) for s in scores), default=0)
    rounds = []
    for r in range(depth):
        have = [(c, s) for c, s in zip(chains, scores) if len(s) > r]
        revised = sum(1 for c, _ in have if r and (c.get("rounds") or [])[r - 1].get("status") == REVISED)
        rounds.append({"round": r, "chains": len(have), "revised": revised,
                       **_with_ci("mean", [(s[r], 1) for _, s in have], resamples, seed + r, min_prompts),
                       **_with_ci("change", [(s[r] - s[0], 1) for _, s in have], resamples, seed + r, min_prompts)})
    per: dict[str, dict] = {}
    for c, s in zip(chains, scores):
        mine: dict[str, list[float]] = {}
        for i, rnd in enumerate(c.get("rounds") or []):
            pid = str(rnd.get("principle_id"))
            d = per.setdefault(pid, {"sampled": 0, "clusters": []})
            d["sampled"] += 1
            if rnd.get("status") == REVISED and i + 1 < len(s):
                mine.setdefault(pid, []).append(s[i + 1] - s[i])
        for pid, deltas in mine.items():
            per[pid]["clusters"].append((sum(deltas), len(deltas)))
    principles = []
    for k, pid in enumerate(sorted(per)):
        d = per[pid]
        principles.append({"id": pid, "sampled": d["sampled"], "revised": sum(n for _, n in d["clusters"]),
                           "prompts": len(d["clusters"]),
                           **_with_ci("delta", d["clusters"], resamples, seed + seeds.REVISION_DELTA + k, min_prompts)})
    return {"chains": len(chains), "bootstrap": resamples, "min_ci_prompts": min_prompts, "rounds": rounds,
            "principles": principles}


def pm_heldout(run_dir: Path) -> dict | None:
    """The PM's held-out agreement with the AI labels (preference_model/metrics.json), with a
    Wilson interval; ``at_chance`` when that interval holds 0.5."""
    path = RunFolder(run_dir).path("preference_model", "metrics")
    try:
        after = (json.loads(path.read_text(encoding="utf-8")).get("test_after") or {}) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    acc, n = after.get("accuracy"), after.get("pairs")
    if not isinstance(acc, (int, float)) or not isinstance(n, int) or n <= 0:
        return None
    lo, hi = wilson(round(acc * n), n)
    return {"accuracy": acc, "pairs": n, "ci_low": round(lo, 4), "ci_high": round(hi, 4), "at_chance": lo <= 0.5 <= hi}


def pm_loader(ctx: StageContext):
    """Loads the run's preference model once, on first use, for both kinds of PM scores."""
    held = []

    def get():
        if not held:
            from cai.reward import RewardModel

            held.append(RewardModel.load(str(ctx.artifact("preference_model", "model", required=False)),
                                         device=ctx.cfg.engine.device))
        return held[0]

    return get, held.clear


def pm_by_revision(ctx: StageContext, load_pm=None) -> dict:
    """The paper's Fig. 5 for this run: the PM score of the SL-CAI chains' answers after
    0..R critique/revision rounds (``evaluate.revision_splits``, at most
    ``revision_max_chains`` per split), and each principle's effect. Writes
    ``revisions.json``, ``answers/revisions.jsonl``, ``revisions.png`` and
    ``revision_principles.png``; returns counts for the manifest (none without a PM, a
    finished critique_revision stage or chains, nor when no chain has a round:
    ``critique_revision.rounds=0`` leaves nothing to plot against the first answer)."""
    ev = ctx.cfg.evaluate
    pm_dir = ctx.artifact("preference_model", "model", required=False)
    if not (ev.preference_model and ev.revision_splits and (pm_dir / "config.json").is_file()
            and ctx.finished("critique_revision")):
        return {}
    chains = []
    for split in ev.revision_splits:
        path = ctx.artifact("critique_revision", "chains", split=split)
        if path.is_file():
            ctx.record_input(f"critique_revision/chains/{split}", path)
            chains += [{**c, "split": split} for c in read_jsonl(path)[: ev.revision_max_chains]]
    if not any(c.get("rounds") for c in chains):
        if chains:
            ctx.log("[evaluate] the SL-CAI chains have no revision rounds (critique_revision.rounds=0): "
                    "no PM score by revision")
        return {}
    load_pm = (load_pm or pm_loader(ctx))[0]
    pm = load_pm()
    texts = sum(len(set(texts_after_rounds(c))) for c in chains)
    with ctx.progress(texts, "PM scores of revisions") as update:
        scores = score_chain_texts(pm, chains, progress=update)
    del pm
    result = {"schema": 1, "splits": list(ev.revision_splits), "max_chains": ev.revision_max_chains,
              "pm_heldout": pm_heldout(ctx.run_dir),
              **revision_effects(chains, scores, ev.bootstrap, ctx.cfg.seed)}
    revisions = Revisions.from_json(result)
    write_json(ctx.output("revisions"), revisions.to_json())
    write_jsonl(ctx.output("answers", name="revisions"), [
        {"id": c.get("id"), "split": c["split"], "principle_ids": [r.get("principle_id") for r in c.get("rounds") or []],
         "statuses": [r.get("status") for r in c.get("rounds") or []], "pm_scores": [round(x, 6) for x in s]}
        for c, s in zip(chains, scores)])
    from cai.plots import plot_revision_principles, plot_revisions

    plot_revisions(ctx.out / "revisions.png", revisions)
    plot_revision_principles(ctx.out / "revision_principles.png", revisions)
    return {"revision_chains": len(chains), "revision_pm_change": revisions.rounds[-1].change}
