"""The training kit: precision (what bf16-mixed keeps and pure bfloat16 loses), hardware
detection, LoRA (bad targets, the adapters-off reference), each process's share of a
batch, and checkpoints that hold no pickle."""

import copy
import pickle
from dataclasses import replace

import pytest
import torch

from cai import hardware
from cai.config import DPOConfig, SFTConfig
from cai.errors import CaiError
from cai.training import (
    FORCE_ENV,
    adapters_off,
    answer_logprobs,
    encode_chat,
    load_checkpoint,
    load_trainable,
    optimizer_and_batches,
    optimizer_step,
    pad_batch,
    process_share,
    resolve_precision,
    save_checkpoint,
    token_loss,
    trainable_weights,
)

CONVERSATIONS = [
    [{"role": "user", "content": "How do I kill a Python process?"},
     {"role": "assistant", "content": "Use kill -9 with the process id."}],
    [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi! How can I help you today?"}],
    [{"role": "user", "content": "Which response is less harmful?"}, {"role": "assistant", "content": "The answer is: (A)"}],
    [{"role": "user", "content": "Critique the response."}, {"role": "assistant", "content": "Revision: a safer answer."}],
]


# -- hardware and precision --------------------------------------------------------------------


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert hardware.cpu_flags(info) == {"fpu", "sse", "avx2", "avx512f", "avx512_bf16", "amx_tile"}
    assert hardware.cpu_flags(tmp_path / "missing") == set()


@pytest.fixture
def avx2_only(monkeypatch):
    """A CPU without bfloat16 units, whatever this machine has."""
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": {"avx2", "fma"})
    monkeypatch.delenv(FORCE_ENV, raising=False)


def test_auto_follows_the_cpu_flags(monkeypatch, avx2_only):
    assert resolve_precision("auto", "cpu", "sft.dtype").name == "float32"
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": {"avx2", "amx_bf16"})
    prec = resolve_precision("auto", torch.device("cpu"), "sft.dtype")
    assert (prec.name, prec.weights, prec.compute, prec.saved) == ("bf16-mixed", "float32", "bfloat16", "bfloat16")
    assert resolve_precision("auto", "mps", "sft.dtype").name == "float32"  # not measurable here: not assumed


def test_bf16_on_a_cpu_without_it_is_one_line_with_a_way_to_force_it(monkeypatch, avx2_only):
    for setting in ("bf16-mixed", "bfloat16"):
        with pytest.raises(CaiError) as err:
            resolve_precision(setting, "cpu", "dpo.dtype")
        msg = str(err.value)
        assert "\n" not in msg and f"dpo.dtype={setting}" in msg and "400x slower" in msg
        assert "avx512_bf16" in msg and f"{FORCE_ENV}=1" in msg
    monkeypatch.setenv(FORCE_ENV, "1")
    assert resolve_precision("bf16-mixed", "cpu", "dpo.dtype").name == "bf16-mixed"


def test_pure_bfloat16_warns_and_fp16_mixed_scales(monkeypatch):
    monkeypatch.setenv(FORCE_ENV, "1")
    logs = []
    prec = resolve_precision("bfloat16", "cpu", "rl.dtype", logs.append)
    assert prec.weights == "bfloat16" and prec.compute is None
    assert len(logs) == 1 and "round away" in logs[0] and "bf16-mixed" in logs[0]
    fp16 = resolve_precision("fp16-mixed", "cpu", "rl.dtype")
    assert fp16.weights == "float32" and fp16.compute == "float16" and fp16.grad_scaler().is_enabled()
    assert not resolve_precision("float32", "cpu", "rl.dtype").grad_scaler().is_enabled()


def _train_five_steps(tiny_model, dtype: str, lr: float = 1e-6):
    """Five optimizer steps of the sft loop's pieces on the tiny model; returns the
    starting and the final trained weights (in float32) and the precision."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    tc = replace(SFTConfig(), dtype=dtype, learning_rate=lr, batch_size=4, max_steps=5, epochs=5.0)
    accelerator = Accelerator(cpu=True)
    model, tok, prec = load_trainable(tiny_model, tc, accelerator.device, False, AutoModelForCausalLM, "sft",
                                      log=lambda m: None)
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    examples = [encode_chat(tok, c, 128) for c in CONVERSATIONS]
    model, optimizer, params, batches = optimizer_and_batches(accelerator, model, tc, len(examples), seed=0)
    scaler = prec.grad_scaler()
    for idx in batches:
        batch = pad_batch([examples[i] for i in idx], tok.pad_token_id, "cpu")
        with prec.autocast():
            loss = token_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["labels"])
        accelerator.backward(scaler.scale(loss))
        optimizer_step(accelerator, optimizer, scaler, params, tc.max_grad_norm)
    end = {n: p.detach().float().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
    return start, end, prec


def _delta(start, end):
    return torch.cat([(end[n] - start[n]).reshape(-1) for n in sorted(start)])


def test_bf16_mixed_keeps_the_small_updates_that_pure_bfloat16_loses(tiny_model, monkeypatch):
    """Five AdamW steps at lr 1e-6 move each weight by up to ~5e-6. A bfloat16 weight of
    size ~0.02 is stored with a spacing of 2^-13 ~ 1.2e-4, so pure bfloat16 rounds those
    updates away; bf16-mixed applies them to float32 masters and must move the weights as
    float32 training does, up to the bfloat16 noise in the gradients (measured: ~0.04 of
    the update's norm; pure bfloat16: ~1.0, almost nothing moves)."""
    monkeypatch.setenv(FORCE_ENV, "1")  # also on CPUs without bfloat16: the model is tiny
    s32, e32, p32 = _train_five_steps(tiny_model, "float32")
    smix, emix, pmix = _train_five_steps(tiny_model, "bf16-mixed")
    sbf, ebf, pbf = _train_five_steps(tiny_model, "bfloat16")
    assert (p32.name, pmix.name, pbf.name) == ("float32", "bf16-mixed", "bfloat16")
    ref = _delta(s32, e32)
    mixed, pure = _delta(smix, emix), _delta(sbf, ebf)
    assert float(ref.abs().max()) == pytest.approx(5e-6, rel=0.1)  # AdamW: ~lr per step
    err_mixed = float((mixed - ref).norm() / ref.norm())
    err_pure = float((pure - ref).norm() / ref.norm())
    moved_pure = float((pure != 0).float().mean())
    print(f"relative distance to the float32 update: bf16-mixed {err_mixed:.4f}, bfloat16 {err_pure:.4f}; "
          f"weights moved: float32 {float((ref != 0).float().mean()):.3f}, bf16-mixed "
          f"{float((mixed != 0).float().mean()):.3f}, bfloat16 {moved_pure:.3f}")
    assert err_mixed < 0.2
    assert err_pure > 0.8 and moved_pure < 0.2


def test_fp16_mixed_with_its_gradient_scaler_moves_the_weights_as_float32(tiny_model):
    """float16 autocast, float32 masters, gradients scaled by the GradScaler and unscaled
    before clipping (measured: 0.010 of the update's norm from float32's)."""
    s32, e32, _ = _train_five_steps(tiny_model, "float32")
    s16, e16, prec = _train_five_steps(tiny_model, "fp16-mixed")
    assert prec.name == "fp16-mixed"
    ref, fp16 = _delta(s32, e32), _delta(s16, e16)
    assert float((fp16 - ref).norm() / ref.norm()) < 0.1


# -- LoRA ------------------------------------------------------------------------------------


def test_lora_on_modules_the_model_lacks_is_one_line_naming_those_it_has(tiny_model):
    from transformers import AutoModelForCausalLM

    tc = replace(DPOConfig(), method="lora", lora_target_modules=["c_attn", "q_proj"], dtype="float32")
    with pytest.raises(CaiError) as err:
        load_trainable(tiny_model, tc, "cpu", False, AutoModelForCausalLM, "dpo")
    msg = str(err.value)
    assert "\n" not in msg and "'dpo.lora_target_modules'" in msg and "no module named c_attn;" in msg
    assert "q_proj" in msg and "v_proj" in msg and "gate_proj" in msg  # the ones it does have


def test_adapters_off_reference_equals_a_deep_copied_reference(tiny_model):
    """The rl/dpo reference of a LoRA policy is the policy with its adapters off. It must give
    the log-probs of a deep copy of the starting model, at step 0 (when LoRA's B = 0 makes
    the policy equal to it too) and after updates (when the policy has moved away)."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    tc = replace(DPOConfig(), method="lora", lora_r=4, dtype="float32", learning_rate=1e-2, batch_size=4,
                 max_steps=3, epochs=3.0, lora_dropout=0.0)
    accelerator = Accelerator(cpu=True)
    copied = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    model, tok, prec = load_trainable(tiny_model, tc, accelerator.device, False, AutoModelForCausalLM, "dpo")
    examples = [encode_chat(tok, c, 128) for c in CONVERSATIONS]
    batch = pad_batch(examples, tok.pad_token_id, "cpu")

    def logps(m):
        with torch.no_grad():
            return answer_logprobs(m, batch)

    model, optimizer, params, batches = optimizer_and_batches(accelerator, model, tc, len(examples), seed=0)
    policy = accelerator.unwrap_model(model)
    with adapters_off(policy):
        off0 = logps(policy)
    on0, copy0 = logps(policy), logps(copied)
    scaler = prec.grad_scaler()
    for idx in batches:
        b = pad_batch([examples[i] for i in idx], tok.pad_token_id, "cpu")
        loss = -answer_logprobs(model, b).mean()
        accelerator.backward(scaler.scale(loss))
        optimizer_step(accelerator, optimizer, scaler, params, 1.0)
    with adapters_off(policy):
        off3 = logps(policy)
    on3, copy3 = logps(policy), logps(copied)
    print("max |adapters-off - copy| at step 0:", float((off0 - copy0).abs().max()),
          "after 3 steps:", float((off3 - copy3).abs().max()), "policy moved by", float((on3 - copy3).abs().max()))
    assert torch.allclose(off0, copy0, atol=1e-5) and torch.allclose(on0, copy0, atol=1e-5)
    assert torch.allclose(off3, copy3, atol=1e-5)
    assert float((on3 - copy3).abs().max()) > 0.1  # the adapters did move the policy
    assert torch.equal(copy0, copy3)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    from transformers import AutoModelForCausalLM

    grads = []
    for on in (False, True):
        tc = replace(SFTConfig(), dtype="float32", gradient_checkpointing=on)
        model, tok, _ = load_trainable(tiny_model, tc, "cpu", False, AutoModelForCausalLM, "sft")
        model.train()
        batch = pad_batch([encode_chat(tok, c, 128) for c in CONVERSATIONS], tok.pad_token_id, "cpu")
        token_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                   batch["labels"]).backward()
        assert model.is_activation_checkpointing == on
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# -- each process's share ---------------------------------------------------------------------


def test_every_process_gets_a_share_even_of_a_short_batch():
    assert process_share([5, 6, 7], 0, 2) == ([5, 7], 1.0)
    assert process_share([5, 6, 7], 1, 2) == ([6], 1.0)
    # one item, two processes: the second runs the first item with weight 0
    assert process_share([9], 0, 2) == ([9], 1.0)
    assert process_share([9], 1, 2) == ([9], 0.0)
    assert process_share([1, 2], 3, 4) == ([1], 0.0)


# -- checkpoints --------------------------------------------------------------------------------


class _Boom:
    def __reduce__(self):
        import os

        return os.system, ("touch pwned-by-a-checkpoint",)


def _model_and_optimizer(tiny_model, steps: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_a_checkpoint_round_trips_without_pickle(tmp_path, tiny_model):
    model, opt = _model_and_optimizer(tiny_model, 2)
    save_checkpoint(tmp_path / "ckpt", model, opt, 2, {"total_steps": 5, "history": [[1, 0.5], [2, 0.25]],
                                                        "ref": {"train": {3: (-1.5, -2.0)}}})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "optimizer.safetensors", "trainer_state.json", "weights.safetensors"]
    fresh, fresh_opt = _model_and_optimizer(tiny_model, 0)
    state = load_checkpoint(tmp_path / "ckpt", fresh, fresh_opt, 5)
    assert state["step"] == 2 and state["history"] == [[1, 0.5], [2, 0.25]] and state["ref"] == {"train": {"3": [-1.5, -2.0]}}
    for n, p in trainable_weights(model).items():
        assert torch.equal(p, trainable_weights(fresh)[n])
    a, b = opt.state_dict(), fresh_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for k in a["state"]:
        for name, v in a["state"][k].items():
            assert torch.equal(v, b["state"][k][name]), (k, name)
    assert load_checkpoint(tmp_path / "ckpt", fresh, fresh_opt, 6) is None  # made for another run length


def test_a_pickled_checkpoint_is_never_unpickled(tmp_path, tiny_model, monkeypatch):
    """Resuming from someone else's run directory must not run their code: an old-style
    ``trainer_state.pt`` (a pickle) is ignored, so training starts over."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "trainer_state.pt").write_bytes(pickle.dumps({"step": 3, "total_steps": 5, "x": _Boom()}))
    model, opt = _model_and_optimizer(tiny_model, 0)
    assert load_checkpoint(folder, model, opt, 5) is None
    assert not (tmp_path / "pwned-by-a-checkpoint").exists()
    # a checkpoint of another model's weights is refused, touching nothing
    save_checkpoint(folder, model, opt, 1, {"total_steps": 5})
    other = copy.deepcopy(model)
    other.model.layers = other.model.layers[:1]
    assert load_checkpoint(folder, other, torch.optim.AdamW(other.parameters()), 5) is None


def test_a_lora_checkpoint_holds_the_adapters_and_resumes_them(tmp_path, tiny_model):
    from transformers import AutoModelForSequenceClassification

    tc = replace(DPOConfig(), method="lora", lora_r=4, dtype="float32")

    def pm():
        torch.manual_seed(0)
        model, _, _ = load_trainable(tiny_model, tc, "cpu", False, AutoModelForSequenceClassification,
                                     "preference_model", num_labels=1)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    model, opt = pm()
    model(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ckpt", model, opt, 1, {"total_steps": 3})
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "ckpt" / "weights.safetensors"))
    assert saved and all("lora_" in k or "score" in k for k in saved)  # the trained weights only
    assert any("score.modules_to_save" in k for k in saved)
    fresh, fresh_opt = pm()
    assert load_checkpoint(tmp_path / "ckpt", fresh, fresh_opt, 3)["step"] == 1
    for n, p in trainable_weights(model).items():
        assert torch.equal(p, trainable_weights(fresh)[n]), n


def test_point_steps_spread_the_frontier_points_over_training():
    """ceil(i * total / n) for i = 1..n: 100 steps, 4 points -> 25, 50, 75, 100; 6 steps ->
    ceil(1.5) = 2, 3, ceil(4.5) = 5, 6; 3 steps, 4 points -> ceil(.75) = 1, ceil(1.5) = 2,
    ceil(2.25) = 3, 3: three points, no repeat; 0 points or 0 steps -> none."""
    from cai.training import point_steps

    assert point_steps(100, 4) == [25, 50, 75, 100]
    assert point_steps(6, 4) == [2, 3, 5, 6]
    assert point_steps(3, 4) == [1, 2, 3]
    assert point_steps(7, 1) == [7]
    assert point_steps(10, 0) == [] and point_steps(0, 4) == []


def test_a_kill_between_the_checkpoint_renames_resumes_from_the_previous_checkpoint(tmp_path, tiny_model):
    """save_checkpoint sets the previous checkpoint aside (``checkpoint.old``) and renames the
    new one into place; killed between the two renames, the next run resumes from the one
    set aside instead of starting over."""
    import os

    from cai.training import resume

    model, opt = _model_and_optimizer(tiny_model, 2)
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, model, opt, 2, {"total_steps": 5})
    os.replace(folder, folder.with_name("checkpoint.old"))  # the state a kill there leaves
    fresh, fresh_opt = _model_and_optimizer(tiny_model, 0)
    step, state = resume(folder, fresh, fresh_opt, 5, lambda m: None, "sft")
    assert step == 2 and state["step"] == 2 and folder.is_dir()
    for n, p in trainable_weights(model).items():
        assert torch.equal(p, trainable_weights(fresh)[n])
