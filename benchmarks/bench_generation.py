"""Generation throughput of the embedded default model (SmolLM2-135M-Instruct).

Compares, in one run on one machine:

* cai's ``LocalEngine`` (our own decode loop) at batch 1 and several batch sizes;
* llama.cpp single stream on the embedded Q4_1 GGUF (skipped if ``llama_cpp`` is
  not importable);
* transformers ``model.generate`` batched with left padding, as a baseline for our
  decode loop (it uses the same float32 weights as LocalEngine).

All runs sample at temperature 0.7 (seeded) with ``max_new_tokens`` 64 on prompts
from ``builtin:helpful`` (train split, repeated in order if a run needs more).
Prints a markdown table and writes JSON to ``benchmarks/results/generation.json``.

    HF_HUB_OFFLINE=1 python benchmarks/bench_generation.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from cai.engines.base import Conversation, SamplingParams
from cai.engines.local import LocalEngine
from cai.models import embedded_gguf, resolve_model
from cai.prompts import load_prompt_set

from _common import log, starved_warning, timed, usable_cores, write_report
from _common import machine_info as _machine_info

TEMPERATURE = 0.7
MEMORY_BANDWIDTH = 16e9  # bytes/s, assumed DRAM bandwidth for the batch-1 ceiling
PEAK_FLOPS = 129e9  # FLOP/s, assumed fp32 peak of this machine
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "generation.json"

# Run a list of prompts with a max_new_tokens budget, return one output per prompt.
RunFn = Callable[[Sequence[Conversation], int], list[Any]]
# Number of generated tokens in one output.
CountFn = Callable[[Any], int]


@dataclass
class Result:
    engine: str
    batch: int
    prompts: int
    seconds: float
    new_tokens: int
    cpu_cores_used: float  # process CPU time / wall time while timed: drops when others compete

    @property
    def prompts_per_s(self) -> float:
        return self.prompts / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds

    def to_dict(self) -> dict:
        return {**asdict(self), "prompts_per_s": self.prompts_per_s, "new_tokens_per_s": self.tokens_per_s}


def measure(engine: str, batch: int, run: RunFn, count: CountFn, prompts: Sequence[Conversation], max_new_tokens: int) -> Result:
    """Warm up with one tiny call, then time one call over all ``prompts``."""
    run(prompts[: max(1, min(batch, len(prompts)))], 2)
    outputs, seconds, cores_used = timed(lambda: run(prompts, max_new_tokens))
    result = Result(engine, batch, len(prompts), seconds, sum(count(o) for o in outputs), cores_used)
    log(
        f"  {engine:<11} batch {batch:>3}: {result.prompts:>4} prompts in {seconds:7.1f} s, "
        f"{result.prompts_per_s:6.2f} prompts/s, {result.tokens_per_s:7.1f} tok/s, "
        f"{result.cpu_cores_used:.2f} cores busy"
    )
    return result


# -- the three backends ---------------------------------------------------------------


def cai_runner(engine: LocalEngine, batch: int, seed: int) -> tuple[RunFn, CountFn]:
    def run(prompts, max_new_tokens):
        engine.batch_size = batch
        params = SamplingParams(temperature=TEMPERATURE, max_new_tokens=max_new_tokens, seed=seed)
        return [samples[0] for samples in engine.generate(prompts, params)]

    return run, lambda text: len(engine.encode(text))


def hf_generate_runner(engine: LocalEngine, batch: int, seed: int) -> tuple[RunFn, CountFn]:
    """transformers ``model.generate`` on the engine's model: chunks in input order, left padding."""
    import torch

    model, tok = engine.model, engine.tok
    tok.padding_side = "left"

    def run(prompts, max_new_tokens):
        torch.manual_seed(seed)
        texts = []
        for start in range(0, len(prompts), batch):
            chunk = [engine.render(p) for p in prompts[start:start + batch]]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(engine.device)
            with torch.inference_mode():
                out = model.generate(
                    **enc, do_sample=True, temperature=TEMPERATURE, top_p=1.0, top_k=0,
                    max_new_tokens=max_new_tokens, pad_token_id=engine.pad_id,
                )
            new = out[:, enc["input_ids"].shape[1]:]
            texts += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
        return texts

    return run, lambda text: len(engine.encode(text))


def llama_cpp_runner(seed: int) -> tuple[RunFn, CountFn] | None:
    try:
        import llama_cpp
    except ImportError as exc:
        log(f"llama_cpp is not importable ({exc}); skipping the llama.cpp measurement")
        return None
    llm = llama_cpp.Llama(model_path=str(embedded_gguf()), n_ctx=2048, n_threads=2, verbose=False)

    def run(prompts, max_new_tokens):
        # top_k=0, min_p=0, top_p=1: plain temperature sampling, as in the other two.
        return [
            llm.create_chat_completion(
                messages=list(p), max_tokens=max_new_tokens, temperature=TEMPERATURE,
                top_p=1.0, top_k=0, min_p=0.0, seed=seed + i,
            )
            for i, p in enumerate(prompts)
        ]

    return run, lambda response: response["usage"]["completion_tokens"]


# -- reporting ------------------------------------------------------------------------


def markdown_table(results: list[Result], base: Result) -> str:
    lines = [
        "| engine | batch | prompts | seconds | prompts/s | new tok/s | ratio vs cai batch 1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.engine} | {r.batch} | {r.prompts} | {r.seconds:.1f} | {r.prompts_per_s:.2f} "
            f"| {r.tokens_per_s:.1f} | {r.tokens_per_s / base.tokens_per_s:.2f}x |"
        )
    return "\n".join(lines)


