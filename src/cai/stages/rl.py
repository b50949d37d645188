"""RL-CAI (Bai et al. 2022, §4): optimise the policy against the preference model, with a
KL penalty to the SL-CAI model. The algorithm is RLOO (REINFORCE leave-one-out,
Ahmadian et al. 2024) instead of the paper's PPO: no value model, one update per batch
of rollouts, and on this scale it matches PPO at a fraction of the memory and code.

Each step:

1. **Rollouts.** ``prompts_per_step`` prompts (red-team and helpfulness train prompts,
   ``helpful_ratio`` to one) get ``samples_per_prompt`` = k answers each from the
   *current* policy, through the local engine's batched decode loop (per-request seeds
   ``seed + step``; no request cache, the weights change every step). The engine hands
   back the sampled token ids, end-of-turn token included, so the update scores exactly
   what was sampled.
2. **Reward.** The PM scores every answer (``RUN_DIR/preference_model/model``). The KL
   term is the sequence-level log-ratio of the sampled tokens,
   ``KL_i = sum_t [log pi(y_t) - log pi_ref(y_t)]`` (the k1 estimator: unbiased for
   KL(pi || pi_ref) when sampling at temperature 1). ``reward_i = PM_i - kl_coef * KL_i``.
   With ``whiten`` the step's rewards are divided by their standard deviation (over all
   processes), so the learning rate does not depend on the PM's scale.
3. **Advantage.** Leave-one-out baseline within each prompt's k answers:
   ``A_i = r_i - mean_{j != i} r_j = k/(k-1) (r_i - mean_j r_j)``; or, with
   ``advantage: grpo``, group-normalised: ``(r_i - mean_j r_j) / (std_j r_j + eps)``
   (:func:`grpo_advantages`). The loss is the same for both.
4. **Loss.** ``-mean_i A_i * sum_t log pi(y_t)``: the REINFORCE estimator with the
   sequence's *summed* log-probability (not length-normalised: that would favour long
   answers with a positive advantage), averaged over the step's sequences. The
   reference is a frozen copy of the starting policy, in eval mode; with
   ``rl.method=lora`` it is the policy itself with its adapters switched off (no copy).

**Memory.** ``rl.offload`` moves what a phase does not use to the CPU between the phases
of a step: the PM waits there except while it scores, the reference copy except while it
gives its log-probs, so the rollout and the update have the accelerator to the policy.
``auto`` does it on an accelerator when the models and the policy's training state would
take over half of its memory, never on a CPU run (there is nothing to move).

**Precision.** ``rl.dtype`` as in every training stage: with bf16-mixed the log-prob
passes and the update run under a bfloat16 autocast over float32 master weights, the PM
is held in bfloat16. The rollouts sample with the weights as they are stored (float32
masters in full fine-tuning; LoRA's bfloat16 base with its adapters): the engine's decode
loop does not run under autocast.

Log-probabilities of the sampled tokens come from one padded forward pass per model
(logits kept only over the answers). When a process's sequences fit one
``micro_batch_size``, the policy's graph from that pass is reused for the update;
otherwise a no-grad pass gives the KL and a second pass per micro-batch the gradient.

Logged per step: mean PM reward, total reward, KL, answer length, mean token entropy
of the policy on the sampled tokens, loss. Evaluation: the mean PM reward (and the KL to
the reference) of answers sampled with a fixed seed to ``eval_prompts`` held-out
red-team test prompts, for the starting policy (before) and the trained one (after).

Outputs in ``rl/``: ``model/`` (``save_pretrained`` + ``cai_training.json``; merged with
LoRA, whose adapter is also in ``adapter/``),
``metrics.json``, ``rollouts.jsonl`` (every sampled answer with its score, KL and
advantage), ``eval_samples.jsonl``, ``reward.png``, ``kl.png``, ``loss.png``, and the
frontier points (``rl.frontier_points``): ``points/step-NNNNNN/`` (the LoRA adapter, or
the whole model) and ``points/index.json`` (step, rollouts seen, the step's KL and
reward; the last point is ``model/``), which the evaluate stage scores.
"""

