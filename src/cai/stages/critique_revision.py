"""SL-CAI data: first answers, then rounds of critique and revision (Bai et al. 2022, §3).

For every red-team prompt the model answers; then, for each round, a principle is
sampled (seeded per prompt and round), the model critiques its latest answer under it
and revises the answer to address the critique. The next round critiques that revision.

Work goes round by round across all prompts, in batches, through the engine protocol:
one engine call for all first answers, then per round one call for all critiques and
one for all revisions. Every request goes through the run's request cache, so a
killed run resumes without recomputing anything that finished.

The constitution's demonstrations are prepended as conversation turns. They are the
same for every request of a kind, so the local engine runs that shared prefix once per
batch rather than once per prompt.

Artifacts (JSONL, read as-is by ``datasets.load_dataset``), each with train/test
splits that follow the red-team prompt splits:

* ``chains/``: full provenance per prompt, plus the Hugging Face recipe's columns;
* ``sft/``: ``messages`` ending in the final revision, plus helpful samples;
* ``prefs/``: TRL ``prompt``/``chosen``/``rejected`` (revision over first answer).
"""

from __future__ import annotations

from cai.constitution import load_constitution
from cai.conversations import (
    clean,
    critique_conversation,
    revision_conversation,
    revision_demos,
    revision_sampling,
    sample_principle,
    says_no_issue,
)
from cai.io import write_jsonl
from cai.prompts import SPLITS
from cai.stage import Cost, PlanInputs, StageContext, StageSpec, prepared_prompts, split_file


def run(ctx: StageContext) -> dict:
    cfg, cr = ctx.cfg, ctx.cfg.critique_revision
    prep = ctx.stage_dir("prepare")
    const = load_constitution(prep / "constitution.yaml")
    prompts = prepared_prompts(prep, "red_team", cr.max_prompts)
    helpful = prepared_prompts(prep, "helpful")
    examples = const.critique_revision_examples
    if cr.few_shot >= 0:
        examples = examples[: cr.few_shot]
    demos = revision_demos(examples, cr.critique)
    engine = ctx.engine()

    items = [(s, p) for s in SPLITS for p in prompts[s]]
    n_helpful = {s: min(len(helpful[s]), round(cr.helpful_ratio * len(prompts[s]))) for s in SPLITS}
    helpful_items = [(s, p) for s in SPLITS for p in helpful[s][: n_helpful[s]]]

    def generate(convs, sp, desc):
        if not convs:
            return []
        with ctx.progress(len(convs), desc) as update:
            return [clean(outs[0]) for outs in engine.generate(convs, sp, progress=update)]

    answers = generate([p.messages for _, p in items] + [p.messages for _, p in helpful_items],
                       revision_sampling(cr, cfg.seed, "answer"), "first answers")
    first = answers[: len(items)]
    helpful_answers = answers[len(items):]
    latest = list(first)
    rounds: list[list[dict]] = [[] for _ in items]
    stats = {"empty_critiques": 0, "empty_revisions": 0, "skipped_revisions": 0, "empty_first_answers": 0}
    stats["empty_first_answers"] = sum(1 for a in first if not a)
    for r in range(cr.rounds):
        principles = [sample_principle(const, cfg.seed, p.id, r) for _, p in items]
        critiques: list[str | None] = [None] * len(items)
        if cr.critique:
            convs = [critique_conversation(demos, p.messages, latest[i], principles[i]) for i, (_, p) in enumerate(items)]
            critiques = generate(convs, revision_sampling(cr, cfg.seed, "critique", r), f"round {r + 1} critiques")
        todo, statuses = [], []
        for i in range(len(items)):
            status = "revised"
            if cr.critique and not critiques[i]:
                status = "empty_critique"
            elif cr.critique and cr.skip_if_no_issue and says_no_issue(critiques[i]):
                status = "skipped_no_issue"
            else:
                todo.append(i)
            statuses.append(status)
        convs = [revision_conversation(demos, items[i][1].messages, latest[i], principles[i], critiques[i]) for i in todo]
        revised = dict(zip(todo, generate(convs, revision_sampling(cr, cfg.seed, "revision", r), f"round {r + 1} revisions")))
        for i in range(len(items)):
            revision = revised.get(i)
            if i in revised and not revision:
                statuses[i] = "empty_revision"
            if statuses[i] == "revised":
                latest[i] = revision
            stats["empty_critiques"] += statuses[i] == "empty_critique"
            stats["empty_revisions"] += statuses[i] == "empty_revision"
            stats["skipped_revisions"] += statuses[i] == "skipped_no_issue"
            rounds[i].append({
                "round": r + 1,
                "principle_id": principles[i].id,
                "critique_request": principles[i].critique if cr.critique else None,
                "critique": critiques[i],
                "revision_request": principles[i].revision,
                "revision": revision,
                "status": statuses[i],
            })

    counts = write_artifacts(ctx, cr, items, first, latest, rounds, helpful_items, helpful_answers)
    counts.update(stats)
    counts["rounds"] = cr.rounds
    return counts


