"""``cai plan``: what a config will do, per stage, before running it.

For every configured stage it counts the engine requests (generations and option
scorings), the tokens they read and write, and the training tokens, from the actual
prompt sets and demonstrations. Two simplifications make it an **upper-bound-ish
estimate**, not a measurement:

* every generated text is assumed to use its whole ``max_new_tokens`` budget, and later
  requests that contain it (a critique of an answer) count that many tokens for it;
* tokens are counted with the engine's tokenizer when a local engine is calibrated,
  else as characters / 4.

The times come from a short calibration on the configured engine: generate calls of
``min(batch_size, 16)`` prompts and of one prompt, 24 new tokens each, give new tokens/s
and a decoding step's fixed part (a step costs about the same for few rows as for many,
so a stage's small calls are slower per token), ``choice_logprobs`` batches of questions
about a ~200-token reply give prompt tokens/s for reading text (each measurement is two
calls on other prompts), and building the engine a second time gives the time
to load a model. Training is calibrated on **measured steps** where the
model is on this machine: ``sft``'s model is loaded as ``sft`` loads it (its dtype, LoRA,
gradient checkpointing); a first step (its one-time costs are the warm-up), then
forward/backward passes at two sizes (each pass costs a fixed part plus its tokens), an
AdamW step, no-grad forward passes at the same two sizes, a short generate call through
an engine around the training model (rl samples its rollouts that way), a
``save_pretrained`` with the hashing a manifest does, and one figure. The result is
cached per model and settings under the cai cache (``plan/``), so a second plan is quick.
Where the model is not here, training is assumed to run at a third of the engine's read
rate (a step costs about three forward passes) and the plan says so. Then::

    generation = decoding steps x step time + new tokens / gen rate + prompt tokens / read rate
               + loads x engine load time
    training   = train tokens / train rate + passes x pass time + steps x AdamW step + warm-up
               + held-out and reference tokens / forward rate + no-grad calls x call time
               + rollout tokens / the training model's sampling rate
               + loads x load time + saves x save time + checkpoints x checkpoint time
               + figures x figure time

A checkpoint (the trained weights plus two AdamW states) is taken as three saves of the
trained weights. Real runs differ: the local engine runs shared demonstration prefixes
once per batch (faster), the request cache skips finished work, batches other than the
calibration's run at other speeds, and answers often stop early.

Memory per process comes from the models' configs alone (:mod:`cai.memory`), and
:func:`check_memory` refuses a plan that cannot fit (``cai validate``, ``cai run``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from cai.config import RunConfig

_PROBE = "Write two sentences about {topic}."
#: New tokens of each calibration generate call.
_PROBE_TOKENS = 24
#: Bumped when the training calibration measures something new (older cached ones are redone).
CALIBRATION_VERSION = 2
_TOPICS = ["rivers", "tea", "maps", "bridges", "clouds", "owls", "glass", "salt", "trains", "bees", "ink", "moss",
           "kites", "clocks", "sand", "violins"]


def counter(engine=None):
    """Tokens of a conversation: the engine's own count (its tokenizer) when there is one,
    else about four characters a token."""
    if engine is not None:
        return engine.count_tokens
    return lambda conv: sum(len(m["content"]) + 16 for m in conv) // 4


def measure_rates(engine, batch: int, score: bool = True, repeats: int = 2) -> dict:
    """New tokens/s of small generate calls (a batch, and one row: a decoding step's fixed
    part) and (``score``) prompt tokens/s of a scoring batch, each the total of ``repeats``
    calls on other prompts (one short call's time moves a lot with the machine's load)."""
    from cai.engines.base import SamplingParams

    batch = min(batch or 16, 16)
    probes = [[[{"role": "user", "content": f"{_PROBE.format(topic=t)}{' Then one more.' * k}"}]
               for t in (_TOPICS * 4)[:batch]] for k in range(repeats)]
    engine.generate(probes[0][:1], SamplingParams(max_new_tokens=2))  # warm-up: first-call costs are not the rate
    count = counter(engine)

    def timed_generate(rows_of_each: list[list]) -> tuple[int, float]:
        new, took = 0, 0.0
        for k, rows in enumerate(rows_of_each):
            t = time.perf_counter()
            outs = engine.generate(rows, SamplingParams(max_new_tokens=_PROBE_TOKENS, temperature=0.7, seed=k + 1))
            took += time.perf_counter() - t
            new += sum(max(1, count([{"role": "assistant", "content": o[0]}]) - count([{"role": "assistant", "content": ""}]))
                       for o in outs)
        return new, took

    new, gen_s = timed_generate(probes)
    out = {"batch": batch, "gen_tokens_per_s": new / max(gen_s, 1e-6)}
    if batch > 1:  # one row too: a decoding step's fixed part, whatever the batch
        one, one_s = timed_generate([p[-1:] for p in probes])
        rate, fixed = two_point(new, gen_s, one, one_s)
        out.update(gen_marginal_tokens_per_s=rate, decode_step_s=fixed / (_PROBE_TOKENS * repeats))
    if not score:
        return out
    read, score_s = 0, 0.0
    for k, convs in enumerate(probes):  # questions about a longer reply, as a judge reads
        q = [c + [{"role": "assistant", "content": f"Reply {k}. " + "A short sentence of the reply. " * 30},
                  {"role": "user", "content": "Which is better?"}, {"role": "assistant", "content": "The answer is: ("}]
             for c in convs]
        t0 = time.perf_counter()
        engine.choice_logprobs(q, [["A", "B"]] * len(q))
        score_s += time.perf_counter() - t0
        read += sum(count(c) for c in q)
    return {**out, "read_tokens_per_s": read / max(score_s, 1e-6)}


#: A calibration that kept fewer than this share of the usable cores busy ran beside other
#: work: it is not cached (the benchmarks flag such runs the same way).
BUSY_SHARE = 0.75


def usable_cores() -> int:
    """The cores torch may use here: the affinity mask capped by torch's thread count."""
    import os

    import torch

    return max(1, min(len(os.sched_getaffinity(0)), torch.get_num_threads()))


