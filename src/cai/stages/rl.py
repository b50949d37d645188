"""RL-CAI (Bai et al. 2022, §4): optimise the policy against the preference model (or, with
``reward: judge``, against the AI judge itself), with a KL penalty to the SL-CAI model. The
algorithm is RLOO (REINFORCE leave-one-out, Ahmadian et al. 2024) instead of the paper's
PPO: no value model, one update per batch of rollouts, and on this scale it matches PPO at a
fraction of the memory and code.

Each step:

1. **Rollouts.** ``prompts_per_step`` prompts (red-team and helpfulness train prompts,
   ``helpful_ratio`` to one) get ``samples_per_prompt`` = k answers each from the
   *current* policy, through the local engine's batched decode loop (per-request seeds
   ``seed + step``; no request cache, the weights change every step). The engine hands
   back the sampled token ids, end-of-turn token included, so the update scores exactly
   what was sampled.
2. **Reward.** The PM scores every answer (``RUN_DIR/preference_model/model``); or with
   ``reward: judge`` (direct RLAIF, beyond the paper) the judge (:class:`cai.judge.Judge`,
   the feedback settings) compares every two answers of a prompt in both orders, and an
   answer's score is its mean probability of being the better one (:func:`rollout_rewards`).
   The KL term is the sequence-level log-ratio of the sampled tokens,
   ``KL_i = sum_t [log pi(y_t) - log pi_ref(y_t)]`` (the k1 estimator: unbiased for
   KL(pi || pi_ref) when sampling at temperature 1). ``reward_i = score_i - kl_coef * KL_i``.
   With ``whiten`` the step's rewards are divided by their standard deviation (over all
   processes), so the learning rate does not depend on the reward's scale.
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

Logged per step: mean reward (the PM's or the judge's), total reward, KL, answer length,
mean token entropy of the policy on the sampled tokens, loss; with the judge also how
decisive and how position-consistent its judgements were; and each step's seconds.
Evaluation: the mean reward (and the KL to the reference) of answers sampled with a fixed
seed to ``eval_prompts`` held-out red-team test prompts, for the starting policy (before)
and the trained one (after); with the judge, an answer's reward is its probability of
beating the starting policy's answer to the same prompt (0.5 before, by construction).

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
import math
import random
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
from cai import loop
from cai.loop import Trainee
from cai.training import (
    IGNORE,
    adapters_off,
    answer_logprobs,
    check_finite,
    is_lora,
    load_trainable,
    pad_batch,
    point_steps,
    resume,
    save_trained_model,
    write_points_index,
)



@dataclass
class Learner:
    """What one RL run holds fixed: the models, the optimizer and the settings."""

    rc: RLConfig
    model: Any  # the policy as accelerate prepared it (DDP-wrapped in several processes)
    policy: Any  # the same weights, unwrapped (generation, no-grad passes, saving)
    ref: Any  # frozen copy of the starting policy; None with LoRA (the policy, adapters off)
    pm: Any  # cai.reward.RewardModel; None with the judge reward
    judge: Any  # cai.judge.Judge with rl.reward=judge; else None
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

    @property
    def reward_name(self) -> str:
        """What scores the answers, in logs, plots and errors: 'PM' or 'judge'."""
        return "PM" if self.judge is None else "judge"


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


def rollout_rewards(ln: Learner, prompts: list[dict], texts: list[str], k: int) -> tuple[list[float], dict]:
    """The score of each of a step's answers (``k`` a prompt, prompt-major), and the judge's
    tallies for the step's log (empty with the PM).

    The PM scores each answer on its own. The judge compares every two answers of a prompt's
    group (k(k-1)/2 pairs, each under its sampled principles in both orders, all in one
    batch): an answer's score is its mean probability of being judged better than each other
    answer of its group (:meth:`cai.judge.Judge.group_verdicts`; the groups are the rollout
    groups, not the prompts' texts, since a step may draw one prompt twice). The scores of a
    group then average 0.5: what moves the policy is how they differ, which is what the
    leave-one-out baseline keeps. The tallies: the pairs labelled and their summed
    |p - 0.5| (decisiveness), and the pairs asked in both orders and how many of them both
    orders preferred the same answer (position consistency)."""
    messages = [p["messages"] for p in prompts for _ in range(k)]
    if ln.judge is None:
        return pm_scores(ln, messages, texts), {}
    scores, verdicts = ln.judge.group_verdicts(messages, texts, groups=[i // k for i in range(len(texts))])
    labelled = [v for v in verdicts if v.p_a is not None]
    orders = [v for v in labelled if v.position_consistent is not None]
    return scores, {"labelled": len(labelled), "distance": sum(abs(v.p_a - 0.5) for v in labelled),
                    "both_orders": len(orders), "consistent": sum(v.position_consistent for v in orders)}


def heldout_rewards(ln: Learner, prompts: list[dict], texts: list[str], baseline: dict | None) -> list[float]:
    """The held-out answers' rewards: the PM's scores, or the judge's probability that each
    answer beats ``baseline``'s answer to the same prompt (the starting policy's, by prompt
    id; None: the answer itself, which is identical, so 0.5 and nothing asked). Each prompt
    is asked under the principles its id draws, the same before and after."""
    if ln.judge is None:
        return pm_scores(ln, [p["messages"] for p in prompts], texts)
    against = [baseline[p["id"]] if baseline is not None else t for p, t in zip(prompts, texts)]
    verdicts = ln.judge.compare_many([(p["messages"], t, b) for p, t, b in zip(prompts, texts, against)],
                                     ids=[f"rl-eval/{p['id']}" for p in prompts])
    return [0.5 if v.p_a is None else v.p_a for v in verdicts]


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


def evaluate(ln: Learner, prompts: list[dict], params, baseline: dict | None = None) -> tuple[dict, list[dict]]:
    """Mean reward (:func:`heldout_rewards`, against ``baseline``'s answers with the judge) and
    KL to the reference of fixed-seed answers to held-out prompts."""
    world, device = ln.accelerator.num_processes, ln.accelerator.device
    mine = prompts[ln.accelerator.process_index::world]
    rows = []
    if mine:
        examples, texts = rollout(ln.engine, mine, params)
        scores = heldout_rewards(ln, mine, texts, baseline)
        kl = (logprobs(ln.policy, examples, ln.pad_id, device, ln.micro, ln.prec)
              - reference_logprobs(ln, examples)).tolist()
        rows = [{"id": p["id"], "prompt": p["prompt"], "answer": t, "reward": s, "kl": k}
                for p, t, s, k in zip(mine, texts, scores, kl)]
    rows = sorted(gather(rows, world), key=lambda r: r["id"])
    n = max(len(rows), 1)
    return {"prompts": len(rows), "reward": round(sum(r["reward"] for r in rows) / n, 4),
            "kl": round(sum(r["kl"] for r in rows) / n, 4)}, rows


def load_reward(ctx: StageContext, prec, device) -> tuple[Any, Any, Any]:
    """What scores the rollouts (``rl.reward``): ``(pm, None, None)``, the run's preference
    model (on the CPU in the frozen dtype; :func:`on_device` moves it where it scores), or
    ``(None, judge, release)``: the judge, built once for the stage on the run's engine on
    the judge's model or on ``rl.judge_endpoints``' servers (:meth:`StageContext.judge_engine`),
    with the run's frozen constitution and the feedback settings, and how to release it."""
    cfg = ctx.cfg
    if cfg.rl.reward == "pm":
        from cai.reward import RewardModel

        pm_dir = ctx.artifact("preference_model", "model")
        pm = RewardModel.load(str(pm_dir), device="cpu", dtype=prec.frozen, trust_remote_code=cfg.engine.trust_remote_code)
        pm.device = str(device)  # its inputs go where it scores; on_device moves it there
        ctx.record_input("preference_model", pm_dir / "model.safetensors")
        return pm, None, None
    from cai.config import judge_model
    from cai.constitution import load_constitution
    from cai.judge import Judge

    engine, release = ctx.judge_engine("rl")
    const = load_constitution(ctx.artifact("prepare", "constitution"))
    return None, Judge(engine, const, cfg.feedback, cfg.seed, model_name=judge_model(cfg, "rl")), release


def run(ctx: StageContext) -> dict:
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from cai.engines.base import SamplingParams
    from cai.engines.local import LocalEngine
    from cai.models import resolve_model

    cfg, rc = ctx.cfg, ctx.cfg.rl
    accelerator = Accelerator(cpu=cfg.engine.device == "cpu")
    world, device = accelerator.num_processes, accelerator.device
    if rc.prompts_per_step < world:
        raise CaiError(f"config field 'rl.prompts_per_step' is {rc.prompts_per_step} but there are {world} processes; "
                       f"each needs at least one prompt per step (set it to {world} or more)")
    base = resolve_model(ctx.model_path(rc.policy), cfg.engine.revision, progress=ctx.log)
    model, tok, prec = load_trainable(base, rc, device, cfg.engine.trust_remote_code, AutoModelForCausalLM, "rl", ctx.log,
                                      seed=cfg.seed)
    # The KL reference: with LoRA the policy itself with its adapters off, else a frozen copy.
    ref = None if is_lora(model) else copy.deepcopy(model).eval().requires_grad_(False)
    # The reward: the run's PM, or the judge, built once for the stage (the feedback settings)
    pm, judge, release_judge = load_reward(ctx, prec, device)
    offload = use_offload(rc.offload, device, model, ref, pm.model if pm else None)
    for frozen in (ref, pm.model if pm else None):
        if frozen is not None and not offload:
            frozen.to(device)
    prompts = lambda name, split: ctx.artifact("prepare", "prompts", set=name, split=split)  # noqa: E731
    pool = prompt_pool(prompts("red_team", "train"), prompts("helpful", "train"), rc.max_prompts, rc.helpful_ratio,
                       cfg.seed, expanded_prompts(ctx))
    eval_set = read_jsonl(prompts("red_team", "test"))[: rc.eval_prompts]

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
    trainee = Trainee(accelerator, model, optimizer, scaler, params, prec, tok, ctx.out)
    ckpt = trainee.checkpoint
    ln = Learner(rc, model, policy, ref, pm, judge, engine, optimizer, scaler, accelerator, params, tok.pad_token_id,
                 ckpt, prec, offload)
    k = rc.samples_per_prompt

    def sampling(seed: int, n: int) -> SamplingParams:
        return SamplingParams(n=n, temperature=rc.temperature, top_p=rc.top_p, max_new_tokens=rc.max_new_tokens, seed=seed)

    eval_params = sampling(cfg.seed + seeds.RL_EVAL, 1)
    start, state = resume(ckpt, policy, optimizer, rc.steps, ctx.log, "rl", scaler)
    if state is None:
        before, before_rows = evaluate(ln, eval_set, eval_params)
        before["rows"] = before_rows
        state = {"history": [], "samples": [], "before": before}
    objective = PolicyGradient(ln, pool, sampling, cfg.seed, state)

    t0 = time.time()
    name = ADVANTAGES[rc.advantage][1]
    points = point_steps(rc.steps, rc.frontier_points)
    history = loop.train(trainee, objective, rc, total_steps=rc.steps, start=start, history=state["history"],
                         micro=ln.micro, progress=ctx.progress, desc=name, points=points,
                         track=ctx.track)
    samples, step_seconds, before = objective.samples, objective.step_seconds, objective.before
    seconds = time.time() - t0
    before_rows = before.pop("rows")
    # with the judge, each held-out answer is judged against the starting policy's to the same prompt
    after, after_rows = evaluate(ln, eval_set, eval_params, baseline={r["id"]: r["answer"] for r in before_rows})
    if release_judge is not None:
        release_judge()
    accelerator.wait_for_everyone()
    counts = {
        "prompt_pool": len(pool), "steps": rc.steps, "rollouts": len(samples), "train_seconds": round(seconds, 1),
        "eval_reward_before": before["reward"], "eval_reward_after": after["reward"], "eval_kl_after": after["kl"],
        "final_kl": round(history[-1]["kl"], 4) if history else None,
        "mean_step_seconds": round(sum(step_seconds) / len(step_seconds), 2) if step_seconds else None,
    }
    if accelerator.is_main_process:
        write_points_index(ctx.out, ctx.run_dir, "rl", base, is_lora(policy), [
            {"step": s, "samples": s * rc.prompts_per_step * k, "kl": round(history[s - 1]["kl"], 4),
             "reward": round(history[s - 1]["reward"], 4)} for s in points], rc.policy)
        save_trained_model(ctx.out, policy, tok, "rl", base, rc, cfg.seed, prec)
        write_json(ctx.output("metrics"), {"history": history, "step_seconds": step_seconds, "eval_before": before,
                                           "eval_after": after, **counts})
        write_jsonl(ctx.out / "rollouts.jsonl", samples)
        write_jsonl(ctx.out / "eval_samples.jsonl", [
            {**{k2: v for k2, v in b.items()}, "answer_after": a["answer"], "reward_after": a["reward"], "kl_after": a["kl"]}
            for b, a in zip(before_rows, after_rows)
        ])
        curve = lambda key: [(h["step"], h[key]) for h in history]  # noqa: E731
        source = ln.reward_name
        plot_curve(ctx.out / "reward.png", {f"{source} reward": curve("reward"),
                                            f"{source} reward - kl_coef * KL": curve("total_reward")},
                   f"RL-CAI ({name}): mean reward per step", ylabel="reward")
        plot_curve(ctx.out / "kl.png", {"KL(policy || SL-CAI)": curve("kl")}, "KL to the reference", ylabel="nats per answer")
        plot_curve(ctx.out / "loss.png", {f"{name} loss": curve("loss")}, f"RL-CAI ({name})")
    return counts


class PolicyGradient:
    """The RL objective (:mod:`cai.loop`): each step samples ``k`` answers to each of its
    prompts from the live policy (the rollout phase, here in this file), scores them (PM or
    judge), shapes the rewards with the KL penalty, turns them into advantages
    (``rl.advantage``) and trains on the policy-gradient loss :func:`rloo_loss`.

    Each process takes its share of the step's prompts; its loss is its share of the mean
    over the step's sequences, times the process count (DDP averages gradients)."""

    def __init__(self, ln: Learner, pool: list[dict], sampling, seed: int, state: dict):
        self.ln, self.pool, self.sampling, self.seed = ln, pool, sampling, seed
        self.samples: list[dict] = state["samples"]  # every rollout so far, all processes'
        self.before = state["before"]
        self.step_seconds: list[float] = state.get("step_seconds", [])

    def begin_step(self, step: int) -> list[int]:
        """Rollouts, rewards and advantages of this process's prompts; its items are the
        indices of their sampled answers."""
        import torch

        ln, k = self.ln, self.ln.rc.samples_per_prompt
        acc = ln.accelerator
        self.began = time.time()
        everyone = step_prompts(self.pool, step, ln.rc.prompts_per_step)
        self.prompts = everyone[acc.process_index::acc.num_processes]
        self.n_total = len(everyone) * k  # the step's sequences over all processes
        examples, self.texts = rollout(ln.engine, self.prompts, self.sampling(self.seed + step, k))
        self.examples = examples  # in the weights' own dtype (see the module's docstring)
        scores, self.tallies = rollout_rewards(ln, self.prompts, self.texts, k)
        self.scores = torch.tensor(scores)
        check_finite(self.scores, step, ln.ckpt, what=f"{ln.reward_name} reward")
        ref_lp = reference_logprobs(ln, examples).cpu()
        # With one micro-batch, the update reuses this forward pass's graph.
        self.one_pass = len(examples) <= ln.micro
        if self.one_pass:
            with ln.prec.autocast():
                self.lp_graph, self.entropy, self.tokens = answer_logprobs(
                    ln.model, pad_batch(examples, ln.pad_id, acc.device), entropy=True)
            lp = self.lp_graph.detach().float().cpu()
        else:
            lp, self.entropy, self.tokens = logprobs(ln.policy, examples, ln.pad_id, acc.device, ln.micro, ln.prec,
                                                     entropy=True)
            lp = lp.cpu()
        self.kl = lp - ref_lp
        raw = self.scores - ln.rc.kl_coef * self.kl
        std = torch.tensor(gather(raw.tolist(), acc.num_processes)).std(unbiased=False) if ln.rc.whiten else None
        rewards = shaped_rewards(self.scores, self.kl, ln.rc.kl_coef, ln.rc.whiten, std)
        check_finite(rewards, step, ln.ckpt, what="reward")
        self.advantages = ADVANTAGES[ln.rc.advantage][0](rewards.view(-1, k)).reshape(-1)
        return list(range(len(examples)))

    def loss(self, items: list[int], step: int):
        import torch

        ln, world = self.ln, self.ln.accelerator.num_processes
        first, end = items[0], items[-1] + 1
        if self.one_pass:
            lp = self.lp_graph
        else:
            with ln.prec.autocast():
                lp = answer_logprobs(ln.model, pad_batch(self.examples[first:end], ln.pad_id, ln.accelerator.device))
        loss = rloo_loss(self.advantages[first:end].to(lp.device), lp, self.n_total) * world
        # sums: the loss (as one process would see it), and the entropy and token count of the
        # step's answers (counted once, with the first micro-batch)
        seen = [self.entropy, self.tokens] if first == 0 else [0.0, 0]
        return loss, torch.tensor([float(loss.detach()) / world, *seen], dtype=torch.float64)

    def log_row(self, step: int, totals) -> dict:
        """The step's row (means over all processes' rollouts); its rollouts join ``samples``."""
        ln, k, world = self.ln, self.ln.rc.samples_per_prompt, self.ln.accelerator.num_processes
        kl_coef, prompts = ln.rc.kl_coef, self.prompts
        lengths = [sum(1 for x in e["labels"] if x != IGNORE) for e in self.examples]
        key = f"{ln.reward_name.lower()}_reward"  # pm_reward | judge_reward
        mine = [{"step": step + 1, "id": prompts[i // k]["id"], "set": prompts[i // k]["set"], "answer": self.texts[i],
                 key: round(float(self.scores[i]), 4), "kl": round(float(self.kl[i]), 4),
                 "advantage": round(float(self.advantages[i]), 4), "tokens": lengths[i]}
                for i in range(len(self.examples))]
        everyone = gather(mine, world)
        self.samples += everyone
        m_all = max(len(everyone), 1)
        row = {
            "step": step + 1,
            "reward": sum(r[key] for r in everyone) / m_all,
            "total_reward": sum(r[key] - kl_coef * r["kl"] for r in everyone) / m_all,
            "kl": sum(r["kl"] for r in everyone) / m_all,
            "length": sum(r["tokens"] for r in everyone) / m_all,
            "entropy": float(totals[1]) / max(float(totals[2]), 1.0),
            "loss": float(totals[0]),
        }
        if ln.judge is not None:  # the mean judge reward is 0.5 by construction: say how much the judge told apart
            t = {name: sum(x[name] for x in gather([self.tallies], world)) for name in self.tallies}
            row["judge_decisiveness"] = t["distance"] / t["labelled"] if t["labelled"] else None
            row["judge_consistency"] = t["consistent"] / t["both_orders"] if t["both_orders"] else None
        self.step_seconds.append(round(time.time() - self.began, 3))
        return row

    def scalars(self, row: dict) -> dict:
        """The row's numbers for the experiment trackers: the step left out, and a judge's
        figures when it had none to give (None)."""
        return {k: v for k, v in row.items() if k != "step" and v is not None}

    def state(self) -> dict:
        return {"samples": self.samples, "before": self.before, "step_seconds": self.step_seconds}


def _needs(cfg) -> tuple[str, ...]:
    reward = ("preference_model",) if cfg.rl.reward == "pm" else ()  # the judge needs no trained model
    return with_expansion(cfg, ("prepare",) + reward + (("sft",) if cfg.rl.policy == SL_CAI else ()))


def judge_cost(inputs: PlanInputs, avg: float) -> Cost:
    """The engine work of the judge reward. Each step asks k(k-1)/2 pairs a prompt, and each
    pair under ``feedback.principles_per_comparison`` principles in both orders
    (``feedback.both_orders``); after training each held-out prompt asks one pair (the trained
    policy's answer against the starting one's; before training the two are the same answer
    and nothing is asked). With a chain of thought every question first generates its
    reasoning. Counted on the judge's engine (served with ``rl.judge_endpoints``): its shared
    demonstrations are read once a batch where it keeps a shared prefix, and a pair of
    identical answers, which is not asked, is counted all the same."""
    from cai.config import judge_engine_config
    from cai.conversations import question
    from cai.engines import batching
    from cai.judge import demonstrations

    rc, fb, count = inputs.cfg.rl, inputs.cfg.feedback, inputs.count
    per_pair = fb.principles_per_comparison * (2 if fb.both_orders else 1)
    per_step = rc.prompts_per_step * math.comb(rc.samples_per_prompt, 2) * per_pair
    held_out = rc.eval_prompts * per_pair
    questions = rc.steps * per_step + held_out
    demo = count(demonstrations(inputs.constitution, fb))
    principle = inputs.constitution.comparison_principles[0].text  # one principle's length stands for all
    # a question: the prompt, its two answers at their whole budget, the principle, the options
    own = avg + 2 * rc.max_new_tokens + count([{"role": "user", "content": question([], principle, "", "")}])
    b = batching(judge_engine_config(inputs.cfg, "rl"))
    reads = lambda kind: rc.steps * b.prefix_reads(per_step, kind) + b.prefix_reads(held_out, kind)  # noqa: E731
    cost = Cost(score=questions, prompt_tokens=int(questions * own) + reads("score") * demo,
                note=f", {per_step} judge questions a step ({questions} with the held-out ones)")
    if fb.chain_of_thought:
        cost.generate, cost.new_tokens = questions, questions * fb.cot_max_new_tokens
        cost.prompt_tokens += int(questions * own) + reads("generate") * demo
        cost.decode_steps = rc.steps * b.decode_steps(per_step, fb.cot_max_new_tokens) + b.decode_steps(
            held_out, fb.cot_max_new_tokens)
    return cost


def estimate(inputs: PlanInputs) -> Cost:
    from cai.config import judge_model
    from cai.memory import DTYPE_BYTES, Memory, frozen_model, training
    from cai.training import point_saves, resolve_precision

    cfg, rc, count = inputs.cfg, inputs.cfg.rl, inputs.count
    pm = rc.reward == "pm"
    train = inputs.sets["red_team"].get("train", [])
    avg = sum(count(p.messages) for p in train) / max(1, len(train))
    rollouts = rc.steps * rc.prompts_per_step * rc.samples_per_prompt
    asked = rc.steps * rc.prompts_per_step + 2 * rc.eval_prompts
    length = int(avg + rc.max_new_tokens)
    # the judge on this machine (not on rl.judge_endpoints' servers) is held beside the policy, as the PM is
    judge_shape = None if pm or rc.judge_endpoints else inputs.shape(judge_model(cfg, "rl"))
    shape, memory, disk = inputs.shape(rc.policy), None, 0
    if shape is not None:
        prec = resolve_precision(rc.dtype, inputs.device, "rl.dtype", lambda _m: None, planning=True)
        mine = math.ceil(rc.prompts_per_step / inputs.world) * rc.samples_per_prompt  # this process's rollouts
        memory = training(shape, prec, rc, min(mine, rc.micro_batch_size), length, inputs.world, reference_copy=True)
        if pm:
            memory += frozen_model(shape.pm_params, DTYPE_BYTES[prec.frozen])
        elif judge_shape is not None:
            memory += frozen_model(judge_shape.params, inputs.engine_bytes(), "judge")
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
    # passes: the reference and the PM over every rollout (and the policy too when a step's rollouts take
    # more than one micro-batch), and policy, reference and PM over the held-out answers before and after;
    # the judge's questions go to its engine instead (judge_cost)
    micro, rows = max(1, rc.micro_batch_size), math.ceil(rc.prompts_per_step / inputs.world) * rc.samples_per_prompt
    per_step = passes(rows, micro)
    frozen = 1 + pm  # the reference, and the PM
    no_grad_step = (frozen + (rows > micro)) * per_step
    held_out = 2 * (frozen + 1) * passes(rc.eval_prompts, micro, inputs.world)
    judge = Cost() if pm else judge_cost(inputs, avg)
    return Cost(generate=asked + judge.generate, score=judge.score, prompt_tokens=judge.prompt_tokens,
                new_tokens=judge.new_tokens, decode_steps=judge.decode_steps,
                policy_tokens=rollouts * rc.max_new_tokens + 2 * rc.eval_prompts * rc.max_new_tokens,
                train_tokens=int(rollouts * length), train_passes=rc.steps * per_step, steps=rc.steps,
                note=f"{rc.steps} steps x {rc.prompts_per_step} prompts x {rc.samples_per_prompt} samples" + judge.note,
                loads=1 + (pm or judge_shape is not None),
                eval_tokens=int(asked * avg + (frozen + (rows > micro)) * rollouts * length
                                + (frozen + 1) * 2 * rc.eval_prompts * length),
                eval_passes=rc.steps * no_grad_step + held_out, figures=3,
                saves=1 + point_saves(rc.steps, rc.frontier_points, rc.method),
                checkpoints=(rc.steps - 1) // rc.checkpoint_every, memory=memory, disk_bytes=disk)


STAGE = StageSpec(
    name="rl",
    run=run,
    config_keys=("seed", "engine", "rl", "feedback"),  # feedback: the judge's settings with reward=judge
    needs=_needs,
    help="RL-CAI: RLOO (or GRPO) against the preference model (or the judge) with a KL penalty to the SL-CAI model.",
    distributed=True,
    estimate=estimate,
)
