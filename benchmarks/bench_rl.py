"""One RL-CAI (RLOO) step on the embedded default model: where does the time go?

The policy is the embedded SmolLM2-135M-Instruct, the reference a frozen copy, and the
PM the same checkpoint with a fresh one-output score head (its scores are meaningless,
its cost is the real one). One warm-up step, then ``--steps`` timed steps of the stage's
own functions (the pieces of ``cai.stages.rl.PolicyGradient``), each split into:

* ``generate``: the batched rollouts through the local engine (``prompts x k`` answers);
* ``pm``: scoring every answer with the PM;
* ``ref``: the reference's log-probs of the sampled tokens (one no-grad pass);
* ``policy_fwd_bwd``: the policy's forward pass with grad, the RLOO loss, backward,
  clipping and the AdamW step;
* with ``--judge``, ``judge``: the same answers scored as ``rl.reward=judge`` scores them
  (``cai.judge.Judge.group_scores`` over each prompt's k answers: k(k-1)/2 pairs, both
  orders, the default feedback settings, the embedded model as the judge on a local
  engine). A PM step is generate + pm + ref + update, a judge step generate + judge + ref
  + update: both from the same rollouts of the same run, and their ratio is reported.

Writes ``benchmarks/results/rl.json`` (``rl-judge.json`` with ``--judge``).

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/bench_rl.py            # 4 prompts x 4, 128 tokens
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_rl.py --quick    # 2 prompts x 4, 16 tokens
    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/bench_rl.py --judge    # judge reward against PM reward
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import _common

from cai.engines.base import SamplingParams
from cai.engines.local import LocalEngine
from cai.models import load_model_and_tokenizer
from cai.models import resolve_model
from cai.prompts import load_prompt_set
from cai.reward import RewardModel
from cai.stages.rl import rloo_advantages, rloo_loss, rollout, shaped_rewards
from cai.training import answer_logprobs, pad_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny step, to check the script runs")
    ap.add_argument("--prompts", type=int, default=4,
                    help="prompts per step (x k answers, in one forward pass: 16 x 4 x 128 tokens ran out of 24 GB)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--judge", action="store_true", help="also time the judge reward (rl.reward=judge) on the same answers")
    ap.add_argument("--out", default=None, help="default: results/rl.json (rl-judge.json with --judge)")
    args = ap.parse_args()
    args.out = args.out or str(Path(__file__).parent / "results" / ("rl-judge.json" if args.judge else "rl.json"))
    if args.quick:
        args.prompts, args.max_new_tokens, args.steps = 2, 16, 1
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification

    wall0, load_before = time.time(), os.getloadavg()
    path = resolve_model("default", progress=_common.log)
    policy, tok, _ = load_model_and_tokenizer(path, device="cpu", dtype="float32")
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    transformers.logging.set_verbosity_error()
    pm_model, pm_tok, _ = load_model_and_tokenizer(path, device="cpu", dtype="float32",
                                                   model_cls=AutoModelForSequenceClassification, num_labels=1)
    pm = RewardModel(pm_model, pm_tok, "cpu")
    engine = LocalEngine(path, model=policy, tokenizer=tok, batch_size=64)
    judge = None
    if args.judge:  # what rl.reward=judge builds: a second copy of the model on the run's (local) engine
        from cai.config import FeedbackConfig
        from cai.constitution import load_constitution
        from cai.judge import Judge

        judge = Judge(LocalEngine(path, device="cpu", dtype="float32"), load_constitution("builtin:default"),
                      FeedbackConfig(), seed=0)
    prompts = [p.to_record() for p in load_prompt_set("builtin:red_team", 0.25, 0)["train"]]
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)

    rows, busy = [], []
    for step in range(args.steps + 1):  # step 0 warms up
        batch = prompts[step * args.prompts:(step + 1) * args.prompts]
        sp = SamplingParams(n=args.k, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=step)
        t = {}
        (examples, texts), t["generate"], b1 = _common.timed(lambda: rollout(engine, batch, sp))
        messages = [p["messages"] for p in batch for _ in range(args.k)]
        scores, t["pm"], b2 = _common.timed(lambda: torch.tensor(pm.score_many(messages, texts, batch_size=16)))
        if judge is not None:
            groups = [i // args.k for i in range(len(texts))]
            _, t["judge"], b5 = _common.timed(lambda: judge.group_scores(messages, texts, groups))
        padded = pad_batch(examples, tok.pad_token_id, "cpu")

        def ref_pass():
            with torch.no_grad():
                return answer_logprobs(ref, padded)

        ref_lp, t["ref"], b3 = _common.timed(ref_pass)

        def update():
            lp = answer_logprobs(policy, padded)
            adv = rloo_advantages(shaped_rewards(scores, lp.detach() - ref_lp, 0.05, True).view(-1, args.k)).reshape(-1)
            rloo_loss(adv, lp, len(examples)).backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        _, t["policy_fwd_bwd"], b4 = _common.timed(update)
        new_tokens = sum(sum(1 for x in e["labels"] if x != -100) for e in examples)
        tokens = sum(len(e["input_ids"]) for e in examples)
        pm_step = sum(v for k, v in t.items() if k != "judge")
        row = {"step": step, "warmup": step == 0, "sequences": len(examples), "new_tokens": new_tokens,
               "tokens": tokens, "seconds": {k: round(v, 2) for k, v in t.items()},
               "total_seconds": round(pm_step, 2)}  # a PM step: the judge's part is another reward's
        _common.log(json.dumps(row))
        rows.append(row)
        if step:
            busy += [("generate", b1), ("pm", b2), ("ref", b3), ("update", b4)] + ([("judge", b5)] if judge else [])
    timed_rows = [r for r in rows if not r["warmup"]]
    parts = {k: sum(r["seconds"][k] for r in timed_rows) / len(timed_rows) for k in timed_rows[0]["seconds"]}
    total = sum(v for k, v in parts.items() if k != "judge")  # a PM step
    summary = {
        "mean_step_seconds": round(total, 2),
        "share": {k: round(v / total, 3) for k, v in parts.items() if k != "judge"},
        "mean_seconds": {k: round(v, 2) for k, v in parts.items()},
        "generated_tokens_per_s": round(sum(r["new_tokens"] for r in timed_rows) / sum(r["seconds"]["generate"] for r in timed_rows), 1),
    }
    if judge is not None:
        judge_step = total - parts["pm"] + parts["judge"]
        summary["judge"] = {
            "questions_per_step": args.prompts * args.k * (args.k - 1),  # k(k-1)/2 pairs a prompt, both orders
            "mean_step_seconds_pm": round(total, 2), "mean_step_seconds_judge": round(judge_step, 2),
            "judge_step_over_pm_step": round(judge_step / total, 2),
            "judge_scoring_over_pm_scoring": round(parts["judge"] / parts["pm"], 1),
        }
    warning = _common.starved_warning(_common.usable_cores(), busy)
    if warning:
        summary["warning"] = warning
        _common.log(warning)
    print("| part | seconds per step | share of a PM step |\n|---|---|---|")
    for k, v in parts.items():
        print(f"| {k} | {v:.2f} | {v / total:.0%} |")
    if judge is not None:
        j = summary["judge"]
        print(f"PM step {j['mean_step_seconds_pm']} s, judge step {j['mean_step_seconds_judge']} s: "
              f"x{j['judge_step_over_pm_step']} ({j['questions_per_step']} judge questions a step)")
    report = {
        "model": {"name": "default", "path": path}, "settings": vars(args),
        "machine": {**_common.machine_info(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "wall_seconds": round(time.time() - wall0, 1), "results": rows, "summary": summary,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