def cores_busy(wall: float, cpu: float) -> float:
    """CPU time over wall time of a measurement: below the usable cores when other
    processes competed for them."""
    return round(cpu / max(wall, 1e-6), 2)


def measure_training(cfg: RunConfig, log=print, recalibrate: bool = False) -> dict | None:
    """A measured training step on this machine with ``sft``'s model and settings (see the
    module docstring), cached; None where the model is not on this machine. A measurement
    taken while other processes kept the cores busy is used once but not cached;
    ``recalibrate`` measures again whatever the cache holds."""
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
    from cai.models import has_weights

    if Path(path).is_dir() and not has_weights(path):
        return None  # a config and a tokenizer only: training is assumed, and the plan says so
    device = pick_device(e.device)
    seqs, length = max(1, sc.batch_size // sc.grad_accum), min(sc.max_length, 256)
    small = (max(1, seqs // 4), max(8, length // 2))  # the second size, for each call's fixed part
    folder = Path(path)
    stamp = [str(folder.resolve()), *(f"{f.name}:{f.stat().st_mtime_ns}" for f in sorted(folder.glob("*"))
                                      if f.suffix in (".json", ".safetensors"))] if folder.is_dir() else [path]
    key = json.dumps([CALIBRATION_VERSION, stamp, device, sc.dtype, sc.method, sc.lora_r, sc.lora_target_modules,
                      sc.gradient_checkpointing, seqs, length, torch.get_num_threads(), torch.__version__])
    cached = cache_root() / "plan" / f"train-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if cached.is_file() and not recalibrate:
        return {**json.loads(cached.read_text()), "cached": True}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    log(f"calibrating training: measured steps of sft's settings ({seqs} x {length} and {small[0]} x {small[1]} "
        f"tokens) on {name}...")
    from transformers import AutoModelForCausalLM

    from cai.engines.local import LocalEngine
    from cai.io import file_sha256
    from cai.training import is_lora, load_trainable, token_loss

    t0 = time.perf_counter()
    model, tok, prec = load_trainable(path, sc, device, e.trust_remote_code, AutoModelForCausalLM, "sft",
                                      lambda _m: None)
    model.to(device)
    load_s = time.perf_counter() - t0
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    batches = {size: torch.randint(0, vocab, size, generator=gen).to(device) for size in ((seqs, length), small)}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-12)
    model.train()

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t

    def train_pass(size) -> None:
        ids = batches[size]
        with prec.autocast():
            loss = token_loss(model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits, ids)
        loss.backward()

    def forward(size) -> None:
        ids = batches[size]
        with torch.no_grad(), prec.autocast():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)

    def opt_step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    # the first step pays one-time costs (AdamW's state, kernels' workspaces): the warm-up
    first = timed(lambda: train_pass((seqs, length))) + timed(opt_step)
    big, optimizer_s = timed(lambda: train_pass((seqs, length))), timed(opt_step)
    timed(lambda: train_pass(small))
    little = timed(lambda: train_pass(small))
    opt.zero_grad(set_to_none=True)
    train_rate, train_call = two_point(seqs * length, big, small[0] * small[1], little)
    model.eval()
    forward(small)
    fwd_rate, fwd_call = two_point(seqs * length, timed(lambda: forward((seqs, length))),
                                   small[0] * small[1], timed(lambda: forward(small)))
    # rl samples its rollouts with the training model itself, through an engine around it
    engine = LocalEngine.for_model(model.get_base_model() if is_lora(model) else model, tok, batch_size=seqs)
    gen_rate = measure_rates(engine, seqs, score=False)["gen_tokens_per_s"]
    del engine
    with tempfile.TemporaryDirectory(prefix="cai-plan-") as tmp:
        saved = model.get_base_model() if hasattr(model, "get_base_model") else model
        t0 = time.perf_counter()
        saved.save_pretrained(tmp)
        for f in Path(tmp).iterdir():  # a run hashes what it writes into the stage's manifest
            file_sha256(f, sync=True)
        save_s = time.perf_counter() - t0
        from cai.plots import plot_curve

        plot_curve(Path(tmp) / "warm.png", {"loss": [(0, 1.0), (1, 0.5)]}, "calibration")  # the import is once a process
        t0 = time.perf_counter()
        plot_curve(Path(tmp) / "loss.png", {"loss": [(0, 1.0), (1, 0.5)]}, "calibration")
        figure_s = time.perf_counter() - t0
    trained = sum(p.numel() for p in params) / max(1, sum(p.numel() for p in model.parameters()))
    out = {"model": name, "batch": seqs, "length": length, "small": list(small), "precision": prec.name,
           "method": sc.method, "train_tokens_per_s": train_rate, "train_pass_s": train_call,
           "optimizer_s": optimizer_s, "warmup_s": max(0.0, first - big - optimizer_s),
           "forward_tokens_per_s": fwd_rate, "forward_call_s": fwd_call, "policy_gen_tokens_per_s": gen_rate,
           "load_s": load_s, "save_s": save_s, "checkpoint_s": 3 * save_s * trained, "figure_s": figure_s,
           "measured": time.strftime("%Y-%m-%d %H:%M")}
    model = opt = None  # the calibration model is not kept
    out["cores"] = usable_cores()
    out["cores_busy"] = cores_busy(time.perf_counter() - wall0, time.process_time() - cpu0)
    if str(device).startswith("cpu") and out["cores_busy"] < BUSY_SHARE * out["cores"]:
        log(f"the training calibration kept {out['cores_busy']:g} of {out['cores']} cores busy: other processes "
            "competed for them, so it is used for this plan only, not cached (the next plan measures again)")
        return {**out, "cached": False, "busy": True}
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(out, indent=2) + "\n")
    return {**out, "cached": False}


