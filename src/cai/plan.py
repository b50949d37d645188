"""``cai plan``: what a config will do, per stage, before running it.

For every configured stage it counts the engine requests (generations and option
scorings), the tokens they read and write, and the training tokens, from the actual
prompt sets and demonstrations. Two simplifications make it an **upper-bound-ish
estimate**, not a measurement:

* every generated text is assumed to use its whole ``max_new_tokens`` budget, and later
  requests that contain it (a critique of an answer) count that many tokens for it;
* tokens are counted with the engine's tokenizer when a local engine is calibrated,
  else as characters / 4.

The times come from a short calibration on the configured engine: one generate call of
``min(batch_size, 16)`` prompts x 16 new tokens gives new tokens/s, and one
``choice_logprobs`` batch gives prompt tokens/s for reading text. Then
``generation = new tokens / gen rate + prompt tokens / read rate``,
``scoring = prompt tokens / read rate`` and ``training = tokens x epochs / (read rate / 3)``
(a training step costs about three forward passes). Real runs differ: the local engine
runs shared demonstration prefixes once per batch (faster), the request cache skips
finished work, batches other than the calibration's run at other speeds, and answers
often stop early.
"""

from __future__ import annotations

import math
import time

from cai.config import RunConfig

_PROBE = "Write two sentences about {topic}."
_TOPICS = ["rivers", "tea", "maps", "bridges", "clouds", "owls", "glass", "salt", "trains", "bees", "ink", "moss",
           "kites", "clocks", "sand", "violins"]


class Counter:
    """Tokens of a conversation, with the engine's tokenizer when there is one."""

    def __init__(self, engine=None):
        self.engine = engine

    def __call__(self, conv: list[dict]) -> int:
        inner = getattr(self.engine, "inner", self.engine)
        if inner is not None and hasattr(inner, "render") and hasattr(inner, "encode"):
            return len(inner.encode(inner.render(conv)))
        return sum(len(m["content"]) + 16 for m in conv) // 4


def measure_rates(engine) -> dict:
    """New tokens/s of a small generate call and prompt tokens/s of a small scoring batch."""
    from cai.engines.base import SamplingParams

    batch = min(getattr(getattr(engine, "inner", engine), "batch_size", 16) or 16, 16)
    convs = [[{"role": "user", "content": _PROBE.format(topic=t)}] for t in (_TOPICS * 4)[:batch]]
    engine.generate(convs[:1], SamplingParams(max_new_tokens=2))  # warm-up: first-call costs are not the rate
    t0 = time.perf_counter()
    outs = engine.generate(convs, SamplingParams(max_new_tokens=16, temperature=0.7, seed=1))
    gen_s = time.perf_counter() - t0
    count = Counter(engine)
    new = sum(max(1, count([{"role": "assistant", "content": o[0]}]) - count([{"role": "assistant", "content": ""}]))
              for o in outs)
    q = [c + [{"role": "assistant", "content": "A short reply. " * 12}, {"role": "user", "content": "Which is better?"},
              {"role": "assistant", "content": "The answer is: ("}] for c in convs]
    t0 = time.perf_counter()
    engine.choice_logprobs(q, [["A", "B"]] * len(q))
    score_s = time.perf_counter() - t0
    read = sum(count(c) for c in q)
    return {"batch": batch, "gen_tokens_per_s": new / max(gen_s, 1e-6), "read_tokens_per_s": read / max(score_s, 1e-6)}


def _row(stage, gen=0, score=0, prompt=0, new=0, train=0, note="") -> dict:
    return {"stage": stage, "generate": gen, "score": score, "prompt_tokens": prompt, "new_tokens": new,
            "train_tokens": train, "note": note}


def _sets(cfg: RunConfig) -> dict:
    from cai.stages.prepare import load_inputs

    return load_inputs(cfg)


