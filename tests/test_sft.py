"""The sft stage on a tiny model: labels, training changes every weight, LoRA, resume."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cai.config import load_config
from cai.errors import CaiError
from cai.pipeline import run_pipeline
from cai.training import IGNORE, encode_chat, token_loss


def test_only_the_final_assistant_turn_is_learned(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    msgs = [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "earlier answer"},
        {"role": "user", "content": "kill a process?"},
        {"role": "assistant", "content": "Use kill -9."},
    ]
    enc = encode_chat(tok, msgs, max_length=512)
    learned = [t for t, l in zip(enc["input_ids"], enc["labels"]) if l != IGNORE]
    text = tok.decode(learned)
    assert text.startswith("Use kill -9.") and "earlier answer" not in text
    assert tok.eos_token in text  # the model learns to stop


def test_token_loss_by_hand():
    """Two positions are labelled; the loss is the mean of their -log softmax.

    logits at t=0 predict label[1]=1: -log(e^2/(e^2+e^0)) = log(1+e^-2) = 0.126928
    logits at t=1 predict label[2]=0: -log(e^0/(e^0+e^0)) = log 2       = 0.693147
    mean = 0.410038
    """
    logits = torch.tensor([[[0.0, 2.0], [0.0, 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[IGNORE, 1, 0]])
    assert float(token_loss(logits, labels)) == pytest.approx(0.410038, abs=1e-5)


def _cfg(tmp_path, tiny_model, *extra):
    return load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"engine.model={tiny_model}", "engine.batch_size=8",
        "stages=[prepare, critique_revision, sft]", "critique_revision.rounds=1",
        "critique_revision.max_prompts=4", "critique_revision.max_new_tokens=8",
        "critique_revision.critique_max_new_tokens=4", "sft.batch_size=4", "sft.learning_rate=1e-2", *extra,
    ])


def test_full_finetuning_changes_every_parameter(tmp_path, tiny_model):
    run = run_pipeline(_cfg(tmp_path, tiny_model), log=lambda m: None)
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(run / "sft" / "model").state_dict()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    metrics = json.loads((run / "sft" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and len(metrics["loss"]) == 2
    assert (run / "sft" / "loss.png").stat().st_size > 1000
    assert json.loads((run / "sft" / "model" / "cai_training.json").read_text())["config"]["method"] == "full"


def test_lora_trains_adapters_and_saves_a_merged_model(tmp_path, tiny_model):
    run = run_pipeline(_cfg(tmp_path, tiny_model, "sft.method=lora", "sft.lora_r=4"), log=lambda m: None)
    assert (run / "sft" / "adapter" / "adapter_config.json").is_file()
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(run / "sft" / "model").state_dict()
    assert set(before) == set(after)  # a plain checkpoint, adapters merged
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"])
    emb = after["model.embed_tokens.weight"]  # the frozen base, saved in the run's dtype
    assert torch.equal(before["model.embed_tokens.weight"].to(emb.dtype), emb)


def test_nan_loss_stops_with_a_clear_error(tmp_path, tiny_model):
    """A model whose weights hold a NaN (e.g. a corrupt checkpoint) stops the run."""
    bad = tmp_path / "nan-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(bad)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(bad)
    with pytest.raises(CaiError, match="training loss is nan at step 0"):
        run_pipeline(_cfg(tmp_path, tiny_model, f"sft.model={bad}"), log=lambda m: None)
    assert not (tmp_path / "run" / "sft").exists()


def test_bf16_mixed_saves_a_bfloat16_model_and_says_so(tmp_path, tiny_model, monkeypatch):
    from safetensors import safe_open

    monkeypatch.setenv("CAI_ALLOW_SLOW_DTYPE", "1")  # also on CPUs without bfloat16 units: the model is tiny
    run = run_pipeline(_cfg(tmp_path, tiny_model, "sft.dtype=bf16-mixed", "sft.max_steps=1"), log=lambda m: None)
    with safe_open(str(run / "sft" / "model" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    made = json.loads((run / "sft" / "model" / "cai_training.json").read_text())
    assert made["precision"] == "bf16-mixed" and made["config"]["dtype"] == "bf16-mixed"


def test_lora_keys_are_the_same_for_every_training_stage(tmp_path, tiny_model):
    cfg = load_config(None, ["sft.method=lora", "preference_model.lora_r=4", "dpo.lora_target_modules=[q_proj, v_proj]",
                             "rl.gradient_checkpointing=true", "rl.offload=always"])
    assert cfg.sft.method == "lora" and cfg.preference_model.lora_r == 4 and cfg.rl.gradient_checkpointing
    assert cfg.dpo.lora_target_modules == ["q_proj", "v_proj"] and cfg.rl.offload == "always"
    for stage in ("sft", "preference_model", "dpo", "rl"):
        with pytest.raises(CaiError, match=f"'{stage}.dtype' must be one of auto, float32, bf16-mixed, bfloat16, fp16-mixed"):
            load_config(None, [f"{stage}.dtype=float16"])
