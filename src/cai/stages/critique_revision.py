"""SL-CAI data: first answers, then rounds of critique and revision (Bai et al. 2022, §3).

For every red-team prompt the model answers; then, for each round, a principle is
sampled (seeded per prompt and round), the model critiques its latest answer under it
and revises the answer to address the critique. The next round critiques that revision.

Context distillation (``system_prompt: constitution``, beyond the paper's SL-CAI: its
baseline) samples the first answers under a system prompt written from the constitution;
the chains' messages, the critiques, the revisions and the SFT data hold the plain
conversation, so SFT teaches the model to answer that way without the prompt. With
``rounds: 0`` the first answers are the SFT data.

Work goes round by round across all prompts, in batches, through the engine protocol:
one engine call for all first answers, then per round one call for all critiques and
one for all revisions. Every request goes through the run's request cache, so a
killed run resumes without recomputing anything that finished. The rounds (critique, skip,
revise, quality gates, retries with a new principle, best-of-n) are
:class:`cai.revision_loop.RevisionLoop`, the loop ``cai chat`` and ``cai revise`` run too;
this stage adds the first and helpful answers, their gates, and the artifacts.

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

from collections import Counter

from cai.constitution import load_constitution
from cai.conversations import (
    answer_system_prompt,
    clean,
    revision_demos,
    revision_sampling,
    sample_principle,
    with_system_prompt,
)
from cai.io import write_jsonl
from cai.prompts import SPLITS
from cai.quality import problems
from cai.revision_loop import (
    EMPTY_REVISION,
    REJECTED,
    REVISED,
    RevisionLoop,
    demonstrations,
    judge_options_with,
)
from cai.cost import Cost, PlanInputs
from cai.inputs import prepared_prompts, red_team_prompts, with_expansion
from cai.stage import StageContext, StageSpec


def run(ctx: StageContext) -> dict:
    cfg, cr = ctx.cfg, ctx.cfg.critique_revision
    const = load_constitution(ctx.artifact("prepare", "constitution"))
    prompts = red_team_prompts(ctx, cr.max_prompts)  # with the expand stage's prompts in train
    helpful = prepared_prompts(ctx, "helpful")
    demos, demo_text = demonstrations(const, cr)
    engine = ctx.engine()
    attempts = 1 + (cr.gate_retries if cr.quality_gates else 0)
    system = answer_system_prompt(const, cr.system_prompt)  # None, or the prompt the first answers are drawn under

    items = [(s, p) for s in SPLITS for p in prompts[s]]
    n_helpful = {s: min(len(helpful[s]), round(cr.helpful_ratio * len(prompts[s]))) for s in SPLITS}
    helpful_items = [(s, p) for s in SPLITS for p in helpful[s][: n_helpful[s]]]

    def generate(convs, sp, desc):
        if not convs:
            return []
        with ctx.progress(len(convs), desc) as update:
            return [[clean(o) for o in outs] for outs in engine.generate(convs, sp, progress=update)]

    answers = [outs[0] for outs in generate([with_system_prompt(p.messages, system) for _, p in items + helpful_items],
                                            revision_sampling(cr, cfg.seed, "answer"), "first answers")]
    first = answers[: len(items)]
    helpful_answers = answers[len(items):]
    stats = Counter(empty_critiques=0, empty_revisions=0, skipped_revisions=0)
    stats["empty_first_answers"] = sum(1 for a in first if not a)
    first_tries: list[list[dict]] = [[] for _ in items]
    if cr.quality_gates:
        helpful_answers, _, left_out = gate_answers(helpful_items, helpful_answers, system, attempts, generate, cr,
                                                    cfg.seed, stats, "helpful", "helpful answers")
        for k in left_out:  # still rejected after the retries: left out of the SFT data
            helpful_answers[k] = ""
        if cr.rounds == 0:  # the first answers are what SFT learns: gated (and retried) as helpful answers are
            first, first_tries, _ = gate_answers(items, first, system, attempts, generate, cr, cfg.seed, stats,
                                                 "first_answer", "first answers")
    # the rounds: the shared loop (cai.revision_loop), with a principle sampled per prompt, round and try
    def principle(prompt_id, round_, attempt):
        return sample_principle(const, cfg.seed, prompt_id, round_, attempt)

    judge = judge_options_with(lambda: ctx.engine(cr.best_of_model),
                               lambda total: ctx.progress(total, "best-of-n judgements"))
    loop = RevisionLoop(cr, cfg.seed, demos, demo_text, principle, generate, judge, stats)
    latest, rounds = loop.run([(p.id, p.messages) for _, p in items], first, cr.rounds)

    counts = write_artifacts(ctx, cr, items, first, latest, rounds, helpful_items, helpful_answers, system,
                             first_tries)
    counts.update(stats)
    counts["rounds"] = cr.rounds
    return counts


def answer_problems(text: str, messages: list[dict], cr) -> list[str]:
    """The gates' reasons against an answer that is not a revision (a helpful answer, a first
    answer): no critique or demonstrations to copy, the run's loop line."""
    return problems(text, messages, repeat_share=cr.gate_repeat_share)


