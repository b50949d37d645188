"""Preference model (Bai et al. 2022, §4.1): a reward model trained on the AI feedback.

A sequence classifier with one output, started from the SL-CAI model by default, reads
each conversation ending in an answer and gives a scalar reward. It is trained on the
feedback stage's **soft labels**: the loss is the cross-entropy of
``sigmoid(r_chosen - r_rejected)`` against ``p_chosen`` (``preference_model.loss=hard``
gives plain Bradley-Terry). TRL's RewardTrainer and OpenRLHF take hard labels only; the
paper found soft labels better.
``preference_model.data`` trains on the user's own file of TRL pairs instead (read by
:mod:`cai.datafiles`, with its ``p_chosen`` where given), with no feedback stage.

Training runs the one loop of :mod:`cai.loop`, as ``sft`` does (so ``accelerate launch``
runs it in several processes, each taking its share of every batch, weighted so that the
step is the whole batch's mean), with the objective :class:`SoftPreferences`: both answers
of a pair go through the model in one padded batch.
With ``preference_model.method=lora`` the body gets LoRA adapters and the score head is
trained in full (peft's ``modules_to_save``).

Outputs in ``preference_model/``: ``model/`` (``save_pretrained``, plus
``cai_training.json``; merged with LoRA, whose adapter is also in ``adapter/``), ``metrics.json`` (loss per step; held-out accuracy, ECE and loss
before and after training, per source), ``test_scores.jsonl`` (every held-out pair's
rewards), ``loss.png``, ``calibration.png`` (reliability diagram) and ``scores.png``
(reward distribution of chosen and rejected answers).
"""

from __future__ import annotations

import time

from cai.errors import CaiError
from cai.io import write_json, write_jsonl
from cai.plots import plot_calibration, plot_curve, plot_scores
from cai.reward import encode_answer, pair_metrics, preference_loss, prepare_for_scoring, rewards, sigmoid
from cai.cost import Cost, PlanInputs, passes, training_disk
from cai.stage import StageContext, StageSpec
from cai.stage_names import SL_CAI
from cai import loop
from cai.loop import ShareOfBatches, Trainee
from cai.training import load_trainable, optimizer_and_batches, resume, save_trained_model


def load_pairs(tok, rows: list[dict], max_length: int, where) -> list[dict]:
    out = []
    for rec in rows:
        p = float(rec.get("p_chosen", 1.0))
        if not 0.0 <= p <= 1.0:
            raise CaiError(f"{where}: pair '{rec.get('id')}' has p_chosen={p}, outside [0, 1]")
        out.append({
            "id": rec.get("id"),
            "source": rec.get("source", "ai"),
            "p": p,
            "chosen": encode_answer(tok, rec["prompt"], rec["chosen"][-1]["content"], max_length),
            "rejected": encode_answer(tok, rec["prompt"], rec["rejected"][-1]["content"], max_length),
        })
    return out


def pair_deltas(model, pairs: list[dict], pad_id, device):
    """r_chosen - r_rejected for a batch of pairs, from one forward pass."""
    r = rewards(model, [x["chosen"] for x in pairs] + [x["rejected"] for x in pairs], pad_id, device)
    return r[: len(pairs)], r[len(pairs):]


def evaluate(model, pairs, pad_id, device, batch_size: int, prec) -> tuple[dict, list[tuple[float, float]]]:
    import torch

    if not pairs:
        return {"pairs": 0}, []
    scores = []
    model.eval()
    with torch.no_grad(), prec.autocast():
        for i in range(0, len(pairs), batch_size):
            rc, rr = pair_deltas(model, pairs[i:i + batch_size], pad_id, device)
            scores += list(zip(rc.tolist(), rr.tolist()))
    model.train()
    deltas = [c - r for c, r in scores]
    return pair_metrics(deltas, [x["p"] for x in pairs], [x["source"] for x in pairs]), scores


class SoftPreferences(ShareOfBatches):
    """The preference model's objective (:mod:`cai.loop`): the cross-entropy of
    ``sigmoid(r_chosen - r_rejected)`` against the soft label (``preference_loss``), averaged
    over the step's whole batch. Both answers of a micro-batch's pairs go through the model
    in one padded batch."""

    def __init__(self, model, train: list[dict], batches: list[list[int]], pad_id, accelerator, prec, kind: str,
                 before: dict):
        super().__init__(batches, accelerator)
        self.model, self.train, self.pad_id, self.prec, self.kind, self.before = model, train, pad_id, prec, kind, before

    def loss(self, items: list[int], step: int):
        import torch

        pairs = [self.train[i] for i in items]
        device = self.accelerator.device
        with self.prec.autocast():
            rc, rr = pair_deltas(self.model, pairs, self.pad_id, device)
        p = torch.tensor([x["p"] for x in pairs], device=device)
        # its part of the whole batch's mean loss
        loss = preference_loss(rc - rr, p, self.kind) * (self.weight * len(pairs) / len(self.batch))
        return loss * self.world, torch.tensor(float(loss.detach()), dtype=torch.float64)  # DDP averages

    def state(self) -> dict:
        return {"before": self.before}


