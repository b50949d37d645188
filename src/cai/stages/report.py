"""The report stage: the audit page of the run, ``report/index.html`` (see ``cai.report``).

It comes last and reads every finished stage folder it finds. Its upstream stages are
all the stages listed before it, so it is rebuilt whenever any of them changes.
"""

from __future__ import annotations

from cai.stage import StageContext, StageSpec


def run(ctx: StageContext) -> dict:
    from cai.report import build_report

    html = build_report(ctx.run_dir)
    ctx.output("page").write_text(html, encoding="utf-8")
    return {"bytes": len(html.encode("utf-8"))}


def _needs(cfg) -> tuple[str, ...]:
    stages = list(cfg.stages)
    return tuple(stages[: stages.index("report")]) if "report" in stages else tuple(stages)


STAGE = StageSpec(
    name="report",
    run=run,
    config_keys=(),
    needs=_needs,
    help="The audit report: one self-contained HTML page with every chain, comparison and evaluation plot.",
)