def machine_info() -> dict:
    info = _machine_info()
    try:
        import llama_cpp

        info["llama_cpp"] = llama_cpp.__version__
    except ImportError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer batch sizes and prompts (< 3 minutes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if args.quick:
        batch_sizes, per_batch, n_single, n_llama, hf_batch, n_hf = [8, 32], 1, 3, 6, 32, 32
    else:
        batch_sizes, per_batch, n_single, n_llama, hf_batch, n_hf = [8, 16, 32, 64], 2, 6, 16, 32, 64

    train = [p.messages for p in load_prompt_set("builtin:helpful")["train"]]
    need = max([n_single, n_llama, n_hf] + [per_batch * b for b in batch_sizes])
    prompts = list(itertools.islice(itertools.cycle(train), need))
    max_new = args.max_new_tokens
    cores = usable_cores()
    load_before = os.getloadavg()
    wall_start = time.perf_counter()

    model_dir = resolve_model("default")
    engine = LocalEngine(model_dir, batch_size=1)
    n_params = sum(p.numel() for p in engine.model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    log(f"model {model_dir}: {n_params / 1e6:.1f} M parameters, {param_bytes / 1e6:.0f} MB")

    results: list[Result] = []
    log("cai LocalEngine:")
    for b in [1] + batch_sizes:
        n = n_single if b == 1 else per_batch * b
        results.append(measure("cai", b, *cai_runner(engine, b, args.seed), prompts[:n], max_new))
    cai_results = list(results)
    base = cai_results[0]
    best = max(cai_results[1:], key=lambda r: r.tokens_per_s)

    log("transformers model.generate:")
    results.append(measure("hf-generate", hf_batch, *hf_generate_runner(engine, hf_batch, args.seed), prompts[:n_hf], max_new))

    log("llama.cpp:")
    llama = None
    runner = llama_cpp_runner(args.seed)
    if runner is not None:
        llama = measure("llama.cpp", 1, *runner, prompts[:n_llama], max_new)
        results.append(llama)
    wall = time.perf_counter() - wall_start
    load_after = os.getloadavg()

    ceiling_tok_s = MEMORY_BANDWIDTH / param_bytes
    achieved_flops = 2 * n_params * best.tokens_per_s
    summary = {
        "best_cai_batch": best.batch,
        "cai_best_vs_batch1_tokens": best.tokens_per_s / base.tokens_per_s,
        "cai_best_vs_batch1_prompts": best.prompts_per_s / base.prompts_per_s,
        "cai_best_vs_llama_cpp_tokens": best.tokens_per_s / llama.tokens_per_s if llama else None,
        "n_params": n_params,
        "param_bytes_fp32": param_bytes,
        "batch1_decode_ceiling_tok_s": ceiling_tok_s,
        "cai_batch1_fraction_of_ceiling": base.tokens_per_s / ceiling_tok_s,
        "best_batch_gflops": achieved_flops / 1e9,
        "best_batch_fraction_of_peak": achieved_flops / PEAK_FLOPS,
    }

    print(f"\nGeneration throughput, SmolLM2-135M-Instruct, temperature {TEMPERATURE}, max_new_tokens {max_new}"
          f"{' (quick)' if args.quick else ''}\n")
    print(markdown_table(results, base))
    print()
    print(f"cai best batch ({best.batch}) vs cai batch 1: {summary['cai_best_vs_batch1_tokens']:.2f}x new tok/s, "
          f"{summary['cai_best_vs_batch1_prompts']:.2f}x prompts/s")
    if llama:
        print(f"cai best batch ({best.batch}) new tok/s / llama.cpp single stream tok/s: "
              f"{summary['cai_best_vs_llama_cpp_tokens']:.2f}x")
    else:
        print("llama.cpp: skipped (llama_cpp not importable)")
    print("\nPhysical ceiling (estimates):")
    print(f"  fp32 parameters: {n_params / 1e6:.1f} M = {param_bytes / 1e6:.0f} MB; at {MEMORY_BANDWIDTH / 1e9:.0f} GB/s "
          f"a batch-1 decode step cannot beat {ceiling_tok_s:.1f} tok/s "
          f"(cai batch 1: {base.tokens_per_s:.1f} tok/s = {summary['cai_batch1_fraction_of_ceiling']:.0%} of it)")
    print(f"  cai batch {best.batch}: 2 x {n_params / 1e6:.1f} M x {best.tokens_per_s:.1f} tok/s = "
          f"{summary['best_batch_gflops']:.1f} GFLOP/s = {summary['best_batch_fraction_of_peak']:.0%} of "
          f"{PEAK_FLOPS / 1e9:.0f} GFLOP/s peak")
    print(f"\nload average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}; total wall time {wall:.0f} s")
    warning = starved_warning(cores, [(f"{r.engine} batch {r.batch}", r.cpu_cores_used) for r in results])
    if warning:
        print(warning)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_report(
        args.out,
        model={"name": "SmolLM2-135M-Instruct", "checkpoint": model_dir, "gguf": str(embedded_gguf())},
        settings={
            "quick": args.quick, "seed": args.seed, "temperature": TEMPERATURE, "max_new_tokens": max_new,
            "prompt_set": "builtin:helpful (train)", "memory_bandwidth_bytes_s": MEMORY_BANDWIDTH,
            "peak_flops": PEAK_FLOPS,
        },
        load_before=load_before, load_after=load_after, wall=wall, results=results, summary=summary,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
