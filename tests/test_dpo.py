"""The dpo stage: the (label-smoothed) DPO loss by hand, training, data options, NaN and resume."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from cai.config import load_config
from cai.errors import CaiError
from cai.pipeline import run_pipeline
from cai.stages.dpo import dpo_loss


def test_dpo_loss_by_hand():
    """beta = 0.5; pair 1: h = 0, p = 0.9; pair 2: h = 2 ln 3, p = 0.75.

    beta*h = 0:    s(0) = 0.5, so both losses are log 2 = 0.693147 whatever p is.
    beta*h = ln 3: s(ln 3) = 0.75, s(-ln 3) = 0.25.
      soft (eps = 1 - p = 0.25): -(0.75 log 0.75 + 0.25 log 0.25) = 0.215762 + 0.346574 = 0.562335
      plain:                     -log 0.75                            = 0.287682
    """
    h = torch.tensor([0.0, 2 * math.log(3)])
    p = torch.tensor([0.9, 0.75])
    assert dpo_loss(h, p, 0.5, soft=True).tolist() == pytest.approx([0.693147, 0.562335], abs=1e-6)
    assert dpo_loss(h, p, 0.5, soft=False).tolist() == pytest.approx([0.693147, 0.287682], abs=1e-6)


def test_soft_dpo_settles_at_the_label_and_plain_dpo_does_not():
    """The soft loss is minimal where s(beta h) = p; plain DPO keeps pushing h up."""
    for soft, check in ((True, lambda q: q == pytest.approx(0.75, abs=1e-3)), (False, lambda q: q > 0.95)):
        h = torch.zeros(1, requires_grad=True)
        opt = torch.optim.SGD([h], lr=5.0)
        for _ in range(500):
            opt.zero_grad()
            dpo_loss(h, torch.tensor([0.75]), 0.5, soft).sum().backward()
            opt.step()
        assert check(float(torch.sigmoid(0.5 * h.detach()))), soft


def _cfg(run_dir, tiny_model, *extra, stages="[prepare, feedback, dpo]"):
    return load_config(None, [
        f"run_dir={run_dir}", f"engine.model={tiny_model}", "engine.batch_size=8", f"stages={stages}",
        f"feedback.policy={tiny_model}", "feedback.max_prompts=6", "feedback.max_new_tokens=6",
        f"dpo.policy={tiny_model}", "dpo.batch_size=4", "dpo.learning_rate=1e-3", *extra,
    ])


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model):
    run = tmp_path_factory.mktemp("dpo") / "run"
    return run_pipeline(_cfg(run, tiny_model, "dpo.soft_labels=false"), log=lambda m: None)


def test_plain_dpo_trains_every_parameter_and_reports(dpo_run, tiny_model):
    out = dpo_run / "dpo"
    metrics = json.loads((out / "metrics.json").read_text())
    n_pairs = sum(1 for _ in (dpo_run / "feedback" / "prefs" / "train.jsonl").open())
    assert metrics["train_pairs"] == n_pairs and metrics["steps"] == math.ceil(n_pairs / 4)
    assert [h["step"] for h in metrics["history"]] == list(range(1, metrics["steps"] + 1))
    assert metrics["test_before"] == {"pairs": metrics["test_pairs"], "loss": 0.6931, "reward_accuracy": 0.0, "margin": 0.0}
    assert set(metrics["test_after"]) == {"pairs", "loss", "reward_accuracy", "margin"}
    assert metrics["test_after"]["loss"] != metrics["test_before"]["loss"]
    assert (out / "loss.png").stat().st_size > 1000
    assert json.loads((out / "model" / "cai_training.json").read_text())["config"]["soft_labels"] is False
    index = json.loads((out / "points" / "index.json").read_text())
    from cai.training import point_steps

    assert [p["step"] for p in index["points"]] == point_steps(metrics["steps"], 4)
    assert [p["samples"] for p in index["points"]] == [min(4 * p["step"], n_pairs) for p in index["points"]]
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged


def test_min_confidence_filters_pairs(tmp_path, dpo_run, tiny_model):
    import shutil

    shutil.copytree(dpo_run, tmp_path / "run")
    with pytest.raises(CaiError, match=r"prefs/train.jsonl: no pairs to train on .*low_confidence"):
        run_pipeline(_cfg(tmp_path / "run", tiny_model, "dpo.min_confidence=1.0"), log=lambda m: None)


def test_sl_prefs_data_trains_on_revision_pairs(tmp_path, tiny_model):
    stages = "[prepare, critique_revision, dpo]"
    run = run_pipeline(_cfg(tmp_path / "run", tiny_model, "dpo.data=sl_prefs", "dpo.max_steps=1",
                            "critique_revision.rounds=1", "critique_revision.max_prompts=4",
                            "critique_revision.max_new_tokens=8", "critique_revision.critique_max_new_tokens=4",
                            stages=stages), log=lambda m: None)
    metrics = json.loads((run / "dpo" / "metrics.json").read_text())
    pairs = [json.loads(l) for l in (run / "critique_revision" / "prefs" / "train.jsonl").read_text().splitlines()]
    assert metrics["data"] == "sl_prefs" and metrics["train_pairs"] == len(pairs) > 0
    assert json.loads((run / "dpo" / "manifest.json").read_text())["needs"].keys() == {"critique_revision"}


def test_nan_loss_stops_then_rerun_resumes_from_the_checkpoint(tmp_path, dpo_run, tiny_model, monkeypatch):
    import shutil

    import cai.stages.dpo as stage

    shutil.copytree(dpo_run, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "dpo")
    cfg = _cfg(tmp_path / "run", tiny_model, "dpo.soft_labels=false", "dpo.checkpoint_every=1", "dpo.batch_size=2")
    real, calls = stage.dpo_loss, []  # call 1 is the held-out "before" metrics, then one per step

    def nan_on_fourth(h, p, beta, soft=True):
        calls.append(1)
        out = real(h, p, beta, soft)
        return out * float("nan") if len(calls) == 4 else out

    monkeypatch.setattr(stage, "dpo_loss", nan_on_fourth)
    with pytest.raises(CaiError, match=r"training loss is nan at step 2; stopped. The last good checkpoint is in .*dpo.partial/checkpoint"):
        run_pipeline(cfg, log=lambda m: None)
    assert (tmp_path / "run" / "dpo.partial" / "checkpoint" / "trainer_state.json").is_file()
    assert not (tmp_path / "run" / "dpo").exists()
    monkeypatch.setattr(stage, "dpo_loss", real)
    logs = []
    run_pipeline(cfg, log=logs.append)
    assert any("[dpo] resuming from checkpoint at step 2/" in m for m in logs), logs
    metrics = json.loads((tmp_path / "run" / "dpo" / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == list(range(1, metrics["steps"] + 1))
    # frontier points (4 by default) after ceil(i * steps / 4): each once, the last being model/
    from cai.training import point_steps

    want = point_steps(metrics["steps"], 4)
    index = json.loads((tmp_path / "run" / "dpo" / "points" / "index.json").read_text())
    assert [p["step"] for p in index["points"]] == want and index["points"][-1]["path"] == "model"
    assert sorted(p.name for p in (tmp_path / "run" / "dpo" / "points").iterdir()) == (
        ["index.json"] + [f"step-{s:06d}" for s in want[:-1]])
    assert [p["train_loss"] for p in index["points"]] == [round(h["loss"], 4) for h in metrics["history"]
                                                          if h["step"] in want]


def test_lora_dpo_uses_the_model_with_adapters_off_as_reference(tmp_path, dpo_run, tiny_model):
    """With LoRA the reference log-probs come from the policy with its adapters off; at the
    start that is the starting model, so h = 0 and the first step's loss is log 2."""
    import shutil

    shutil.copytree(dpo_run, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "dpo")
    run = run_pipeline(_cfg(tmp_path / "run", tiny_model, "dpo.soft_labels=false", "dpo.method=lora", "dpo.lora_r=4",
                            "dpo.learning_rate=1e-2", "dpo.lora_dropout=0.0"), log=lambda m: None)
    out = run / "dpo"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert metrics["test_after"]["loss"] != metrics["test_before"]["loss"]
    assert (out / "adapter" / "adapter_config.json").is_file()
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    assert set(before) == set(after)  # merged: a plain checkpoint
    assert not torch.equal(before["model.layers.1.mlp.down_proj.weight"].to(after["model.layers.1.mlp.down_proj.weight"].dtype),
                           after["model.layers.1.mlp.down_proj.weight"])
