"""SL-CAI model: supervised fine-tuning on the critique_revision stage's ``sft`` data, or on
the user's own file of TRL rows (``sft.data``, read by :mod:`cai.datafiles`; the stage then
needs no critique_revision).

The one training loop (:func:`cai.loop.train`, driven by ``accelerate``, so ``accelerate
launch`` runs it in several processes) with the objective :class:`NextTokens`: forward,
loss on the final assistant turn only, backward, clip, AdamW step. Defaults follow the
paper: one epoch at a constant learning rate. The precision is ``sft.dtype`` (float32 master weights with a bfloat16 autocast where the
hardware has bfloat16: see ``cai.training.resolve_precision``). LoRA (peft,
``sft.method=lora``) is an option; its adapters are merged into the saved model so later
stages load an ordinary checkpoint.

The loss of a step is the mean over the labelled tokens of the whole batch: each process
scales its share by its tokens over the batch's, times the process count (DDP averages),
so one batch gives the same step with any number of processes.

Outputs in ``sft/``: ``model/`` (``save_pretrained``: weights, tokenizer, and
``cai_training.json`` with the resolved config), ``adapter/`` with LoRA, ``metrics.json``
(loss per step, held-out loss before and after), ``loss.png``. A resumable checkpoint is
kept in ``sft.partial/checkpoint`` while training; a rerun after a crash continues from it.
"""

from __future__ import annotations

import time
from pathlib import Path

from cai.errors import CaiError
from cai.io import write_json
from cai.plots import plot_curve
from cai.cost import Cost, PlanInputs, passes, training_disk
from cai.stage import StageContext, StageSpec
from cai import loop
from cai.loop import ShareOfBatches, Trainee
from cai.training import (
    IGNORE,
    encode_chat,
    full_state_dict,
    load_trainable,
    optimizer_and_batches,
    pad_batch,
    resume,
    save_trained_model,
    token_loss,
)


def evaluate_loss(model, examples, pad_id, device, batch_size: int, prec) -> float | None:
    import torch

    if not examples:
        return None
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad(), prec.autocast():
        for i in range(0, len(examples), batch_size):
            batch = pad_batch(examples[i:i + batch_size], pad_id, device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            total += float(token_loss(logits, batch["labels"])) * n
            count += n
    model.train()
    return total / max(count, 1)


def load_examples(tok, rows: list[dict], max_length: int) -> tuple[list[dict], int]:
    examples, dropped = [], 0
    for rec in rows:
        enc = encode_chat(tok, rec["messages"], max_length)
        if enc is None:
            dropped += 1
        else:
            examples.append(enc)
    return examples, dropped


class NextTokens(ShareOfBatches):
    """The SFT objective (:mod:`cai.loop`): the mean next-token loss over the answer tokens
    of the step's whole batch. Each process takes its share of the batch; a micro-batch's
    loss is its tokens' part of the batch's token mean, times the process count."""

    def __init__(self, model, train: list[dict], batches: list[list[int]], pad_id, accelerator, prec, eval_before):
        super().__init__(batches, accelerator)
        self.model, self.train, self.pad_id, self.prec, self.eval_before = model, train, pad_id, prec, eval_before
        self.learned = [sum(1 for x in e["labels"][1:] if x != IGNORE) for e in train]  # answer tokens per example
        self.tokens_seen = 0  # this process's, for the tokens/s figure

    def loss(self, items: list[int], step: int):
        import torch

        batch = pad_batch([self.train[i] for i in items], self.pad_id, self.accelerator.device)
        batch_labels = sum(self.learned[i] for i in self.batch) or 1  # the whole batch's, over all processes
        with self.prec.autocast():
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                use_cache=False).logits
            share = self.weight * sum(self.learned[i] for i in items) / batch_labels
            loss = token_loss(logits, batch["labels"]) * share  # its part of the batch's token mean
        self.tokens_seen += int(self.weight) * sum(len(self.train[i]["input_ids"]) for i in items)
        logged = torch.tensor(float(loss.detach()), dtype=torch.float64)
        return loss * self.world, logged  # DDP averages over the processes

    def state(self) -> dict:
        return {"eval_before": self.eval_before}