def gate_answers(items, answers, system, attempts, generate, cr, seed, stats, kind: str,
                 desc: str) -> tuple[list[str], list[list[dict]], list[int]]:
    """Resample the answers (not revisions: helpful answers, and the first answers when there
    are no rounds) that the gates reject (empty, looping, restating the prompt), under the same
    system prompt, up to the retries. Returns the answers (one still rejected keeps its last
    try), each answer's rejected tries with their reasons, and the indices still rejected;
    counts ``gate_<kind>_rejected`` and ``gate_<kind>_dropped`` in ``stats``."""
    answers = list(answers)
    tries: list[list[dict]] = [[] for _ in answers]
    reasons = {k: answer_problems(a, items[k][1].messages, cr) for k, a in enumerate(answers)}
    bad = [k for k, why in reasons.items() if why]
    stats[f"gate_{kind}_rejected"] = len(bad)
    for attempt in range(1, attempts):
        if not bad:
            break
        for k in bad:
            tries[k].append({"answer": answers[k], "reasons": reasons[k]})
        outs = generate([with_system_prompt(items[k][1].messages, system) for k in bad],
                        revision_sampling(cr, seed, "answer", attempt=attempt), f"{desc} retry {attempt}")
        for k, o in zip(bad, outs):
            answers[k] = o[0]
            reasons[k] = answer_problems(answers[k], items[k][1].messages, cr)
        bad = [k for k in bad if reasons[k]]
    stats[f"gate_{kind}_dropped"] = len(bad)
    return answers, tries, bad


def sft_target(cr, init: str, final: str, rs: list[dict], prompt_messages: list[dict]) -> str | None:
    """The text a chain teaches: its last accepted revision. Without one, the first answer
    when no round found a problem (every critique said "no issue" or was empty); with the
    quality gates on, a chain whose revisions were all rejected teaches nothing (its first
    answer is what the critique objected to), and neither does a first answer that fails
    the gates itself."""
    if any(x["status"] == REVISED for x in rs) or not cr.quality_gates:
        return final or None
    if any(x["status"] in (REJECTED, EMPTY_REVISION) for x in rs) or answer_problems(init, prompt_messages, cr):
        return None
    return init or None


