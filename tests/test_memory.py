"""Memory estimates (cai.memory) against numbers worked by hand, and the plan's refusal.

The model: a Llama with vocab V = 100, hidden h = 32, MLP width i = 64, 2 layers, 4 heads
of dim 8 and 2 key/value heads (kv = 16), tied embeddings. Its parameters:

* embeddings: V x h = 3200 (the output head is the same tensor);
* per layer: q 32x32 = 1024, k 32x16 = 512, v 512, o 1024, gate/up/down 3 x 32x64 = 6144,
  two norms 64: 9280; two layers 18560; the final norm 32;
* N = 3200 + 18560 + 32 = 21792; linear parameters 2 x 9216 = 18432;
* LoRA r = 4 on every linear layer: r (in + out) = 4 x (64 + 48 + 48 + 64 + 96 x 3) = 2048
  per layer, 4096 in all.

Activations per layer and token (float32, c = 4): 2h x 4 + (5h + 3kv + 4i) x c
= 256 + (160 + 48 + 256) x 4 = 2112 bytes. For 2 sequences x 10 tokens: body
20 x 2 layers x 2112 = 84480, logits 20 x V x (4 + 8) = 24000. With checkpointing the body
is 20 x (2 layers x h x 4 + 2112) = 20 x 2368 = 47360.
"""

import pytest

from cai.errors import CaiError


@pytest.fixture(scope="module")
def shape():
    from transformers import LlamaConfig

    from cai.memory import shape_of

    return shape_of(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


class TC:
    method, lora_r, lora_target_modules, gradient_checkpointing = "full", 4, ["all-linear"], False


def test_shape_counts_the_meta_model(shape):
    assert (shape.params, shape.linear_params, shape.kv_dim, shape.layers, shape.tied) == (21792, 18432, 16, 2, True)
    assert shape.lora_params(4, ["all-linear"]) == 4096
    assert shape.lora_params(4, ["q_proj", "v_proj"]) == 2 * (4 * 64 + 4 * 48)
    assert shape.pm_params == 21792 + 32  # a 32 x 1 score head, no separate output head
    assert shape.layer_params == (21792 - 3200) // 2
    assert shape.kv_bytes(20, 4) == 2 * 2 * 16 * 20 * 4


def test_full_float32_training(shape):
    from cai.memory import training
    from cai.training import Precision

    m = training(shape, Precision("float32", "cpu"), TC(), seqs=2, tokens=10)
    assert m.parts == {"weights": 87168, "gradients": 87168, "optimizer": 174336, "activations": 84480 + 24000}
    tc = TC()
    tc.gradient_checkpointing = True
    assert training(shape, Precision("float32", "cpu"), tc, 2, 10).parts["activations"] == 47360 + 24000


def test_lora_bf16_mixed_and_reference(shape):
    from cai.memory import training
    from cai.training import Precision

    tc = TC()
    tc.method = "lora"
    m = training(shape, Precision("bf16-mixed", "cpu"), tc, 2, 10, reference_copy=True)
    # frozen base in bfloat16, float32 adapters; no reference copy and no autocast copies with LoRA
    assert m.parts["weights"] == 21792 * 2 + 4096 * 4
    assert (m.parts["gradients"], m.parts["optimizer"]) == (4096 * 4, 2 * 4096 * 4)
    assert "reference" not in m.parts and "autocast copies" not in m.parts
    # activations in bfloat16: 256 + 464 x 2 = 1184 per layer and token; logits 20 x 100 x (2 + 8)
    assert m.parts["activations"] == 20 * 2 * 1184 + 20 * 100 * 10
    full = training(shape, Precision("bf16-mixed", "cpu"), TC(), 2, 10, reference_copy=True)
    assert full.parts["reference"] == 87168 and full.parts["autocast copies"] == 18432 * 2


def test_sharded_divides_the_training_state(shape):
    from cai.memory import training
    from cai.training import Precision

    m = training(shape, Precision("float32", "cpu"), TC(), 1, 10, world=2, sharded=True)
    assert (m.parts["weights"], m.parts["gradients"], m.parts["optimizer"]) == (43584, 43584, 87168)
    assert m.parts["gathered layers"] == 2 * 9296 * 4
    unsharded = training(shape, Precision("float32", "cpu"), TC(), 1, 10, world=2)
    assert unsharded.parts["weights"] == 87168  # data parallel: every process holds a whole copy


def test_generation_weights_kv_and_int8(shape):
    from cai.memory import generation

    m = generation(shape, 4, seqs=2, tokens=10)
    assert m.parts["weights"] == 87168 and m.parts["kv cache"] == 2 * 2 * 16 * 20 * 4
    q = generation(shape, 4, 2, 100, int8=True)
    # linear layers in one byte, the rest (embeddings, norms) in float32, plus the tied head's int8 copy
    assert q.parts["weights"] == 18432 + (21792 - 18432) * 4 + 3200
    # a small batch: the float model held while its layers are replaced is the peak
    small = generation(shape, 4, 1, 4, int8=True)
    assert small.total == 87168 and small.parts["float weights while quantizing"] > 0


def test_frontier_points_add_whole_model_saves_but_not_for_lora():
    from cai.training import point_saves

    assert point_saves(3, 4, "full") == 2  # points after steps 1, 2 and 3; the last is model/
    assert point_saves(24, 4, "full") == 3
    assert point_saves(24, 0, "full") == 0
    assert point_saves(24, 4, "lora") == 0


def test_check_fit_refuses_in_one_line():
    from cai.memory import GiB, RUNTIME_BYTES, check_fit

    rows = [{"stage": "prepare", "memory": None},
            {"stage": "rl", "memory": {"stage_bytes": 30 * GiB - RUNTIME_BYTES, "parts": {}, "basis": ""}}]
    check_fit(rows, "cpu", 1.0, available=31 * GiB)
    with pytest.raises(CaiError) as err:
        check_fit(rows, "cuda:0", 1.0, available=24 * GiB)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("rl needs ~30.0 GiB per process but the GPU has 24.0 GiB; set rl.method=lora")
    assert msg.endswith("or memory_check=false to run anyway")


def test_validate_and_run_refuse_a_plan_that_cannot_fit(tmp_path, tiny_model, capsys):
    from cai.cli import main

    args = [f"run_dir={tmp_path / 'run'}", f"engine.model={tiny_model}", "engine.device=cpu",
            "stages=[prepare, critique_revision, sft]", "memory_margin=1e-9"]
    assert main(["validate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: critique_revision needs ~") and "per process but this machine has" in err
    assert main(["run", *args]) == 2
    assert "critique_revision needs ~" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert main(["validate", *args, "memory_check=false"]) == 0
    assert main(["validate", *args[:-1]]) == 0
    assert "ok: memory: the largest stage (" in capsys.readouterr().out


def test_plan_prints_memory_per_process_and_the_device(tiny_model, capsys):
    from cai.cli import main

    assert main(["plan", "--no-calibrate", f"engine.model={tiny_model}", "engine.device=cpu", "--processes", "2",
                 "sft.sharding=fsdp"]) == 0
    out = capsys.readouterr().out
    assert "peak/proc" in out.splitlines()[1]
    assert "memory: peak per process (2 processes)" in out and "device: RAM:" in out
    assert "  sft: weights" in out and "gathered layers" in out  # sharded over the 2 processes
    sft = next(line for line in out.splitlines() if line.startswith("sft "))
    assert "MiB" in sft or "GiB" in sft
