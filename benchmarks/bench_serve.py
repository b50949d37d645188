"""Managed llama.cpp servers (``engine.serve``) against the in-process engine, in one run.

Setups, all on the embedded SmolLM2-135M-Instruct:

* ``local`` and ``local int8``: cai's LocalEngine in this process (float32, or
  ``engine.quantize=int8``; batched, shared-prefix and continued KV caches);
* ``llama-cpp-python {q8_0,q4_0} x{1,2}``: managed ``python -m llama_cpp.server``
  servers on the GGUF export (1 server with all cores, or 2 servers with 1 thread each);
* ``llama-server q8_0 x1``: llama.cpp's C++ server with ``--parallel 8`` slots, when a
  ``llama-server`` binary is found (PATH, ``cai serve-setup --build-server``, or --llama-server).

Two measurements per setup:

1. raw generation: the same prompts (red-team train split), temperature 0.7 seeded per
   request, ``--max-new-tokens`` each; new tokens per second;
2. stages: ``critique_revision``, ``feedback`` (policy: the original model) and
   ``evaluate`` through ``run_pipeline`` with small settings; seconds per stage from the
   manifests, plus evaluate's harmfulness and refusal figures for the quality check.

Server start-up (and the one-off GGUF export) is outside the timed parts: exports are
made before the first setup, and in the stage runs the servers start inside the stage
(their start-up is in the stage time, as a user would see it). Writes
``benchmarks/results/serve.json`` and prints a markdown table.

    HF_HUB_OFFLINE=1 python benchmarks/bench_serve.py [--prompts 16 --max-new-tokens 64] [--no-stages]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cai.config import load_config
from cai.engines import build_engine
from cai.engines.base import SamplingParams
from cai.engines.gguf import export_gguf
from cai.models import resolve_model
from cai.prompts import load_prompt_set

from _common import log, timed, write_report

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "serve.json"
STAGE_ARGS = [
    "stages=[prepare, critique_revision, feedback, evaluate]",
    "critique_revision.rounds=1", "critique_revision.max_prompts=4", "critique_revision.few_shot=1",
    "critique_revision.max_new_tokens=64", "critique_revision.critique_max_new_tokens=32",
    "feedback.policy=default", "feedback.max_prompts=3", "feedback.max_new_tokens=48",
    "evaluate.max_prompts=3", "evaluate.max_new_tokens=48", "evaluate.bootstrap=50",
    "evaluate.preference_model=false", "evaluate.revision_splits=[]",
]


def setups(llama_server: str | None) -> list[dict]:
    cores = os.cpu_count() or 1
    out = [{"name": "local", "serve": "none"}, {"name": "local int8", "serve": "none", "quantize": "int8"}]
    for quant in ("q8_0", "q4_0"):
        out.append({"name": f"llama-cpp-python {quant} x1", "serve": "llama-cpp-python", "quant": quant,
                    "replicas": 1, "threads": cores, "parallel": 1})
        out.append({"name": f"llama-cpp-python {quant} x2", "serve": "llama-cpp-python", "quant": quant,
                    "replicas": 2, "threads": max(1, cores // 2), "parallel": 1})
    if llama_server:
        out.append({"name": "llama-server q8_0 x1 (8 slots)", "serve": "llama-server", "quant": "q8_0",
                    "replicas": 1, "threads": cores, "parallel": 8})
    return out


def overrides(s: dict, concurrency: int) -> list[str]:
    if s["serve"] == "none":
        return [f"engine.quantize={s.get('quantize', 'none')}"]
    return [f"engine.serve={s['serve']}", f"engine.serve_quant={s['quant']}", f"engine.serve_replicas={s['replicas']}",
            f"engine.serve_threads={s['threads']}", f"engine.serve_parallel={s['parallel']}",
            f"engine.max_concurrency={concurrency}"]


def concurrency(s: dict) -> int:
    return max(2, 2 * s.get("replicas", 1) * s.get("parallel", 1)) if s["serve"] != "none" else 16


def generation(s: dict, prompts: list[str], max_new: int, server_dir: Path) -> dict:
    cfg = load_config(None, overrides(s, concurrency(s)) + ["engine.batch_size=64"]).engine
    engine = build_engine(cfg, None, progress=log, server_dir=server_dir)
    try:
        convs = [[{"role": "user", "content": p}] for p in prompts]
        params = SamplingParams(n=1, temperature=0.7, top_p=0.95, max_new_tokens=max_new, seed=1)
        out, seconds, _ = timed(lambda: engine.generate(convs, params))
        tok = getattr(engine, "tok", None)
        new = sum(len(tok(o[0], add_special_tokens=False)["input_ids"]) for o in out) if tok is not None else 0
    finally:
        engine.close()
    return {"seconds": round(seconds, 2), "new_tokens": new, "new_tok_per_s": round(new / seconds, 1),
            "sample": out[0][0][:200]}


def stages(s: dict, run_dir: Path) -> dict:
    from cai.pipeline import run_pipeline

    cfg = load_config(None, [f"run_dir={run_dir}", *STAGE_ARGS, *overrides(s, concurrency(s))])
    run_pipeline(cfg, log=lambda m: None)
    secs = {n: json.loads((run_dir / n / "manifest.json").read_text())["seconds"]
            for n in ("critique_revision", "feedback", "evaluate")}
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    answers = [json.loads(x) for x in (run_dir / "evaluate" / "answers" / "initial.jsonl").read_text().splitlines()]
    return {"stage_seconds": secs, "evaluate": _quality(results), "answers": [a.get("answer", "")[:160]
                                                                             for a in answers[:3]]}


def _quality(results: dict) -> dict:
    """Evaluate's harmfulness and refusal figures for the original model, whatever keys hold them."""
    def find(obj, path=""):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from find(v, f"{path}.{k}" if path else k)
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
            yield path, obj

    return {k: v for k, v in find(results) if any(w in k for w in ("harm", "refus")) and "ci" not in k.split(".")[-1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--no-stages", action="store_true", help="raw generation only")
    ap.add_argument("--llama-server", help="a llama-server binary (default: PATH or cai serve-setup's)")
    ap.add_argument("--only", nargs="*", default=None, help="setups whose name starts with one of these (the local ones always)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    from cai.engines import serve

    binary = args.llama_server or shutil.which("llama-server") or serve._bundled("llama-server")
    if binary:
        os.environ["PATH"] = f"{Path(binary).parent}{os.pathsep}{os.environ['PATH']}"
    model = resolve_model("default", progress=log)
    for quant in ("q8_0", "q4_0"):
        export_gguf(model, quant, progress=log)
    reds = load_prompt_set("builtin:red_team", 0.25, 0)["train"][: args.prompts]
    prompts = [p.text for p in reds]
    load_before, start = os.getloadavg(), time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cai-bench-serve-") as tmp:
        chosen = [s for s in setups(binary) if s["name"].startswith("local") or args.only is None
                  or any(s["name"].startswith(o) for o in args.only)]
        for i, s in enumerate(chosen):
            log(f"== {s['name']}")
            row = {"setup": s["name"], **{k: v for k, v in s.items() if k != "name"}}
            row["generation"] = generation(s, prompts, args.max_new_tokens, Path(tmp) / f"servers-{i}")
            log(f"   generation: {row['generation']['new_tok_per_s']} new tok/s")
            if not args.no_stages:
                row.update(stages(s, Path(tmp) / f"run-{i}"))
                log(f"   stages: {row['stage_seconds']}")
            rows.append(row)
    base = rows[0]
    for r in rows:
        r["generation_ratio"] = round(r["generation"]["new_tok_per_s"] / base["generation"]["new_tok_per_s"], 2)
        if "stage_seconds" in r:
            r["stage_ratio"] = {k: round(base["stage_seconds"][k] / v, 2) for k, v in r["stage_seconds"].items()}

    class Row(dict):
        def to_dict(self):
            return dict(self)

    write_report(args.out, {"name": "SmolLM2-135M-Instruct (embedded)"},
                 {"prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "stage_args": STAGE_ARGS,
                  "llama_server": binary}, load_before, os.getloadavg(), round(time.time() - start, 1),
                 [Row(r) for r in rows], {"baseline": "local"})
    print("| setup | gen new tok/s | gen ratio | critique_revision | feedback | evaluate |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        sr = r.get("stage_ratio", {})
        print(f"| {r['setup']} | {r['generation']['new_tok_per_s']} | {r['generation_ratio']:.2f}x | "
              + " | ".join(f"{sr[k]:.2f}x" if k in sr else "-" for k in ("critique_revision", "feedback", "evaluate"))
              + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