def two_point(n_big: int, t_big: float, n_small: int, t_small: float) -> tuple[float, float]:
    """(tokens/s, seconds per call) of a call that costs a fixed part plus its tokens, from
    two timed calls of ``n_big`` and ``n_small`` tokens. Where the two do not resolve (noise:
    the bigger call was not the slower one by enough) the fixed part is 0 and the rate the big
    call's."""
    if t_big > t_small and n_big > n_small:
        rate = (n_big - n_small) / (t_big - t_small)
        fixed = t_small - n_small / rate
        if fixed >= 0 and rate > 0:
            return rate, fixed
    return n_big / max(t_big, 1e-6), 0.0


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def estimate(cfg: RunConfig, count, world: int = 1) -> list[dict]:
    """Each configured stage's :class:`~cai.cost.Cost`, as plan rows (the stages estimate
    themselves), with its peak memory per process for ``world`` processes."""
    from cai.models import pick_device
    from cai.cost import PlanInputs
    from cai.inputs import load_inputs
    from cai.stages import registry

    const, sets = load_inputs(cfg)
    inputs = PlanInputs(cfg=cfg, constitution=const, sets=sets, count=count, world=world,
                        device=pick_device(cfg.engine.device))
    specs = registry()
    rows = []
    for stage in cfg.stages:
        cost = specs[stage].estimate(inputs)
        row = {"stage": stage, **{f.name: getattr(cost, f.name) for f in dataclasses.fields(cost) if f.name != "memory"}}
        # what every stage adds beside its models: the request cache (each request and its answer)
        # and its data files, at about four bytes a token
        row["disk_bytes"] += 4 * (cost.prompt_tokens + 2 * (cost.new_tokens + cost.policy_tokens))
        rows.append({**row, "memory": cost.memory.to_dict() if cost.memory is not None else None})
    return rows