def write_artifacts(ctx, cr, items, first, latest, rounds, helpful_items, helpful_answers) -> dict:
    chains = {s: [] for s in SPLITS}
    sft = {s: [] for s in SPLITS}
    prefs = {s: [] for s in SPLITS}
    for (split, p), init, final, rs in zip(items, first, latest, rounds):
        last = next((x for x in reversed(rs) if x["status"] == "revised"), rs[-1] if rs else None)
        chains[split].append({
            "id": p.id,
            "category": p.category,
            "prompt": p.text,
            "messages": p.messages,
            "initial_response": init,
            "rounds": rs,
            "final_response": final,
            "revised": final != init,
            # The Hugging Face recipe's columns (its one round = our last effective round).
            "init_prompt": p.text,
            "init_response": init,
            "critic_prompt": last["critique_request"] if last else None,
            "critic_response": last["critique"] if last else None,
            "revision_prompt": last["revision_request"] if last else None,
            "revision_response": final,
        })
        targets = [x["revision"] for x in rs if x["status"] == "revised"] if cr.sft_all_revisions else [final]
        for k, target in enumerate(targets):
            if target:
                sft[split].append({
                    "id": p.id if len(targets) == 1 else f"{p.id}/r{k + 1}",
                    "source": "revision",
                    "messages": p.messages + [{"role": "assistant", "content": target}],
                })
        if final and init and final != init:
            prefs[split].append({
                "id": p.id,
                "prompt": p.messages,
                "chosen": [{"role": "assistant", "content": final}],
                "rejected": [{"role": "assistant", "content": init}],
            })
    for (split, p), answer in zip(helpful_items, helpful_answers):
        if answer:
            sft[split].append({
                "id": p.id, "source": "helpful", "messages": p.messages + [{"role": "assistant", "content": answer}]
            })
    counts = {}
    for name, data in (("chains", chains), ("sft", sft), ("prefs", prefs)):
        for split in SPLITS:
            path = split_file(ctx.out / name, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(path, data[split])
            counts[f"{name}_{split}"] = len(data[split])
    counts["helpful_samples"] = len([a for a in helpful_answers if a])
    return counts


def estimate(inputs: PlanInputs) -> Cost:
    count, cr = inputs.count, inputs.cfg.critique_revision
    reds = inputs.capped("red_team", cr.max_prompts)
    ps = [p for s in reds for p in reds[s]]
    hs = inputs.helpful_beside(reds, cr.helpful_ratio)
    examples = inputs.constitution.critique_revision_examples
    ex = examples if cr.few_shot < 0 else examples[: cr.few_shot]
    demo = count(revision_demos(ex, cr.critique)) if ex else 0
    first = sum(count(p.messages) for p in ps + hs)
    per_round = sum(count(p.messages) + demo + cr.max_new_tokens + 40 for p in ps)
    calls = 2 if cr.critique else 1
    new = len(ps + hs) * cr.max_new_tokens + cr.rounds * len(ps) * (
        cr.max_new_tokens + (cr.critique_max_new_tokens if cr.critique else 0))
    return Cost(generate=len(ps + hs) + cr.rounds * len(ps) * calls, prompt_tokens=first + cr.rounds * per_round * calls,
                new_tokens=new, note=f"{len(ps)} red-team + {len(hs)} helpful prompts, rounds: {cr.rounds}")


STAGE = StageSpec(
    name="critique_revision",
    run=run,
    config_keys=("seed", "engine", "critique_revision"),
    needs=("prepare",),
    help="SL-CAI data: answer, critique and revise red-team prompts; mix in helpful samples.",
    estimate=estimate,
)
