"""float32 vs int8 linear layers (`engine.quantize=int8`) for sampling, one run.

    python benchmarks/bench_int8.py

Three engines on the same prompts, seeds and token budget: float32, cai's int8 layers (a
scale per token, `cai.engines.int8`) and, for reference, torch's `quantize_dynamic` (one
scale per batch, which cai used before: its answers depended on the batch). Reports new
tokens/s at batch 1 and at batch 32 and each int8 engine's ratio to float32. Texts differ
slightly: int8 changes the logits.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cai.engines.base import SamplingParams  # noqa: E402
from cai.engines.local import LocalEngine  # noqa: E402
from cai.models import resolve_model  # noqa: E402
from cai.prompts import load_prompt_set  # noqa: E402


def tokens_per_s(engine: LocalEngine, convs, batch: int) -> float:
    engine.batch_size = batch
    engine.generate(convs[:1], SamplingParams(max_new_tokens=2))  # warm-up
    start = time.time()
    outs = engine.generate(convs, SamplingParams(max_new_tokens=64, temperature=0.7, seed=0))
    return sum(len(engine.encode(o[0])) for o in outs) / (time.time() - start)


def torch_dynamic(model):
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def main() -> None:
    path = resolve_model("default")
    convs = [p.messages for p in load_prompt_set("builtin:helpful")["train"]][:32]
    rates = {}
    for mode in ("none", "int8", "torch-dynamic"):
        engine = LocalEngine(path, quantize="int8" if mode == "int8" else "none")
        if mode == "torch-dynamic":
            engine.model = torch_dynamic(engine.model)
        rates[mode] = {1: tokens_per_s(engine, convs[:3], 1), 32: tokens_per_s(engine, convs, 32)}
    print("| quantize | batch 1 new tok/s | batch 32 new tok/s |")
    print("|---|---:|---:|")
    for mode, r in rates.items():
        print(f"| {mode} | {r[1]:.1f} | {r[32]:.1f} |")
    for mode in ("int8", "torch-dynamic"):
        print(f"{mode} / float32: {rates[mode][1] / rates['none'][1]:.2f}x at batch 1, "
              f"{rates[mode][32] / rates['none'][32]:.2f}x at batch 32")


if __name__ == "__main__":
    main()
