"""The training kit shared by ``sft``, ``preference_model``, ``dpo`` and ``rl``.

Each stage's loop stays in its own file and reads top to bottom (torchtune's recipes
are the model: no trainer class hierarchy). What the loops share lives here, once:

* loading the starting model for training (:func:`load_trainable`, :func:`train_dtype`);
* the optimizer and each step's example indices (:func:`optimizer_and_batches`) and the
  learning-rate schedule (:func:`warmup_lr`);
* chat tokenization with assistant-only labels (:func:`encode_chat`), padding and the
  losses' building blocks (:func:`token_loss`, :func:`sequence_logprobs`,
  :func:`answer_logprobs`);
* resumable checkpoints (:func:`save_checkpoint`, :func:`resume`), the NaN guard
  (:func:`check_finite`) and the final ``save_pretrained`` (:func:`save_trained_model`).

The optimizer settings are the flat fields of ``cai.config.OptimizerConfig`` /
``TrainingConfig``, which every training stage's config extends.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path

from cai.errors import CaiError

IGNORE = -100


def encode_chat(tok, messages: list[dict], max_length: int) -> dict | None:
    """Token ids and labels for a conversation; only the final assistant turn is learned.

    The prefix is the chat-template rendering of every turn before the last with the
    assistant cue; the target is what the full rendering adds after it (the answer and
    its end-of-turn token). Returns None when the prefix leaves no room for a target.
    """
    from cai.engines.base import defang, special_strings

    if not messages or messages[-1]["role"] != "assistant":
        raise CaiError("a training conversation must end with an assistant turn")
    specials = special_strings(tok)
    messages = [{**m, "content": defang(m["content"], specials)} for m in messages]
    prefix = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages, tokenize=False)
    p_ids = tok(prefix, add_special_tokens=False)["input_ids"]
    f_ids = tok(full, add_special_tokens=False)["input_ids"]
    k = 0
    while k < min(len(p_ids), len(f_ids)) and p_ids[k] == f_ids[k]:
        k += 1
    f_ids = f_ids[:max_length]
    if k >= len(f_ids):
        return None
    labels = [IGNORE] * k + f_ids[k:]
    return {"input_ids": f_ids, "labels": labels}


def pad_batch(examples: list[dict], pad_id: int, device) -> dict:
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def token_loss(logits, labels):
    """Mean cross-entropy over the labelled tokens (labels shifted inside)."""
    import torch.nn.functional as F

    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE)


def batches_for_epochs(n: int, batch_size: int, epochs: float, seed: int) -> list[list[int]]:
    """Shuffled index batches covering ``epochs`` passes (a fractional last pass is cut)."""
    order: list[int] = []
    rng = random.Random(seed)
    full = math.ceil(epochs)
    for _ in range(full):
        idx = list(range(n))
        rng.shuffle(idx)
        order += idx
    order = order[: max(1, round(n * epochs))]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def optimizer_and_batches(accelerator, model, tc, n: int, seed: int):
    """The shared set-up of a training loop: AdamW over the trainable weights, both prepared
    by accelerate, and each optimizer step's example indices (shuffled batches of
    ``tc.batch_size`` over ``tc.epochs``, cut at ``tc.max_steps``). ``tc`` is a stage's
    config (sft, preference_model, dpo). Returns (model, optimizer, params, batches).
    """
    import torch

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    batches = batches_for_epochs(n, tc.batch_size, tc.epochs, seed)
    if tc.max_steps is not None:
        batches = batches[: tc.max_steps]
    return model, optimizer, params, batches


def check_finite(value, step: int, where: Path, what: str = "training loss") -> None:
    """Stop with a clear error when ``value`` (a scalar or any tensor) holds NaN or inf."""
    import torch

    bad = value[~torch.isfinite(value)] if value.dim() else (value if not torch.isfinite(value) else None)
    if bad is not None and bad.numel():
        raise CaiError(
            f"{what} is {float(bad.detach().reshape(-1)[0])} at step {step}; stopped. The last good checkpoint is in "
            f"{where} (lower the learning rate or check the data)"
        )


def load_trainable(path: str, dtype: str, device, trust_remote_code: bool, model_cls=None, **kwargs):
    """The starting model and tokenizer of a training loop, on the CPU (accelerate moves it),
    in the dtype that ``dtype`` (a stage's setting) resolves to on ``device``."""
    from cai.models import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(
        path, device="cpu", dtype=train_dtype(dtype, device), trust_remote_code=trust_remote_code,
        model_cls=model_cls, **kwargs,
    )
    return model, tok


def train_dtype(setting: str, device) -> str:
    """'auto' is float32 on CPU (no fast bf16 there) and bfloat16 on accelerators."""
    if setting != "auto":
        return setting
    return "float32" if getattr(device, "type", str(device)) == "cpu" else "bfloat16"


def warmup_lr(base: float, warmup_steps: int, step: int) -> float:
    """Linear warmup to ``base``, then constant (the paper's schedule)."""
    return base * min(1.0, (step + 1) / warmup_steps) if warmup_steps else base


def sequence_logprobs(logits, labels):
    """Sum of log p(token) over each row's labelled tokens (labels shifted inside).

    The log-likelihood of an answer under the model, as DPO and policy gradients need it;
    computed through ``cross_entropy`` so no full-vocabulary log-softmax is kept around.
    """
    import torch.nn.functional as F

    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="none")
    return -nll.view(labels.shape).sum(-1)