def run(ctx: StageContext) -> dict:
    import transformers
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification

    from cai.models import resolve_model

    cfg, pc = ctx.cfg, ctx.cfg.preference_model
    rows, source = ctx.training_rows("feedback", "prefs")  # or the user's file, preference_model.data
    accelerator = Accelerator(cpu=cfg.engine.device == "cpu")
    start_from = ctx.model_path(pc.model)
    base = resolve_model(start_from, cfg.engine.revision, progress=ctx.log)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "score.weight newly initialized" is the point here
    try:
        model, tok, prec = load_trainable(base, pc, accelerator.device, cfg.engine.trust_remote_code,
                                          AutoModelForSequenceClassification, "preference_model", ctx.log, num_labels=1,
                                          seed=cfg.seed)  # the new score head: the same in every run and process
    finally:
        transformers.logging.set_verbosity(verbosity)
    prepare_for_scoring(model, tok)
    train = load_pairs(tok, rows["train"], pc.max_length, source)
    test = load_pairs(tok, rows["test"], pc.max_length, source)
    if not train:
        raise CaiError(f"{source}: no comparisons to train on (did the feedback stage label any?)")
    model, optimizer, params, batches = optimizer_and_batches(accelerator, model, pc, len(train), cfg.seed)
    trainee = Trainee(accelerator, model, optimizer, prec.grad_scaler(), params, prec, tok, ctx.out)
    micro = max(1, pc.batch_size // pc.grad_accum)
    total_steps = len(batches)
    pad_id, device = tok.pad_token_id, accelerator.device
    start, state = resume(trainee.checkpoint, trainee.plain, optimizer, total_steps, ctx.log, "preference_model",
                          trainee.scaler)
    before = state.get("before") if state else evaluate(model, test, pad_id, device, micro, prec)[0]
    objective = SoftPreferences(model, train, batches, pad_id, accelerator, prec, pc.loss, before)

    t0 = time.time()
    history = loop.train(trainee, objective, pc, total_steps=total_steps, start=start,
                         history=state["history"] if state else [], micro=micro, progress=ctx.progress,
                         track=ctx.track)
    seconds = time.time() - t0
    after, scores = evaluate(model, test, pad_id, device, micro, prec)
    accelerator.wait_for_everyone()
    counts = {
        "train_pairs": len(train), "test_pairs": len(test), "steps": total_steps, "loss": pc.loss,
        "train_seconds": round(seconds, 1),
        "final_loss": round(history[-1][1], 4) if history else None,
        "test_accuracy_before": before.get("accuracy"), "test_accuracy": after.get("accuracy"),
        "test_ece_before": before.get("ece"), "test_ece": after.get("ece"),
    }
    if accelerator.is_main_process:
        save_trained_model(ctx.out, trainee.plain, tok, "preference_model", base, pc, cfg.seed, prec)
        write_json(ctx.output("metrics"), {
            "loss_history": history, "test_before": before, "test_after": after, **counts,
        })
        write_jsonl(ctx.out / "test_scores.jsonl", [
            {"id": x["id"], "source": x["source"], "p_chosen": x["p"], "reward_chosen": c, "reward_rejected": r}
            for x, (c, r) in zip(test, scores)
        ])
        plot_curve(ctx.out / "loss.png", {"train loss": [tuple(h) for h in history]}, "Preference model")
        if scores:
            q = [sigmoid(c - r) for c, r in scores]
            plot_calibration(ctx.out / "calibration.png", q, [x["p"] for x in test], "PM calibration (held out)")
            plot_scores(ctx.out / "scores.png", scores, "Held-out rewards")
    return counts


def _needs(cfg) -> tuple[str, ...]:
    pc = cfg.preference_model
    return (() if pc.data else ("feedback",)) + (("sft",) if pc.model == SL_CAI else ())


def estimate(inputs: PlanInputs) -> Cost:
    import math

    from cai.memory import training
    from cai.training import resolve_precision

    pc = inputs.cfg.preference_model
    n, n_test, length, longest = inputs.training_pairs("preference_model", pc.max_length)
    seqs = 2 * n * pc.epochs if pc.max_steps is None else min(2 * n * pc.epochs, 2 * pc.max_steps * pc.batch_size)
    steps = math.ceil(seqs / 2 / pc.batch_size)
    shape, memory, disk = inputs.shape(pc.model), None, 0
    if shape is not None:
        per_pass = math.ceil(2 * max(1, pc.batch_size // pc.grad_accum) / inputs.world)  # both answers of a pair
        prec = resolve_precision(pc.dtype, inputs.device, "preference_model.dtype", lambda _m: None, planning=True)
        memory = training(shape, prec, pc, per_pass, longest, inputs.world,  # padded to the longest
                          classifier=True)
        disk = training_disk(shape.pm_params, prec, pc, 1, (steps - 1) // pc.checkpoint_every)
    micro = max(1, pc.batch_size // pc.grad_accum)  # pairs per pass (two sequences each)
    # held-out pairs scored before and after training (two sequences each)
    return Cost(train_tokens=int(seqs * length), note=f"~{int(n)} pairs x {pc.epochs} epochs",
                train_passes=steps * passes(pc.batch_size, micro, inputs.world), steps=steps,
                loads=1, eval_tokens=int(2 * 2 * n_test * length), eval_passes=2 * passes(n_test, micro),
                saves=1, checkpoints=(steps - 1) // pc.checkpoint_every, figures=3, memory=memory, disk_bytes=disk)


STAGE = StageSpec(
    name="preference_model",
    run=run,
    config_keys=("seed", "engine", "preference_model"),
    needs=_needs,
    help="Preference model: a reward model trained on the AI feedback's soft labels.",
    distributed=True,
    estimate=estimate,
)