from __future__ import annotations

import contextlib
import copy
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai import seeds
from cai.config import RLConfig
from cai.errors import CaiError
from cai.io import read_jsonl, write_json, write_jsonl
from cai.plots import plot_curve
from cai.cost import Cost, PlanInputs, passes, training_disk
from cai.inputs import expanded_prompts, with_expansion
from cai.stage import StageContext, StageSpec
from cai.stage_names import SL_CAI
from cai.training import (
    IGNORE,
    adapters_off,
    answer_logprobs,
    check_finite,
    is_lora,
    load_trainable,
    optimizer_step,
    pad_batch,
    point_steps,
    resume,
    save_checkpoint,
    save_point,
    save_trained_model,
    warmup_lr,
    write_points_index,
)



@dataclass
class Learner:
    """What one RL run holds fixed: the models, the optimizer and the settings."""

    rc: RLConfig
    model: Any  # the policy as accelerate prepared it (DDP-wrapped in several processes)
    policy: Any  # the same weights, unwrapped (generation, no-grad passes, saving)
    ref: Any  # frozen copy of the starting policy; None with LoRA (the policy, adapters off)
    pm: Any  # cai.reward.RewardModel
    engine: Any  # LocalEngine around ``policy``
    optimizer: Any
    scaler: Any  # the fp16 gradient scaler (disabled in other precisions)
    accelerator: Any
    params: list
    pad_id: int
    ckpt: Path
    prec: Any  # cai.training.Precision
    offload: bool  # PM and reference copy wait on the CPU outside their phase

    @property
    def micro(self) -> int:
        return max(1, self.rc.micro_batch_size)


# -- the estimator (pure functions, unit-tested against hand-worked values) -----------------


def shaped_rewards(scores, kl, kl_coef: float, whiten: bool, std=None):
    """``scores - kl_coef * kl``, divided by ``std`` (default: their own) when whitening."""
    r = scores - kl_coef * kl
    if whiten:
        s = r.std(unbiased=False) if std is None else std
        r = r / (s + 1e-8) if float(s) > 0 else r
    return r


def rloo_advantages(rewards):
    """Leave-one-out advantages for a ``[prompts, k]`` reward matrix (k >= 2):
    ``A_ij = r_ij - mean_{l != j} r_il = k/(k-1) * (r_ij - mean_l r_il)``."""
    k = rewards.size(-1)
    if k < 2:
        raise CaiError("RLOO needs at least 2 samples per prompt (rl.samples_per_prompt)")
    return (rewards - rewards.mean(-1, keepdim=True)) * (k / (k - 1))


#: GRPO's guard against a zero spread, in the units of the rewards it divides (with
#: ``whiten``, the step's reward standard deviation; see :func:`grpo_advantages`).
GRPO_EPS = 1e-4


def grpo_advantages(rewards, eps: float = GRPO_EPS):
    """Group-normalised advantages (GRPO, Shao et al. 2024) for a ``[prompts, k]`` reward
    matrix: ``A_ij = (r_ij - mean_l r_il) / (std_l r_il + eps)``.

    The std is the **population** one (divide by k): each prompt's advantages then have
    mean 0 and mean square ~1, so k = 2 gives exactly +-1 (TRL's ``GRPOTrainer`` uses the
    sample std, which makes its advantages sqrt((k-1)/k) times ours: only a learning-rate
    scale for a fixed k). A prompt whose k rewards are all equal gets all-zero advantages
    (0 / eps): no gradient, as with RLOO. Dividing every reward by a constant ``c`` gives
    the same advantages with ``eps / c``, so whitening first only makes ``eps`` relative.
    """
    k = rewards.size(-1)
    if k < 2:
        raise CaiError("GRPO needs at least 2 samples per prompt (rl.samples_per_prompt)")
    centred = rewards - rewards.mean(-1, keepdim=True)
    return centred / (rewards.std(-1, unbiased=False, keepdim=True) + eps)


#: ``rl.advantage`` -> (the estimator, its name in titles and logs).
ADVANTAGES = {"rloo": (rloo_advantages, "RLOO"), "grpo": (grpo_advantages, "GRPO")}


