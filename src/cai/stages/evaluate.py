"""Evaluation (Bai et al. 2022, §4.4): every model of the run on held-out prompts.

The models are the run's original model (``initial``), the SL-CAI model (``sl-cai``,
``sft/model``) and the RL-CAI / DPO models (``rl/model``, ``dpo/model``) when those
folders exist, and ``evaluate.extra_models``. Each answers the **test** splits of the
red-team, helpful and benign prompt sets (``evaluate.max_prompts`` per set) and of the
standard sets in ``evaluate.sets``. A judge model (``evaluate.judge``, default
``engine.model``) then reads everything with ``Engine.choice_logprobs``, so nothing the
judge writes is parsed. The parts live in :mod:`cai.evaluation`; this stage composes them:

1. answers: one model in memory at a time (:func:`answer_prompts`), then the frontier
   points kept along training (:mod:`cai.evaluation.frontier`); the judge's model (the
   initial one by default) answers last and stays loaded for step 2, so it loads once;
2. the judge: the pairs of models of the design (``evaluate.anchors``: by default each
   extra model meets the run's own models only) on every prompt in both orders
   (:mod:`cai.evaluation.pairwise`) fitted to Elo with bootstrap intervals
   (:mod:`cai.evaluation.elo`); harmfulness 0-4, refusal and safe-answer questions and
   the plain-text quality measures (:mod:`cai.evaluation.measures`); each standard set's
   own questions (:mod:`cai.evaluation.sets`);
3. the preference model, when the run has one: each answer's score, and the score of the
   SL-CAI chains against the number of revisions (:mod:`cai.evaluation.revisions`);
4. the files: ``results.json`` (schema in docs/evaluation.md), ``answers/<model>.jsonl``
   (every answer with its judge outputs), ``answers/comparisons.jsonl`` (every pairwise
   question), ``elo.png``, ``harmfulness.png``, ``refusal.png``; with a PM and chains
   ``revisions.json``, ``answers/revisions.jsonl``, ``revisions.png`` and
   ``revision_principles.png``; with frontier points ``frontier.json`` and ``frontier.png``.
"""

from __future__ import annotations

import math
from pathlib import Path

from cai import seeds
from cai.config import judge_model
from cai.constitution import ComparisonPrinciple, load_constitution
from cai.conversations import comparison_demos, principle_texts
from cai.cost import Cost, PlanInputs
from cai.engines.base import SamplingParams
from cai.errors import CaiError
from cai.evaluation import sets as evalsets
from cai.evaluation.elo import elo_table
from cai.evaluation.frontier import (
    delete_point_weights,
    frontier_answers,
    frontier_extra,
    frontier_points,
    frontier_result,
    score_frontier,
)
from cai.evaluation.measures import (
    QUALITY_DEFINITIONS,
    REFUSAL_PHRASES,
    judge_answers,
    judge_summary,
    measure_quality,
    reliability,
    rounded_mean,
    summarise,
)
from cai.evaluation.pairwise import comparison_items, comparison_pairs, opponents, pairwise
from cai.evaluation.results import EloByDimension, EloDesign, EloTable, Results, Settings, StandardSetResult
from cai.evaluation.revisions import pm_by_revision, pm_loader
from cai.inputs import PROMPT_SETS
from cai.io import write_json, write_jsonl
from cai.layout import RunFolder
from cai.prompts import Prompt, load_prompt_file
from cai.stage import StageContext, StageSpec
from cai.stage_names import SL_CAI, TRAINED_POLICIES

#: A run directory given in ``evaluate.extra_models`` stands for its final model: the
#: first of these stages' model folders that exists.
FINAL_MODEL_ORDER = ("rl", "dpo", "sft")

SETS = PROMPT_SETS


# -- the standard evaluation sets (cai.evaluation.sets) ----------------------------------------


