"""The one training loop: ``sft``, ``preference_model``, ``dpo`` and ``rl`` all run :func:`train`.

It is a plain function that reads top to bottom (nanoGPT's loop is the model; no trainer
class hierarchy). A stage hands it an *objective*: an object that says what one step
trains on, how a micro-batch of it becomes a loss, and what the step logs. The loop owns
everything the four stages used to write each for themselves: the learning-rate warmup,
micro-batches with gradients synced once per step, the NaN guard, backward through the
fp16 gradient scaler, clipping and the optimizer step, the step's stats summed over the
processes, frontier points and resumable checkpoints.

An objective (see :class:`Objective`) has five methods:

* ``begin_step(step)``: this process's items of the step (indices into its data). RL
  samples its rollouts here, in ``stages/rl.py``; the supervised stages take their share
  of a shuffled batch (:func:`cai.training.process_share`);
* ``loss(items, step)``: ``(loss, stats)`` for a micro-batch of those items. ``loss`` is
  what is backpropagated: this micro-batch's part of the step's mean loss, times the
  process count (DDP averages gradients over the processes, so their sum is the batch's
  mean). ``stats`` is a tensor of sums the step logs; the loop adds them up over the
  micro-batches and the processes;
* ``log_row(step, stats)``: the step's row in the stage's history;
* ``scalars(row)``: that row as named numbers for the experiment trackers (``report_to``):
  ``{"loss": ...}``, the step left out. The history itself (``metrics.json``) is unchanged;
* ``state()``: what a checkpoint keeps besides the weights, optimizer and history
  (plain JSON values).

Losses stay pure functions next to their stage (``dpo_loss``, ``preference_loss``,
``rloo_loss``, :func:`cai.training.token_loss`), each tested against hand-worked values.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from cai.artifacts import CHECKPOINT
from cai.training import (
    Precision,
    check_finite,
    full_state_dict,
    optimizer_step,
    process_share,
    save_checkpoint,
    save_point,
    warmup_lr,
)


class Objective(Protocol):
    def begin_step(self, step: int) -> list: ...

    def loss(self, items: list, step: int) -> tuple[Any, Any]: ...

    def log_row(self, step: int, stats) -> Any: ...

    def scalars(self, row) -> dict: ...

    def state(self) -> dict: ...


@dataclass
class Trainee:
    """What the loop trains and where it keeps it."""

    accelerator: Any
    model: Any  # as accelerate prepared it (DDP-wrapped in several processes) or sharded
    optimizer: Any
    scaler: Any  # the fp16 gradient scaler (disabled in other precisions)
    params: list  # the trained weights (clipped together)
    prec: Precision
    tok: Any
    out: Path  # the stage's folder: frontier points in out/points, the checkpoint in out/checkpoint

    @property
    def plain(self):
        """The model without accelerate's wrapper (saving, no-grad passes)."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def checkpoint(self) -> Path:
        return self.out / CHECKPOINT


def train(trainee: Trainee, objective: Objective, tc, *, total_steps: int, start: int, history: list,
          micro: int, progress: Callable, desc: str = "training", points=(),
          track: Callable[[dict, int], None] | None = None) -> list:
    """Run steps ``start`` .. ``total_steps`` of ``objective`` on ``trainee``; returns ``history``
    with a row appended per step.

    ``tc`` is the stage's config (``learning_rate``, ``warmup_steps``, ``max_grad_norm``,
    ``checkpoint_every``); ``micro`` is how many items go through one forward pass;
    ``points`` are the steps after which a frontier point is kept; ``progress`` is the
    stage's progress bar factory. ``start`` and ``history`` come from
    :func:`cai.training.resume` (0 and [] for a fresh run). ``track(metrics, step)``
    (``StageContext.track``) receives each step's row as scalars (``objective.scalars``).
    """
    acc, model, optimizer = trainee.accelerator, trainee.model, trainee.optimizer
    with progress(total_steps, desc, unit="step") as update:
        update(start)  # a resumed run's bar starts at its checkpoint
        for step in range(start, total_steps):
            # The learning rate of this step: a linear warmup, then constant (the paper's schedule).
            for group in optimizer.param_groups:
                group["lr"] = warmup_lr(tc.learning_rate, tc.warmup_steps, step)
            # What this process trains on in this step (RL samples its rollouts here).
            items = objective.begin_step(step)
            # Forward and backward a micro-batch at a time. Gradients add up over the
            # micro-batches; across processes they are synced once, after the last one.
            stats = None
            for first in range(0, len(items), micro):
                last = first + micro >= len(items)
                with contextlib.nullcontext() if last else acc.no_sync(model):
                    loss, part = objective.loss(items[first:first + micro], step)
                    check_finite(loss, step, trainee.checkpoint)  # stop at a NaN, the last checkpoint intact
                    acc.backward(trainee.scaler.scale(loss))
                stats = part if stats is None else stats + part
            # Clip the gradient norm, step the optimizer, zero the gradients.
            optimizer_step(acc, optimizer, trainee.scaler, trainee.params, tc.max_grad_norm)
            # The step's stats are sums: add up every process's before logging them.
            if acc.num_processes > 1:
                stats = acc.reduce(stats.to(acc.device), "sum").cpu()
            history.append(objective.log_row(step, stats))
            if track is not None:  # the experiment trackers (report_to): the same row, as named scalars
                track(objective.scalars(history[-1]), step + 1)
            update(1)
            done = step + 1
            # The last step's weights are the stage's model, saved by the stage: neither a point nor a checkpoint.
            if done in points and done < total_steps:
                keep_point(trainee, done)
            if done % tc.checkpoint_every == 0 and done < total_steps:
                # every process takes part: a sharded model's weights are gathered whole
                save_checkpoint(trainee.checkpoint, trainee.plain, optimizer, done,
                                {"history": history, "total_steps": total_steps, **objective.state()},
                                trainee.scaler, main=acc.is_main_process)
    return history