def rloo_loss(advantages, logprobs, n_total: int):
    """``-sum_i A_i * log pi(y_i) / n_total``: the policy-gradient surrogate over a step's
    ``n_total`` sequences (a process passes its share; see the module docstring)."""
    return -(advantages.detach() * logprobs).sum() / n_total


# -- data -------------------------------------------------------------------------------------


def prompt_pool(red_file: Path, helpful_file: Path, max_prompts: int | None, helpful_ratio: float, seed: int,
                extra=()) -> list[dict]:
    """Red-team train prompts (``red_file``: at most ``max_prompts``, then the ``extra`` ones:
    the expand stage's) plus ``helpful_ratio`` helpfulness prompts per red-team one
    (``helpful_file``), shuffled."""
    red = read_jsonl(red_file)
    if max_prompts is not None:
        red = red[:max_prompts]
    red = red + [p.to_record() for p in extra]
    helpful = read_jsonl(helpful_file)[: round(helpful_ratio * len(red))]
    pool = [{**p, "set": "red_team"} for p in red] + [{**p, "set": "helpful"} for p in helpful]
    if not pool:
        raise CaiError(f"{red_file}: no train prompts for RL (check rl.max_prompts)")
    random.Random(seed).shuffle(pool)
    return pool


def step_prompts(pool: list[dict], step: int, per_step: int) -> list[dict]:
    """The prompts of one step: the next ``per_step`` of the pool, cycling through it."""
    return [pool[(step * per_step + i) % len(pool)] for i in range(per_step)]


# -- rollouts and scoring ---------------------------------------------------------------------


def rollout(engine, prompts: list[dict], params) -> tuple[list[dict], list[str]]:
    """k sampled answers per prompt from the engine's live policy: examples (prompt ids +
    sampled ids, answer-only labels) and the answers' texts, in prompt-major order."""
    examples, texts = [], []
    for sample in engine.sample_tokens([p["messages"] for p in prompts], params):
        prefix = sample.prompt_ids
        for a, text in zip(sample.answer_ids, sample.texts):
            examples.append({"input_ids": prefix + a, "labels": [IGNORE] * len(prefix) + a})
            texts.append(text)
    return examples, texts


def logprobs(model, examples, pad_id, device, micro: int, prec, entropy: bool = False):
    """Summed answer log-probs (no grad), and with ``entropy`` the summed token entropy and count."""
    import torch

    lps, ent, count = [], 0.0, 0
    with torch.no_grad(), prec.autocast():
        for i in range(0, len(examples), micro):
            batch = pad_batch(examples[i:i + micro], pad_id, device)
            if entropy:
                lp, e, n = answer_logprobs(model, batch, entropy=True)
                ent, count = ent + e, count + n
            else:
                lp = answer_logprobs(model, batch)
            lps.append(lp.float())
    out = torch.cat(lps)
    return (out, ent, count) if entropy else out


@contextlib.contextmanager
def on_device(module, device, offload: bool):
    """``module`` on ``device`` for the block. With ``offload`` it is moved there on entry and
    back to the CPU on exit, so it takes accelerator memory only while its phase runs."""
    if offload:
        module.to(device)
    try:
        yield module
    finally:
        if offload:
            module.to("cpu")
            if getattr(device, "type", "") == "cuda":
                import torch

                torch.cuda.empty_cache()


def reference_logprobs(ln: Learner, examples):
    """Log-probs of ``examples`` under the frozen reference: the policy with its LoRA
    adapters switched off, or the reference copy (on the accelerator for the call)."""
    device = ln.accelerator.device
    if ln.ref is None:
        with adapters_off(ln.policy):
            return logprobs(ln.policy, examples, ln.pad_id, device, ln.micro, ln.prec)
    with on_device(ln.ref, device, ln.offload):
        return logprobs(ln.ref, examples, ln.pad_id, device, ln.micro, ln.prec)


