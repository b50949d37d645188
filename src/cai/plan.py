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
``choice_logprobs`` batch gives prompt tokens/s for reading text; building the engine
gives the time to load a model. Training is calibrated on a **measured step** where the
model is on this machine: ``sft``'s model is loaded as ``sft`` loads it (its dtype, LoRA,
gradient checkpointing), one forward/backward/AdamW step of a ``sft`` micro-batch is timed
after a warm-up step, then a no-grad forward pass and a ``save_pretrained``; the result is
cached per model and settings under the cai cache (``plan/``), so a second plan is quick.
Where the model is not here, training is assumed to run at a third of the engine's read
rate (a step costs about three forward passes) and the plan says so. Then::

    generation = new tokens / gen rate + prompt tokens / read rate + loads x engine load time
    training   = train tokens / train rate + held-out and reference tokens / forward rate
               + loads x load time + saves x save time + checkpoints x checkpoint time

A checkpoint (the trained weights plus two AdamW states) is taken as three saves of the
trained weights. Real runs differ: the local engine runs shared demonstration prefixes
once per batch (faster), the request cache skips finished work, batches other than the
calibration's run at other speeds, and answers often stop early.

Memory per process comes from the models' configs alone (:mod:`cai.memory`), and
:func:`check_memory` refuses a plan that cannot fit (``cai validate``, ``cai run``).
"""

from __future__ import annotations

import time
from pathlib import Path

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


def measure_training(cfg: RunConfig, log=print) -> dict | None:
    """A measured training step on this machine with ``sft``'s model and settings (see the
    module docstring), cached; None where the model is not on this machine."""
    import hashlib
    import json
    import tempfile

    import torch

    from cai.errors import CaiError
    from cai.models import cache_root, check_model, embedded_target, pick_device, resolve_model

    sc, e = cfg.sft, cfg.engine
    name = sc.model or e.model
    if e.kind != "local" and not sc.model:
        return None
    try:
        check_model(name, "sft.model", e.revision)
        if name == "default" and not (embedded_target() / "cai_model.json").is_file():
            return None  # converting the GGUF takes a while: the run does it, the plan does not
        path = resolve_model(name, e.revision, progress=lambda _m: None)
    except CaiError:
        return None
    device = pick_device(e.device)
    seqs, length = max(1, sc.batch_size // sc.grad_accum), min(sc.max_length, 256)
    folder = Path(path)
    stamp = [str(folder.resolve()), *(f"{f.name}:{f.stat().st_mtime_ns}" for f in sorted(folder.glob("*"))
                                      if f.suffix in (".json", ".safetensors"))] if folder.is_dir() else [path]
    key = json.dumps([stamp, device, sc.dtype, sc.method, sc.lora_r, sc.lora_target_modules, sc.gradient_checkpointing,
                      seqs, length, torch.get_num_threads(), torch.__version__])
    cached = cache_root() / "plan" / f"train-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if cached.is_file():
        return {**json.loads(cached.read_text()), "cached": True}
    log(f"calibrating training: one measured step of sft's settings ({seqs} x {length} tokens) on {name}...")
    from transformers import AutoModelForCausalLM

    from cai.training import load_trainable, token_loss

    t0 = time.perf_counter()
    model, _tok, prec = load_trainable(path, sc, device, e.trust_remote_code, AutoModelForCausalLM, "sft",
                                       lambda _m: None)
    model.to(device)
    load_s = time.perf_counter() - t0
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (seqs, length), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-12)
    model.train()

    def step():
        with prec.autocast():
            loss = token_loss(model(input_ids=ids, attention_mask=mask).logits, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)

    step()  # warm-up: allocates AdamW's state and the kernels' workspaces
    t0 = time.perf_counter()
    step()
    step_s = time.perf_counter() - t0
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad(), prec.autocast():
        model(input_ids=ids, attention_mask=mask)
    _sync(device)
    fwd_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="cai-plan-") as tmp:
        saved = model.get_base_model() if hasattr(model, "get_base_model") else model
        t0 = time.perf_counter()
        saved.save_pretrained(tmp)
        save_s = time.perf_counter() - t0
    trained = sum(p.numel() for p in params) / max(1, sum(p.numel() for p in model.parameters()))
    out = {"model": name, "batch": seqs, "length": length, "precision": prec.name, "method": sc.method,
           "train_tokens_per_s": seqs * length / step_s, "forward_tokens_per_s": seqs * length / fwd_s,
           "load_s": load_s, "save_s": save_s, "checkpoint_s": 3 * save_s * trained,
           "measured": time.strftime("%Y-%m-%d %H:%M")}
    del model, opt
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(out, indent=2) + "\n")
    return {**out, "cached": False}


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def estimate(cfg: RunConfig, count, world: int = 1) -> list[dict]:
    """Each configured stage's :class:`~cai.stage.Cost`, as plan rows (the stages estimate
    themselves), with its peak memory per process for ``world`` processes."""
    from cai.models import pick_device
    from cai.stage import PlanInputs, load_inputs
    from cai.stages import registry

    const, sets = load_inputs(cfg)
    inputs = PlanInputs(cfg=cfg, constitution=const, sets=sets, count=count, world=world,
                        device=pick_device(cfg.engine.device))
    specs = registry()
    rows = []
    for stage in cfg.stages:
        cost = specs[stage].estimate(inputs)
        rows.append({"stage": stage, "generate": cost.generate, "score": cost.score,
                     "prompt_tokens": cost.prompt_tokens, "new_tokens": cost.new_tokens,
                     "train_tokens": cost.train_tokens, "note": cost.note, "loads": cost.loads,
                     "eval_tokens": cost.eval_tokens, "saves": cost.saves, "checkpoints": cost.checkpoints,
                     "memory": cost.memory.to_dict() if cost.memory is not None else None})
    return rows


def check_memory(cfg: RunConfig, world: int | None = None, log=print) -> list[dict] | None:
    """Refuse (one line) a config whose estimated peak memory per process does not fit the
    device (``memory_check``, ``memory_margin``); returns the plan rows, or None when the
    check is off or the inputs cannot be read here."""
    from cai.errors import CaiError
    from cai.memory import check_fit, process_count
    from cai.models import pick_device

    if not cfg.memory_check:
        return None
    try:
        rows = estimate(cfg, counter(None), world or process_count())
    except CaiError as exc:
        log(f"memory check skipped: {exc}")
        return None
    check_fit(rows, pick_device(cfg.engine.device), cfg.memory_margin)
    return rows


def plan(cfg: RunConfig, calibrate: bool = True, log=print, world: int | None = None) -> dict:
    """The per-stage estimate; with calibration, also seconds per stage and in total."""
    from cai.config import check_config
    from cai.memory import device_memory, process_count
    from cai.models import pick_device

    check_config(cfg)
    world = world or process_count()
    engine, rates, train = None, None, None
    if calibrate:
        from cai.engines import build_engine

        log("calibrating the engine (a small generate and a small scoring batch)...")
        t0 = time.perf_counter()
        engine = build_engine(cfg.engine, cache_path=None, progress=log)
        load_s = time.perf_counter() - t0
        rates = {**measure_rates(engine, cfg.engine.batch_size), "load_s": load_s}
    rows = estimate(cfg, counter(engine), world)
    if engine is not None:
        engine.close()
    if rates and any(r["train_tokens"] or r["saves"] for r in rows):
        train = measure_training(cfg, log)
    if rates:
        g, r = rates["gen_tokens_per_s"], rates["read_tokens_per_s"]
        t = train or {"train_tokens_per_s": r / 3, "forward_tokens_per_s": r, "load_s": rates["load_s"],
                      "save_s": rates["load_s"], "checkpoint_s": 3 * rates["load_s"]}
        # a load measured once the engine had paid the imports (the training calibration's) is what
        # every later load costs; without one, the engine's first load (imports included) is used
        load = t["load_s"]
        for row in rows:
            row["seconds"] = round(row["new_tokens"] / g + row["prompt_tokens"] / r
                                   + row["train_tokens"] / t["train_tokens_per_s"]
                                   + row["eval_tokens"] / t["forward_tokens_per_s"] + row["loads"] * load
                                   + row["saves"] * t["save_s"] + row["checkpoints"] * t["checkpoint_s"], 1)
    what, available = device_memory(pick_device(cfg.engine.device))
    return {"rows": rows, "calibration": rates, "training": train, "engine": cfg.engine.model, "kind": cfg.engine.kind,
            "world": world, "device_memory": what, "available_bytes": available}


def render(result: dict) -> str:
    from cai.memory import RUNTIME_BYTES, fmt

    rows = result["rows"]
    head = f"{'stage':<18}{'generate':>10}{'score':>8}{'prompt tok':>12}{'new tok':>10}{'train tok':>11}{'peak/proc':>11}"
    timed = result["calibration"] is not None
    if timed:
        head += f"{'est. time':>11}"
    lines = [f"plan for engine {result['kind']}:{result['engine']} (an estimate; see `cai plan --help`)", head]
    for r in rows:
        mem = r.get("memory")
        line = (f"{r['stage']:<18}{r['generate']:>10}{r['score']:>8}{r['prompt_tokens']:>12}{r['new_tokens']:>10}"
                f"{r['train_tokens']:>11}{fmt(mem['stage_bytes'] + RUNTIME_BYTES) if mem else '-':>11}")
        if timed:
            line += f"{_dur(r['seconds']):>11}"
        lines.append(line + (f"   {r['note']}" if r["note"] else ""))
    if timed:
        c = result["calibration"]
        total = sum(r["seconds"] for r in rows)
        lines.append(f"total estimated time: {_dur(total)}")
        lines.append(
            f"generation rests on the engine's calibration (measured): {c['gen_tokens_per_s']:.1f} new tok/s "
            f"(batch {c['batch']}), {c['read_tokens_per_s']:.0f} prompt tok/s read, {c['load_s']:.0f}s to build the "
            "engine (imports included); every answer is assumed to use its whole token budget; shared prefixes, the request cache and "
            "early stops make real runs faster."
        )
        t = result.get("training")
        if t:
            lines.append(
                f"training rests on a measured step of sft's settings ({'cached from ' if t.get('cached') else ''}"
                f"{t['measured']}): {t['train_tokens_per_s']:.0f} train tok/s and {t['forward_tokens_per_s']:.0f} "
                f"no-grad tok/s at {t['batch']} x {t['length']} tokens ({t['precision']}, {t['method']}); model load "
                f"{t['load_s']:.0f}s (every stage's loads) and save {t['save_s']:.0f}s measured, checkpoint {t['checkpoint_s']:.0f}s "
                "assumed (three saves' worth of the trained weights)")
        elif any(r["train_tokens"] for r in rows):
            lines.append("training is ASSUMED, not measured (the training model is not on this machine): a step at "
                         "a third of the read rate, a save and every load as long as building the engine")
    else:
        lines.append("no calibration: counts only (every answer assumed to use its whole token budget)")
    world = result.get("world", 1)
    lines.append(f"memory: peak per process ({world} process{'es' if world > 1 else ''}) from the models' configs, "
                 f"with ~{fmt(RUNTIME_BYTES)} for the runtime; device: {result.get('device_memory', '?')}")
    for r in rows:
        mem = r.get("memory")
        if mem and (r["train_tokens"] or r["saves"]):
            parts = ", ".join(f"{k} {fmt(v)}" for k, v in mem["parts"].items() if v)
            lines.append(f"  {r['stage']}: {parts} ({mem['basis']})")
    return "\n".join(lines)


def _dur(s: float) -> str:
    s = float(s)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s / 60:.1f}min"
    return f"{s / 3600:.1f}h"