def run(ctx: StageContext) -> dict:
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from cai.models import resolve_model

    cfg, sc = ctx.cfg, ctx.cfg.sft
    rows, source = ctx.training_rows("critique_revision", "sft")  # or the user's file, sft.data
    accelerator = Accelerator(cpu=cfg.engine.device == "cpu")
    if not sc.model and cfg.engine.kind == "openai":
        raise CaiError("config field 'sft.model' is empty; with engine.kind=openai the policy is remote, so name a local checkpoint to fine-tune")
    base = resolve_model(sc.model or cfg.engine.model, cfg.engine.revision, progress=ctx.log)
    model, tok, prec = load_trainable(base, sc, accelerator.device, cfg.engine.trust_remote_code,
                                      AutoModelForCausalLM, "sft", ctx.log, seed=cfg.seed)
    train, dropped = load_examples(tok, rows["train"], sc.max_length)
    test, _ = load_examples(tok, rows["test"], sc.max_length)
    if not train:
        raise CaiError(f"{source}: no usable SFT examples ({dropped} longer than sft.max_length={sc.max_length}"
                       f"{'' if sc.data else '; is the critique_revision output empty?'})")
    model, optimizer, params, batches = optimizer_and_batches(accelerator, model, sc, len(train), cfg.seed)
    trainee = Trainee(accelerator, model, optimizer, prec.grad_scaler(), params, prec, tok, ctx.out)
    micro = max(1, sc.batch_size // sc.grad_accum)
    total_steps = len(batches)
    start, state = resume(trainee.checkpoint, trainee.plain, optimizer, total_steps, ctx.log, "sft", trainee.scaler)
    pad_id = tok.pad_token_id
    eval_before = state.get("eval_before") if state else evaluate_loss(model, test, pad_id, accelerator.device, micro, prec)
    objective = NextTokens(model, train, batches, pad_id, accelerator, prec, eval_before)

    t0 = time.time()
    history = loop.train(trainee, objective, sc, total_steps=total_steps, start=start,
                         history=state["history"] if state else [], micro=micro, progress=ctx.progress,
                         track=ctx.track)
    seconds = time.time() - t0
    tokens_seen = int(accelerator.reduce(torch.tensor(objective.tokens_seen, device=accelerator.device), "sum"))
    eval_after = evaluate_loss(model, test, pad_id, accelerator.device, micro, prec)
    accelerator.wait_for_everyone()
    counts = {
        "examples": len(train), "test_examples": len(test), "dropped_examples": dropped, "steps": total_steps,
        "train_tokens_per_s": round(tokens_seen / seconds, 1) if seconds and tokens_seen else None,
        "final_loss": round(history[-1][1], 4) if history else None,
        "test_loss_before": round(eval_before, 4) if eval_before is not None else None,
        "test_loss_after": round(eval_after, 4) if eval_after is not None else None,
    }
    gathered = full_state_dict(trainee.plain)  # sharded: every process takes part; else None
    if accelerator.is_main_process:
        save_trained_model(ctx.out, trainee.plain, tok, "sft", base, sc, cfg.seed, prec, gathered)
        write_json(ctx.output("metrics"), {"loss": history, **counts})
        plot_curve(ctx.out / "loss.png", {"train loss": [tuple(h) for h in history]},
                   f"SFT on {Path(sc.data).name}" if sc.data else "SFT on critique/revision data")
    return counts


def estimate(inputs: PlanInputs) -> Cost:
    import math

    from cai.memory import training
    from cai.training import resolve_precision

    count, cr, sc = inputs.count, inputs.cfg.critique_revision, inputs.cfg.sft
    own = inputs.own_rows("sft")
    if own is not None:  # the user's file: its rows as they are
        n, n_test = len(own["train"]), len(own["test"])
        sizes = [count(r["messages"]) for r in own["train"]]
        per = sum(sizes) / max(1, n)
    else:  # about what critique_revision will write: a final revision per red-team prompt, and helpful answers
        reds = inputs.capped("red_team", cr.max_prompts)
        helpful = inputs.sets["helpful"]
        train, test = reds.get("train", []), reds.get("test", [])
        n = len(train) + min(len(helpful.get("train", [])), round(cr.helpful_ratio * len(train)))
        n_test = len(test) + min(len(helpful.get("test", [])), round(cr.helpful_ratio * len(test)))
        per = sum(count(p.messages) for p in train) / max(1, len(train)) + cr.max_new_tokens
        mixed = inputs.helpful_beside({"train": train}, cr.helpful_ratio)
        sizes = [count(p.messages) + cr.max_new_tokens for p in train + mixed]
    length = int(min(per, sc.max_length))
    # memory: the batch that holds the longest example is padded to it
    longest = int(min(max(sizes, default=0), sc.max_length))
    seen = n * sc.epochs if sc.max_steps is None else min(n * sc.epochs, sc.max_steps * sc.batch_size)
    steps = math.ceil(seen / sc.batch_size)
    shape, memory, disk = inputs.shape(sc.model or inputs.cfg.engine.model), None, 0
    if shape is not None:
        seqs = math.ceil(max(1, sc.batch_size // sc.grad_accum) / inputs.world)
        prec = resolve_precision(sc.dtype, inputs.device, "sft.dtype", lambda _m: None, planning=True)
        memory = training(shape, prec, sc, min(seqs, max(1, n)), longest, inputs.world, sc.sharding == "fsdp")
        disk = training_disk(shape.params, prec, sc, 1, (steps - 1) // sc.checkpoint_every)
    micro = max(1, sc.batch_size // sc.grad_accum)
    # held-out loss before and after training; a checkpoint every checkpoint_every steps but the last
    return Cost(train_tokens=int(seen * length), note=f"{n} examples x {sc.epochs} epochs",
                train_passes=steps * passes(sc.batch_size, micro, inputs.world), steps=steps,
                loads=1, eval_tokens=2 * n_test * length, eval_passes=2 * passes(n_test, micro, inputs.world),
                saves=1, checkpoints=(steps - 1) // sc.checkpoint_every, figures=1, memory=memory, disk_bytes=disk)


def _needs(cfg) -> tuple[str, ...]:
    return () if cfg.sft.data else ("critique_revision",)


STAGE = StageSpec(
    name="sft",
    run=run,
    config_keys=("seed", "engine", "sft"),
    needs=_needs,
    help="SL-CAI model: fine-tune on the final revisions plus helpful samples.",
    distributed=True,
    estimate=estimate,
)
