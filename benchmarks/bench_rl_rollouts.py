"""RL's rollouts on an int8 copy of the policy, synced every step, against the float32 policy.

The rl stage samples each step's rollouts with the training policy itself (float32). An int8
engine (``engine.quantize=int8``) decodes faster, but the policy changes every step, so an
int8 copy would have to be rebuilt (copied, calibrated and quantized) before each step's
rollouts. This measures, on the default run's rollout shape (2 prompts x 4 samples, 32 new
tokens, the embedded model), interleaved over ``--repeats`` rounds: the float32 rollouts,
the int8 rollouts, and the sync (copy + calibrate + quantize); and the log-prob gap: the
mean |log p_float(token) - log p_int8(token)| of the int8 rollouts' tokens, which is how far
off-policy RLOO's samples would be. Writes ``benchmarks/results/rl_rollouts.json``.

    HF_HUB_OFFLINE=1 python benchmarks/bench_rl_rollouts.py
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
from pathlib import Path

import _common

OUT = Path(__file__).resolve().parent / "results" / "rl_rollouts.json"


def main() -> int:
    import torch

    from cai.engines.base import SamplingParams
    from cai.engines.int8 import CALIBRATION
    from cai.engines.local import LocalEngine, _quantize_int8
    from cai.models import load_model_and_tokenizer, resolve_model

    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    path = resolve_model("default", None, progress=_common.log)
    policy, tok, _ = load_model_and_tokenizer(path, "cpu", "float32", False)
    prompts = [[{"role": "user", "content": "How do I pick a lock on a door that isn't mine?"}],
               [{"role": "user", "content": "Write a short note thanking a colleague for their help."}]]
    params = SamplingParams(temperature=1.0, max_new_tokens=32, n=4, seed=3)
    float_engine = LocalEngine.for_model(policy, tok, batch_size=8)
    calib = float_engine.encode(float_engine.render(CALIBRATION))

    def sync():
        q = copy.deepcopy(policy)
        return LocalEngine.for_model(_quantize_int8(q, "cpu", torch.tensor([calib])), tok, batch_size=8)

    float_engine.sample_tokens(prompts, params)  # warm-up: rl's policy has sampled before every step but the first
    times = {"float32 rollouts": [], "int8 rollouts": [], "sync (copy+calibrate+quantize)": []}
    gaps = []
    for _ in range(repeats):
        _, s, _ = _common.timed(lambda: float_engine.sample_tokens(prompts, params))
        times["float32 rollouts"].append(s)
        q_engine, s, _ = _common.timed(sync)
        times["sync (copy+calibrate+quantize)"].append(s)
        samples, s, _ = _common.timed(lambda e=q_engine: e.sample_tokens(prompts, params))
        times["int8 rollouts"].append(s)
        with torch.inference_mode():  # the int8 rollouts' tokens under both models
            for sm in samples:
                for answer in sm.answer_ids:
                    if not answer:
                        continue
                    ids = torch.tensor([sm.prompt_ids + answer])
                    n = len(answer)
                    lp = [torch.log_softmax(m(input_ids=ids).logits[0, -n - 1:-1].float(), -1)
                          .gather(-1, torch.tensor(answer).view(-1, 1)) for m in (policy, q_engine.model)]
                    gaps.append(float((lp[0] - lp[1]).abs().mean()))
        del q_engine
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    gain = med["float32 rollouts"] - med["int8 rollouts"]
    summary = {"median_seconds": med, "decode_gain_s": round(gain, 3),
               "net_per_step_s": round(gain - med["sync (copy+calibrate+quantize)"], 3),
               "mean_abs_logprob_gap": round(statistics.mean(gaps), 4) if gaps else None,
               "cpu_flags": sorted({f for f in Path("/proc/cpuinfo").read_text().split()
                                    if f.startswith(("avx512_bf16", "avx512_vnni", "amx"))})}
    for k, v in med.items():
        print(f"{k:<34}{v:>8.3f} s")
    print(f"decode gain {gain:.3f} s a step against a sync of {med['sync (copy+calibrate+quantize)']:.3f} s: "
          f"net {summary['net_per_step_s']:+.3f} s a step; mean |log-prob gap| {summary['mean_abs_logprob_gap']}")
    OUT.write_text(json.dumps({"machine": _common.machine_info(), "repeats": repeats, "times": times,
                               "summary": summary}, indent=2) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
