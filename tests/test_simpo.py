"""SimPO (dpo.objective=simpo): the loss by hand, the mean log-probs, and the stage on a tiny model."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from cai.config import load_config
from cai.pipeline import run_pipeline
from cai.simpo import simpo_loss


def test_simpo_loss_by_hand():
    """beta = 2, gamma = 0.3; pair 1: h = 0.2, p = 1; pair 2: h = 0.2, p = 0.8; pair 3: h = -0.1, p = 1.

    z = beta*h - gamma:  pairs 1, 2: 0.4 - 0.3 = 0.1;  pair 3: -0.2 - 0.3 = -0.5.
    -log s(0.1) = log(1 + e^-0.1) = 0.644397;  -log s(-0.1) = log(1 + e^0.1) = 0.744397;
    -log s(-0.5) = log(1 + e^0.5) = 0.974077.
      pair 1:          0.644397
      pair 2 (soft):   0.8 * 0.644397 + 0.2 * 0.744397 = 0.664397
      pair 2 (plain):  0.644397 (p is taken as 1)
      pair 3:          0.974077
    With h = 0 and gamma = 0 the loss is log 2, as DPO's at its start.
    """
    h = torch.tensor([0.2, 0.2, -0.1])
    p = torch.tensor([1.0, 0.8, 1.0])
    assert simpo_loss(h, p, 2.0, 0.3, soft=True).tolist() == pytest.approx([0.644397, 0.664397, 0.974077], abs=1e-6)
    assert simpo_loss(h, p, 2.0, 0.3, soft=False).tolist() == pytest.approx([0.644397, 0.644397, 0.974077], abs=1e-6)
    assert float(simpo_loss(torch.zeros(1), torch.ones(1), 2.0, 0.0)) == pytest.approx(math.log(2))


def test_the_reward_is_the_mean_token_logprob(tiny_model):
    """A chosen answer twice as long as the rejected one, with the same tokens repeated, gets
    the mean of its own tokens' log-probs, not their sum: log pi / |y| for each answer."""
    from transformers import AutoTokenizer

    from cai.simpo import mean_logprobs
    from cai.training import IGNORE, answer_logprobs, pad_batch

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt = tok("Q: hi", add_special_tokens=False)["input_ids"]
    short, long = tok(" yes", add_special_tokens=False)["input_ids"], tok(" yes yes", add_special_tokens=False)["input_ids"]
    pair = {"chosen": {"input_ids": prompt + long, "labels": [IGNORE] * len(prompt) + long},
            "rejected": {"input_ids": prompt + short, "labels": [IGNORE] * len(prompt) + short}}
    with torch.no_grad():
        c, r = mean_logprobs(model, [pair], tok.pad_token_id, "cpu")
        sums = answer_logprobs(model, pad_batch([pair["chosen"], pair["rejected"]], tok.pad_token_id, "cpu"))
    assert float(c) == pytest.approx(float(sums[0]) / len(long), rel=1e-5)
    assert float(r) == pytest.approx(float(sums[1]) / len(short), rel=1e-5)


@pytest.fixture(scope="module")
def simpo_run(tmp_path_factory, tiny_model):
    run = tmp_path_factory.mktemp("simpo") / "run"
    cfg = load_config(None, [
        f"run_dir={run}", f"engine.model={tiny_model}", "engine.batch_size=8", "stages=[prepare, feedback, dpo]",
        f"feedback.policy={tiny_model}", "feedback.max_prompts=6", "feedback.max_new_tokens=6",
        f"dpo.policy={tiny_model}", "dpo.batch_size=4", "dpo.learning_rate=1e-3", "dpo.objective=simpo",
        "dpo.checkpoint_every=1",
    ])
    return run_pipeline(cfg, log=lambda m: None)


def test_simpo_trains_every_parameter_with_no_reference(simpo_run, tiny_model):
    out = simpo_run / "dpo"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["objective"] == "simpo" and metrics["steps"] == math.ceil(metrics["train_pairs"] / 4)
    # no reference, so the starting policy's held-out numbers come from a pass, not from h = 0
    before, after = metrics["test_before"], metrics["test_after"]
    assert set(before) == set(after) == {"pairs", "loss", "reward_accuracy", "margin"}
    assert before["margin"] != 0.0 and after["loss"] != before["loss"]
    assert all(math.isfinite(h["loss"]) for h in metrics["history"])
    assert json.loads((out / "model" / "cai_training.json").read_text())["config"]["objective"] == "simpo"
    start = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    unchanged = [k for k in start if torch.equal(start[k], trained[k])]
    assert not unchanged, unchanged


def test_a_killed_simpo_run_resumes_to_the_same_model(simpo_run, tmp_path, tiny_model, monkeypatch):
    """Stopped by a NaN at step 2, rerun from its checkpoint: the same history and weights as
    the uninterrupted run (the checkpoint keeps the starting policy's held-out numbers)."""
    import shutil

    import cai.simpo as simpo
    from cai.errors import CaiError

    shutil.copytree(simpo_run, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "dpo")
    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"engine.model={tiny_model}", "engine.batch_size=8",
        "stages=[prepare, feedback, dpo]", f"feedback.policy={tiny_model}", "feedback.max_prompts=6",
        "feedback.max_new_tokens=6", f"dpo.policy={tiny_model}", "dpo.batch_size=4", "dpo.learning_rate=1e-3",
        "dpo.objective=simpo", "dpo.checkpoint_every=1",
    ])
    real, calls = simpo.simpo_loss, []  # the held-out "before" metrics call it once, then once a step

    def nan_on_third(h, p, beta, gamma, soft=True):
        calls.append(1)
        out = real(h, p, beta, gamma, soft)
        return out * float("nan") if len(calls) == 3 else out

    monkeypatch.setattr(simpo, "simpo_loss", nan_on_third)
    with pytest.raises(CaiError, match="training loss is nan at step 1"):
        run_pipeline(cfg, log=lambda m: None)
    monkeypatch.setattr(simpo, "simpo_loss", real)
    logs = []
    run_pipeline(cfg, log=logs.append)
    assert any("[dpo] resuming from checkpoint at step 1/" in m for m in logs), logs
    want = json.loads((simpo_run / "dpo" / "metrics.json").read_text())
    got = json.loads((tmp_path / "run" / "dpo" / "metrics.json").read_text())
    assert got["history"] == want["history"] and got["test_before"] == want["test_before"]
    assert got["test_after"] == want["test_after"]
    assert (tmp_path / "run" / "dpo" / "model" / "model.safetensors").read_bytes() == (
        simpo_run / "dpo" / "model" / "model.safetensors").read_bytes()