#: The parts of the training time a plan leaves at 0 where training is not calibrated (the model is
#: not on this machine): only the per-token rates are assumed then.
ASSUMED_TRAINING = {"train_pass_s": 0.0, "optimizer_s": 0.0, "warmup_s": 0.0, "forward_call_s": 0.0, "figure_s": 0.0}


def stage_seconds(row: dict, rates: dict, t: dict) -> float:
    """A stage's estimated seconds from its counts (a plan row), the engine's rates and the
    training calibration ``t`` (see the module docstring)."""
    if row.get("decode_steps") and "decode_step_s" in rates:  # each step's fixed part, then each new token's
        decode = row["decode_steps"] * rates["decode_step_s"] + row["new_tokens"] / rates["gen_marginal_tokens_per_s"]
    else:
        decode = row["new_tokens"] / rates["gen_tokens_per_s"]
    engine = decode + row["prompt_tokens"] / rates["read_tokens_per_s"]
    training = (row["train_tokens"] / t["train_tokens_per_s"] + row["train_passes"] * t["train_pass_s"]
                + row["steps"] * t["optimizer_s"] + (t["warmup_s"] if row["steps"] else 0.0))
    no_grad = row["eval_tokens"] / t["forward_tokens_per_s"] + row["eval_passes"] * t["forward_call_s"]
    # a stage that trains loads training models; the others build engines
    load = t["load_s"] if row["steps"] else rates.get("engine_load_s", rates["load_s"])
    fixed = (row["loads"] * load + row["saves"] * t["save_s"] + row["checkpoints"] * t["checkpoint_s"]
             + row["figures"] * t["figure_s"])
    return engine + training + no_grad + row["policy_tokens"] / t["policy_gen_tokens_per_s"] + fixed


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


