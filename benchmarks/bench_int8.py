"""float32 vs int8 linear layers (`engine.quantize=int8`) for sampling, one run.

    python benchmarks/bench_int8.py

Four engines on the same prompts, seeds and token budget: float32; cai's int8 layers (a
scale per token, each layer's 16 calibrated outlier input channels in float,
`cai.engines.int8`); the same without the float outlier channels (cai's scheme before);
and, for reference, torch's `quantize_dynamic` (one scale per batch, which cai used
before that: its answers depended on the batch). Reports new tokens/s at batch 1 and at
batch 32, each int8 engine's ratio to float32, and how far each moves the model: the mean
KL divergence from float32's next-token distribution and the share of positions whose
most likely token is float32's, over 8 prompts with float32's answers to them.
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


def next_token_logprobs(engine: LocalEngine, texts: list[list[int]]):
    import torch

    with torch.inference_mode():
        return [torch.log_softmax(engine.model(input_ids=torch.tensor([t])).logits.float()[0], -1) for t in texts]


def main() -> None:
    import torch

    from cai.engines.int8 import quantize_linear_layers

    path = resolve_model("default")
    convs = [p.messages for p in load_prompt_set("builtin:helpful")["train"]][:32]
    rates, quality, texts, ref = {}, {}, None, None
    for mode in ("none", "int8", "int8-no-outliers", "torch-dynamic"):
        engine = LocalEngine(path, quantize="int8" if mode == "int8" else "none")
        if mode == "torch-dynamic":
            engine.model = torch_dynamic(engine.model)
        elif mode == "int8-no-outliers":
            engine.model = quantize_linear_layers(engine.model)
        if texts is None:  # the prompts with float32's greedy answers, read by every engine
            answers = engine.generate(convs[:8], SamplingParams(max_new_tokens=48))
            texts = [engine.encode(engine.render(c) + a[0]) for c, a in zip(convs[:8], answers)]
            ref = next_token_logprobs(engine, texts)
        lp = next_token_logprobs(engine, texts)
        kl = torch.cat([(r.exp() * (r - q)).sum(-1) for r, q in zip(ref, lp)])
        same = torch.cat([(r.argmax(-1) == q.argmax(-1)).float() for r, q in zip(ref, lp)])
        quality[mode] = (float(kl.mean()), float(same.mean()))
        rates[mode] = {1: tokens_per_s(engine, convs[:3], 1), 32: tokens_per_s(engine, convs, 32)}
    print("| quantize | batch 1 new tok/s | batch 32 new tok/s | KL from float32 (nats) | same top token |")
    print("|---|---:|---:|---:|---:|")
    for mode, r in rates.items():
        print(f"| {mode} | {r[1]:.1f} | {r[32]:.1f} | {quality[mode][0]:.4f} | {quality[mode][1]:.1%} |")
    for mode in ("int8", "int8-no-outliers", "torch-dynamic"):
        print(f"{mode} / float32: {rates[mode][1] / rates['none'][1]:.2f}x at batch 1, "
              f"{rates[mode][32] / rates['none'][32]:.2f}x at batch 32")


if __name__ == "__main__":
    main()