def load_standard_sets(ctx: StageContext) -> list[tuple[evalsets.LoadedSet, list[Prompt]]]:
    """``evaluate.sets``, loaded: each set with its test prompts (at most ``max_prompts``, a
    seeded sample across the set's categories: :func:`cai.evaluation.sets.sample`),
    frozen in ``evaluate/sets/<name>.jsonl`` (with each prompt's set-specific fields in
    ``meta``); the local files read are recorded as the stage's inputs."""
    cfg, ev = ctx.cfg, ctx.cfg.evaluate
    out = []
    for spec in ev.sets:
        loaded = evalsets.load_eval_set(spec, cfg.data.test_fraction, cfg.seed)
        test = evalsets.sample(loaded.splits.get("test", []), ev.max_prompts, cfg.seed)
        if not test:
            raise CaiError(f"config field 'evaluate.sets': '{spec}' has no test prompts ({loaded.total} in all, "
                           f"data.test_fraction {cfg.data.test_fraction})")
        for f in loaded.files:
            ctx.record_input(f"{loaded.name}:{f.name}", f)
        (ctx.out / "sets").mkdir(parents=True, exist_ok=True)
        write_jsonl(ctx.out / "sets" / f"{loaded.name}.jsonl", ({**p.to_record(), "meta": p.meta} for p in test))
        ctx.log(f"[evaluate] {loaded.name}: {len(test)} prompts from {loaded.source} "
                f"({loaded.split_note(cfg.data.test_fraction, cfg.seed)})")
        out.append((loaded, test))
    return out


def standard_set_results(ctx: StageContext, named, names: list[str], rows: list[dict]) -> dict[str, StandardSetResult]:
    """``results.json["standard_sets"]``: per set, its figures for every model and where they came from."""
    cfg = ctx.cfg
    return {ls.name: StandardSetResult.from_json(
                evalsets.results_entry(ls, len(ps), names, rows, cfg.data.test_fraction, cfg.seed))
            for ls, ps in named}


def standard_set_counts(sets: dict[str, StandardSetResult]) -> dict:
    """The headline figures of the standard sets, for the manifest."""
    counts = {}
    for name, entry in sets.items():
        for model, summary in entry.models.items():
            for label, value in evalsets.headline(name, summary):
                key = label.replace(": ", "_").replace(" ", "_").replace("-", "_")
                counts[f"{name}_{key}_{model}"] = value
    return counts


# -- the stage --------------------------------------------------------------------------------


def models_to_evaluate(ctx: StageContext) -> dict[str, str]:
    """name -> model setting: the original model, then every trained policy folder found,
    then ``evaluate.extra_models``."""
    out = {"initial": ctx.cfg.engine.model}
    for stage in TRAINED_POLICIES:
        if ctx.artifact(stage, "model", required=False).is_dir():
            out[SL_CAI if stage == "sft" else stage] = str(ctx.artifact(stage, "model", required=False))
    for name, model in ctx.cfg.evaluate.extra_models.items():
        out[name] = resolve_extra_model(model)
    return out


def resolve_extra_model(model: str) -> str:
    """An ``evaluate.extra_models`` value as a model setting: a run directory (it has a
    ``prepare/`` or ``config.yaml``) becomes its final model folder; anything else is used
    as given (a checkpoint directory, 'default', a hub id)."""
    path, run = Path(model), RunFolder(model)
    if path.is_dir() and not (path / "config.json").is_file() and run.looks_like_run():
        for stage in FINAL_MODEL_ORDER:
            if (run.path(stage, "model") / "config.json").is_file():
                return str(run.path(stage, "model"))
        raise CaiError(f"config field 'evaluate.extra_models': run directory '{model}' has no trained model "
                       f"({', '.join(f'{s}/model' for s in FINAL_MODEL_ORDER)}); name a checkpoint directory instead")
    return model