def plan(cfg: RunConfig, calibrate: bool = True, log=print, world: int | None = None,
         recalibrate: bool = False) -> dict:
    """The per-stage estimate; with calibration, also seconds per stage and in total (where
    the engine's model has no weights here, memory and tokens only). ``recalibrate``
    measures training again instead of taking the cached measurement."""
    from cai.checks import check_config
    from cai.memory import device_memory, process_count
    from cai.stages import check_order
    from cai.models import pick_device

    check_config(cfg)
    check_order(cfg, finished=False)  # a plan may price part of a run whose rest is elsewhere
    world = world or process_count()
    engine, rates, train, no_timing = None, None, None, None
    if calibrate and cfg.engine.kind == "local":
        from cai.models import has_weights, resolve_model

        path = resolve_model(cfg.engine.model, cfg.engine.revision, progress=log)
        if Path(path).is_dir() and not has_weights(path):
            no_timing = (f"timing needs the weights: '{cfg.engine.model}' has a config but no weights here, so this "
                         "plan gives memory and tokens only")
            log(no_timing)
            calibrate = False
    if calibrate:
        from cai.engines import batching, build_engine

        log("calibrating the engine (a small generate and a small scoring batch)...")
        t0 = time.perf_counter()
        engine = build_engine(cfg.engine, cache_path=None, progress=log)
        load_s = time.perf_counter() - t0
        wall0, cpu0 = time.perf_counter(), time.process_time()
        rates = {**measure_rates(engine, batching(cfg.engine).generate), "load_s": load_s}
        if cfg.engine.kind == "local":  # a server's work is not this process's CPU time
            rates.update(cores=usable_cores(),
                         cores_busy=cores_busy(time.perf_counter() - wall0, time.process_time() - cpu0))
    rows = estimate(cfg, counter(engine), world)
    if engine is not None:
        engine.close()
        del engine
        if cfg.engine.kind == "local":  # a second build: what each of a run's engine loads costs, imports paid
            t0 = time.perf_counter()
            build_engine(cfg.engine, cache_path=None, progress=lambda _m: None).close()
            rates["engine_load_s"] = time.perf_counter() - t0
    if rates and any(r["train_tokens"] or r["saves"] for r in rows):
        train = measure_training(cfg, log, recalibrate)
    if rates:
        g, r = rates["gen_tokens_per_s"], rates["read_tokens_per_s"]
        t = {**ASSUMED_TRAINING, "train_tokens_per_s": r / 3, "forward_tokens_per_s": r, "policy_gen_tokens_per_s": g,
             "load_s": rates["load_s"], "save_s": rates["load_s"], "checkpoint_s": 3 * rates["load_s"], **(train or {})}
        for row in rows:
            row["seconds"] = round(stage_seconds(row, rates, t), 1)
    what, available = device_memory(pick_device(cfg.engine.device))
    return {"rows": rows, "calibration": rates, "training": train, "engine": cfg.engine.model, "kind": cfg.engine.kind,
            "world": world, "device_memory": what, "available_bytes": available, "no_timing": no_timing}


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
        new = r["new_tokens"] + r.get("policy_tokens", 0)  # rl's are sampled by its training policy
        line = (f"{r['stage']:<18}{r['generate']:>10}{r['score']:>8}{r['prompt_tokens']:>12}{new:>10}"
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
            "engine (imports included)"
            + (f", cores busy {c['cores_busy']:g} of {c['cores']}" if "cores_busy" in c else "")
            + (" (other processes competed for them: noisy)" if c.get("cores_busy", 1e9) < BUSY_SHARE * c.get("cores", 0)
               else "")
            + "; every answer is assumed to use its whole token budget; shared prefixes, the request cache and "
            "early stops make real runs faster."
        )
        t = result.get("training")
        if t:
            lines.append(
                f"training rests on measured steps of sft's settings ({'cached from ' if t.get('cached') else ''}"
                f"{t['measured']}, {t['precision']}, {t['method']}): {t['train_tokens_per_s']:.0f} train tok/s "
                f"+ {t.get('train_pass_s', 0):.2f}s a pass, AdamW step {t.get('optimizer_s', 0):.2f}s, warm-up "
                f"{t.get('warmup_s', 0):.1f}s, {t['forward_tokens_per_s']:.0f} no-grad tok/s + "
                f"{t.get('forward_call_s', 0):.2f}s a call (from {t['batch']} x {t['length']} and "
                f"{' x '.join(map(str, t.get('small', ['-'])))} tokens), rollouts "
                f"{t.get('policy_gen_tokens_per_s', 0):.0f} new tok/s; model load {t['load_s']:.0f}s, save (hashed) "
                f"{t['save_s']:.0f}s and a figure {t.get('figure_s', 0):.1f}s measured, checkpoint "
                f"{t['checkpoint_s']:.0f}s assumed (three saves' worth of the trained weights)"
                + (f"; cores busy {t['cores_busy']:g} of {t['cores']}" if "cores_busy" in t else "")
                + ("; taken beside other work, not cached" if t.get("busy") else ""))
        elif any(r["train_tokens"] for r in rows):
            lines.append("training is ASSUMED, not measured (the training model is not on this machine): a step at "
                         "a third of the read rate, a save and every load as long as building the engine")
    else:
        lines.append(f"{result.get('no_timing') or 'no calibration: counts only'} (every answer assumed to use its "
                     "whole token budget)")
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