def save_checkpoint(folder: Path, model, optimizer, step: int, extra: dict) -> None:
    """Save weights, optimizer and step atomically (a temp folder renamed into place)."""
    import torch

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, **extra}, tmp / "trainer_state.pt")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def resume(folder: Path, model, optimizer, total_steps: int, log, stage: str) -> tuple[int, dict | None]:
    """Where a loop starts: ``(0, None)``, or the step and trainer state of the checkpoint an
    interrupted run of the same configuration left in ``folder`` (weights and optimizer
    state loaded into ``model`` and ``optimizer``)."""
    state = load_checkpoint(folder, model, optimizer, total_steps) if folder.exists() else None
    if state is None:
        return 0, None
    log(f"[{stage}] resuming from checkpoint at step {state['step']}/{total_steps}")
    return state["step"], state


def load_checkpoint(folder: Path, model, optimizer, total_steps: int | None = None) -> dict | None:
    """The trainer state of a checkpoint, with its weights and optimizer state loaded.

    None, touching nothing, when there is no checkpoint, when it was made for another
    number of steps (the config changed), or when its weights do not fit the model:
    then training starts over rather than mixing weights.
    """
    import torch
    from safetensors.torch import load_file

    state_file = folder / "trainer_state.pt"
    if not state_file.is_file():
        return None
    trainer = torch.load(state_file, weights_only=False)
    if total_steps is not None and trainer.get("total_steps") != total_steps:
        return None
    state = {}
    for w in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(w)))
    own = set(model.state_dict())
    missing = [k for k in own - set(state) if "lm_head" not in k]  # tied to the embeddings
    if missing or set(state) - own:
        return None
    model.load_state_dict(state, strict=False)
    optimizer.load_state_dict(trainer["optimizer"])
    return trainer


def answer_logprobs(model, batch: dict, entropy: bool = False):
    """One forward pass: each row's summed log-probability of its labelled tokens.

    Logits are kept only from the earliest answer position on (``logits_to_keep``), so the
    vocabulary projection is not paid over the prompts. With ``entropy``, also returns the
    summed entropy of the model's next-token distribution at the labelled positions and
    their count (no gradient through it: it is a diagnostic).
    """
    import torch

    labels = batch["labels"]
    labelled = labels != IGNORE
    first = int(labelled.float().argmax(-1).min()) if bool(labelled.any()) else 0
    keep = labels.size(1) - max(first - 1, 0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    logits = logits[:, -keep:, :]
    kept = labels[:, -keep:]
    logp = sequence_logprobs(logits, kept)
    if not entropy:
        return logp
    with torch.no_grad():
        mask = kept[:, 1:] != IGNORE
        sel = torch.log_softmax(logits[:, :-1, :][mask].float(), dim=-1)
        ent = -(sel.exp() * sel).sum(-1)
    return logp, float(ent.sum()), int(mask.sum())


def save_trained_model(out: Path, model, tok, stage: str, base: str, config, seed: int) -> None:
    """``save_pretrained`` weights and tokenizer into ``out``, plus ``cai_training.json``
    (the stage, its starting model and resolved config), so the artifact says how it was made."""
    import dataclasses

    from cai.io import write_json

    model.save_pretrained(out)
    tok.save_pretrained(out)
    write_json(out / "cai_training.json", {
        "stage": stage, "base_model": base, "config": dataclasses.asdict(config), "seed": seed,
    })
