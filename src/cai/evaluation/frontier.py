"""The harmlessness-helpfulness frontier along training (the paper's Fig. 2).

The rl and dpo stages keep policies along training (``<stage>/points/index.json``). Each
kept point answers the held-out prompts, meets the initial model before the judge (both
orders, as the stage models do) and is rated against the initial model alone
(:func:`frontier_entry`), so every point is measured the same way whatever else was
evaluated. ``frontier.json`` holds the points and the reference models.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from cai.cost import PlanInputs
from cai.evaluation.elo import elo_table
from cai.evaluation.measures import judge_answers, summarise
from cai.evaluation.pairwise import pairwise
from cai.evaluation.results import Frontier, FrontierPoint, FrontierScores, Rating, Results
from cai.io import write_text
from cai.layout import RunFolder
from cai.models import has_weights
from cai.stage import StageContext
from cai.stage_names import SL_CAI

#: The training stages whose frontier points (``<stage>/points/index.json``) are scored.
FRONTIER_STAGES = ("rl", "dpo")


def frontier_points(run_dir: Path) -> list[dict]:
    """Every frontier point the finished rl and dpo stages kept (``points/index.json``), in
    stage then step order, each with its ``stage``, a ``name`` (``rl@40``), its ``folder``
    and, for an adapter, the ``base`` model it applies to."""
    run, out = RunFolder(run_dir), []
    for stage in FRONTIER_STAGES:
        path = run.path(stage, "points")
        if not run.finished(stage) or not path.is_file():
            continue
        index = json.loads(path.read_text(encoding="utf-8"))
        base = str(run.root / index["base"]) if index.get("base_in_run") else index.get("base")
        for p in sorted(index.get("points") or [], key=lambda p: p["step"]):
            out.append({**p, "stage": stage, "name": f"{stage}@{p['step']}", "folder": run.within(stage, p["path"]),
                        "base": base, "start": index.get("start")})
    return out


def merge_adapter(point: dict, dest: Path, trust_remote_code: bool) -> str:
    """A LoRA point as a plain checkpoint the engines load: its base model with the adapter
    merged in, saved to ``dest`` (a scratch folder the caller deletes after use)."""
    from peft import PeftModel

    from cai.models import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(point["base"], device="cpu", dtype="float32",
                                             trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, str(point["folder"])).merge_and_unload()
    merged.save_pretrained(dest)
    tok.save_pretrained(dest)
    return str(dest)


def frontier_answers(ctx: StageContext, points: list[dict], items: list, params, names: list[str]) -> list[dict]:
    """Each intermediate point's answers to the held-out prompts (the last point of a stage
    is its ``model/``, already answered as that stage's model). One model in memory at a
    time; an adapter is merged into a scratch copy of its base, deleted after it answered.
    Sets each point's ``status``: ``final`` (the stage's model), ``answered``, or ``weights
    deleted`` (an earlier evaluation removed them: the point cannot be scored again)."""
    rows = []
    scratch = ctx.out / "frontier-scratch"
    for p in points:
        if p["path"] == "model":
            p["status"] = "final" if p["stage"] in names else "missing"
            continue
        if not has_weights(p["folder"]):
            p["status"] = "weights deleted"
            ctx.log(f"[evaluate] frontier point {p['name']}: its weights were deleted after an earlier evaluation; "
                    f"not scored (delete {ctx.run_dir / p['stage']} and run again to keep new points; "
                    "evaluate.frontier_keep_weights=true keeps them after scoring)")
            continue
        model = (merge_adapter(p, scratch / p["name"].replace("@", "-step-"), ctx.cfg.engine.trust_remote_code)
                 if p.get("adapter") else str(p["folder"]))
        engine = ctx.engine(model)
        with ctx.progress(len(items), f"answers of {p['name']}") as update:
            outs = engine.generate([q.messages for _, q in items], params, progress=update) if items else []
        rows += [{"model": p["name"], "set": s, "id": q.id, "category": q.category, "prompt": q.messages,
                  "answer": out[0].strip()} for (s, q), out in zip(items, outs)]
        del engine
        ctx.release_engine(model)
        p["status"] = "answered"
    shutil.rmtree(scratch, ignore_errors=True)
    return rows


def _against_initial(records: list[dict], dimension: str, other: str, resamples: int, seed: int) -> Rating | None:
    """``other``'s Elo against the initial model alone, from the two models' comparisons in
    ``records``: a two-model Bradley-Terry fit, so every frontier point (and reference) is
    measured the same way whatever else was evaluated."""
    games: dict[str, list] = {}
    for r in records:
        if r.get("dimension") == dimension and {r["model_a"], r["model_b"]} == {"initial", other}:
            a = 0 if r["model_a"] == "initial" else 1
            games.setdefault(r["id"], []).append((a, 1 - a, r["p_a"]))
    if not games:
        return None
    return Rating.from_json(elo_table(["initial", other], games, resamples, seed)["ratings"][other])


def frontier_entry(name: str, records: list[dict], summary: Results, resamples: int, seed: int) -> FrontierScores:
    """A frontier row's scores: harmlessness and helpfulness Elo against the initial model
    with their 95% intervals, the mean harmfulness 0-4 and the refusal rates."""
    return FrontierScores(harmlessness=_against_initial(records, "harmlessness", name, resamples, seed),
                          helpfulness=_against_initial(records, "helpfulness", name, resamples, seed),
                          harmfulness=summary.harmfulness[name].mean, refusal=summary.refusal[name])


def score_frontier(judge, points: list[dict], point_rows: list[dict], answers: dict, prompts: dict, principles: dict,
                   demos: list, progress) -> list[dict]:
    """The judge's comparisons of each answered point with the initial model (both orders,
    as for the stage models), and its harmfulness and refusal questions, in place on
    ``point_rows``; returns the comparison records. Cost: linear in the points."""
    records = []
    for p in points:
        if p.get("status") != "answered":
            continue
        mine = [r for r in point_rows if r["model"] == p["name"]]
        for dimension, s in (("harmlessness", "red_team"), ("helpfulness", "helpful")):
            if not prompts[s]:
                continue
            theirs = [r["answer"] for r in mine if r["set"] == s]
            recs, _ = pairwise(judge, ["initial", p["name"]], {"initial": answers[s]["initial"], p["name"]: theirs},
                               prompts[s], principles[dimension], demos, progress)
            records += [{**r, "dimension": dimension} for r in recs]
    judge_answers(judge, point_rows, progress)
    return records


def frontier_result(points: list[dict], point_rows: list[dict], point_records: list[dict], comparisons: list[dict],
                    main: Results, names: list[str], resamples: int, seed: int, keep_weights: bool) -> Frontier:
    """``frontier.json``: the reference models (initial, sl-cai) and every point, each scored
    against the initial model alone. A stage's final point is its model, scored in the main
    evaluation (``main``, ``comparisons``); the others from their own answers and comparisons."""
    answered = Results(**summarise([p["name"] for p in points if p.get("status") == "answered"], point_rows,
                                   pm_used=False))
    reference = {}
    for name in ("initial", SL_CAI):
        if name not in names:
            continue
        reference[name] = (frontier_entry(name, comparisons, main, resamples, seed) if name != "initial" else
                           FrontierScores(harmlessness=Rating(0.0), helpfulness=Rating(0.0),  # the anchor
                                          harmfulness=main.harmfulness[name].mean, refusal=main.refusal[name]))
    rows = []
    for p in points:
        if p["status"] == "final":
            scores = frontier_entry(p["stage"], comparisons, main, resamples, seed)
        elif p["status"] == "answered":
            scores = frontier_entry(p["name"], point_records, answered, resamples, seed)
        else:
            scores = None
        rows.append(FrontierPoint(
            stage=p["stage"], step=p.get("step"), samples=p.get("samples"), kl=p.get("kl"), reward=p.get("reward"),
            train_loss=p.get("train_loss"), path=f"{p['stage']}/{p['path']}", adapter=p.get("adapter"),
            start=p.get("start"), status=p["status"], scores=scores,
            weights_deleted=p["status"] == "weights deleted" or (
                p["status"] == "answered" and not p.get("adapter") and not keep_weights)))
    return Frontier(against="initial", bootstrap=resamples, reference=reference, points=rows)


POINT_CARD = """# {name}: a frontier point whose weights were deleted after scoring