def pm_scores(ln: Learner, prompts: list, texts: list[str]) -> list[float]:
    """The PM's scores of answers ``texts`` to ``prompts`` (on the accelerator for the call)."""
    with on_device(ln.pm.model, ln.accelerator.device, ln.offload):
        return ln.pm.score_many(prompts, texts, batch_size=ln.micro)


def use_offload(setting: str, device, policy, ref, pm_model) -> bool:
    """``rl.offload``: 'always', 'never', or 'auto': on an accelerator, offload when the
    weights of the policy, reference copy and PM plus the policy's gradients and AdamW
    state (float32: 12 bytes per trained weight) exceed half of the device's memory."""
    import torch

    if setting != "auto":
        return setting == "always"
    if getattr(device, "type", str(device)) != "cuda":
        return False  # a CPU run has nothing to move (other accelerators: not measured, so not guessed)
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters()) if m is not None else 0  # noqa: E731
    trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    need = size(policy) + size(ref) + size(pm_model) + 12 * trained
    return need > torch.cuda.get_device_properties(device).total_memory / 2


def gather(rows: list, world: int) -> list:
    from accelerate.utils import gather_object

    return gather_object(rows) if world > 1 else rows


def evaluate(ln: Learner, prompts: list[dict], params) -> tuple[dict, list[dict]]:
    """Mean PM reward and KL to the reference of fixed-seed answers to held-out prompts."""
    world, device = ln.accelerator.num_processes, ln.accelerator.device
    mine = prompts[ln.accelerator.process_index::world]
    rows = []
    if mine:
        examples, texts = rollout(ln.engine, mine, params)
        scores = pm_scores(ln, [p["messages"] for p in mine], texts)
        kl = (logprobs(ln.policy, examples, ln.pad_id, device, ln.micro, ln.prec)
              - reference_logprobs(ln, examples)).tolist()
        rows = [{"id": p["id"], "prompt": p["prompt"], "answer": t, "reward": s, "kl": k}
                for p, t, s, k in zip(mine, texts, scores, kl)]
    rows = sorted(gather(rows, world), key=lambda r: r["id"])
    n = max(len(rows), 1)
    return {"prompts": len(rows), "reward": round(sum(r["reward"] for r in rows) / n, 4),
            "kl": round(sum(r["kl"] for r in rows) / n, 4)}, rows


