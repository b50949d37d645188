"""`cai plan` against a real run: seconds and peak memory per stage, and in total.

Runs every stage of a small cpu-tiny run (the preset with caps, below) and measures, per
stage, the seconds its manifest records and the peak resident memory it added. Each stage
runs in a fresh Python process (``cai.pipeline.run_pipeline`` with the stages up to it;
the finished ones are skipped), which reads its resident memory after the imports
(``VmRSS``) and its peak at the end (``VmHWM``), and the same for its anonymous memory
(``RssAnon``, sampled every 20 ms): the differences are what the stage added at its
highest point. The plan's memory column estimates the anonymous figure (it leaves out the
runtime's own ~0.5 GiB); the resident one also counts the pages of checkpoint files being
read, which the OS can drop. Then it runs the plan (with its calibration) on the same config
and prints both side by side.

* ``--actual FILE`` reuses the measured rows of an earlier report instead of running
  the stages again (to rerun the plan alone);
* ``--keep DIR`` runs the stages in DIR and keeps it (each stage's ``metrics.json``);
* ``--only STAGE`` (repeatable) measures those stages alone, in a ``--keep`` folder that already holds
  the finished stages before them (an earlier run's, copied);
* ``--no-caps`` runs the preset as it is (the real default run: cpu-tiny takes ~10 minutes);
* extra ``KEY=VALUE`` arguments override the config (after the caps).

Writes ``benchmarks/results/plan.json``. The goal of issue 17: within 25% per stage and
in total. A benchmark, not a test: the machine's load moves both sides.

    HF_HUB_OFFLINE=1 python benchmarks/bench_plan.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "plan.json"
#: The cpu-tiny preset made smaller: a few minutes on 2 cores.
CAPS = ["critique_revision.max_prompts=6", "feedback.max_prompts=6", "rl.steps=3", "rl.eval_prompts=4",
        "evaluate.max_prompts=3", "evaluate.bootstrap=100"]



def measure_stages(preset: str, args: list[str], run_dir: Path, stages: list[str],
                   only: list[str] | None = None) -> list[dict]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1"}
    rows = []
    for i, stage in enumerate(stages):
        if only and stage not in only:
            continue
        todo = f"stages=[{', '.join(stages[: i + 1])}]"
        _common.log(f"running {stage} ...")
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", _common.RSS_CHILD, json.dumps([preset, [*args, f"run_dir={run_dir}", todo]])],
                             env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{stage} failed:\n{out.stderr[-3000:]}")
        mem = json.loads(out.stdout.strip().splitlines()[-1])
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        rows.append({"stage": stage, "seconds": manifest["seconds"], "process_seconds": time.perf_counter() - t0,
                     "added_bytes": mem["peak_rss"] - mem["rss_after_imports"],
                     "added_anon_bytes": mem["peak_anon"] - mem["anon_after_imports"], **mem})
        _common.log(f"  {stage}: {manifest['seconds']:.1f} s, +{rows[-1]['added_bytes'] / 2**20:.0f} MiB resident, "
                    f"+{rows[-1]['added_anon_bytes'] / 2**20:.0f} MiB anonymous")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu-tiny")
    ap.add_argument("--actual", type=Path, help="reuse the measured rows of this earlier report")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--keep", type=Path, help="run the stages in this (new) folder and keep it, to read their metrics")
    ap.add_argument("--only", action="append", metavar="STAGE",
                    help="measure this stage alone (repeatable); the --keep folder holds the finished stages before it")
    ap.add_argument("--no-caps", action="store_true", help="run the preset as it is, without the caps (CAPS)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    opts = ap.parse_args()
    from cai.config import load_config
    from cai.plan import plan, render

    args = ([] if opts.no_caps else CAPS) + opts.overrides
    cfg = load_config(opts.preset, args)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    if opts.actual:
        actual = json.loads(opts.actual.read_text())["actual"]
    elif opts.keep:
        done = sorted(p.parent.name for p in opts.keep.glob("*/manifest.json"))
        if opts.only:  # the stages before them are to be there, finished; these are not
            done = [d for d in done if d in opts.only]
        if done:  # its finished stages would be skipped, and their old seconds reported
            raise SystemExit(f"--keep {opts.keep}: already holds finished stages ({', '.join(done)}); "
                             "give a new or empty folder")
        actual = measure_stages(opts.preset, args, opts.keep, list(cfg.stages), opts.only)
    else:
        with tempfile.TemporaryDirectory(prefix="cai-bench-plan-") as tmp:
            actual = measure_stages(opts.preset, args, Path(tmp) / "run", list(cfg.stages))
    _common.log("planning (with calibration) ...")
    t_plan = time.perf_counter()
    planned = plan(cfg, calibrate=True, log=_common.log)
    plan_seconds = time.perf_counter() - t_plan
    print(render(planned))
    by_stage = {r["stage"]: r for r in planned["rows"]}
    table = []
    for a in actual:
        p = by_stage[a["stage"]]
        mem = p.get("memory") or {}
        table.append({"stage": a["stage"], "plan_s": p.get("seconds"), "actual_s": a["seconds"],
                      "plan_mib": mem.get("stage_bytes", 0) / 2**20, "actual_mib": a["added_bytes"] / 2**20,
                      "anon_mib": a.get("added_anon_bytes", 0) / 2**20})
    total_plan = sum(r["plan_s"] or 0 for r in table)
    total_actual = sum(r["actual_s"] for r in table)
    print("\n| stage | plan s | actual s | plan / actual | plan MiB | measured MiB (all / anonymous) "
          "| plan / anonymous |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in table:
        ratio = r["plan_s"] / r["actual_s"] if r["actual_s"] > 0.5 and r["plan_s"] is not None else None
        mratio = r["plan_mib"] / r["anon_mib"] if r["anon_mib"] > 1 else None
        print(f"| {r['stage']} | {r['plan_s']:.1f} | {r['actual_s']:.1f} | {'-' if ratio is None else f'{ratio:.2f}'} | "
              f"{r['plan_mib']:.0f} | {r['actual_mib']:.0f} / {r['anon_mib']:.0f} | "
              f"{'-' if mratio is None else f'{mratio:.2f}'} |")
    print(f"| **total** | {total_plan:.1f} | {total_actual:.1f} | {total_plan / total_actual:.2f} | | | |")
    report = {"what": "cai plan vs a measured run, per stage", "preset": opts.preset, "overrides": args,
              "machine": _common.machine_info(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "wall_seconds": time.perf_counter() - t0, "plan_seconds": plan_seconds, "actual": actual,
              "plan": planned, "table": table, "total": {"plan_s": total_plan, "actual_s": total_actual}}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