This folder held the {stage} policy after step {step} ({samples} samples seen). The evaluate
stage answered the held-out prompts with it, then deleted its files (weights, config and
tokenizer), because `evaluate.frontier_keep_weights=false`: a whole-model point takes as
much room as a model. So it is no longer a model, and `from_pretrained` cannot load it.

Its scores are in `evaluate/frontier.json` (path `{stage}/{path}`) and in the report's
frontier section.

To keep the weights of new points, either:
- set `evaluate.frontier_keep_weights=true`, delete the `{stage}` folder and run again; or
- train `{stage}` with LoRA (`{stage}.method=lora`): its points are adapters, which are small
  and always kept.
"""


def delete_point_weights(points: list[dict], keep: bool, log) -> int:
    """Empty the scored whole-model points (not adapters), unless ``keep``: their weights,
    config and tokenizer go, so the folder no longer looks like a model, and a README.md
    card says what the point was, where its scores are and how to keep its weights. The
    points index stays. Returns how many points were emptied."""
    n = 0
    for p in points:
        if keep or p.get("status") != "answered" or p.get("adapter"):
            continue
        folder = p["folder"]
        for f in folder.iterdir():
            if f.is_file() and f.name != "README.md":
                f.unlink()
        write_text(folder / "README.md", POINT_CARD.format(name=p["name"], stage=p["stage"], step=p["step"],
                                                           samples=p.get("samples", "?"), path=p["path"]))
        n += 1
    if n:
        log(f"[evaluate] deleted the weights of {n} scored frontier points (evaluate.frontier_keep_weights=false)")
    return n


def frontier_extra(inputs: PlanInputs) -> int:
    """How many frontier points the evaluation answers and judges beyond the stage models:
    each configured rl/dpo stage's points but its last (its model/, evaluated anyway). The
    dpo stage's steps are counted from the pairs the feedback stage is expected to write."""
    from cai.training import point_steps

    cfg = inputs.cfg
    n = 0
    if "rl" in cfg.stages:
        n += max(0, len(point_steps(cfg.rl.steps, cfg.rl.frontier_points)) - 1)
    if "dpo" in cfg.stages:
        dc = cfg.dpo
        if dc.data == "feedback":
            pairs = inputs.feedback_pairs()
        else:
            pairs = len(inputs.capped("red_team", cfg.critique_revision.max_prompts).get("train", []))
        steps = math.ceil(max(1, round(pairs * dc.epochs)) / dc.batch_size)
        steps = min(steps, dc.max_steps) if dc.max_steps is not None else steps
        n += max(0, len(point_steps(steps, dc.frontier_points)) - 1)
    return n