def run(ctx: StageContext) -> dict:
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from cai.engines.base import SamplingParams
    from cai.engines.local import LocalEngine
    from cai.models import resolve_model
    from cai.reward import RewardModel

    cfg, rc = ctx.cfg, ctx.cfg.rl
    accelerator = Accelerator(cpu=cfg.engine.device == "cpu")
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if rc.prompts_per_step < world:
        raise CaiError(f"config field 'rl.prompts_per_step' is {rc.prompts_per_step} but there are {world} processes; "
                       f"each needs at least one prompt per step (set it to {world} or more)")
    base = resolve_model(ctx.model_path(rc.policy), cfg.engine.revision, progress=ctx.log)
    model, tok, prec = load_trainable(base, rc, device, cfg.engine.trust_remote_code, AutoModelForCausalLM, "rl", ctx.log)
    # The KL reference: with LoRA the policy itself with its adapters off, else a frozen copy.
    ref = None if is_lora(model) else copy.deepcopy(model).eval().requires_grad_(False)
    pm_dir = ctx.artifact("preference_model", "model")
    pm = RewardModel.load(str(pm_dir), device="cpu", dtype=prec.frozen, trust_remote_code=cfg.engine.trust_remote_code)
    pm.device = str(device)  # its inputs go where it scores; on_device moves it there
    offload = use_offload(rc.offload, device, model, ref, pm.model)
    for frozen in (ref, pm.model):
        if frozen is not None and not offload:
            frozen.to(device)
    prompts = lambda name, split: ctx.artifact("prepare", "prompts", set=name, split=split)  # noqa: E731
    pool = prompt_pool(prompts("red_team", "train"), prompts("helpful", "train"), rc.max_prompts, rc.helpful_ratio,
                       cfg.seed, expanded_prompts(ctx))
    eval_set = read_jsonl(prompts("red_team", "test"))[: rc.eval_prompts]
    ctx.record_input("preference_model", pm_dir / "model.safetensors")

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=rc.learning_rate, weight_decay=rc.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    scaler = prec.grad_scaler()
    policy = accelerator.unwrap_model(model)
    # The engine wraps the policy's own modules (with LoRA: the base model with the adapters
    # in its layers): optimizer steps update it in place.
    engine = LocalEngine.for_model(policy.get_base_model() if is_lora(policy) else policy, tok,
                                   batch_size=cfg.engine.batch_size, name=base)
    ckpt = ctx.out / "checkpoint"
    ln = Learner(rc, model, policy, ref, pm, engine, optimizer, scaler, accelerator, params, tok.pad_token_id, ckpt,
                 prec, offload)
    k = rc.samples_per_prompt

    def sampling(seed: int, n: int) -> SamplingParams:
        return SamplingParams(n=n, temperature=rc.temperature, top_p=rc.top_p, max_new_tokens=rc.max_new_tokens, seed=seed)

    eval_params = sampling(cfg.seed + seeds.RL_EVAL, 1)
    start, state = resume(ckpt, policy, optimizer, rc.steps, ctx.log, "rl", scaler)
    history, samples = [], []
    if state is not None:
        history, samples, before = state["history"], state["samples"], state["before"]
    else:
        before, before_rows = evaluate(ln, eval_set, eval_params)
        before["rows"] = before_rows

    t0 = time.time()
    name = ADVANTAGES[rc.advantage][1]
    points = point_steps(rc.steps, rc.frontier_points)
    with ctx.progress(rc.steps, name, unit="step") as update:
        update(start)
        for step in range(start, rc.steps):
            for g in optimizer.param_groups:
                g["lr"] = warmup_lr(rc.learning_rate, rc.warmup_steps, step)
            everyone = step_prompts(pool, step, rc.prompts_per_step)
            mine = everyone[rank::world]
            n_total = len(everyone) * k
            row = train_step(ln, mine, sampling(cfg.seed + step, k), n_total, step, samples)
            history.append(row)
            update(1)
            done = step + 1
            if accelerator.is_main_process and done in points and done < rc.steps:
                save_point(ctx.out, done, policy, tok, prec)
            if accelerator.is_main_process and done % rc.checkpoint_every == 0 and done < rc.steps:
                save_checkpoint(ckpt, policy, optimizer, done, {
                    "history": history, "total_steps": rc.steps, "samples": samples, "before": before,
                }, scaler)
    seconds = time.time() - t0
    after, after_rows = evaluate(ln, eval_set, eval_params)
    accelerator.wait_for_everyone()
    before_rows = before.pop("rows")
    counts = {
        "prompt_pool": len(pool), "steps": rc.steps, "rollouts": len(samples), "train_seconds": round(seconds, 1),
        "eval_reward_before": before["reward"], "eval_reward_after": after["reward"], "eval_kl_after": after["kl"],
        "final_kl": round(history[-1]["kl"], 4) if history else None,
    }
    if accelerator.is_main_process:
        write_points_index(ctx.out, ctx.run_dir, "rl", base, is_lora(policy), [
            {"step": s, "samples": s * rc.prompts_per_step * k, "kl": round(history[s - 1]["kl"], 4),
             "reward": round(history[s - 1]["reward"], 4)} for s in points], rc.policy)
        save_trained_model(ctx.out, policy, tok, "rl", base, rc, cfg.seed, prec)
        write_json(ctx.output("metrics"), {"history": history, "eval_before": before, "eval_after": after, **counts})
        write_jsonl(ctx.out / "rollouts.jsonl", samples)
        write_jsonl(ctx.out / "eval_samples.jsonl", [
            {**{k2: v for k2, v in b.items()}, "answer_after": a["answer"], "reward_after": a["reward"], "kl_after": a["kl"]}
            for b, a in zip(before_rows, after_rows)
        ])
        curve = lambda key: [(h["step"], h[key]) for h in history]  # noqa: E731
        plot_curve(ctx.out / "reward.png", {"PM reward": curve("reward"), "PM reward - kl_coef * KL": curve("total_reward")},
                   f"RL-CAI ({name}): mean reward per step", ylabel="reward")
        plot_curve(ctx.out / "kl.png", {"KL(policy || SL-CAI)": curve("kl")}, "KL to the reference", ylabel="nats per answer")
        plot_curve(ctx.out / "loss.png", {f"{name} loss": curve("loss")}, f"RL-CAI ({name})")
        shutil.rmtree(ckpt, ignore_errors=True)
    return counts


