"""The rl stage: the RLOO and GRPO estimators by hand, sampled token ids, training, NaN rewards."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from cai.config import load_config
from cai.engines.base import SamplingParams
from cai.errors import CaiError
from cai.pipeline import run_pipeline
from cai.stages.rl import grpo_advantages, rloo_advantages, rloo_loss, shaped_rewards, step_prompts


def test_rloo_advantages_by_hand():
    """One prompt, k = 4 rewards [1, 2, 3, 6]; each baseline is the mean of the other three.

    1: 1 - (2+3+6)/3 = 1 - 11/3 = -2.6667     2: 2 - (1+3+6)/3 = 2 - 10/3 = -1.3333
    3: 3 - (1+2+6)/3 = 3 - 3    =  0          6: 6 - (1+2+3)/3 = 6 - 2    =  4
    Prompts are independent: a second row [5, 5] (k = 2) gets [0, 0].
    """
    adv = rloo_advantages(torch.tensor([[1.0, 2.0, 3.0, 6.0]]))
    assert adv.tolist()[0] == pytest.approx([-8 / 3, -4 / 3, 0.0, 4.0], abs=1e-6)
    assert rloo_advantages(torch.tensor([[5.0, 5.0], [1.0, 3.0]])).tolist() == [[0.0, 0.0], [-2.0, 2.0]]
    with pytest.raises(CaiError, match="at least 2 samples"):
        rloo_advantages(torch.tensor([[1.0]]))


def test_grpo_advantages_by_hand():
    """GRPO: A_ij = (r_ij - mean_j r_ij) / (std_j r_ij + eps), population std, eps = 1e-4.

    One prompt, k = 8 rewards [2, 4, 4, 4, 5, 5, 7, 9]: mean 40/8 = 5, deviations
    [-3, -1, -1, -1, 0, 0, 2, 4], squares sum to 9+1+1+1+0+0+4+16 = 32, population variance
    32/8 = 4, std 2, so A = [-1.5, -0.5, -0.5, -0.5, 0, 0, 1, 2] (over 2.0001). (The sample
    std would be sqrt(32/7) = 2.138, and every advantage 2/2.138 = 0.935 times these.)
    RLOO on the same row: 8/7 * deviations = [-3.43, -1.14, ..., 4.57]: same signs and order.

    k = 2: [1, 3] -> mean 2, std 1 -> [-1, 1]; [10, 30] -> mean 20, std 10 -> [-1, 1] too:
    each prompt's advantages have unit scale (RLOO gives [-2, 2] and [-20, 20]).
    All rewards equal, [5, 5, 5, 5]: deviations 0, std 0 -> 0 / 1e-4 = [0, 0, 0, 0].
    """
    d = 2.0 + 1e-4
    adv = grpo_advantages(torch.tensor([[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]]))
    assert adv.tolist()[0] == pytest.approx([-3 / d, -1 / d, -1 / d, -1 / d, 0.0, 0.0, 2 / d, 4 / d], abs=1e-6)
    rloo = rloo_advantages(torch.tensor([[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]]))
    assert rloo.tolist()[0] == pytest.approx([8 / 7 * x for x in (-3, -1, -1, -1, 0, 0, 2, 4)], abs=1e-5)
    pair = grpo_advantages(torch.tensor([[1.0, 3.0], [10.0, 30.0], [5.0, 5.0]]))
    assert pair.reshape(-1).tolist() == pytest.approx([-1 / 1.0001, 1 / 1.0001, -10 / 10.0001, 10 / 10.0001, 0.0, 0.0])
    assert grpo_advantages(torch.tensor([[5.0, 5.0, 5.0, 5.0]])).tolist() == [[0.0, 0.0, 0.0, 0.0]]
    with pytest.raises(CaiError, match="GRPO needs at least 2 samples"):
        grpo_advantages(torch.tensor([[1.0]]))


def test_grpo_after_whitening_is_grpo_with_a_relative_eps():
    """Whitening divides a step's rewards by their std s; GRPO divides by each group's std
    again, so (r/s - mean)/(std(r/s) + eps) = (r - mean)/(std(r) + eps*s): the same
    advantages, with eps measured in units of s. Rewards [1, 3] and [0, 8]: shaped_rewards
    whitens by their population std over all four, s = sqrt(((1-3)^2+(3-3)^2+(0-3)^2+(8-3)^2)/4)
    = sqrt(38/4) = 3.0822; then [1, 3]/s has std 1/s = 0.3244, so A = +-0.3244/(0.3244 + 1e-4)."""
    r = torch.tensor([1.0, 3.0, 0.0, 8.0])
    w = shaped_rewards(r, torch.zeros(4), 0.0, whiten=True)
    s = (38 / 4) ** 0.5
    assert w.tolist() == pytest.approx([x / s for x in (1.0, 3.0, 0.0, 8.0)], abs=1e-6)
    after = grpo_advantages(w.view(-1, 2))
    assert after.reshape(-1).tolist() == pytest.approx(
        grpo_advantages(r.view(-1, 2), eps=1e-4 * s).reshape(-1).tolist(), abs=1e-6)
    assert after[0].tolist() == pytest.approx([-(1 / s) / (1 / s + 1e-4), (1 / s) / (1 / s + 1e-4)], abs=1e-6)


def test_kl_penalty_whitening_and_loss_by_hand():
    """scores [1, 2], KL [2, 0], kl_coef 0.25: rewards [1 - 0.5, 2 - 0] = [0.5, 2].

    whitened: population std of [0.5, 2] is 0.75, so [0.6667, 2.6667].
    loss with A = [1, -1], log pi = [-2, -3] over 2 sequences: -(1*-2 + -1*-3)/2 = -0.5;
    d loss / d log pi = -A / 2 = [-0.5, 0.5] (the better answer's log-prob goes up).
    """
    scores, kl = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 0.0])
    assert shaped_rewards(scores, kl, 0.25, whiten=False).tolist() == [0.5, 2.0]
    assert shaped_rewards(scores, kl, 0.25, whiten=True).tolist() == pytest.approx([2 / 3, 8 / 3], abs=1e-6)
    assert shaped_rewards(scores, kl, 0.25, whiten=True, std=torch.tensor(0.5)).tolist() == pytest.approx([1.0, 4.0])
    lp = torch.tensor([-2.0, -3.0], requires_grad=True)
    loss = rloo_loss(torch.tensor([1.0, -1.0]), lp, n_total=2)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(-0.5)
    assert lp.grad.tolist() == [-0.5, 0.5]


def test_step_prompts_cycle_through_the_pool():
    pool = [{"id": i} for i in range(5)]
    assert [p["id"] for p in step_prompts(pool, 0, 3)] == [0, 1, 2]
    assert [p["id"] for p in step_prompts(pool, 1, 3)] == [3, 4, 0]


def test_generate_ids_are_the_tokens_behind_generate(tiny_engine):
    convs = [[{"role": "user", "content": "hello there"}], [{"role": "user", "content": "kill a process?"}]]
    sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=4)
    texts = tiny_engine.generate(convs, sp)
    ids = tiny_engine.generate_ids(convs, sp, keep_stop=True)
    eos = tiny_engine.eos_ids
    for row_t, row_i in zip(texts, ids):
        for t, i in zip(row_t, row_i):
            assert tiny_engine.tok.decode(i, skip_special_tokens=True).strip() == t
            assert 0 < len(i) <= 12 and all(x not in eos for x in i[:-1])
            assert i[-1] in eos or len(i) == 12  # stopped by its end token, or by the budget


def _cfg(run_dir, tiny_model, *extra):
    return load_config(None, [
        f"run_dir={run_dir}", f"engine.model={tiny_model}", "engine.batch_size=8",
        "stages=[prepare, feedback, preference_model, rl]", f"feedback.policy={tiny_model}",
        f"preference_model.model={tiny_model}", "feedback.max_prompts=6", "feedback.max_new_tokens=6",
        "preference_model.batch_size=4", f"rl.policy={tiny_model}", "rl.steps=3", "rl.prompts_per_step=2",
        "rl.max_new_tokens=8", "rl.eval_prompts=4", "rl.learning_rate=1e-3", "rl.micro_batch_size=8",
        # float32 everywhere, on every CPU: these tests compare numbers to 1e-4 (bf16-mixed has its own tests)
        "preference_model.dtype=float32", "rl.dtype=float32", *extra,
    ])


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory, tiny_model):
    return run_pipeline(_cfg(tmp_path_factory.mktemp("rl") / "run", tiny_model), log=lambda m: None)


def test_rl_trains_every_parameter_and_logs_each_step(rl_run, tiny_model):
    out = rl_run / "rl"
    metrics = json.loads((out / "metrics.json").read_text())
    hist = metrics["history"]
    assert [h["step"] for h in hist] == [1, 2, 3]
    for h in hist:
        assert set(h) == {"step", "reward", "total_reward", "kl", "length", "entropy", "loss"}
        assert 0 < h["length"] <= 8 and h["entropy"] > 0
    assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts at the reference
    assert hist[-1]["kl"] != pytest.approx(0.0, abs=1e-6)
    assert metrics["eval_before"]["prompts"] == metrics["eval_after"]["prompts"] == 4
    assert metrics["eval_before"]["kl"] == pytest.approx(0.0, abs=1e-4)
    rollouts = [json.loads(l) for l in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 3 * 2 * 4 and {r["set"] for r in rollouts} <= {"red_team", "helpful"}
    for step in (1, 2, 3):  # leave-one-out advantages sum to zero per prompt
        for pid in {r["id"] for r in rollouts if r["step"] == step}:
            assert sum(r["advantage"] for r in rollouts if r["step"] == step and r["id"] == pid) == pytest.approx(0, abs=1e-3)
    assert len((out / "eval_samples.jsonl").read_text().splitlines()) == 4
    for f in ("reward.png", "kl.png", "loss.png", "model/cai_training.json", "model/tokenizer_config.json"):
        assert (out / f).is_file(), f
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged


def _points(out):
    return json.loads((out / "points" / "index.json").read_text()), sorted(p.name for p in (out / "points").iterdir())


def test_rl_keeps_frontier_points_along_training(rl_run, tiny_model):
    """rl.frontier_points=4 over 3 steps: points after steps 1, 2, 3 (ceil(i*3/4)); the last
    is model/ itself, the others whole save_pretrained models that differ from each other."""
    out = rl_run / "rl"
    index, names = _points(out)
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert names == ["index.json", "step-000001", "step-000002"]
    assert [(p["step"], p["path"], p["adapter"], p["samples"]) for p in index["points"]] == [
        (1, "points/step-000001", False, 8), (2, "points/step-000002", False, 16), (3, "model", False, 24)]
    assert [p["kl"] for p in index["points"]] == [round(h["kl"], 4) for h in hist]
    assert index["stage"] == "rl" and index["base"] == tiny_model and index["base_in_run"] is False
    one = AutoModelForCausalLM.from_pretrained(out / "points" / "step-000001").state_dict()
    two = AutoModelForCausalLM.from_pretrained(out / "points" / "step-000002").state_dict()
    assert not torch.equal(one["model.layers.0.mlp.up_proj.weight"], two["model.layers.0.mlp.up_proj.weight"])
    assert (out / "points" / "step-000001" / "tokenizer_config.json").is_file()


def test_two_pass_update_matches_the_one_pass_update(tmp_path, rl_run, tiny_model):
    """micro_batch_size below the step's sequences takes the no-grad + per-micro-batch path:
    same rollouts and, up to float noise, the same trained weights."""
    import shutil

    shutil.copytree(rl_run, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "rl")
    run_pipeline(_cfg(tmp_path / "run", tiny_model, "rl.micro_batch_size=3"), log=lambda m: None)
    one = AutoModelForCausalLM.from_pretrained(rl_run / "rl" / "model").state_dict()
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "rl" / "model").state_dict()
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-4


def test_grpo_run_trains_with_unit_scale_advantages_per_prompt(tmp_path, rl_run, tiny_model):
    """rl.advantage=grpo end to end: every prompt's logged advantages sum to ~0 and have mean
    square ~1 (or are all 0 when its rewards tie), which RLOO's would not; every weight moves."""
    import shutil

    shutil.copytree(rl_run, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "rl")
    run_pipeline(_cfg(tmp_path / "run", tiny_model, "rl.advantage=grpo", "rl.steps=2"), log=lambda m: None)
    out = tmp_path / "run" / "rl"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["rl"]["advantage"] == "grpo"
    assert [h["step"] for h in json.loads((out / "metrics.json").read_text())["history"]] == [1, 2]
    rollouts = [json.loads(l) for l in (out / "rollouts.jsonl").read_text().splitlines()]
    groups = {}
    for r in rollouts:
        groups.setdefault((r["step"], r["id"]), []).append(r["advantage"])
    assert len(groups) == 4 and all(len(g) == 4 for g in groups.values())
    squares = []
    for g in groups.values():
        assert sum(g) == pytest.approx(0, abs=1e-3)
        squares.append(sum(a * a for a in g) / len(g))
        assert squares[-1] == pytest.approx(1, abs=2e-3) or squares[-1] == pytest.approx(0, abs=1e-6)
    assert max(squares) == pytest.approx(1, abs=2e-3)
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    assert not [k for k in before if torch.equal(before[k], after[k])]


def test_nan_reward_stops_and_keeps_the_last_checkpoint(tmp_path, rl_run, tiny_model, monkeypatch):
    import shutil

    from cai.reward import RewardModel

    shutil.copytree(rl_run, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "rl")
    real, calls = RewardModel.score_many, []

    def nan_on_step_two(self, prompts, responses, batch_size=8):  # call 1: the "before" evaluation
        calls.append(1)
        out = real(self, prompts, responses, batch_size)
        return [float("nan")] + out[1:] if len(calls) == 3 else out

    monkeypatch.setattr(RewardModel, "score_many", nan_on_step_two)
    with pytest.raises(CaiError, match=r"PM reward is nan at step 1; stopped. The last good checkpoint is in .*rl.partial/checkpoint"):
        run_pipeline(_cfg(tmp_path / "run", tiny_model, "rl.checkpoint_every=1"), log=lambda m: None)
    assert (tmp_path / "run" / "rl.partial" / "checkpoint" / "trainer_state.json").is_file()
    assert not (tmp_path / "run" / "rl").exists()
    # The point of step 1 was kept before the crash; the resumed run redoes step 2 and keeps
    # its point: every point once, none lost.
    assert sorted(p.name for p in (tmp_path / "run" / "rl.partial" / "points").iterdir()) == ["step-000001"]
    monkeypatch.setattr(RewardModel, "score_many", real)
    logs = []
    run_pipeline(_cfg(tmp_path / "run", tiny_model, "rl.checkpoint_every=1"), log=logs.append)
    assert any("[rl] resuming from checkpoint at step 1/3" in m for m in logs), logs
    index, names = _points(tmp_path / "run" / "rl")
    assert names == ["index.json", "step-000001", "step-000002"]
    assert [p["step"] for p in index["points"]] == [1, 2, 3]


def test_rl_needs_the_preference_model(tmp_path, tiny_model):
    cfg = _cfg(tmp_path / "run", tiny_model, "stages=[prepare, rl]")
    with pytest.raises(CaiError, match="stage 'rl' needs stage 'preference_model'"):
        run_pipeline(cfg, log=lambda m: None)
    with pytest.raises(CaiError, match="rl.samples_per_prompt' must be >= 2"):
        run_pipeline(_cfg(tmp_path / "run", tiny_model, "rl.samples_per_prompt=1"), log=lambda m: None)


def test_lora_rl_kl_reference_is_the_policy_with_adapters_off(tmp_path, rl_run, tiny_model):
    """LoRA policy, no reference copy: the first step's KL is 0 (the adapters start at zero),
    the adapters then move the policy away from its adapters-off self. Offloading on a CPU
    run moves nothing and changes nothing."""
    import shutil

    from cai.stages import rl as stage

    shutil.copytree(rl_run, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "rl")
    copies = []
    real_deepcopy = stage.copy.deepcopy
    monkey = pytest.MonkeyPatch()
    def deepcopy(x, *a):
        if isinstance(x, torch.nn.Module) and any(True for _ in x.parameters()):
            copies.append(type(x).__name__)
        return real_deepcopy(x, *a)

    monkey.setattr(stage.copy, "deepcopy", deepcopy)
    try:
        run = run_pipeline(_cfg(tmp_path / "run", tiny_model, "rl.method=lora", "rl.lora_r=4", "rl.learning_rate=1e-2",
                                "rl.offload=always", "rl.lora_dropout=0.0", "rl.gradient_checkpointing=true"),
                           log=lambda m: None)
    finally:
        monkey.undo()
    assert copies == []  # no second copy of the policy
    out = run / "rl"
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert abs(hist[-1]["kl"]) > 1e-4
    assert (out / "adapter" / "adapter_config.json").is_file()
    index, names = _points(out)  # LoRA points are adapters alone: a few kB here, no base weights
    assert names == ["index.json", "step-000001", "step-000002"]
    assert [p["adapter"] for p in index["points"]] == [True, True, False]
    for step in ("step-000001", "step-000002"):
        assert sorted(f.name for f in (out / "points" / step).iterdir()) == ["README.md", "adapter_config.json",
                                                                           "adapter_model.safetensors"]
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    assert set(before) == set(after) and not torch.equal(before["model.layers.0.self_attn.v_proj.weight"],
                                                         after["model.layers.0.self_attn.v_proj.weight"])


def test_offload_setting(tiny_model):
    from cai.stages.rl import use_offload

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert use_offload("auto", torch.device("cpu"), model, model, model) is False  # nothing to move on a CPU run
    assert use_offload("always", torch.device("cpu"), model, None, model) is True
    assert use_offload("never", torch.device("cuda"), model, None, model) is False


def test_a_step_needs_a_prompt_for_every_process():
    from cai.errors import CaiError
    from cai.stages import rl as stage

    class Ctx:
        cfg = load_config(None, ["rl.prompts_per_step=1"])

    class TwoProcesses:
        def __init__(self, cpu):
            self.process_index, self.num_processes, self.device = 0, 2, torch.device("cpu")

    monkey = pytest.MonkeyPatch()
    monkey.setattr("accelerate.Accelerator", TwoProcesses)
    try:
        with pytest.raises(CaiError, match=r"'rl.prompts_per_step' is 1 but there are 2 processes"):
            stage.run(Ctx())
    finally:
        monkey.undo()