def write_artifacts(ctx, cr, items, first, latest, rounds, helpful_items, helpful_answers, system, first_tries) -> dict:
    """The chains, the SFT data and the pairs of both splits. Every conversation written is the
    prompt's own ``messages``: a system prompt the first answers were drawn under is recorded in
    the chain (``initial_system_prompt``), never trained on."""
    chains = {s: [] for s in SPLITS}
    sft = {s: [] for s in SPLITS}
    prefs = {s: [] for s in SPLITS}
    dropped = 0
    for (split, p), init, final, rs, tries in zip(items, first, latest, rounds, first_tries):
        last = next((x for x in reversed(rs) if x["status"] == REVISED), rs[-1] if rs else None)
        target = sft_target(cr, init, final, rs, p.messages)
        chains[split].append({
            "id": p.id,
            "category": p.category,
            "prompt": p.text,
            "messages": p.messages,
            **({"initial_system_prompt": system} if system else {}),
            "initial_response": init,
            **({"initial_attempts": tries} if tries else {}),
            "rounds": rs,
            "final_response": final,
            "revised": final != init,
            "trained_on": None if target is None else ("first_answer" if target == init else "revision"),
            # The Hugging Face recipe's columns (its one round = our last effective round).
            "init_prompt": p.text,
            "init_response": init,
            "critic_prompt": last["critique_request"] if last else None,
            "critic_response": last["critique"] if last else None,
            "revision_prompt": last["revision_request"] if last else None,
            "revision_response": final,
        })
        if cr.sft_all_revisions:
            targets = [x["revision"] for x in rs if x["status"] == REVISED]
        else:
            targets = [target] if target else []
        dropped += not targets
        for k, text in enumerate(targets):
            if text:
                sft[split].append({
                    "id": p.id if len(targets) == 1 else f"{p.id}/r{k + 1}",
                    "source": "revision",
                    "messages": p.messages + [{"role": "assistant", "content": text}],
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
            path = ctx.output(name, split=split)
            write_jsonl(path, data[split])
            counts[f"{name}_{split}"] = len(data[split])
    counts["helpful_samples"] = len([a for a in helpful_answers if a])
    counts["prompts_without_sft_example"] = dropped
    return counts


def estimate(inputs: PlanInputs) -> Cost:
    count, cr = inputs.count, inputs.cfg.critique_revision
    reds = inputs.capped("red_team", cr.max_prompts)
    ps = [p for s in reds for p in reds[s]]
    hs = inputs.helpful_beside(reds, cr.helpful_ratio)
    examples = inputs.constitution.critique_revision_examples
    ex = examples if cr.few_shot < 0 else examples[: cr.few_shot]
    demo = count(revision_demos(ex, cr.critique)) if ex else 0
    batching = inputs.batching
    # the first answers' system prompt, when they are drawn under one, is a prefix they all share
    system = answer_system_prompt(inputs.constitution, cr.system_prompt)
    shared = count(with_system_prompt([], system)) if system else 0
    first = sum(count(p.messages) for p in ps + hs) + shared * batching.prefix_reads(len(ps + hs))
    per_round = sum(count(p.messages) + demo + cr.max_new_tokens + 40 for p in ps)
    # what a round's call reads: the engine may read the demonstrations once a batch, not once a row
    read_round = per_round - demo * (len(ps) - batching.prefix_reads(len(ps)))
    calls = 2 if cr.critique else 1
    # a rejected revision is retried (a new critique and revision) up to gate_retries times; counted
    # as if every revision were retried once per allowed retry: the embedded model's gates rejected
    # 17 of 24 first revisions (docs/sl-cai.md), a stronger model's far fewer
    tries = 1 + (cr.gate_retries if cr.quality_gates else 0)
    new = len(ps + hs) * cr.max_new_tokens + tries * cr.rounds * len(ps) * (
        cr.best_of * cr.max_new_tokens + (cr.critique_max_new_tokens if cr.critique else 0))
    score = tries * cr.rounds * len(ps) * cr.best_of * 2 if cr.best_of > 1 else 0
    note = f"{len(ps)} red-team + {len(hs)} helpful prompts, rounds: {cr.rounds}"
    if system:
        note += ", first answers under the constitution's system prompt"
    if cr.best_of > 1:
        note += f", {cr.best_of} revisions per request"
    if tries > 1:
        note += f"; every revision counted with {cr.gate_retries} retr{'y' if cr.gate_retries == 1 else 'ies'}"
    # memory: the engine's model and the KV cache of a batch of the longest requests (a revision's)
    shape, memory = inputs.shape(None), None
    if shape is not None:
        from cai.memory import generation

        longest = int(per_round / max(1, len(ps)) + cr.max_new_tokens + cr.critique_max_new_tokens)
        local = inputs.local_batching  # the model in this process (a served one's memory is its server's)
        memory = generation(shape, inputs.engine_bytes(), local.in_flight(len(ps + hs)),
                            longest, inputs.cfg.engine.quantize == "int8", shared=local.kept_prefix(demo))
    loads = 1 + (cr.best_of > 1 and bool(cr.best_of_model) and cr.best_of_model != inputs.cfg.engine.model)
    steps = batching.decode_steps
    decoding = steps(len(ps + hs), cr.max_new_tokens) + tries * cr.rounds * (
        steps(len(ps) * cr.best_of, cr.max_new_tokens) + (steps(len(ps), cr.critique_max_new_tokens) if cr.critique else 0))
    return Cost(generate=len(ps + hs) + tries * cr.rounds * len(ps) * calls, score=score, decode_steps=decoding,
                prompt_tokens=first + tries * cr.rounds * read_round * calls, new_tokens=new, note=note,
                loads=int(loads) if shape is not None else 0, memory=memory)


STAGE = StageSpec(
    name="critique_revision",
    run=run,
    config_keys=("seed", "engine", "critique_revision"),
    needs=lambda cfg: with_expansion(cfg, ("prepare",)),
    help="SL-CAI data: answer, critique and revise red-team prompts; mix in helpful samples.",
    estimate=estimate,
)