def estimate(cfg: RunConfig, count: Counter) -> list[dict]:
    from cai.stages.critique_revision import demo_turns as cr_demos
    from cai.stages.feedback import demo_turns as fb_demos, question

    const, sets = _sets(cfg)
    red, helpful, benign = sets["red_team"], sets["helpful"], sets["benign"]
    cr, fb, ev = cfg.critique_revision, cfg.feedback, cfg.evaluate
    rows = []

    def capped(splits, n):
        return {s: (ps if n is None else ps[:n]) for s, ps in splits.items()}

    for stage in cfg.stages:
        if stage == "prepare":
            rows.append(_row(stage, note="reads and freezes the inputs"))
        elif stage == "critique_revision":
            reds = capped(red, cr.max_prompts)
            ps = [p for s in reds for p in reds[s]]
            hs = [p for s in reds for p in helpful.get(s, [])[: min(len(helpful.get(s, [])), round(cr.helpful_ratio * len(reds[s])))]]
            ex = const.critique_revision_examples if cr.few_shot < 0 else const.critique_revision_examples[: cr.few_shot]
            demo = count(cr_demos(ex, cr.critique)) if ex else 0
            first = sum(count(p.messages) for p in ps + hs)
            per_round = sum(count(p.messages) + demo + cr.max_new_tokens + 40 for p in ps)
            gen = len(ps + hs) + cr.rounds * len(ps) * (2 if cr.critique else 1)
            new = len(ps + hs) * cr.max_new_tokens + cr.rounds * len(ps) * (
                cr.max_new_tokens + (cr.critique_max_new_tokens if cr.critique else 0))
            prompt = first + cr.rounds * per_round * (2 if cr.critique else 1)
            rows.append(_row(stage, gen=gen, prompt=prompt, new=new,
                             note=f"{len(ps)} red-team + {len(hs)} helpful prompts, rounds: {cr.rounds}"))
        elif stage == "sft":
            reds = capped(red, cr.max_prompts)
            n = len(reds.get("train", [])) + min(len(helpful.get("train", [])), round(cr.helpful_ratio * len(reds.get("train", []))))
            per = sum(count(p.messages) for p in reds.get("train", [])) / max(1, len(reds.get("train", []))) + cr.max_new_tokens
            seen = n * cfg.sft.epochs if cfg.sft.max_steps is None else min(n * cfg.sft.epochs, cfg.sft.max_steps * cfg.sft.batch_size)
            rows.append(_row(stage, train=int(seen * min(per, cfg.sft.max_length)), note=f"{n} examples x {cfg.sft.epochs} epochs"))
        elif stage == "feedback":
            reds = capped(red, fb.max_prompts)
            ps = [p for s in reds for p in reds[s]]
            hs = [p for s in reds for p in helpful.get(s, [])[: min(len(helpful.get(s, [])), round(fb.helpful_ratio * len(reds[s])))]]
            pairs = math.comb(fb.samples_per_prompt, 2)
            ex = const.comparison_examples if fb.few_shot < 0 else const.comparison_examples[: fb.few_shot]
            texts = {p.id: p.text for p in const.comparison_principles + const.helpfulness_principles}
            demo = count(fb_demos(ex, texts, fb.chain_of_thought)) if ex else 0
            qs = len(ps + hs) * pairs * fb.principles_per_comparison * (2 if fb.both_orders else 1)
            q_tokens = sum(count([{"role": "user", "content": question(p.messages, "Which is better?", "", "")}])
                           for p in ps + hs) / max(1, len(ps + hs)) + demo + 2 * fb.max_new_tokens
            gen = len(ps + hs) * fb.samples_per_prompt + (qs if fb.chain_of_thought else 0)
            new = len(ps + hs) * fb.samples_per_prompt * fb.max_new_tokens + (qs * fb.cot_max_new_tokens if fb.chain_of_thought else 0)
            prompt = sum(count(p.messages) for p in ps + hs) + int(qs * q_tokens) * (2 if fb.chain_of_thought else 1)
            rows.append(_row(stage, gen=gen, score=qs, prompt=prompt, new=new,
                             note=f"{len(ps + hs) * pairs} pairs, {qs} questions"))
        elif stage == "preference_model":
            reds = capped(red, fb.max_prompts)
            n = len(reds.get("train", [])) * math.comb(fb.samples_per_prompt, 2) * (1 + fb.helpful_ratio)
            pc = cfg.preference_model
            seqs = 2 * n * pc.epochs if pc.max_steps is None else min(2 * n * pc.epochs, 2 * pc.max_steps * pc.batch_size)
            rows.append(_row(stage, train=int(seqs * min(fb.max_new_tokens + 60, pc.max_length)),
                             note=f"~{int(n)} pairs x {pc.epochs} epochs"))
        elif stage == "evaluate":
            models = 1 + sum(s in cfg.stages for s in ("sft", "rl", "dpo"))
            r, h, b = (len(x.get("test", [])[: ev.max_prompts]) for x in (red, helpful, benign))
            ps = [p for x in (red, helpful, benign) for p in x.get("test", [])[: ev.max_prompts]]
            avg = sum(count(p.messages) for p in ps) / max(1, len(ps))
            ex = const.comparison_examples if ev.few_shot < 0 else const.comparison_examples[: ev.few_shot]
            texts = {p.id: p.text for p in const.comparison_principles + const.helpfulness_principles}
            demo = count(fb_demos(ex, texts, False)) if ex else 0
            pair_q = math.comb(models, 2) * (r + h) * 2
            judge_q = models * r + models * (r + b) * 2
            score = pair_q + judge_q
            pm = models * (r + h) if ev.preference_model and "preference_model" in cfg.stages else 0
            prompt = int(models * len(ps) * avg + pair_q * (avg + demo + 2 * ev.max_new_tokens + 80)
                         + judge_q * (avg + ev.max_new_tokens + 120) + pm * (avg + ev.max_new_tokens))
            rows.append(_row(stage, gen=models * len(ps), score=score, prompt=prompt,
                             new=models * len(ps) * ev.max_new_tokens,
                             note=f"{models} models x {len(ps)} test prompts; {pair_q} comparisons; {pm} PM scores"))
        elif stage == "rl":
            rc = cfg.rl
            avg = sum(count(p.messages) for p in red.get("train", [])) / max(1, len(red.get("train", [])))
            rollouts = rc.steps * rc.prompts_per_step * rc.samples_per_prompt
            # policy forward + backward, reference and PM forwards: about 1.5x a training token
            rows.append(_row(stage, gen=rc.steps * rc.prompts_per_step + 2 * rc.eval_prompts,
                             prompt=int((rc.steps * rc.prompts_per_step + 2 * rc.eval_prompts) * avg),
                             new=rollouts * rc.max_new_tokens + 2 * rc.eval_prompts * rc.max_new_tokens,
                             train=int(1.5 * rollouts * (avg + rc.max_new_tokens)),
                             note=f"{rc.steps} steps x {rc.prompts_per_step} prompts x {rc.samples_per_prompt} samples"))
        elif stage == "dpo":
            dc = cfg.dpo
            reds = capped(red, fb.max_prompts)
            n = len(reds.get("train", [])) * math.comb(fb.samples_per_prompt, 2) * (1 + fb.helpful_ratio)
            seqs = 2 * n * dc.epochs if dc.max_steps is None else min(2 * n * dc.epochs, 2 * dc.max_steps * dc.batch_size)
            # plus one reference forward per sequence before training (a third of a training token)
            rows.append(_row(stage, train=int(seqs * 4 / 3 * min(fb.max_new_tokens + 60, dc.max_length)),
                             note=f"~{int(n)} pairs x {dc.epochs} epochs"))
        elif stage == "report":
            rows.append(_row(stage, note="reads the run directory"))
        else:
            rows.append(_row(stage, note="no estimate for this stage"))
    return rows


