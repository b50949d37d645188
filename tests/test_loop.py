"""cai.loop.train: the one training loop, against a plain loop written out by hand."""

from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from cai.config import SFTConfig
from cai.training import encode_chat, load_trainable, optimizer_and_batches, optimizer_step, pad_batch, token_loss
from test_training import CONVERSATIONS


@contextmanager
def _bar(total, desc, unit="step"):
    yield lambda n: None


def _setup(tiny_model, tmp_path, **settings):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    # float32 on every machine ("auto" is bf16-mixed where the CPU has bfloat16)
    tc = replace(SFTConfig(), dtype="float32", learning_rate=1e-3, batch_size=4, epochs=6.0, **settings)
    accelerator = Accelerator(cpu=True)
    model, tok, prec = load_trainable(tiny_model, tc, accelerator.device, False, AutoModelForCausalLM, "sft",
                                      log=lambda m: None, seed=0)
    examples = [encode_chat(tok, c, 128) for c in CONVERSATIONS]
    model, optimizer, params, batches = optimizer_and_batches(accelerator, model, tc, len(examples), seed=0)
    return tc, accelerator, model, tok, prec, examples, optimizer, params, batches


@pytest.mark.parametrize("warmup", [0, 3])
def test_the_loop_with_the_sft_objective_is_the_plain_loop(tiny_model, tmp_path, warmup):
    """One process, one micro-batch a step: cai.loop.train with sft's objective gives the
    losses and weights, bit for bit, of the loop anyone would write: forward, token loss,
    backward, clip, AdamW step (with the learning rate of the warmup)."""
    from cai import loop
    from cai.loop import Trainee
    from cai.stages.sft import NextTokens
    from cai.training import warmup_lr

    tc, acc, model, tok, prec, examples, optimizer, params, batches = _setup(tiny_model, tmp_path, warmup_steps=warmup)
    objective = NextTokens(model, examples, batches, tok.pad_token_id, acc, prec, None)
    trainee = Trainee(acc, model, optimizer, prec.grad_scaler(), params, prec, tok, tmp_path)
    history = loop.train(trainee, objective, tc, total_steps=len(batches), start=0, history=[], micro=tc.batch_size,
                         progress=_bar)

    tc, acc, plain, tok, prec, examples, optimizer, params, batches = _setup(tiny_model, tmp_path, warmup_steps=warmup)
    scaler, losses = prec.grad_scaler(), []
    for step, idx in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = warmup_lr(tc.learning_rate, tc.warmup_steps, step)
        batch = pad_batch([examples[i] for i in idx], tok.pad_token_id, "cpu")
        loss = token_loss(plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                          batch["labels"])
        acc.backward(scaler.scale(loss))
        optimizer_step(acc, optimizer, scaler, params, tc.max_grad_norm)
        losses.append(float(loss.detach()))

    assert len(batches) > 3 and [h[0] for h in history] == list(range(1, len(batches) + 1))
    assert [h[1] for h in history] == losses
    for (name, a), b in zip(acc.unwrap_model(model).named_parameters(), acc.unwrap_model(plain).parameters()):
        assert torch.equal(a, b), name
    assert not (tmp_path / "checkpoint").exists()  # checkpoint_every (50) is past the last step


def test_micro_batches_add_up_to_the_step(tiny_model, tmp_path):
    """grad_accum = 2: each step runs as two micro-batches whose losses are each their tokens'
    share of the batch's token mean, so the logged loss and the update are the whole batch's
    (up to float summation order), and a checkpoint is written every checkpoint_every steps."""
    from cai import loop
    from cai.loop import Trainee
    from cai.stages.sft import NextTokens

    runs = []
    for accum in (1, 2):
        tc, acc, model, tok, prec, examples, optimizer, params, batches = _setup(
            tiny_model, tmp_path, grad_accum=accum, checkpoint_every=2)
        objective = NextTokens(model, examples, batches, tok.pad_token_id, acc, prec, None)
        out = tmp_path / f"accum{accum}"
        trainee = Trainee(acc, model, optimizer, prec.grad_scaler(), params, prec, tok, out)
        history = loop.train(trainee, objective, tc, total_steps=len(batches), start=0, history=[],
                             micro=max(1, tc.batch_size // accum), progress=_bar)
        runs.append((history, [p.detach().clone() for p in acc.unwrap_model(model).parameters()]))
        assert (out / "checkpoint" / "trainer_state.json").is_file()
    (h1, w1), (h2, w2) = runs
    # the first step starts from the same weights: its loss differs by summation order alone
    assert h2[0][1] == pytest.approx(h1[0][1], rel=1e-6)
    # later steps drift apart by AdamW's normalised steps on gradients that differ in the last
    # bits (up to ~lr a step on a weight whose gradient is near zero)
    assert [r[1] for r in h2] == pytest.approx([r[1] for r in h1], rel=1e-3)
    assert all(torch.allclose(a, b, atol=len(h1) * 2e-3) for a, b in zip(w1, w2))
