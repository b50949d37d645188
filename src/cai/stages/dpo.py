"""RL-CAI without a preference model: DPO on the preference pairs (Rafailov et al. 2023).

The policy starts from ``dpo.policy`` (the SL-CAI model by default), which is also the
frozen reference. For a pair with answers c (chosen) and r (rejected) to one prompt,

    h = (log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r))

summed over the answer tokens only (the prompt is not learned, as in ``sft``).

**Soft labels.** The feedback stage says how sure the feedback model was (``p_chosen``,
>= 0.5). By default the loss is conservative / label-smoothed DPO with a per-pair
smoothing eps = 1 - p_chosen::

    loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)

which is the cross-entropy of sigmoid(beta h) against p_chosen: its minimum is at
sigmoid(beta h) = p_chosen, so a 55/45 pair pulls the policy only a little way and a
50/50 pair not at all, instead of being pushed towards an infinite margin like a sure
pair. ``dpo.soft_labels=false`` gives plain DPO, ``-log sigmoid(beta h)``;
``dpo.min_confidence`` drops unsure pairs instead (or as well). ``dpo.data=sl_prefs``
trains on the critique_revision stage's pairs (revision over first answer, p = 1), and
``dpo.data=FILE`` on the user's own TRL pairs (:mod:`cai.datafiles`), with no data stage.

**Reference log-probabilities** are computed once, before training, with the starting
weights (which *are* the reference; with ``dpo.method=lora``, the same model with its
adapters switched off), so no second model is kept in memory; they travel in the
checkpoint, so a resumed run does not need the reference again. It also means the
held-out numbers *before* training are exact without a forward pass: h = 0 for every
pair (loss log 2, accuracy 0, margin 0).

Training runs the one loop of :mod:`cai.loop` with the objective :class:`PreferencePairs`:
each process takes its share of every batch of pairs, and its loss is scaled so that the
averaged gradient is that of the mean over the whole batch (identical to one process up
to float summation order; a process left without a pair in a small last batch runs one
with weight 0).

Outputs in ``dpo/``: ``model/`` (``save_pretrained`` + ``cai_training.json``; merged
with LoRA, whose adapter is also in ``adapter/``),
``metrics.json`` (loss per step; held-out loss, reward accuracy and margins before and
after), ``loss.png``, and the frontier points (``dpo.frontier_points``) as in ``rl``:
``points/step-NNNNNN/`` and ``points/index.json`` (step, pairs seen, that step's train
loss; no KL is measured here), which the evaluate stage scores.
"""

from __future__ import annotations

import math
import time

from cai.datafiles import DPO_PAIRS
from cai.errors import CaiError
from cai.io import write_json
from cai.plots import plot_curve
from cai.cost import Cost, PlanInputs, passes, training_disk
from cai.stage import StageContext, StageSpec
from cai.stage_names import SL_CAI
from cai import loop
from cai.loop import PairedPreferences, Trainee
from cai.simpo import SimPOPairs
from cai.training import (
    adapters_off,
    answer_logprobs,
    is_lora,
    encode_chat,
    full_state_dict,
    is_sharded,
    load_trainable,
    optimizer_and_batches,
    pad_batch,
    resume,
    point_steps,
    save_trained_model,
    write_points_index,
)


def dpo_loss(h, p, beta: float, soft: bool = True):
    """Per-pair DPO loss for log-ratio differences ``h`` and labels ``p`` (= p_chosen).

    soft: ``-p log s(beta h) - (1 - p) log s(-beta h)`` (label smoothing eps = 1 - p);
    plain: ``-log s(beta h)`` whatever p says. Both equal log 2 at h = 0.
    """
    import torch.nn.functional as F

    target = p.float() if soft else p.new_ones(p.shape).float()
    return F.binary_cross_entropy_with_logits(beta * h.float(), target, reduction="none")


