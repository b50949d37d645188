"""Memory estimates (cai.memory) against numbers worked by hand, and the plan's refusal.

The model: a Llama with vocab V = 100, hidden h = 32, MLP width i = 64, 2 layers, 4 heads
of dim 8 and 2 key/value heads (kv = 16), tied embeddings. Its parameters:

* embeddings: V x h = 3200 (the output head is the same tensor);
* per layer: q 32x32 = 1024, k 32x16 = 512, v 512, o 1024, gate/up/down 3 x 32x64 = 6144,
  two norms 64: 9280; two layers 18560; the final norm 32;
* N = 3200 + 18560 + 32 = 21792; linear parameters 2 x 9216 = 18432;
* LoRA r = 4 on every linear layer: r (in + out) = 4 x (64 + 48 + 48 + 64 + 96 x 3) = 2048
  per layer, 4096 in all.

Activations per layer and token (module docstring of cai.memory; h = 32, kv = 16, i = 64):
float32 (c = w = 4, no autocast) in a padded batch: norms 2 x (4h + 4h) = 512, the norms'
outputs 2h x 4 = 256, attention 4h x 4 = 512, MLP 4i x 4 = 1024: 2304 bytes. For 2 sequences
x 10 tokens: body 20 x 2 layers x 2304 = 92160, the attention mask 2 x 10 x 10 x 4 = 800,
logits 20 x V x 12 = 24000. With checkpointing the body is 20 x (2 layers x h x 4 + 2304)
= 20 x 2560 = 51200.
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
    method, lora_r, lora_target_modules, lora_dropout, gradient_checkpointing = "full", 4, ["all-linear"], 0.05, False


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
    assert m.parts == {"weights": 87168, "gradients": 87168, "optimizer": 174336,
                       "activations": 92160 + 800 + 24000}
    tc = TC()
    tc.gradient_checkpointing = True
    assert training(shape, Precision("float32", "cpu"), tc, 2, 10).parts["activations"] == 51200 + 800 + 24000


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
    # per layer and token: the norms' float32 inputs 8h = 256 (their weights are frozen), attention
    # 4h x 2 = 256, the MLP 3i x 2 = 384 (the frozen down projection keeps no input), and each
    # adapter d x (4 + 2) + r x 2 (dropout mask in float32, input in bfloat16, the rank-4 middle):
    # q, k, v, o, gate, up (d = 32) and down (d = 64), 6 x 256 + 7 x 8 = 1592; 2488 in all.
    # Mask 2 x 10 x 10 x 2, logits 20 x 100 x 12
    assert m.parts["activations"] == 20 * 2 * 2488 + 400 + 24000
    full = training(shape, Precision("bf16-mixed", "cpu"), TC(), 2, 10, reference_copy=True)
    # autocast copies: every linear weight and the (tied) output head, in bfloat16
    assert full.parts["reference"] == 87168 and full.parts["autocast copies"] == (18432 + 3200) * 2


def test_bf16_mixed_activations_padded_or_not(shape):
    """Full fine-tuning under bf16-mixed (c = 2, float32 masters), per layer and token: the
    norms 2 x (4h + 4h) = 512; autocast casts the input of each of q, k, v, gate and up itself,
    5h x 2 = 320; the MLP 4i x 2 = 512. Attention keeps q, k, v and its output: one sequence,
    no mask, (2h + 2kv) x 2 = 192 (1536 a layer); a padded batch hands the kernel k and v
    repeated to every head, 4h x 2 = 256 (1600 a layer), plus the mask B x S x S x 2 once.
    Logits: tokens x V x 12 (the float32 log-softmax, its incoming gradient and its own)."""
    from cai.memory import training
    from cai.training import Precision

    one = training(shape, Precision("bf16-mixed", "cpu"), TC(), 1, 10)
    assert one.parts["activations"] == 10 * 2 * 1536 + 10 * 100 * 12
    two = training(shape, Precision("bf16-mixed", "cpu"), TC(), 2, 10)
    assert two.parts["activations"] == 20 * 2 * 1600 + 2 * 10 * 10 * 2 + 20 * 100 * 12


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
    # K and V, 2 layers, kv width 16, 20 tokens, float32; held twice while a grouped prefill lays it out
    assert m.parts["weights"] == 87168 and m.parts["kv cache"] == 2 * (2 * 2 * 16 * 20 * 4)
    # one layer's workspace: 20 tokens x (4h + 2i) floats, and 3 copies of 2 x 4 heads x 10 x 10 attention scores
    assert m.parts["workspace"] == 20 * (4 * 32 + 2 * 64) * 4 + 3 * 2 * 4 * 10 * 10 * 4
    # a few-shot prefix of 6 of the 10 tokens is kept once for the batch: 2 x 4 own tokens, twice, + 6 once
    s = generation(shape, 4, seqs=2, tokens=10, shared=6)
    assert s.parts["kv cache"] == 2 * (2 * 2 * 16 * 8 * 4) + 2 * 2 * 16 * 6 * 4
    assert s.parts["workspace"] == 8 * (4 * 32 + 2 * 64) * 4 + 3 * 2 * 4 * 4 * 4 * 4 and "6 shared" in s.basis
    q = generation(shape, 4, 2, 100, int8=True)
    # linear layers in one byte, the rest (embeddings, norms) in float32, plus the tied head's int8 copy
    assert q.parts["weights"] == 18432 + (21792 - 18432) * 4 + 3200
    # quantizing a layer's input per token holds float copies of it: 4h + 6i floats a token
    assert q.parts["workspace"] == 200 * (4 * 32 + 6 * 64) * 4 + 3 * 2 * 4 * 100 * 100 * 4
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


def test_a_stage_s_time_from_its_counts_and_the_calibration():
    """`cai plan`'s formula (cai.plan.stage_seconds), worked by hand for each kind of count."""
    from cai.plan import ASSUMED_TRAINING, stage_seconds
    from cai.cost import Cost

    row = {f: 0 for f in Cost.__dataclass_fields__ if f not in ("note", "memory")}
    rates = {"gen_tokens_per_s": 100.0, "read_tokens_per_s": 1000.0, "gen_marginal_tokens_per_s": 200.0,
             "decode_step_s": 0.05, "load_s": 9.0, "engine_load_s": 1.5}
    t = {**ASSUMED_TRAINING, "train_tokens_per_s": 400.0, "train_pass_s": 0.5, "optimizer_s": 0.25, "warmup_s": 2.0,
         "forward_tokens_per_s": 2000.0, "forward_call_s": 0.1, "policy_gen_tokens_per_s": 50.0, "load_s": 1.0,
         "save_s": 3.0, "checkpoint_s": 6.0, "figure_s": 0.2}
    # generation: 1000 new tokens at 100/s; with decoding steps counted, 300 steps x 0.05 s + 1000 / 200
    gen = {**row, "new_tokens": 1000, "prompt_tokens": 5000, "loads": 2}
    assert stage_seconds(gen, rates, t) == pytest.approx(10 + 5 + 2 * 1.5)
    assert stage_seconds({**gen, "decode_steps": 300}, rates, t) == pytest.approx(15 + 5 + 5 + 2 * 1.5)
    # training: tokens, passes, AdamW steps and one warm-up; no-grad tokens and calls; the policy's own
    # sampling; the training model's loads, saves, checkpoints and figures
    train = {**row, "train_tokens": 4000, "train_passes": 8, "steps": 4, "eval_tokens": 2000, "eval_passes": 5,
             "policy_tokens": 100, "loads": 2, "saves": 1, "checkpoints": 1, "figures": 3}
    assert stage_seconds(train, rates, t) == pytest.approx(
        10 + 8 * 0.5 + 4 * 0.25 + 2.0 + 1 + 5 * 0.1 + 2 + 2 * 1.0 + 3 + 6 + 3 * 0.2)


