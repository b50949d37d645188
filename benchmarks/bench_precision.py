"""Training step speed in float32 against bf16-mixed, for the sft, dpo and rl stages.

The real stages (``cai.stages.{sft,dpo,rl}.run``) train the embedded SmolLM2-135M-Instruct
on a prepared run directory, once with ``<stage>.dtype=float32`` and once with
``<stage>.dtype=bf16-mixed`` (float32 master weights, bfloat16 autocast), in one process
on one machine. Each stage run does one warm-up step and ``--steps`` timed steps, timed
through the stage's progress callback (called after every optimizer step); by default the
modes run in the order float32, bf16-mixed, bf16-mixed, float32 (ABBA) so that a drift in
the machine's load falls on both. The ratio is float32 seconds per step over bf16-mixed
seconds per step (above 1: bf16-mixed is faster).

Data (synthetic, the stages' own formats):

* sft: built-in helpful prompts, each with one fixed ~100-word answer;
* dpo: the same prompts, chosen = that answer, rejected = a shorter one, p_chosen 0.8;
* rl: the prepare stage's red-team/helpful prompts; the PM is the embedded checkpoint
  with a fresh one-output score head (its scores mean nothing, its cost is real).

Also records the CPU's bfloat16 flags (``cai.hardware``) and, per run, the process CPU
time over wall time ("cores busy": it drops when other processes compete for the cores).
Writes ``benchmarks/results/precision.json``.

    HF_HUB_OFFLINE=1 python benchmarks/bench_precision.py [--steps 2] [--stages sft,dpo,rl]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import _common

from cai.config import load_config
from cai.hardware import CPU_BF16_FLAGS, bf16_fast, cpu_flags
from cai.io import write_json, write_jsonl
from cai.models import resolve_model
from cai.pipeline import run_pipeline
from cai.prompts import load_prompt_set
from cai.stage import StageContext

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "precision.json"
MODES = ("float32", "bf16-mixed")
ANSWER = (
    "Here is a practical way to approach it. First, make sure you understand exactly what "
    "you want to achieve and what constraints you have, such as time, budget or tools. "
    "Next, break the task into small steps and tackle them one at a time, checking the "
    "result of each step before moving on. If something does not work as expected, look "
    "at the simplest explanation first and change one thing at a time. Finally, write down "
    "what worked so you can repeat it later."
)
SHORT = "Sure. Break it into small steps and check each one before you move on."


class QuietContext(StageContext):
    """The stage's context without progress bars; ``stamps[k]`` is (wall, CPU) after step k."""

    stamps: list

    @contextlib.contextmanager
    def progress(self, total: int, desc: str, unit: str = "req"):
        if unit == "step":
            self.stamps = []
            yield lambda n: self.stamps.append((time.perf_counter(), time.process_time()))
        else:
            yield lambda n: None


def manifest(folder: Path, stage: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "manifest.json", {"stage": stage, "status": "complete", "note": "synthetic (bench_precision)"})


def prepare_run_dir(run_dir: Path, model: str, n: int) -> None:
    """prepare (the real stage), plus synthetic sft data, preference pairs and a PM."""
    run_pipeline(load_config(None, [f"run_dir={run_dir}", "stages=[prepare]", "data.max_per_split=40"]),
                 log=lambda m: None)
    prompts = load_prompt_set("builtin:helpful")["train"]
    pick = [prompts[k % len(prompts)] for k in range(n)]
    cr = run_dir / "critique_revision"
    manifest(cr, "critique_revision")
    (cr / "sft").mkdir(exist_ok=True)
    sft = [{"id": f"{p.id}/{k}", "messages": p.messages + [{"role": "assistant", "content": ANSWER}]}
           for k, p in enumerate(pick)]
    write_jsonl(cr / "sft" / "train.jsonl", sft)
    write_jsonl(cr / "sft" / "test.jsonl", sft[:1])
    fb = run_dir / "feedback"
    manifest(fb, "feedback")
    (fb / "prefs").mkdir(exist_ok=True)
    pairs = [{"id": f"{p.id}/{k}", "prompt": p.messages, "chosen": [{"role": "assistant", "content": ANSWER}],
              "rejected": [{"role": "assistant", "content": SHORT}], "p_chosen": 0.8} for k, p in enumerate(pick)]
    write_jsonl(fb / "prefs" / "train.jsonl", pairs)
    write_jsonl(fb / "prefs" / "test.jsonl", pairs[:1])
    pm = run_dir / "preference_model"
    manifest(pm, "preference_model")
    _common.untrained_pm(model, pm / "model")


