"""Shared-prefix attention of the local engine: kept once vs copied per row.

A batch of ``--batch`` rows shares a ``--prefix``-token start (the few-shot
demonstrations) and then has its own ``--suffix`` tokens (rows differ in length by
up to 7 tokens, so padding is exercised). In one run on one model, for each way of
handling the shared prefix, this times the prefill and then ``--steps`` greedy
decoding steps:

* ``copy``: the prefix runs once and its KV cache is copied for every row (what the
  engine did before :mod:`cai.engines.shared_prefix`);
* ``shared``: the prefix's KV cache is kept once and attended by every row (forced
  here; the engine does this by default on the CPU only, where it pays off).

It also checks that both give the same next-token log-probabilities at every step
(the largest difference is printed) and the same greedy tokens.

The model is built in-process with random weights (nothing is downloaded): by default
the shape of SmolLM2-135M (30 layers, hidden 576, 9 query and 3 KV heads), so the
attention/MLP balance is the embedded default's. Runs on the CPU or a GPU::

    python benchmarks/bench_shared_prefix.py [--device cuda --dtype bfloat16] [--quick]

Writes JSON to ``benchmarks/results/shared_prefix[-DEVICE-DTYPE].json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from cai.engines.local import LocalEngine
from cai.models import pick_device, pick_dtype

from _common import log, write_report

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
}


def build_engine(shape: str, device: str, dtype, batch: int) -> LocalEngine:
    """A random-weight Llama of the given shape and a word-level tokenizer, in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dims = SHAPES[shape]
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(dims["vocab_size"] - 2)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    torch.manual_seed(0)
    cfg = LlamaConfig(**dims, max_position_embeddings=8192, bos_token_id=0, eos_token_id=1, pad_token_id=0,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    # Generation must not stop early: no row may ever pick the end-of-sequence token.
    return LocalEngine("in-process", batch_size=batch, model=model, tokenizer=tok, min_shared_prefix=1)


class Row:
    def __init__(self, data: dict):
        self.data = data

    def to_dict(self) -> dict:
        return self.data


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_mode(engine: LocalEngine, seqs, mode: str, steps: int, device: str):
    """Prefill then ``steps`` greedy steps; the seconds of each and every step's log-probs."""
    with torch.inference_mode():
        sync(device)
        t = time.perf_counter()
        logits, cache, mask, _, pos, prefix = engine._prefill(seqs, share=mode)
        sync(device)
        prefill = time.perf_counter() - t
        logps, tokens = [torch.log_softmax(logits[:, -1].float(), -1)], []
        t = time.perf_counter()
        for _ in range(steps):
            chosen = logps[-1].argmax(-1)
            tokens.append(chosen)
            mask = torch.cat([mask, mask.new_ones((len(seqs), 1))], dim=1)
            logits = engine._forward(chosen.view(-1, 1), mask, pos, cache, prefix).logits
            pos = pos + 1
            logps.append(torch.log_softmax(logits[:, -1].float(), -1))
        sync(device)
        decode = time.perf_counter() - t
    return prefill, decode, torch.stack(logps), torch.stack(tokens, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="float32 or bfloat16 (auto: float32 on CPU, bfloat16 on GPU)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prefix", type=int, default=1160, help="shared tokens (default: the critique demonstrations' 1,160)")
    ap.add_argument("--suffix", type=int, default=100, help="own tokens per row (plus 0-7)")
    ap.add_argument("--steps", type=int, default=32, help="greedy decoding steps")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per mode, alternating; the best is kept")
    ap.add_argument("--quick", action="store_true", help="batch 8, prefix 256, suffix 32, 8 steps")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.prefix, args.suffix, args.steps = 8, 256, 32, 8
    load_before, wall_start = os.getloadavg(), time.perf_counter()
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    engine = build_engine(args.shape, device, dtype, args.batch)
    default = engine._shared_prefix_ok()
    log(f"{args.shape} on {device} in {str(dtype).removeprefix('torch.')}: the engine keeps shared prefixes once "
        f"by default here: {'yes' if default else 'no (CPU only, or the check failed)'}")

    gen = torch.Generator().manual_seed(1)
    vocab = SHAPES[args.shape]["vocab_size"]
    prefix = torch.randint(2, vocab, (args.prefix,), generator=gen).tolist()
    seqs = [prefix + torch.randint(2, vocab, (args.suffix + i % 8,), generator=gen).tolist() for i in range(args.batch)]
    run_mode(engine, [s[: args.prefix + 4] for s in seqs[:2]], "shared", 1, device)  # warm-up
    best: dict[str, tuple] = {}
    for _ in range(args.repeats):
        for mode in ("copy", "shared"):
            out = run_mode(engine, seqs, mode, args.steps, device)
            if mode not in best or out[0] + out[1] < best[mode][0] + best[mode][1]:
                best[mode] = out
            log(f"  {mode:<6} prefill {out[0]:7.3f} s, {args.steps} steps {out[1]:7.3f} s")
    copy, shared = best["copy"], best["shared"]
    diff = float((copy[2] - shared[2]).abs().max())
    same = bool((copy[3] == shared[3]).all())
    rows = [Row({"mode": mode, "prefill_s": prefill, "decode_s": decode, "per_step_ms": 1000 * decode / args.steps,
                 "total_s": prefill + decode}) for mode, (prefill, decode, _, _) in best.items()]
    summary = {
        "prefill_speedup": copy[0] / shared[0], "decode_speedup": copy[1] / shared[1],
        "total_speedup": (copy[0] + copy[1]) / (shared[0] + shared[1]),
        "max_abs_logprob_diff": diff, "same_greedy_tokens": same, "engine_default_shared": default,
    }
    print(f"\nshared prefix kept once vs copied per row: {args.shape} (random weights), {device}, "
          f"{str(dtype).removeprefix('torch.')}, batch {args.batch}, prefix {args.prefix}, suffix {args.suffix}+0..7, "
          f"{args.steps} greedy steps\n")
    print("| mode | prefill s | decode s | ms/step | total s |\n|---|---:|---:|---:|---:|")
    for r in (row.data for row in rows):
        print(f"| {r['mode']} | {r['prefill_s']:.3f} | {r['decode_s']:.3f} | {r['per_step_ms']:.1f} | {r['total_s']:.3f} |")
    print(f"\nshared / copy speed-up: prefill {summary['prefill_speedup']:.2f}x, decode {summary['decode_speedup']:.2f}x, "
          f"total {summary['total_speedup']:.2f}x; largest |log-prob difference| {diff:.2e}; "
          f"greedy tokens {'identical' if same else 'DIFFER'}")
    suffix = "" if device == "cpu" and dtype == torch.float32 else f"-{device}-{str(dtype).removeprefix('torch.')}"
    out = args.out or RESULTS / f"shared_prefix{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(out, model={"name": f"random Llama, {args.shape} shape"},
                 settings={k: v for k, v in vars(args).items() if k != "out"} | {"device": device, "dtype": str(dtype)},
                 load_before=load_before, load_after=os.getloadavg(), wall=time.perf_counter() - wall_start,
                 results=rows, summary=summary)
    return 0 if same or dtype != torch.float32 else 1


if __name__ == "__main__":
    sys.exit(main())
