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

import time

from cai.config import RunConfig

_PROBE = "Write two sentences about {topic}."
_TOPICS = ["rivers", "tea", "maps", "bridges", "clouds", "owls", "glass", "salt", "trains", "bees", "ink", "moss",
           "kites", "clocks", "sand", "violins"]


def counter(engine=None):
    """Tokens of a conversation: the engine's own count (its tokenizer) when there is one,
    else about four characters a token."""
    if engine is not None:
        return engine.count_tokens
    return lambda conv: sum(len(m["content"]) + 16 for m in conv) // 4


def measure_rates(engine, batch: int) -> dict:
    """New tokens/s of a small generate call and prompt tokens/s of a small scoring batch."""
    from cai.engines.base import SamplingParams

    batch = min(batch or 16, 16)
    convs = [[{"role": "user", "content": _PROBE.format(topic=t)}] for t in (_TOPICS * 4)[:batch]]
    engine.generate(convs[:1], SamplingParams(max_new_tokens=2))  # warm-up: first-call costs are not the rate
    t0 = time.perf_counter()
    outs = engine.generate(convs, SamplingParams(max_new_tokens=16, temperature=0.7, seed=1))
    gen_s = time.perf_counter() - t0
    count = counter(engine)
    new = sum(max(1, count([{"role": "assistant", "content": o[0]}]) - count([{"role": "assistant", "content": ""}]))
              for o in outs)
    q = [c + [{"role": "assistant", "content": "A short reply. " * 12}, {"role": "user", "content": "Which is better?"},
              {"role": "assistant", "content": "The answer is: ("}] for c in convs]
    t0 = time.perf_counter()
    engine.choice_logprobs(q, [["A", "B"]] * len(q))
    score_s = time.perf_counter() - t0
    read = sum(count(c) for c in q)
    return {"batch": batch, "gen_tokens_per_s": new / max(gen_s, 1e-6), "read_tokens_per_s": read / max(score_s, 1e-6)}


def estimate(cfg: RunConfig, count) -> list[dict]:
    """Each configured stage's :class:`~cai.stage.Cost`, as plan rows (the stages estimate themselves)."""
    from cai.stage import PlanInputs, load_inputs
    from cai.stages import registry

    const, sets = load_inputs(cfg)
    inputs = PlanInputs(cfg=cfg, constitution=const, sets=sets, count=count)
    specs = registry()
    rows = []
    for stage in cfg.stages:
        cost = specs[stage].estimate(inputs)
        rows.append({"stage": stage, "generate": cost.generate, "score": cost.score,
                     "prompt_tokens": cost.prompt_tokens, "new_tokens": cost.new_tokens,
                     "train_tokens": cost.train_tokens, "note": cost.note})
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
        rates = measure_rates(engine, cfg.engine.batch_size)
    rows = estimate(cfg, counter(engine))
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