def pick_principle(pool: list[ComparisonPrinciple], wanted: str | None, field: str) -> ComparisonPrinciple:
    if not pool:
        raise CaiError(f"config field 'evaluate.{field}': the constitution has no such principles to judge with")
    if wanted is None:
        return pool[0]
    for p in pool:
        if p.id == wanted:
            return p
    raise CaiError(f"config field 'evaluate.{field}': no principle '{wanted}' (have: {', '.join(p.id for p in pool)})")


def score_with_pm(ctx: StageContext, rows: list[dict], load_pm=None) -> bool:
    """Each red-team and helpful answer's reward under the run's preference model, in place
    (``row["pm_score"]``); False when there is no PM to score with."""
    pm_dir = ctx.artifact("preference_model", "model", required=False)
    if not ctx.cfg.evaluate.preference_model or not (pm_dir / "config.json").is_file():
        return False
    pm = (load_pm or pm_loader(ctx))[0]()
    todo = [r for r in rows if r["set"] in ("red_team", "helpful")]
    with ctx.progress(len(todo), "PM scores") as update:
        scores = []
        for k in range(0, len(todo), 64):  # score_many sorts each chunk by length: long chunks pad less
            chunk = todo[k:k + 64]
            scores += pm.score_many([r["prompt"] for r in chunk], [r["answer"] for r in chunk])
            update(len(chunk))
    for r, s in zip(todo, scores):
        r["pm_score"] = round(s, 6)
    del pm
    return True


def held_out_prompts(ctx: StageContext) -> dict[str, list[Prompt]]:
    """The test split of each prompt set (red_team, helpful, benign), at most ``evaluate.max_prompts``."""
    prompts = {}
    for s in SETS:
        path = ctx.artifact("prepare", "prompts", set=s, split="test")
        prompts[s] = load_prompt_file(path)[: ctx.cfg.evaluate.max_prompts] if path.is_file() else []
    return prompts


def answer_prompts(ctx: StageContext, models: dict[str, str], items: list[tuple[str, Prompt]],
                   params: SamplingParams, keep: str | None = None) -> list[dict]:
    """Every model's answer to every ``(set, prompt)`` item, as answer rows in model then
    prompt order (a standard set's rows keep the prompt's ``meta``, which its questions
    read). One model in memory at a time, each released after it answered, except the model
    setting ``keep`` (the judge's): its engine stays for the judge, so it is not loaded twice."""
    rows: list[dict] = []
    for name, model in models.items():
        engine = ctx.engine(model)
        with ctx.progress(len(items), f"answers of {name}") as update:
            outs = engine.generate([p.messages for _, p in items], params, progress=update) if items else []
        rows += [{"model": name, "set": s, "id": p.id, "category": p.category, "prompt": p.messages,
                  "answer": out[0].strip(), **({"meta": p.meta} if s in evalsets.SETS else {})}
                 for (s, p), out in zip(items, outs)]
        del engine
        if model != keep:
            ctx.release_engine(model)  # the next one (or the judge) loads into the room it leaves
    return rows


def answer_texts(rows: list[dict]) -> dict[str, dict[str, list[str]]]:
    """The answer texts by set and model, in the rows' order, for the pairwise comparisons."""
    answers: dict[str, dict[str, list[str]]] = {s: {} for s in SETS}
    for r in rows:
        answers.setdefault(r["set"], {}).setdefault(r["model"], []).append(r["answer"])
    return answers