def keep_point(trainee: Trainee, step: int) -> None:
    """The weights after ``step`` as a frontier point (:func:`cai.training.save_point`); every
    process calls it, as a sharded model's weights are gathered whole first."""
    gathered = full_state_dict(trainee.plain)
    if trainee.accelerator.is_main_process:
        save_point(trainee.out, step, trainee.plain, trainee.tok, trainee.prec, state_dict=gathered)


class ShareOfBatches:
    """``begin_step`` for the objectives that train on shuffled batches of their data (sft,
    preference_model, dpo): each process takes its share of the step's batch
    (:func:`cai.training.process_share`). The step's whole batch is ``self.batch``, and
    ``self.weight`` is 0 for a process left with no item of it (it runs one with no gradient)."""

    #: What a history row ``[step, ...]`` holds after its step (``scalars``); dpo adds its reward stats.
    names: tuple[str, ...] = ("loss",)

    def __init__(self, batches: list[list[int]], accelerator):
        self.batches, self.accelerator = batches, accelerator
        self.world = accelerator.num_processes
        self.batch: list[int] = []
        self.weight = 1.0

    def begin_step(self, step: int) -> list[int]:
        self.batch = self.batches[step]
        mine, self.weight = process_share(self.batch, self.accelerator.process_index, self.world)
        return mine

    def log_row(self, step: int, stats) -> list:
        """``[step, loss]``: ``stats`` is the step's loss, its micro-batches' shares of the batch mean summed."""
        return [step + 1, float(stats)]

    def scalars(self, row: list) -> dict:
        """The row ``[step, loss, ...]`` as ``{name: value}`` (``names``), for the experiment trackers."""
        return dict(zip(self.names, row[1:]))


class PairedPreferences(ShareOfBatches):
    """What the objectives on preference pairs share (dpo's :class:`PreferencePairs`, SimPO's
    :class:`~cai.simpo.SimPOPairs`): a per-pair loss of each pair's margin ``h`` (how much more
    the policy favours the chosen answer, as the objective measures it) against its label,
    averaged over the step's whole batch; a step logs the mean loss, reward accuracy (h > 0)
    and margin (beta * h). An objective supplies ``margins(items)`` (h, with its graph) and
    ``pair_loss(h, p)``, and sets ``beta``."""

    names = ("loss", "reward_accuracy", "margin")  # the history row [step, loss, accuracy, margin]
    beta: float

    def loss(self, items: list[int], step: int):
        import torch

        h = self.margins(items)
        p = torch.tensor([self.train[i]["p"] for i in items], device=self.accelerator.device)
        per_pair = self.pair_loss(h, p)
        # sum over my pairs / whole batch * world: the processes' averaged gradient is
        # exactly the gradient of the batch mean.
        loss = per_pair.sum() * (self.weight * self.world / len(self.batch))
        sums = self.weight * torch.tensor([float(per_pair.detach().sum()), float((h > 0).sum()),
                                           float(self.beta * h.detach().sum())])  # loss, correct, margin
        return loss, sums

    def log_row(self, step: int, stats) -> list:
        n = len(self.batches[step])
        return [step + 1, float(stats[0]) / n, float(stats[1]) / n, float(stats[2]) / n]
