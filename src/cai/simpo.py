"""SimPO, a preference objective without a reference model (beyond the paper).

Meng, Xia and Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
Reward". An answer's implicit reward is its *mean* token log-prob under the policy, scaled
by ``beta``; the chosen answer must beat the rejected one by a target margin ``gamma``:

    h = log pi(chosen) / |chosen| - log pi(rejected) / |rejected|
    loss = -log sigmoid(beta * h - gamma)

With the feedback stage's soft labels the loss is label-smoothed as DPO's is: the
cross-entropy of ``sigmoid(beta * h - gamma)`` against ``p_chosen``. No reference pass
is run and no reference log-probs are kept, so a step costs a forward and backward of
the pairs alone. Nothing but the small learning rate holds the policy near where it
started (SimPO has no KL term): watch the held-out numbers.

``dpo.objective=simpo`` trains it in the dpo stage, through the one loop of
:mod:`cai.loop`, with everything else of that stage (data, frontier points, outputs).
"""

from __future__ import annotations

from cai.loop import PairedPreferences
from cai.training import IGNORE, answer_logprobs, pad_batch


def simpo_loss(h, p, beta: float, gamma: float, soft: bool = True):
    """Per-pair SimPO loss for mean log-prob differences ``h`` and labels ``p`` (= p_chosen).

    soft: ``-p log s(beta h - gamma) - (1 - p) log s(gamma - beta h)``; plain: the first term
    with p = 1. At h = 0 and gamma = 0 both are log 2.
    """
    import torch.nn.functional as F

    target = p.float() if soft else p.new_ones(p.shape).float()
    return F.binary_cross_entropy_with_logits(beta * h.float() - gamma, target, reduction="none")


def mean_logprobs(model, pairs: list[dict], pad_id, device):
    """(mean token log-prob of each chosen answer, of each rejected one), one padded pass."""
    batch = pad_batch([x["chosen"] for x in pairs] + [x["rejected"] for x in pairs], pad_id, device)
    tokens = (batch["labels"][:, 1:] != IGNORE).sum(-1).clamp(min=1)  # each answer's length
    mean = answer_logprobs(model, batch) / tokens
    return mean[: len(pairs)], mean[len(pairs):]


def simpo_metrics(h: list[float], p: list[float], beta: float, gamma: float, soft: bool) -> dict:
    """Held-out SimPO loss, reward accuracy (h > 0) and mean margin beta*h."""
    import torch

    if not h:
        return {"pairs": 0}
    return {
        "pairs": len(h),
        "loss": round(float(simpo_loss(torch.tensor(h), torch.tensor(p), beta, gamma, soft).mean()), 4),
        "reward_accuracy": round(sum(x > 0 for x in h) / len(h), 4),
        "margin": round(beta * sum(h) / len(h), 4),
    }


class SimPOPairs(PairedPreferences):
    """The SimPO objective (:mod:`cai.loop`): :func:`simpo_loss` averaged over the step's
    whole batch of pairs. A step logs its mean loss, reward accuracy and margin, as DPO's."""

    def __init__(self, model, train: list[dict], batches: list[list[int]], pad_id, accelerator, prec, beta: float,
                 gamma: float, soft: bool):
        super().__init__(batches, accelerator)
        self.model, self.train, self.pad_id, self.prec = model, train, pad_id, prec
        self.beta, self.gamma, self.soft = beta, gamma, soft
        self.before: dict | None = None  # held-out metrics of the starting policy (a checkpoint keeps them)

    def margins(self, items: list[int]):
        with self.prec.autocast():
            c, r = mean_logprobs(self.model, [self.train[i] for i in items], self.pad_id, self.accelerator.device)
        return c - r

    def pair_loss(self, h, p):
        return simpo_loss(h, p, self.beta, self.gamma, self.soft)

    def state(self) -> dict:
        return {"before": self.before}

    # -- held out (cai.stages.dpo.evaluate) --

    def heldout_h(self, model, pairs: list[dict], indices: list[int]) -> list[float]:
        c, r = mean_logprobs(model, pairs, self.pad_id, self.accelerator.device)
        return [a - b for a, b in zip(c.tolist(), r.tolist())]

    def metrics(self, h: list[float], p: list[float]) -> dict:
        return simpo_metrics(h, p, self.beta, self.gamma, self.soft)