def load_pairs(tok, rows: list[dict], max_length: int, min_confidence: float, where) -> tuple[list[dict], dict]:
    """Encoded pairs (answer-only labels) and how many were dropped and why."""
    pairs, dropped = [], {"low_confidence": 0, "too_long": 0}
    for rec in rows:
        p = float(rec.get("p_chosen", 1.0))
        if not 0.0 <= p <= 1.0:
            raise CaiError(f"{where}: pair '{rec.get('id')}' has p_chosen={p}, outside [0, 1]")
        if p < min_confidence:
            dropped["low_confidence"] += 1
            continue
        prompt = rec["prompt"] if isinstance(rec["prompt"], list) else [{"role": "user", "content": rec["prompt"]}]
        chosen = encode_chat(tok, prompt + rec["chosen"][-1:], max_length)
        rejected = encode_chat(tok, prompt + rec["rejected"][-1:], max_length)
        if chosen is None or rejected is None:
            dropped["too_long"] += 1
            continue
        pairs.append({"id": rec.get("id"), "p": p, "source": rec.get("source", "revision"),
                      "chosen": chosen, "rejected": rejected})
    return pairs, dropped


def pair_logprobs(model, pairs: list[dict], pad_id, device):
    """(log pi(chosen), log pi(rejected)) for a batch of pairs, from one padded forward pass."""
    batch = pad_batch([x["chosen"] for x in pairs] + [x["rejected"] for x in pairs], pad_id, device)
    lp = answer_logprobs(model, batch)
    return lp[: len(pairs)], lp[len(pairs):]


def reference_logprobs(model, pairs: list[dict], indices: list[int], pad_id, device, batch_size: int, prec) -> dict:
    """{pair index: (log pi(c), log pi(r))} under the reference: the starting weights, with
    any LoRA adapters switched off."""
    import torch

    out = {}
    model.eval()
    with torch.no_grad(), prec.autocast(), adapters_off(model):
        for i in range(0, len(indices), batch_size):
            idx = indices[i:i + batch_size]
            c, r = pair_logprobs(model, [pairs[j] for j in idx], pad_id, device)
            out.update({j: (float(a), float(b)) for j, a, b in zip(idx, c.tolist(), r.tolist())})
    model.train()
    return out


def shared_reference(model, pairs, indices, pad_id, device, batch_size, rank: int, world: int, prec) -> dict:
    """Reference log-probs of ``indices``: each process computes its share, all get all."""
    from accelerate.utils import gather_object

    mine = reference_logprobs(model, pairs, indices[rank::world], pad_id, device, batch_size, prec)
    return dict(gather_object(list(mine.items())) if world > 1 else mine.items())


def pair_metrics(h: list[float], p: list[float], beta: float, soft: bool) -> dict:
    """Held-out DPO loss, reward accuracy (h > 0) and mean margin beta*h."""
    import torch

    if not h:
        return {"pairs": 0}
    ht, pt = torch.tensor(h), torch.tensor(p)
    return {
        "pairs": len(h),
        "loss": round(float(dpo_loss(ht, pt, beta, soft).mean()), 4),
        "reward_accuracy": round(sum(x > 0 for x in h) / len(h), 4),
        "margin": round(beta * sum(h) / len(h), 4),
    }


def evaluate(model, pairs, objective, batch_size, rank, world, prec) -> dict:
    """Held-out metrics of ``objective`` (its ``heldout_h`` and ``metrics``); each process
    scores its share of the pairs."""
    import torch
    from accelerate.utils import gather_object

    rows = []
    model.eval()
    with torch.no_grad(), prec.autocast():
        idx = list(range(len(pairs)))[rank::world]
        for i in range(0, len(idx), batch_size):
            part = idx[i:i + batch_size]
            rows += list(zip(part, objective.heldout_h(model, [pairs[j] for j in part], part)))
    model.train()
    rows = sorted(gather_object(rows) if world > 1 else rows)
    return objective.metrics([h for _, h in rows], [pairs[j]["p"] for j, _ in rows])


class PreferencePairs(PairedPreferences):
    """The DPO objective (:mod:`cai.loop`): :func:`dpo_loss` of each pair's log-ratio
    difference ``h`` against the reference, averaged over the step's whole batch. A step
    logs its mean loss, reward accuracy (h > 0) and margin (beta * h)."""

    def __init__(self, model, train: list[dict], batches: list[list[int]], pad_id, accelerator, prec, ref: dict,
                 beta: float, soft: bool):
        super().__init__(batches, accelerator)
        self.model, self.train, self.pad_id, self.prec = model, train, pad_id, prec
        self.ref, self.beta, self.soft = ref, beta, soft  # ref: {"train"/"test": {pair index: (log pi_ref(c), (r))}}

    def margins(self, items: list[int]):
        import torch

        device = self.accelerator.device
        with self.prec.autocast():
            c, r = pair_logprobs(self.model, [self.train[i] for i in items], self.pad_id, device)
        rc = torch.tensor([self.ref["train"][i][0] for i in items], device=device)
        rr = torch.tensor([self.ref["train"][i][1] for i in items], device=device)
        return (c - rc) - (r - rr)

    def pair_loss(self, h, p):
        return dpo_loss(h, p, self.beta, self.soft)

    def state(self) -> dict:
        return {"ref": self.ref}

    # -- held out (evaluate) --

    def heldout_h(self, model, pairs: list[dict], indices: list[int]) -> list[float]:
        c, r = pair_logprobs(model, pairs, self.pad_id, self.accelerator.device)
        ref = self.ref["test"]
        return [(a - ref[j][0]) - (b - ref[j][1]) for j, a, b in zip(indices, c.tolist(), r.tolist())]

    def metrics(self, h: list[float], p: list[float]) -> dict:
        return pair_metrics(h, p, self.beta, self.soft)