def train_step(ln: Learner, prompts: list[dict], sp, n_total: int, step: int, samples: list) -> dict:
    """Rollouts, rewards, advantages (``rl.advantage``) and one optimizer step; returns the step's log row.

    ``n_total`` is the step's number of sequences over all processes; this process's
    loss is its share of the mean, times the process count (DDP averages gradients).
    """
    import torch

    k, accelerator, model, micro, pad_id, ckpt = sp.n, ln.accelerator, ln.model, ln.micro, ln.pad_id, ln.ckpt
    world, device = accelerator.num_processes, accelerator.device
    kl_coef, whiten = ln.rc.kl_coef, ln.rc.whiten
    examples, texts = rollout(ln.engine, prompts, sp)  # in the weights' own dtype (see the docstring)
    n = len(examples)
    scores = torch.tensor(pm_scores(ln, [p["messages"] for p in prompts for _ in range(k)], texts))
    check_finite(scores, step, ckpt, what="PM reward")
    ref_lp = reference_logprobs(ln, examples).cpu()
    one_pass = n <= micro
    if one_pass:  # the update reuses this forward pass's graph
        with ln.prec.autocast():
            lp_graph, ent, count = answer_logprobs(model, pad_batch(examples, pad_id, device), entropy=True)
        lp = lp_graph.detach().float().cpu()
    else:
        lp, ent, count = logprobs(ln.policy, examples, pad_id, device, micro, ln.prec, entropy=True)
        lp = lp.cpu()
    kl = lp - ref_lp
    raw = scores - kl_coef * kl
    std = torch.tensor(gather(raw.tolist(), world)).std(unbiased=False) if whiten else None
    rewards = shaped_rewards(scores, kl, kl_coef, whiten, std)
    check_finite(rewards, step, ckpt, what="reward")
    adv = ADVANTAGES[ln.rc.advantage][0](rewards.view(-1, k)).reshape(-1)
    loss_sum = 0.0
    for m in range(0, n, micro):
        sync = contextlib.nullcontext() if m + micro >= n else accelerator.no_sync(model)
        with sync:
            if one_pass:
                lp_m = lp_graph
            else:
                with ln.prec.autocast():
                    lp_m = answer_logprobs(model, pad_batch(examples[m:m + micro], pad_id, device))
            loss = rloo_loss(adv[m:m + micro].to(lp_m.device), lp_m, n_total) * world
            check_finite(loss, step, ckpt)
            accelerator.backward(ln.scaler.scale(loss))
        loss_sum += float(loss.detach()) / world
    optimizer_step(accelerator, ln.optimizer, ln.scaler, ln.params, ln.rc.max_grad_norm)
    lengths = [sum(1 for x in e["labels"] if x != IGNORE) for e in examples]
    mine = [{"step": step + 1, "id": prompts[i // k]["id"], "set": prompts[i // k]["set"], "answer": texts[i],
             "pm_reward": round(float(scores[i]), 4), "kl": round(float(kl[i]), 4), "advantage": round(float(adv[i]), 4),
             "tokens": lengths[i]} for i in range(n)]
    everyone = gather(mine, world)
    samples += everyone
    totals = torch.tensor([loss_sum, ent, count], dtype=torch.float64)
    if world > 1:
        totals = accelerator.reduce(totals.to(device), "sum").cpu()
    m_all = max(len(everyone), 1)
    return {
        "step": step + 1,
        "reward": sum(r["pm_reward"] for r in everyone) / m_all,
        "total_reward": sum(r["pm_reward"] - kl_coef * r["kl"] for r in everyone) / m_all,
        "kl": sum(r["kl"] for r in everyone) / m_all,
        "length": sum(r["tokens"] for r in everyone) / m_all,
        "entropy": float(totals[1]) / max(float(totals[2]), 1.0),
        "loss": float(totals[0]),
    }


def _needs(cfg) -> tuple[str, ...]:
    return with_expansion(cfg, ("prepare", "preference_model") + (("sft",) if cfg.rl.policy == SL_CAI else ()))


def estimate(inputs: PlanInputs) -> Cost:
    import math

    from cai.memory import DTYPE_BYTES, Memory, frozen_model, training
    from cai.training import point_saves, resolve_precision

    cfg, rc, count = inputs.cfg, inputs.cfg.rl, inputs.count
    train = inputs.sets["red_team"].get("train", [])
    avg = sum(count(p.messages) for p in train) / max(1, len(train))
    rollouts = rc.steps * rc.prompts_per_step * rc.samples_per_prompt
    asked = rc.steps * rc.prompts_per_step + 2 * rc.eval_prompts
    length = int(avg + rc.max_new_tokens)
    shape, memory, disk = inputs.shape(rc.policy), None, 0
    if shape is not None:
        prec = resolve_precision(rc.dtype, inputs.device, "rl.dtype", lambda _m: None, planning=True)
        mine = math.ceil(rc.prompts_per_step / inputs.world) * rc.samples_per_prompt  # this process's rollouts
        memory = training(shape, prec, rc, min(mine, rc.micro_batch_size), length, inputs.world, reference_copy=True)
        memory += frozen_model(shape.pm_params, DTYPE_BYTES[prec.frozen])
        disk = training_disk(shape.params, prec, rc, 1 + point_saves(rc.steps, rc.frontier_points, rc.method),
                             (rc.steps - 1) // rc.checkpoint_every)
        # the rollouts' KV cache (weights as stored: float32 masters, or LoRA's compute-dtype base) and the
        # update's activations are phases of a step: the larger one counts
        kv_bytes = DTYPE_BYTES[prec.frozen if rc.method == "lora" else prec.weights]
        rollouts_at_once = inputs.local_batching.in_flight(mine)
        kv = shape.kv_bytes(rollouts_at_once * length, kv_bytes)
        if kv > memory.parts["activations"]:
            memory = Memory({**{k: v for k, v in memory.parts.items() if k != "activations"}, "kv cache": kv},
                            f"{rollouts_at_once} rollouts x {length} tokens")
    # the rollouts are sampled by the training policy itself (not the engine); the update; no-grad
    # passes: reference and PM over every rollout (and the policy too when a step's rollouts take
    # more than one micro-batch), and policy, reference and PM over the held-out answers before and after
    micro, rows = max(1, rc.micro_batch_size), math.ceil(rc.prompts_per_step / inputs.world) * rc.samples_per_prompt
    per_step = passes(rows, micro)
    no_grad_step = (2 + (rows > micro)) * per_step
    held_out = 2 * 3 * passes(rc.eval_prompts, micro, inputs.world)
    return Cost(generate=asked, policy_tokens=rollouts * rc.max_new_tokens + 2 * rc.eval_prompts * rc.max_new_tokens,
                train_tokens=int(rollouts * length), train_passes=rc.steps * per_step, steps=rc.steps,
                note=f"{rc.steps} steps x {rc.prompts_per_step} prompts x {rc.samples_per_prompt} samples",
                loads=2, eval_tokens=int(asked * avg + (2 + (rows > micro)) * rollouts * length
                                         + 3 * 2 * rc.eval_prompts * length),
                eval_passes=rc.steps * no_grad_step + held_out, figures=3,
                saves=1 + point_saves(rc.steps, rc.frontier_points, rc.method),
                checkpoints=(rc.steps - 1) // rc.checkpoint_every, memory=memory, disk_bytes=disk)


STAGE = StageSpec(
    name="rl",
    run=run,
    config_keys=("seed", "engine", "rl"),
    needs=_needs,
    help="RL-CAI: RLOO (or GRPO) against the preference model with a KL penalty to the SL-CAI model.",
    distributed=True,
    estimate=estimate,
)