def stage_config(run_dir: Path, stage: str, mode: str, model: str, steps: int, args) -> object:
    common = [f"run_dir={run_dir}", "engine.device=cpu", f"engine.model={model}", f"{stage}.dtype={mode}"]
    if stage == "sft":
        extra = [f"sft.batch_size={args.batch}", f"sft.max_steps={steps}", "sft.checkpoint_every=1000000",
                 "sft.max_length=512"]
    elif stage == "dpo":
        extra = [f"dpo.policy={model}", f"dpo.batch_size={args.batch}", f"dpo.max_steps={steps}",
                 "dpo.checkpoint_every=1000000", "dpo.max_length=512"]
    else:
        extra = [f"rl.policy={model}", f"rl.steps={steps}", f"rl.prompts_per_step={args.rl_prompts}",
                 "rl.samples_per_prompt=4", f"rl.max_new_tokens={args.rl_tokens}", "rl.micro_batch_size=8",
                 "rl.eval_prompts=1", "rl.checkpoint_every=1000000"]
    return load_config(None, common + extra)


def run_stage(run_dir: Path, stage: str, cfg) -> tuple[list, float]:
    import importlib

    module = importlib.import_module(f"cai.stages.{stage}")
    out = run_dir / f"{stage}.bench"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ctx = QuietContext(cfg=cfg, run_dir=run_dir, out=out, name=stage, log=_common.log)
    _, seconds, _ = _common.timed(lambda: module.run(ctx))
    shutil.rmtree(out, ignore_errors=True)
    gc.collect()
    return ctx.stamps, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="sft,dpo,rl")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per stage run (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=4, help="sft examples / dpo pairs per step")
    ap.add_argument("--rl-prompts", type=int, default=2, help="rl prompts per step (x 4 samples)")
    ap.add_argument("--rl-tokens", type=int, default=32, help="rl max_new_tokens")
    ap.add_argument("--order", default="ABBA", choices=("AB", "ABBA"), help="A = float32, B = bf16-mixed")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    import torch

    if not bf16_fast("cpu"):
        os.environ.setdefault("CAI_ALLOW_SLOW_DTYPE", "1")  # measure anyway; the flags say it will be slow
    wall0, load_before = time.perf_counter(), os.getloadavg()
    model = resolve_model("default", progress=_common.log)
    steps = 1 + args.steps
    order = [MODES[0], MODES[1]] if args.order == "AB" else [MODES[0], MODES[1], MODES[1], MODES[0]]
    runs, summary = [], {}
    with tempfile.TemporaryDirectory(prefix="cai-bench-precision-") as tmp:
        run_dir = Path(tmp) / "run"
        prepare_run_dir(run_dir, model, max(args.batch * steps, 8))
        for stage in args.stages.split(","):
            per_mode: dict[str, list[float]] = {m: [] for m in MODES}
            for mode in order:
                _common.log(f"{stage} {mode} ...")
                stamps, whole = run_stage(run_dir, stage, stage_config(run_dir, stage, mode, model, steps, args))
                # stamps[0]: before step 1 (resume point); stamps[k]: after step k
                step_s = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
                busy = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(stamps[1:], stamps[2:])]
                per_mode[mode] += step_s[1:]
                runs.append({"stage": stage, "mode": mode, "step_seconds": step_s, "warmup_excluded": True,
                             "cores_busy": busy, "whole_run_seconds": whole})
                _common.log(f"  steps {[round(x, 2) for x in step_s]} s, cores busy {[round(b, 2) for b in busy]}")
            med = {m: statistics.median(v) for m, v in per_mode.items()}
            summary[stage] = {"float32_s_per_step": med["float32"], "bf16_mixed_s_per_step": med["bf16-mixed"],
                              "speedup_bf16_mixed": med["float32"] / med["bf16-mixed"],
                              "timed_steps_per_mode": len(per_mode["float32"])}
    flags = cpu_flags()
    report = {
        "what": "seconds per optimizer step of the real stage loops, float32 vs bf16-mixed, embedded SmolLM2-135M",
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "model": model},
        "machine": {**_common.machine_info(), "bf16_flags": sorted(flags & set(CPU_BF16_FLAGS)),
                    "bf16_fast": bf16_fast("cpu"), "amx_flags": sorted(f for f in flags if f.startswith("amx")),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "torch_threads": torch.get_num_threads()},
        "wall_seconds": time.perf_counter() - wall0,
        "runs": runs,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| stage | float32 s/step | bf16-mixed s/step | float32 / bf16-mixed |")
    print("|---|---:|---:|---:|")
    for stage, s in summary.items():
        print(f"| {stage} | {s['float32_s_per_step']:.2f} | {s['bf16_mixed_s_per_step']:.2f} | {s['speedup_bf16_mixed']:.2f}x |")
    print(f"CPU bf16 flags: {report['machine']['bf16_flags'] or 'none'}; wrote {args.out}")
    warn = _common.starved_warning(_common.usable_cores(), [(f"{r['stage']} {r['mode']}", min(r["cores_busy"] or [0]))
                                                             for r in runs])
    if warn:
        print(warn)


if __name__ == "__main__":
    main()