def run(ctx: StageContext) -> dict:
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from cai.models import resolve_model

    cfg, dc = ctx.cfg, ctx.cfg.dpo
    rows, source = ctx.training_rows(DPO_PAIRS.get(dc.data), "prefs")  # or the user's file, dpo.data
    if dc.data in DPO_PAIRS:
        ctx.record_input("train_pairs", source)
    accelerator = Accelerator(cpu=cfg.engine.device == "cpu")
    base = resolve_model(ctx.model_path(dc.policy), cfg.engine.revision, progress=ctx.log)
    model, tok, prec = load_trainable(base, dc, accelerator.device, cfg.engine.trust_remote_code,
                                      AutoModelForCausalLM, "dpo", ctx.log, seed=cfg.seed)
    train, dropped = load_pairs(tok, rows["train"], dc.max_length, dc.min_confidence, source)
    test, _ = load_pairs(tok, rows["test"], dc.max_length, dc.min_confidence, source)
    if not train:
        raise CaiError(f"{source}: no pairs to train on (dropped: {dropped}; lower dpo.min_confidence?)")
    model, optimizer, params, batches = optimizer_and_batches(accelerator, model, dc, len(train), cfg.seed)
    trainee = Trainee(accelerator, model, optimizer, prec.grad_scaler(), params, prec, tok, ctx.out)
    plain = trainee.plain
    micro = max(1, dc.batch_size // dc.grad_accum)
    total_steps = len(batches)
    rank, world = accelerator.process_index, accelerator.num_processes
    pad_id, device = tok.pad_token_id, accelerator.device
    # Sharded, every forward pass is collective: each process scores every reference and held-out
    # pair (the same passes in lockstep) instead of its share.
    split = (0, 1) if is_sharded(plain) else (rank, world)

    start, state = resume(trainee.checkpoint, plain, optimizer, total_steps, ctx.log, "dpo", trainee.scaler)
    if dc.objective == "simpo":  # no reference: held-out numbers before training take a pass of the policy
        objective = SimPOPairs(model, train, batches, pad_id, accelerator, prec, dc.simpo_beta, dc.simpo_gamma,
                               dc.soft_labels)
        objective.before = state["before"] if state else evaluate(plain, test, objective, micro, *split, prec)
        before = objective.before
    else:
        if state is not None:  # JSON made the pair indices strings and the pairs lists
            ref = {split: {int(i): tuple(lp) for i, lp in rows.items()} for split, rows in state["ref"].items()}
        else:
            used = sorted({i for b in batches for i in b})
            ref = {"train": shared_reference(plain, train, used, pad_id, device, micro, *split, prec),
                   "test": shared_reference(plain, test, list(range(len(test))), pad_id, device, micro, *split, prec)}
        # The policy starts at the reference: h = 0 for every held-out pair (see the docstring).
        before = pair_metrics([0.0] * len(test), [x["p"] for x in test], dc.beta, dc.soft_labels)
        objective = PreferencePairs(model, train, batches, pad_id, accelerator, prec, ref, dc.beta, dc.soft_labels)

    t0 = time.time()
    points = point_steps(total_steps, dc.frontier_points)
    history = loop.train(trainee, objective, dc, total_steps=total_steps, start=start,
                         history=state["history"] if state else [], micro=micro, progress=ctx.progress,
                         points=points, track=ctx.track)
    seconds = time.time() - t0
    after = evaluate(plain, test, objective, micro, *split, prec)
    accelerator.wait_for_everyone()
    counts = {
        "train_pairs": len(train), "test_pairs": len(test), "dropped_pairs": sum(dropped.values()),
        "steps": total_steps, "data": dc.data, "objective": dc.objective, "soft_labels": dc.soft_labels,
        "train_seconds": round(seconds, 1),
        "final_loss": round(history[-1][1], 4) if history else None,
        "test_loss_before": before.get("loss"), "test_loss": after.get("loss"),
        "test_reward_accuracy": after.get("reward_accuracy"), "test_margin": after.get("margin"),
    }
    gathered = full_state_dict(plain)  # sharded: every process takes part; else None
    if accelerator.is_main_process:
        write_points_index(ctx.out, ctx.run_dir, "dpo", base, is_lora(plain), [
            {"step": s, "samples": sum(len(b) for b in batches[:s]), "kl": None,
             "train_loss": round(history[s - 1][1], 4)} for s in points], dc.policy)
        save_trained_model(ctx.out, plain, tok, "dpo", base, dc, cfg.seed, prec, gathered)
        write_json(ctx.output("metrics"), {
            "history": [{"step": s, "loss": l, "reward_accuracy": a, "margin": mg} for s, l, a, mg in history],
            "dropped": dropped, "test_before": before, "test_after": after, **counts,
        })
        name = "SimPO" if dc.objective == "simpo" else "DPO"
        curves = {f"train {name} loss": [(s, l) for s, l, _, _ in history]}
        if dc.objective == "dpo":  # the policy starts at the reference: h = 0
            curves["log 2 (start)"] = [(0, math.log(2)), (total_steps, math.log(2))]
        plot_curve(ctx.out / "loss.png", curves, name + (" (label-smoothed by the soft labels)" if dc.soft_labels else ""))
    return counts


def _needs(cfg) -> tuple[str, ...]:
    data = (DPO_PAIRS[cfg.dpo.data],) if cfg.dpo.data in DPO_PAIRS else ()  # a file needs no stage
    return data + (("sft",) if cfg.dpo.policy == SL_CAI else ())


def estimate(inputs: PlanInputs) -> Cost:
    import math

    from cai.memory import training
    from cai.training import point_saves, resolve_precision

    dc = inputs.cfg.dpo
    n, n_test, length, longest = inputs.training_pairs("dpo", dc.max_length)
    seqs = 2 * n * dc.epochs if dc.max_steps is None else min(2 * n * dc.epochs, 2 * dc.max_steps * dc.batch_size)
    steps = math.ceil(seqs / 2 / dc.batch_size)
    # the train sequences whose reference log-probs are computed once (SimPO has no reference)
    used = min(2 * n, seqs) if dc.objective == "dpo" else 0
    shape, memory, disk = inputs.shape(dc.policy), None, 0
    if shape is not None:
        per_pass = math.ceil(2 * max(1, dc.batch_size // dc.grad_accum) / inputs.world)  # chosen and rejected
        prec = resolve_precision(dc.dtype, inputs.device, "dpo.dtype", lambda _m: None, planning=True)
        memory = training(shape, prec, dc, per_pass, longest, inputs.world,  # padded to the longest
                          dc.sharding == "fsdp")
        disk = training_disk(shape.params, prec, dc, 1 + point_saves(steps, dc.frontier_points, dc.method),
                             (steps - 1) // dc.checkpoint_every)
    micro = max(1, dc.batch_size // dc.grad_accum)  # pairs per pass (chosen and rejected)
    # no-grad passes: the reference log-probs of the train and test pairs, the held-out pairs after training
    return Cost(train_tokens=int(seqs * length), note=f"~{int(n)} pairs x {dc.epochs} epochs",
                train_passes=steps * passes(dc.batch_size, micro, inputs.world), steps=steps,
                loads=1, eval_tokens=int((used + 2 * 2 * n_test) * length), figures=1,
                eval_passes=passes(used / 2, micro, inputs.world) + 2 * passes(n_test, micro, inputs.world),
                saves=1 + point_saves(steps, dc.frontier_points, dc.method),
                checkpoints=(steps - 1) // dc.checkpoint_every, memory=memory, disk_bytes=disk)


STAGE = StageSpec(
    name="dpo",
    run=run,
    config_keys=("seed", "engine", "dpo"),
    needs=_needs,
    help="RL-CAI without a PM: DPO on the preference pairs, label-smoothed by the soft labels.",
    distributed=True,
    estimate=estimate,
)
