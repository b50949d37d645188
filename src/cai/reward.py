"""Preference (reward) models: the soft-label loss, metrics, and scoring a saved PM.

A PM is a ``AutoModelForSequenceClassification`` with one output, saved with
``save_pretrained``, so TRL, OpenRLHF and plain transformers load it as-is. It reads the
chat-template rendering of ``prompt + [assistant answer]`` and scores its last token.

Python::

    from cai.reward import RewardModel
    pm = RewardModel.load("runs/cpu-tiny/preference_model/model")
    pm.score("How do I pick a lock?", "I can't help with breaking into ...")

CLI: ``cai score PM_DIR --prompt TEXT --response TEXT`` (or ``--file`` with JSONL rows
that have ``prompt`` and ``response``).
"""

from __future__ import annotations

import math

from cai.engines.base import defang, special_strings
from cai.errors import CaiError


# -- losses and metrics (pure functions, unit-tested against hand-worked values) -----------


def preference_loss(delta, p, kind: str = "soft"):
    """Mean loss over comparisons with reward gaps ``delta = r_chosen - r_rejected``.

    ``soft``: cross-entropy of ``sigmoid(delta)`` against the soft label ``p``,
    ``-[p log s(d) + (1 - p) log s(-d)]``; with p = 1 it is Bradley-Terry.
    ``hard``: Bradley-Terry on the hard label, ``-log s(d)``, whatever p says.
    """
    import torch.nn.functional as F

    target = p if kind == "soft" else p.new_ones(p.shape)
    return F.binary_cross_entropy_with_logits(delta.float(), target.float())


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def reliability(q: list[float], p: list[float], bins: int = 10) -> list[dict]:
    """Bins of the PM's probability ``q = sigmoid(delta)`` with the mean soft label in each."""
    out = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, x in enumerate(q) if lo <= x < hi or (b == bins - 1 and x == 1.0)]
        if idx:
            out.append({
                "lo": lo, "hi": hi, "count": len(idx),
                "mean_q": sum(q[i] for i in idx) / len(idx),
                "mean_p": sum(p[i] for i in idx) / len(idx),
            })
    return out


def ece(q: list[float], p: list[float], bins: int = 10) -> float:
    """Expected calibration error of the PM's probabilities against the (soft) labels:
    ``sum_b (n_b / N) |mean q_b - mean p_b|`` over equal-width bins of q.
    """
    if not q:
        return float("nan")
    return sum(b["count"] / len(q) * abs(b["mean_q"] - b["mean_p"]) for b in reliability(q, p, bins))


def pair_metrics(delta: list[float], p: list[float], sources: list[str] | None = None) -> dict:
    """Held-out numbers for reward gaps ``delta`` against labels ``p`` (p >= 0.5 by construction)."""
    if not delta:
        return {"pairs": 0}
    q = [sigmoid(d) for d in delta]
    loss = -sum(pi * math.log(max(qi, 1e-12)) + (1 - pi) * math.log(max(1 - qi, 1e-12)) for qi, pi in zip(q, p))
    out = {
        "pairs": len(delta),
        "accuracy": round(sum(d > 0 for d in delta) / len(delta), 4),
        "ece": round(ece(q, p), 4),
        "soft_label_loss": round(loss / len(delta), 4),
        "mean_delta": round(sum(delta) / len(delta), 4),
    }
    if sources:
        for src in sorted(set(sources)):
            idx = [i for i, s in enumerate(sources) if s == src]
            out[f"accuracy_{src}"] = round(sum(delta[i] > 0 for i in idx) / len(idx), 4)
            out[f"pairs_{src}"] = len(idx)
    return out


# -- encoding and scoring ---------------------------------------------------------------------


def as_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return list(prompt)
    raise CaiError("a prompt must be a string or a list of {role, content} messages")


def encode_answer(tok, prompt, response: str, max_length: int, specials=None) -> list[int]:
    """Token ids of the conversation ending in ``response``; keeps the last ``max_length``
    tokens, since the score is read at the end."""
    specials = special_strings(tok) if specials is None else specials
    msgs = as_messages(prompt) + [{"role": "assistant", "content": response}]
    msgs = [{**m, "content": defang(str(m["content"]), specials)} for m in msgs]
    text = tok.apply_chat_template(msgs, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids[-max_length:]


def rewards(model, seqs: list[list[int]], pad_id: int, device):
    """One reward per sequence (right-padded batch; the model reads the last real token)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    # no KV cache: a scoring pass reads each sequence once, and the cache would hold every
    # layer's keys and values for every token (~45 KiB a token on the embedded model) until it ends
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return out.logits[:, 0].float()


def prepare_for_scoring(model, tok) -> None:
    """Sequence classifiers find the last token through ``pad_token_id``: make sure it is set."""
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id


class RewardModel:
    """A saved preference model, ready to score answers."""

    def __init__(self, model, tok, device: str, max_length: int = 2048):
        self.model, self.tok, self.device, self.max_length = model.eval(), tok, device, max_length
        self.specials = special_strings(tok)
        prepare_for_scoring(self.model, self.tok)

    @classmethod
    def load(cls, path: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False):
        import json
        from pathlib import Path

        from transformers import AutoModelForSequenceClassification

        from cai.models import load_model_and_tokenizer

        cfg_file = Path(path) / "config.json"
        if cfg_file.is_file():
            data = json.loads(cfg_file.read_text(encoding="utf-8"))
            archs = data.get("architectures") or []
            if not any(a.endswith("ForSequenceClassification") for a in archs) or len(data.get("id2label") or {0: 0}) != 1:
                raise CaiError(
                    f"{path}: not a preference model ({', '.join(archs) or 'unknown architecture'}); give the "
                    "model/ folder that the preference_model stage wrote"
                )
        model, tok, device = load_model_and_tokenizer(
            str(path), device, dtype, trust_remote_code, model_cls=AutoModelForSequenceClassification
        )
        return cls(model, tok, device)

    def score_many(self, prompts: list, responses: list[str], batch_size: int = 8) -> list[float]:
        import torch

        if len(prompts) != len(responses):
            raise CaiError(f"{len(prompts)} prompts but {len(responses)} responses")
        seqs = [encode_answer(self.tok, p, r, self.max_length, self.specials) for p, r in zip(prompts, responses)]
        # batched longest first, so that each batch pads to lengths close to its own
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out: list[float] = [0.0] * len(seqs)
        with torch.inference_mode():
            for i in range(0, len(order), batch_size):
                batch = order[i:i + batch_size]
                scores = rewards(self.model, [seqs[k] for k in batch], self.tok.pad_token_id, self.device).tolist()
                for k, score in zip(batch, scores):
                    out[k] = score
        return out

    def score(self, prompt, response: str) -> float:
        return self.score_many([prompt], [response])[0]