def test_two_point_calibration_and_the_counting_helpers():
    from cai.plan import two_point
    from cai.cost import passes
    from cai.engines import Batching

    # calls of 1000 and 100 tokens taking 2.5 s and 0.7 s: 500 tokens/s plus 0.5 s a call
    rate, fixed = two_point(1000, 2.5, 100, 0.7)
    assert rate == pytest.approx(500) and fixed == pytest.approx(0.5)
    # noise that would give a negative fixed part (or a bigger call no slower): the big call's rate alone
    assert two_point(1000, 2.0, 100, 0.1) == (500.0, 0.0)
    assert two_point(1000, 1.0, 100, 1.2) == (1000.0, 0.0)
    local, served = Batching(16, 8, shared_prefix_once=True), Batching(16, 16, shared_prefix_once=False)
    assert local.decode_steps(33, 10) == 30 and local.decode_steps(0, 10) == 0
    # a shared prefix: read once a batch by the local engine, once a request by a server
    assert local.prefix_reads(33) == 3 and local.prefix_reads(17, "score") == 3 and served.prefix_reads(33) == 33
    assert local.in_flight(5) == 5 and local.in_flight(50, "score") == 8 and local.in_flight(0) == 1
    assert local.kept_prefix(100) == 100 and served.kept_prefix(100) == 0
    assert passes(9, 4) == 3 and passes(9, 4, world=2) == 2 and passes(0, 4) == 0


def test_sft_plans_memory_for_the_batch_padded_to_its_longest_example(tmp_path):
    """A batch is padded to its longest sequence, so the plan's peak is the micro-batch that
    holds the longest example, not one of average length. Without an engine the plan counts
    (characters + 16) / 4 tokens a conversation, per message: rows of two 20-character
    messages are (36 + 36) / 4 = 18 tokens, the one of two 384-character messages is 200;
    their mean, 78, sets the time and 200 the memory."""
    import json

    from cai.config import load_config
    from cai.memory import model_config, shape_of, training
    from cai.plan import counter, estimate
    from cai.training import resolve_precision

    def row(n: int) -> dict:
        return {"messages": [{"role": "user", "content": "q" * (n // 2)}, {"role": "assistant", "content": "a" * (n // 2)}]}

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row(n)) + "\n" for n in (40, 40, 768)))
    (tmp_path / "test.jsonl").write_text(json.dumps(row(40)) + "\n")
    cfg = load_config("cpu-tiny", ["stages=[sft]", f"sft.data={tmp_path}"])
    sft = {r["stage"]: r for r in estimate(cfg, counter(None))}["sft"]
    assert sft["train_tokens"] == 3 * 78
    assert sft["memory"]["basis"] == "3 sequences x 200 tokens per pass"
    shape = shape_of(model_config(cfg.engine.model))
    prec = resolve_precision(cfg.sft.dtype, "cpu", "sft.dtype", planning=True)
    assert sft["memory"]["stage_bytes"] == training(shape, prec, cfg.sft, 3, 200).total
