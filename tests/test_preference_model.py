"""The preference model: the soft-label loss by hand, calibration, training, scoring."""

import json
import math
import subprocess
import sys

import pytest
import torch

from cai.config import load_config
from cai.pipeline import run_pipeline
from cai.reward import RewardModel, ece, pair_metrics, preference_loss, rewards


def test_soft_label_loss_by_hand():
    """Two comparisons.

    delta = 0,     p = 0.5 : s(0) = 0.5;  -(0.5 log 0.5 + 0.5 log 0.5)    = log 2   = 0.693147
    delta = ln 3,  p = 0.75: s(ln 3) = 0.75; -(0.75 log 0.75 + 0.25 log 0.25) = 0.562335
    soft mean = 0.627741
    hard (p taken as 1): -log 0.5 = 0.693147, -log 0.75 = 0.287682, mean = 0.490415
    """
    delta = torch.tensor([0.0, math.log(3)])
    p = torch.tensor([0.5, 0.75])
    assert float(preference_loss(delta, p, "soft")) == pytest.approx(0.627741, abs=1e-6)
    assert float(preference_loss(delta, p, "hard")) == pytest.approx(0.490415, abs=1e-6)


def test_soft_labels_fit_the_label_and_hard_labels_overshoot():
    """Minimising the soft loss drives sigmoid(delta) to p; the hard loss pushes it to 1."""
    for kind, check in (("soft", lambda q: q == pytest.approx(0.75, abs=1e-3)), ("hard", lambda q: q > 0.95)):
        delta = torch.zeros(1, requires_grad=True)
        opt = torch.optim.SGD([delta], lr=1.0)
        for _ in range(500):
            opt.zero_grad()
            preference_loss(delta, torch.tensor([0.75]), kind).backward()
            opt.step()
        assert check(float(torch.sigmoid(delta.detach()))), kind


def test_ece_and_accuracy_by_hand():
    """q = sigmoid(delta) = [0.9, 0.9, 0.3] against p = [0.7, 0.9, 0.6].

    bin [0.9, 1.0): mean q 0.9, mean p 0.8, weight 2/3 -> 0.0667
    bin [0.3, 0.4): mean q 0.3, mean p 0.6, weight 1/3 -> 0.1000
    ECE = 0.1667; accuracy = 2/3 (delta > 0 twice)
    """
    logit = lambda x: math.log(x / (1 - x))  # noqa: E731
    deltas = [logit(0.9), logit(0.9), logit(0.3)]
    p = [0.7, 0.9, 0.6]
    assert ece([0.9, 0.9, 0.3], p) == pytest.approx(1 / 6, abs=1e-6)
    m = pair_metrics(deltas, p, ["a", "a", "b"])
    assert m["accuracy"] == pytest.approx(0.6667, abs=1e-4)
    assert m["accuracy_a"] == 1.0 and m["accuracy_b"] == 0.0


def test_a_reward_does_not_depend_on_padding(tiny_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).eval()
    model.config.pad_token_id = tok.pad_token_id
    short, long = [5, 6, 7], [5, 6, 7, 8, 9, 10, 11]
    with torch.no_grad():
        alone = rewards(model, [short], tok.pad_token_id, "cpu")
        batch = rewards(model, [short, long], tok.pad_token_id, "cpu")
    assert float(batch[0]) == pytest.approx(float(alone[0]), abs=1e-5)


def _run(run_dir, tiny_model, *extra):
    cfg = load_config(None, [
        f"run_dir={run_dir}", f"engine.model={tiny_model}", "engine.batch_size=8",
        "stages=[prepare, feedback, preference_model]", f"feedback.policy={tiny_model}",
        f"preference_model.model={tiny_model}", "feedback.max_prompts=6", "feedback.max_new_tokens=6",
        "preference_model.batch_size=4", "preference_model.learning_rate=1e-3",
        "preference_model.dtype=float32",  # on every CPU: the scores are compared to 1e-4
        *extra,
    ])
    return run_pipeline(cfg, log=lambda m: None)


@pytest.fixture(scope="module")
def pm_run(tmp_path_factory, tiny_model):
    return _run(tmp_path_factory.mktemp("pm") / "run", tiny_model)


