"""The prepare stage: resolve the model, validate the inputs, freeze them in the run.

It writes the constitution as cai YAML and every prompt set as fixed train/test
JSONL splits (``id, category, prompt, messages``), so later stages, and anyone
auditing the run, read exactly what was used.
"""

from __future__ import annotations

import json
from pathlib import Path

from cai.io import write_jsonl
from cai.models import resolve_model
from cai.prompts import BUILTIN_DIR as PROMPTS_DIR
from cai.cost import Cost, PlanInputs
from cai.inputs import load_inputs
from cai.stage import StageContext, StageSpec


def _source_files(spec: str) -> list[Path]:
    if spec.startswith("eval:"):
        from cai.evaluation.sets import source_files

        return source_files(spec)
    if spec.startswith("builtin:"):
        return sorted((PROMPTS_DIR / spec.split(":", 1)[1]).glob("*.jsonl"))
    p = Path(spec)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(x for x in p.iterdir() if x.is_file())
    return []


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    const, sets = load_inputs(cfg)
    const.save(ctx.output("constitution"))
    ctx.record_input("constitution", Path(const.source))
    for note in const.notes:
        ctx.log(f"[prepare] constitution: {note}")
    counts = {"principles": len(const.principles), "comparison_principles": len(const.comparison_principles)}
    for name, splits in sets.items():
        for split, prompts in splits.items():
            path = ctx.output("prompts", set=name, split=split)
            write_jsonl(path, (p.to_record() for p in prompts))
            counts[f"{name}_{split}"] = len(prompts)
        for f in _source_files(getattr(cfg.data, name)):
            ctx.record_input(f"{name}:{f.name}", f)
    if cfg.engine.kind == "openai":  # the model lives on the servers (their URLs stay out of the run dir)
        model = {"name": cfg.engine.model, "kind": "openai", "tokenizer": cfg.engine.tokenizer}
    else:
        model = {"name": cfg.engine.model, "path": resolve_model(cfg.engine.model, cfg.engine.revision, progress=ctx.log)}
    ctx.output("model").write_text(json.dumps(model, indent=2) + "\n", encoding="utf-8")
    return counts


def estimate(inputs: PlanInputs) -> Cost:
    return Cost(note="reads and freezes the inputs")


STAGE = StageSpec(
    name="prepare",
    run=run,
    config_keys=("data", "seed", "engine"),
    help="Validate and freeze the constitution and prompt splits; resolve the model.",
    estimate=estimate,
)