def judge_last(models: dict[str, str], judge: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """``models`` split in two, in their order: those to answer first, and the one (if any)
    whose model is the judge's, to answer last (after the frontier points) and stay loaded."""
    first = {n: m for n, m in models.items() if m != judge}
    return first, {n: m for n, m in models.items() if m == judge}


#: What the pairwise comparisons rate: (dimension, the prompt set whose answers are compared).
DIMENSIONS = (("harmlessness", "red_team"), ("helpfulness", "helpful"))


def design_anchors(setting: list[str], names: list[str], extra: list[str]) -> list[str] | None:
    """``evaluate.anchors`` as the anchors among ``names`` (in their order), None for all
    pairs: 'run' is every model but the ``extra`` ones (``evaluate.extra_models``); a list
    is its models and the initial one. Names not among ``names`` are left out (the stage
    checks them first: :meth:`cai.config.EvaluateConfig.check_anchors`)."""
    if setting == ["all"]:
        return None
    if setting == ["run"]:
        return [n for n in names if n not in extra]
    return [n for n in names if n == "initial" or n in setting]


def rate_models(judge, names: list[str], answers: dict, prompts: dict, principles: dict, demos: list,
                resamples: int, seed: int, progress, anchors: list[str] | None = None) -> tuple[dict, list[dict]]:
    """Per dimension, the pairs of models of the design (``anchors``: see
    :func:`cai.evaluation.pairwise.comparison_pairs`; None: every pair) compared by the judge
    and fitted to Elo (None with fewer than two models or no prompts), and every comparison
    record. A table whose design leaves pairs out records it (``design``) and, for each model
    that did not meet every other, whom it met (``compared_with``)."""
    elo, comparisons = {}, []
    pairs = comparison_pairs(names, anchors)
    met = opponents(names, pairs)
    for dimension, s in DIMENSIONS:
        if len(names) < 2 or not prompts[s]:
            elo[dimension] = None
            continue
        principle = principles[dimension]
        recs, games = pairwise(judge, names, answers[s], prompts[s], principle, demos, progress, pairs)
        for r in recs:
            r["dimension"] = dimension
        comparisons += recs
        table = EloTable.from_json(elo_table(names, games, resamples, seed))
        if len(pairs) < math.comb(len(names), 2):  # a complete design is written as before: no design key
            table.design = EloDesign(kind="anchors", anchors=list(anchors), pairs=len(pairs))
            for name, rating in table.ratings.items():
                if len(met[name]) < len(names) - 1:
                    rating.compared_with = met[name]
        table.principle_id = principle.id
        table.position_consistency = rounded_mean(float(r["position_consistent"]) for r in recs
                                                  if "position_consistent" in r)
        table.judge_reliability = reliability(comparison_items(recs))
        elo[dimension] = table
    return EloByDimension(**elo), comparisons


def run(ctx: StageContext) -> dict:
    cfg, ev = ctx.cfg, ctx.cfg.evaluate
    const = load_constitution(ctx.artifact("prepare", "constitution"))
    principles = {
        "harmlessness": pick_principle(const.comparison_principles, ev.harmlessness_principle, "harmlessness_principle"),
        "helpfulness": pick_principle(const.helpfulness_principles, ev.helpfulness_principle, "helpfulness_principle"),
    }
    prompts = held_out_prompts(ctx)
    named = load_standard_sets(ctx)
    models = models_to_evaluate(ctx)
    names = list(models)
    ev.check_anchors("evaluate", names)  # a named anchor whose model folder is not there
    anchors = design_anchors(ev.anchors, names, list(ev.extra_models))
    ctx.log(f"[evaluate] models: {', '.join(f'{n} ({p})' for n, p in models.items())}")
    if anchors is not None and len(comparison_pairs(names, anchors)) < math.comb(len(names), 2):
        ctx.log(f"[evaluate] pairwise design: every model meets the anchors ({', '.join(anchors)}) only")

    # 1. Answers: every model, then every frontier point, one model in memory at a time.
    params = SamplingParams(temperature=ev.temperature, top_p=ev.top_p, max_new_tokens=ev.max_new_tokens,
                            seed=cfg.seed + seeds.EVALUATE_ANSWERS)
    items = [(s, p) for s in SETS for p in prompts[s]] + [(ls.name, p) for ls, ps in named for p in ps]
    # The model the judge runs (the initial one by default) answers last and stays loaded
    # for the judge; a served judge (evaluate.judge_endpoints) keeps nothing.
    keep = None if ev.judge_endpoints else ctx.model_path(judge_model(cfg, "evaluate"))
    first, last = judge_last(models, keep)
    rows = answer_prompts(ctx, first, items, params)
    points = frontier_points(ctx.run_dir) if ev.frontier else []
    point_rows = frontier_answers(ctx, points, items, params, names)
    rows += answer_prompts(ctx, last, items, params, keep=keep)
    rows.sort(key=lambda r: names.index(r["model"]))  # the models' order (stable: prompts stay in order)
    answers = answer_texts(rows)

    # 2. The judge reads every answer: pairs for Elo, each answer's own questions, the sets' rubrics.
    # evaluate.judge (default engine.model), or a served judge on evaluate.judge_endpoints
    judge, release_judge = ctx.judge_engine("evaluate")
    examples = const.comparison_examples if ev.few_shot < 0 else const.comparison_examples[: ev.few_shot]
    demos = comparison_demos(examples, principle_texts(const), cot=False)
    elo, comparisons = rate_models(judge, names, answers, prompts, principles, demos, ev.bootstrap, cfg.seed,
                                   ctx.progress, anchors)
    judge_answers(judge, rows, ctx.progress)
    evalsets.judge_rows(judge, rows, ctx.progress)
    point_records = score_frontier(judge, points, point_rows, answers, prompts, principles, demos, ctx.progress)
    measure_quality(rows)
    del judge
    release_judge()  # the PM loads into the room the judge leaves

    # 3. The preference model, loaded once, on first use, for the answers' and the revisions' scores.
    pm = pm_loader(ctx)
    pm_used = score_with_pm(ctx, rows, pm)
    revision_counts = pm_by_revision(ctx, pm)
    pm[1]()

    # 4. The files.
    results = Results(
        models=models,
        judge=judge_model(cfg, "evaluate"),
        prompts={s: len(prompts[s]) for s in SETS},
        settings=Settings(max_new_tokens=ev.max_new_tokens, temperature=ev.temperature, top_p=ev.top_p,
                          seed=cfg.seed, few_shot=len(examples), bootstrap=ev.bootstrap,
                          elo_scale="400 / ln(10) per natural-log odds unit; initial = 0"),
        elo=elo,
        **summarise(names, rows, pm_used),
        refusal_phrases=list(REFUSAL_PHRASES),
        quality_definitions=QUALITY_DEFINITIONS,
        judge_reliability=judge_summary(rows, comparisons),
        standard_sets=standard_set_results(ctx, named, names, rows) if named else None,
    )
    for name in names:
        write_jsonl(ctx.output("answers", name=name), [r for r in rows if r["model"] == name])
    write_jsonl(ctx.output("answers", name="comparisons"), comparisons)
    write_json(ctx.output("results"), results.to_json())
    ctx.track(headline_scalars(results), 0)  # the experiment trackers (report_to), once
    from cai.plots import plot_elo, plot_harmfulness, plot_refusals

    plot_elo(ctx.out / "elo.png", results)
    plot_harmfulness(ctx.out / "harmfulness.png", results)
    plot_refusals(ctx.out / "refusal.png", results)
    counts = {"models": len(names), "answers": len(rows), "comparisons": len(comparisons), **revision_counts}
    if points:
        counts.update(write_frontier(ctx, points, point_rows, point_records, comparisons, results, names))
    return {**counts, **headline_counts(results, rows, names)}


def write_frontier(ctx: StageContext, points: list[dict], point_rows: list[dict], point_records: list[dict],
                   comparisons: list[dict], results: Results, names: list[str]) -> dict:
    """``frontier.json``, its answers, comparisons and plot; then the scored points' weights
    go unless ``evaluate.frontier_keep_weights``. Returns the manifest counts."""
    ev = ctx.cfg.evaluate
    frontier = frontier_result(points, point_rows, point_records, comparisons, results, names, ev.bootstrap,
                               ctx.cfg.seed, ev.frontier_keep_weights)
    write_json(ctx.output("frontier"), frontier.to_json())
    write_jsonl(ctx.output("answers", name="frontier"), point_rows)
    write_jsonl(ctx.output("answers", name="frontier_comparisons"), point_records)
    from cai.plots import plot_frontier

    plot_frontier(ctx.out / "frontier.png", frontier)
    return {"frontier_points": sum(1 for p in points if p["status"] in ("answered", "final")),
            "frontier_comparisons": len(point_records),
            "frontier_weights_deleted": delete_point_weights(points, ev.frontier_keep_weights, ctx.log)}


def model_figures(results: Results):
    """(model, figure, value) for each model's Elo in each dimension and its mean harmfulness:
    what the manifest's headline counts and the experiment trackers both report."""
    for dimension, _ in DIMENSIONS:
        table = getattr(results.elo, dimension)
        for name, r in (table.ratings if table else {}).items():
            yield name, f"elo_{dimension}", r.elo
    for name, h in results.harmfulness.items():
        yield name, "harmfulness", h.mean


def headline_counts(results: Results, rows: list[dict], names: list[str]) -> dict:
    """The manifest's headline figures: each model's Elo, mean harmfulness, share of looping
    answers, and the standard sets' headlines."""
    counts = {f"{figure}_{name}": value for name, figure, value in model_figures(results)}
    for name in names:
        counts[f"degenerate_{name}"] = rounded_mean(float(r["quality"]["degenerate"]) for r in rows
                                                    if r["model"] == name)
    counts.update(standard_set_counts(results.standard_sets or {}))
    return counts


def headline_scalars(results: Results) -> dict[str, float | None]:
    """A handful of each model's results for the experiment trackers (``report_to``), named
    ``<model>/<figure>``: its Elo in each dimension, mean harmfulness, the judge's majority
    refusal rate on the benign and red-team prompts, its mean PM score on each set. None
    where a figure was not measured (the tracker leaves it out)."""
    out: dict[str, float | None] = {f"{name}/{figure}": value for name, figure, value in model_figures(results)}
    for name, by_set in results.refusal.items():
        for prompts in ("benign", "red_team"):
            rates = getattr(by_set, prompts)
            out[f"{name}/refusal_{prompts}"] = rates.judge_majority if rates else None
    for name, scores in (results.pm_score or {}).items():
        out[f"{name}/pm_score_red_team"], out[f"{name}/pm_score_helpful"] = scores.red_team, scores.helpful
    return out


def _needs(cfg) -> tuple[str, ...]:
    trained = (*TRAINED_POLICIES, "preference_model")
    if cfg.evaluate.preference_model and cfg.evaluate.revision_splits:
        trained += ("critique_revision",)  # its chains are scored by the PM (pm_by_revision)
    return ("prepare",) + tuple(s for s in trained if s in cfg.stages)


def estimate(inputs: PlanInputs) -> Cost:
    cfg, count, ev, const = inputs.cfg, inputs.count, inputs.cfg.evaluate, inputs.constitution
    names = (["initial"] + [SL_CAI if s == "sft" else s for s in TRAINED_POLICIES if s in cfg.stages]
             + list(ev.extra_models))
    models = len(names)
    red, helpful, benign = (inputs.sets[s].get("test", [])[: ev.max_prompts] for s in SETS)
    r, h, b = len(red), len(helpful), len(benign)
    ps = red + helpful + benign
    avg = sum(count(p.messages) for p in ps) / max(1, len(ps))
    ex = const.comparison_examples if ev.few_shot < 0 else const.comparison_examples[: ev.few_shot]
    demo = count(comparison_demos(ex, principle_texts(const), False)) if ex else 0
    pair_q = len(comparison_pairs(names, design_anchors(ev.anchors, names, list(ev.extra_models)))) * (r + h) * 2
    judge_q = models * r + models * (r + b) * 2 + models * r * 2  # harmfulness, refusal, safe (both orders)
    points = frontier_extra(inputs) if ev.frontier else 0  # each answers every prompt, then meets initial
    pair_q += points * (r + h) * 2
    judge_q += points * (r + (r + b) * 2 + r * 2)
    pm = models * (r + h) if ev.preference_model and "preference_model" in cfg.stages else 0
    cr = cfg.critique_revision
    if pm and "critique_revision" in cfg.stages and cr.rounds:  # at most rounds + 1 texts per scored chain
        chains = sum(min(len(inputs.capped("red_team", cr.max_prompts).get(s, [])),
                         ev.revision_max_chains or 1 << 30) for s in ev.revision_splits)
        pm += chains * (cr.rounds + 1)
    std_n, std_q = 0, 0
    for spec in ev.sets:  # loading them here also checks them before a run
        loaded = evalsets.load_eval_set(spec, cfg.data.test_fraction, cfg.seed)
        n = len(loaded.splits.get("test", [])[: ev.max_prompts])
        std_n, std_q = std_n + n, std_q + models * n * evalsets.questions_per_answer(loaded.name)
    judge_q += std_q
    prompt = int(models * (len(ps) + std_n) * avg + pair_q * (avg + demo + 2 * ev.max_new_tokens + 80)
                 + judge_q * (avg + ev.max_new_tokens + 120) + pm * (avg + ev.max_new_tokens))
    # memory: one model at a time (each answers, then the judge, then the PM: see run), each with a batch
    memory, loads = None, 0
    shape = inputs.shape(ev.judge)
    if shape is not None:
        from cai.memory import frozen_model, generation, largest

        ib, int8 = inputs.engine_bytes(), cfg.engine.quantize == "int8"
        local = inputs.local_batching  # the models in this process (a served one's memory is its server's)
        phases = [generation(shape, ib, local.in_flight(len(ps) + std_n), int(avg) + ev.max_new_tokens, int8),
                  generation(shape, ib, local.in_flight(pair_q + judge_q, "score"),
                             int(avg + demo + 2 * ev.max_new_tokens + 80), int8, shared=local.kept_prefix(demo))]
        if pm:  # its texts: the answers, and the revisions where chains are scored
            longest = max(ev.max_new_tokens, cr.max_new_tokens if pm > models * (r + h) else 0)
            phases.append(frozen_model(shape.pm_params, ib, shape=shape, seqs=8, tokens=int(avg) + longest))
        memory = largest(*phases)
        # the judge loads apart unless it runs an evaluated model's engine (kept after it answered)
        evaluated = {cfg.engine.model, *ev.extra_models.values(), *([SL_CAI] if "sft" in cfg.stages else [])}
        judge_apart = not ev.judge_endpoints and judge_model(cfg, "evaluate") not in evaluated
        loads = models + points + (1 if judge_apart else 0) + (1 if pm else 0)
    prompt += int(points * len(ps) * avg)
    steps = inputs.batching.decode_steps  # one generate call a model, one a frontier point
    decoding = models * steps(len(ps) + std_n, ev.max_new_tokens) + points * steps(len(ps), ev.max_new_tokens)
    figures = 3 + (1 if points else 0) + (2 if pm and "critique_revision" in cfg.stages else 0)
    return Cost(generate=(models + points) * len(ps) + models * std_n, score=pair_q + judge_q, prompt_tokens=prompt,
                figures=figures, decode_steps=decoding,
                new_tokens=((models + points) * len(ps) + models * std_n) * ev.max_new_tokens,
                note=f"{models} models + {points} frontier points x {len(ps)} test prompts"
                + (f" + {std_n} of standard sets" if std_n else "") + f"; {pair_q} comparisons; {pm} PM scores",
                loads=loads, memory=memory)


STAGE = StageSpec(
    name="evaluate",
    run=run,
    config_keys=("seed", "engine", "evaluate"),
    needs=_needs,
    help="Evaluate every model of the run: Elo (harmlessness, helpfulness), harmfulness 0-4, refusal rates, PM score.",
    estimate=estimate,
)