def plan(cfg: RunConfig, calibrate: bool = True, log=print) -> dict:
    """The per-stage estimate; with calibration, also seconds per stage and in total."""
    from cai.config import check_config

    check_config(cfg)
    engine, rates = None, None
    if calibrate:
        from cai.engines import build_engine

        log("calibrating the engine (a small generate and a small scoring batch)...")
        engine = build_engine(cfg.engine, cache_path=None, progress=log)
        rates = measure_rates(engine)
    rows = estimate(cfg, Counter(engine))
    if engine is not None:
        engine.close()
    if rates:
        g, r = rates["gen_tokens_per_s"], rates["read_tokens_per_s"]
        for row in rows:
            row["seconds"] = round(row["new_tokens"] / g + row["prompt_tokens"] / r + row["train_tokens"] / (r / 3), 1)
    return {"rows": rows, "calibration": rates, "engine": cfg.engine.model, "kind": cfg.engine.kind}


def render(result: dict) -> str:
    rows = result["rows"]
    head = f"{'stage':<18}{'generate':>10}{'score':>8}{'prompt tok':>12}{'new tok':>10}{'train tok':>11}"
    timed = result["calibration"] is not None
    if timed:
        head += f"{'est. time':>11}"
    lines = [f"plan for engine {result['kind']}:{result['engine']} (an estimate; see `cai plan --help`)", head]
    for r in rows:
        line = (f"{r['stage']:<18}{r['generate']:>10}{r['score']:>8}{r['prompt_tokens']:>12}{r['new_tokens']:>10}"
                f"{r['train_tokens']:>11}")
        if timed:
            line += f"{_dur(r['seconds']):>11}"
        lines.append(line + (f"   {r['note']}" if r["note"] else ""))
    if timed:
        c = result["calibration"]
        total = sum(r["seconds"] for r in rows)
        lines.append(f"total estimated time: {_dur(total)}")
        lines.append(
            f"calibration: {c['gen_tokens_per_s']:.1f} new tok/s (batch {c['batch']}), {c['read_tokens_per_s']:.0f} "
            "prompt tok/s read; time = new/gen + prompt/read + train/(read/3). Every answer is assumed to use its "
            "whole token budget; shared prefixes, the request cache and early stops make real runs faster."
        )
    else:
        lines.append("no calibration: counts only (every answer assumed to use its whole token budget)")
    return "\n".join(lines)


def _dur(s: float) -> str:
    s = float(s)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s / 60:.1f}min"
    return f"{s / 3600:.1f}h"
