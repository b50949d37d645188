"""Peak memory of the evaluate and rl stages on the embedded model, before and after.

Each measurement is a fresh Python process that imports torch, transformers, accelerate,
peft and cai, reads its resident memory (``VmRSS`` in ``/proc/self/status``), runs one
stage through ``cai.pipeline.run_pipeline`` and reads its peak resident memory
(``VmHWM``). The figure is the peak minus the resident memory after the imports: what
the stage itself added at its highest point. On a CPU, offloading moves nothing, so what
these numbers show is how many models and optimizer states are held at once.

* ``--before-src DIR`` runs the same stages with another checkout's ``src`` (e.g. the
  commit before this change: ``git archive <commit> src | tar -x -C /tmp/before``), with
  the settings that checkout knows (no ``rl.method``, ``rl.dtype`` values of its own).
* evaluate: the run's original model (the embedded one, also the judge), ``sft/model``,
  ``rl/model`` and ``dpo/model`` (copies of it) and a preference model with a fresh head;
  1 prompt per set, 8-token answers, no demonstrations, no bootstrap.
* rl: the embedded model as policy, the same PM, 2 steps of 2 prompts x 4 samples,
  16-token answers, in float32, in bf16-mixed (``auto`` on a CPU with bfloat16), and with
  LoRA (no reference copy, AdamW state for the adapters only).

Writes ``benchmarks/results/memory.json``.

    HF_HUB_OFFLINE=1 python benchmarks/bench_memory.py --before-src /tmp/before/src
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

from cai.io import write_json
from cai.models import resolve_model

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "memory.json"



def link_copy(src: Path, dst: Path) -> None:
    """A model folder whose files are symlinks to ``src``'s (a separate model to load)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())


def prepare_run_dir(run_dir: Path, model: str) -> None:
    from cai.config import load_config
    from cai.pipeline import run_pipeline

    run_pipeline(load_config(None, [f"run_dir={run_dir}", "stages=[prepare]", "data.max_per_split=20"]),
                 log=lambda m: None)
    for stage in ("sft", "rl", "dpo"):
        link_copy(Path(model), run_dir / "trained" / stage / "model")
    pm = run_dir / "preference_model"
    pm.mkdir(exist_ok=True)
    write_json(pm / "manifest.json", {"stage": "preference_model", "status": "complete", "note": "bench_memory"})
    _common.untrained_pm(model, pm / "model")


def measure(src: str, run_dir: Path, stage: str, args: list[str]) -> dict:
    for folder in (run_dir / stage, run_dir / f"{stage}.partial"):
        shutil.rmtree(folder, ignore_errors=True)
    # no answers from an earlier measurement: an engine whose requests all hit the cache
    # would never load its model
    (run_dir / "cache.sqlite").unlink(missing_ok=True)
    if stage == "evaluate":  # the trained models where evaluate looks for them
        for s in ("sft", "rl", "dpo"):
            shutil.rmtree(run_dir / s, ignore_errors=True)
            shutil.copytree(run_dir / "trained" / s, run_dir / s, symlinks=True)
    else:
        for s in ("sft", "rl", "dpo"):
            shutil.rmtree(run_dir / s, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _common.RSS_CHILD, json.dumps([None, [f"run_dir={run_dir}", *args]])],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{stage} {args} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["added_mb"] = (row["peak_rss"] - row["rss_after_imports"]) / 2**20
    row["seconds"] = time.perf_counter() - t0
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before-src", help="the src folder of the checkout to compare with (optional)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    after_src = str(Path(__file__).resolve().parents[1] / "src")
    model = resolve_model("default", progress=_common.log)
    engine = ["engine.model=default", "engine.device=cpu", "engine.dtype=float32", "engine.quantize=none",
              "engine.batch_size=8"]
    evaluate = engine + ["stages=[evaluate]", "evaluate.max_prompts=1", "evaluate.max_new_tokens=8",
                         "evaluate.few_shot=0", "evaluate.bootstrap=0"]
    rl = engine + ["stages=[rl]", f"rl.policy={model}", "rl.steps=2", "rl.prompts_per_step=2",
                   "rl.samples_per_prompt=4", "rl.max_new_tokens=16", "rl.eval_prompts=2", "rl.micro_batch_size=8"]
    cases = []
    if args.before_src:
        cases += [("before", args.before_src, "evaluate", evaluate, "all models loaded at once"),
                  ("before", args.before_src, "rl", rl, "full fine-tuning, float32 ('auto' on CPU then)")]
    cases += [
        ("after", after_src, "evaluate", evaluate, "one model at a time"),
        ("after", after_src, "rl", rl + ["rl.dtype=float32"], "full fine-tuning, float32"),
        ("after", after_src, "rl", rl + ["rl.dtype=auto"], "full fine-tuning, auto"),
        ("after", after_src, "rl", rl + ["rl.dtype=float32", "rl.method=lora"], "LoRA, float32"),
        ("after", after_src, "rl", rl + ["rl.dtype=auto", "rl.method=lora"], "LoRA, auto"),
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="cai-bench-memory-") as tmp:
        run_dir = Path(tmp) / "run"
        prepare_run_dir(run_dir, model)
        for label, src, stage, settings, what in cases:
            _common.log(f"{label} {stage}: {what} ...")
            row = measure(src, run_dir, stage, settings)
            row.update({"code": label, "src": src, "stage": stage, "what": what, "settings": settings})
            rows.append(row)
            _common.log(f"  +{row['added_mb']:.0f} MB over {row['rss_after_imports'] / 2**20:.0f} MB after imports "
                        f"({row['seconds']:.0f} s)")
    from cai.hardware import describe_cpu

    report = {"what": "peak RSS added by one stage over the RSS after imports (VmHWM - VmRSS), embedded SmolLM2-135M",
              "machine": {**_common.machine_info(), "cpu": describe_cpu()}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| stage | code | what | MB after imports | peak MB added |")
    print("|---|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['stage']} | {r['code']} | {r['what']} | {r['rss_after_imports'] / 2**20:.0f} | {r['added_mb']:.0f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