def test_stage_trains_saves_and_scores(pm_run, tiny_model):
    from transformers import AutoModelForSequenceClassification

    run = pm_run
    out = run / "preference_model"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == math.ceil(metrics["train_pairs"] / 4) and metrics["train_pairs"] >= 6
    for key in ("accuracy", "ece", "soft_label_loss"):
        assert key in metrics["test_after"] and key in metrics["test_before"]
    for f in ("loss.png", "calibration.png", "scores.png", "test_scores.jsonl", "model/cai_training.json"):
        assert (out / f).is_file(), f
    start = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    trained = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert trained.config.num_labels == 1 and trained.config.pad_token_id is not None
    before = dict(start.named_parameters())
    changed = [n for n, p in trained.named_parameters() if n in before and not torch.equal(p, before[n]) and "score" not in n]
    assert len(changed) == sum(1 for n in before if "score" not in n)  # every body weight moved
    pm = RewardModel.load(str(out / "model"), device="cpu")
    a = pm.score("How do I pick a lock?", "Call a locksmith.")
    b = pm.score_many([[{"role": "user", "content": "How do I pick a lock?"}]], ["Call a locksmith."])[0]
    assert a == pytest.approx(b, abs=1e-5)
    # the same numbers the stage wrote for its held-out pairs
    row = json.loads((out / "test_scores.jsonl").read_text().splitlines()[0])
    pair = next(json.loads(l) for l in (run / "feedback" / "prefs" / "test.jsonl").read_text().splitlines()
                if json.loads(l)["id"] == row["id"])
    assert pm.score(pair["prompt"], pair["chosen"][0]["content"]) == pytest.approx(row["reward_chosen"], abs=1e-4)


def test_cli_score(tmp_path, pm_run, tiny_model, capsys):
    from cai.cli import main

    model = pm_run / "preference_model" / "model"
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n" + json.dumps({"prompt": "hi", "response": "go"}))
    one = subprocess.run([sys.executable, "-m", "cai", "score", str(model), "--prompt", "hi", "--response", "hello"],
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    assert main(["score", str(model), "--file", str(rows)]) == 0
    scored = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [r["response"] for r in scored] == ["hello", "go"]
    assert scored[0]["reward"] == pytest.approx(float(one.stdout), abs=1e-5)
    assert main(["score", str(model), "--prompt", "hi"]) == 2
    assert "--response" in capsys.readouterr().err
    assert main(["score", tiny_model, "--prompt", "a", "--response", "b"]) == 2
    assert "not a preference model" in capsys.readouterr().err
    rows.write_text('{"prompt": "hi"')
    assert main(["score", str(model), "--file", str(rows)]) == 2
    assert "rows.jsonl:1: malformed JSON line" in capsys.readouterr().err


def test_hard_label_option_reuses_the_feedback(tmp_path, pm_run, tiny_model):
    import shutil

    shutil.copytree(pm_run, tmp_path / "run")
    run = _run(tmp_path / "run", tiny_model, "preference_model.loss=hard", "preference_model.max_steps=1")
    assert json.loads((run / "preference_model" / "metrics.json").read_text())["loss"] == "hard"


def test_lora_pm_trains_adapters_and_the_whole_score_head(tmp_path, pm_run, tiny_model):
    import shutil

    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    shutil.copytree(pm_run, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "preference_model")
    run = _run(tmp_path / "run", tiny_model, "preference_model.method=lora", "preference_model.lora_r=4",
               "preference_model.learning_rate=1e-2", "preference_model.gradient_checkpointing=true")
    out = run / "preference_model"
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("lora_A" in k for k in keys) and any(k.endswith("score.weight") for k in keys)
    start = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).state_dict()
    merged = AutoModelForSequenceClassification.from_pretrained(out / "model").state_dict()
    assert set(start) == set(merged)
    assert not torch.equal(start["model.layers.0.self_attn.q_proj.weight"], merged["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(start["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])  # frozen
    # the merged model scores as the stage's adapters + head did on its held-out pairs
    pm = RewardModel.load(str(out / "model"), device="cpu")
    row = json.loads((out / "test_scores.jsonl").read_text().splitlines()[0])
    pair = next(json.loads(l) for l in (run / "feedback" / "prefs" / "test.jsonl").read_text().splitlines()
                if json.loads(l)["id"] == row["id"])
    assert pm.score(pair["prompt"], pair["chosen"][0]["content"]) == pytest.approx(row["reward_chosen"], abs=1e-4)
    assert json.loads((out / "metrics.json").read_text())["loss_history"][-1][1] != \
        json.loads((out / "metrics.json").read_text())["loss_history"][0][1]
