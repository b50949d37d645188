"""The default `cai run` against an older commit's, interleaved on one machine.

Runs the default job (no arguments: the cpu-tiny preset on the embedded model) with the
code of ``--base`` (default 396fb1e, the commit the speed issue measured from) and with this
checkout's, in the order ``--order`` (default old, new, new, old, so that a machine that
warms up or slows down over the benchmark moves both sides alike). Each run is a fresh
``python -m cai run`` in a fresh run folder (its own request cache); the converted embedded
model in the cai cache is shared, as it is for a user's second run.

Reported, per stage: each run's seconds (from the stage's manifest), the median of each
side and the ratio old / new of the medians (above 1: the new code is faster), and the same
for the whole process; then the work each side did (the manifests' counts: answers,
comparisons, chains, rollouts...), which must be the same, and the evaluation's Elo with
its interval for every model of both sides. The old code is exported with ``git archive``
into a scratch folder (nothing is checked out here).

Writes ``benchmarks/results/default_run.json``. A benchmark, not a test: ratios within one
run of this script are what it measures.

    HF_HUB_OFFLINE=1 python benchmarks/bench_default_run.py
    HF_HUB_OFFLINE=1 python benchmarks/bench_default_run.py --order new,old  # quicker, noisier
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "default_run.json"
STAGES = ("prepare", "critique_revision", "sft", "feedback", "preference_model", "rl", "dpo", "evaluate", "report")
#: The manifest counts that say how much work a stage did: they must match between the sides.
WORK = {
    "critique_revision": ("chains_train", "chains_test", "helpful_samples", "rounds"),
    "sft": ("examples", "steps"),
    "feedback": ("comparisons", "prefs_train", "prefs_test"),
    "preference_model": ("train_pairs", "steps"),
    "rl": ("steps", "rollouts"),
    "dpo": ("train_pairs", "steps"),
    "evaluate": ("models", "answers", "comparisons", "frontier_points", "frontier_comparisons"),
}


def cpu_flags() -> list[str]:
    """The CPU flags that decide the engine's speed (AVX-512 and its bf16/VNNI parts, AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))


def export(commit: str, dest: Path) -> Path:
    """``commit``'s tree (its ``src/`` is what runs) exported into ``dest``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "src"


def one_run(src: Path, run_dir: Path, extra: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "cai", "run", f"run_dir={run_dir}", *extra], env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"cai run with {src} failed:\n{out.stderr[-3000:]}")
    stages, counts = {}, {}
    for stage in STAGES:
        manifest = run_dir / stage / "manifest.json"
        if manifest.is_file():
            m = json.loads(manifest.read_text())
            stages[stage] = m["seconds"]
            counts[stage] = {k: m.get("counts", {}).get(k) for k in WORK.get(stage, ())}
    results = run_dir / "evaluate" / "results.json"
    elo = {}
    if results.is_file():
        r = json.loads(results.read_text())
        for dimension, table in (r.get("elo") or {}).items():
            for name, rating in ((table or {}).get("ratings") or {}).items():
                elo[f"{dimension}:{name}"] = [rating["elo"], rating.get("ci_low"), rating.get("ci_high")]
        for name, h in (r.get("harmfulness") or {}).items():
            elo[f"harmfulness:{name}"] = [h["mean"], None, None]
    return {"wall": wall, "stages": stages, "counts": counts, "figures": elo}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="396fb1e", help="the old commit (default: 396fb1e)")
    p.add_argument("--order", default="old,new,new,old", help="the runs, in order (default: old,new,new,old)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--keep", type=Path, help="keep the run folders here")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE given to every run (both sides)")
    a = p.parse_args(argv)
    order = [s.strip() for s in a.order.split(",") if s.strip()]
    if not order or set(order) - {"old", "new"}:
        raise SystemExit(f"--order: a comma-separated list of old and new, not '{a.order}'")
    base = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", a.base], capture_output=True, text=True,
                          check=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src"], capture_output=True,
                                text=True).stdout.strip())
    load_before, t_all = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cai-bench-default-") as tmp:
        scratch = a.keep or Path(tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        (Path(tmp) / "old").mkdir()
        sources = {"old": export(base, Path(tmp) / "old"), "new": ROOT / "src"}
        runs = []
        for k, side in enumerate(order):
            _common.log(f"run {k + 1}/{len(order)}: {side} ({base if side == 'old' else head}) ...")
            r = one_run(sources[side], scratch / f"{k + 1}-{side}", a.overrides)
            _common.log(f"  {r['wall']:.1f} s: " + ", ".join(f"{s} {v:.1f}" for s, v in r["stages"].items()))
            runs.append({"side": side, **r})
    by_side = {side: [r for r in runs if r["side"] == side] for side in ("old", "new")}

    def median(side, get):
        xs = [get(r) for r in by_side[side] if get(r) is not None]
        return statistics.median(xs) if xs else None

    rows = []
    for stage in (*STAGES, "total (process)"):
        get = (lambda r: r["wall"]) if stage.startswith("total") else (lambda r, s=stage: r["stages"].get(s))
        old, new = median("old", get), median("new", get)
        rows.append({"stage": stage, "old": [get(r) for r in by_side["old"]], "new": [get(r) for r in by_side["new"]],
                     "old_median": old, "new_median": new,
                     "ratio": round(old / new, 3) if old and new else None})
    same_work = {}
    for stage, keys in WORK.items():
        for key in keys:
            seen = {side: sorted({json.dumps(r["counts"].get(stage, {}).get(key)) for r in by_side[side]})
                    for side in ("old", "new")}
            same_work[f"{stage}.{key}"] = {"old": seen["old"], "new": seen["new"], "same": seen["old"] == seen["new"]}
    figures = {}
    for key in sorted({k for r in runs for k in r["figures"]}):
        figures[key] = {side: [r["figures"].get(key) for r in by_side[side]] for side in ("old", "new")}

    print(f"\ndefault `cai run`: old {base} against new {head}{' (with uncommitted changes)' if dirty else ''}; "
          f"runs in order {','.join(order)}")
    print(f"CPU flags: {' '.join(cpu_flags()) or 'unknown'}; torch threads {_common.usable_cores()}")
    print(f"{'stage':<20}{'old s':>18}{'new s':>18}{'old/new':>9}")
    for r in rows:
        fmt = lambda xs: "/".join(f"{x:.1f}" for x in xs if x is not None)  # noqa: E731
        print(f"{r['stage']:<20}{fmt(r['old']):>18}{fmt(r['new']):>18}"
              f"{(str(r['ratio']) + 'x') if r['ratio'] else '-':>9}")
    differ = [k for k, v in same_work.items() if not v["same"]]
    print("same work: " + ("yes, every count matches" if not differ else
                           "NO: " + "; ".join(f"{k} old {same_work[k]['old']} new {same_work[k]['new']}"
                                               for k in differ)))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "base": base, "head": head, "uncommitted_changes": dirty, "order": order, "overrides": a.overrides,
        "machine": {**_common.machine_info(), "cpu_flags": cpu_flags(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "wall_seconds": time.perf_counter() - t_all, "stages": rows, "same_work": same_work,
        "figures": figures, "runs": runs}, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
