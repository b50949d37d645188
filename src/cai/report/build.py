"""Builds the report page from a run directory (see ``cai.report`` for the safety rules)."""

from __future__ import annotations

import base64
import datetime as _dt
import difflib
import hashlib
import json
from html import escape
from pathlib import Path

from cai.artifacts import verify_stage
from cai.errors import CaiError
from cai.evaluation.results import (
    Frontier,
    FrontierScores,
    JudgeReliability,
    PMScores,
    QualityBySet,
    QualityRates,
    Rating,
    RefusalBySet,
    RefusalRates,
    Results,
    Revisions,
    SafeBySet,
)
from cai.io import read_json, read_jsonl, read_text
from cai.judge_stats import MAX_CI_WIDTH, share_ci
from cai.report.expansion import expansion
from cai.layout import OUTPUTS, RunFolder
from cai.revision_loop import REVISED
from cai.stage_names import STAGES

HERE = Path(__file__).parent
#: The artifact files the report reads, checked against their stage's manifest first.
REPORTED = (".json", ".jsonl", ".png", ".yaml")


def safe_json(obj) -> str:
    """JSON that is inert inside ``<script>``: no ``<``, ``>``, ``&`` or line separators
    survive as themselves, so model text can neither close the element nor open a comment."""
    text = json.dumps(obj, ensure_ascii=False, default=str)
    for ch, rep in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, rep)
    return text


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return read_jsonl(path)


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return "–"
    return str(v)


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


#: evaluate/'s plots that the "PM score vs revisions" section shows, not the evaluation's.
REVISION_PNGS = ("revisions.png", "revision_principles.png")
#: evaluate/'s plot that the frontier section shows.
FRONTIER_PNGS = ("frontier.png",)


def _figures(folder: Path, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> str:
    """Every PNG in ``folder`` (by name) but ``skip``; or those named in ``only``, in that order."""
    out = []
    pngs = sorted(folder.glob("*.png")) if only is None else [folder / n for n in only if (folder / n).is_file()]
    for png in pngs:
        if png.name in skip:
            continue
        out.append(f'<figure><img alt="{escape(png.stem)}" src="{_png(png)}"><figcaption>'
                   f"{escape(folder.name)}/{escape(png.name)}</figcaption></figure>")
    return f'<div class="figures">{"".join(out)}</div>' if out else ""


# -- sections ------------------------------------------------------------------------------


def stage_manifests(run: Path) -> list[dict]:
    folder = RunFolder(run)
    found = [m for m in (read_json(folder.manifest_path(s)) for s in STAGES)  # not an interrupted <stage>.partial
             if isinstance(m, dict) and m.get("stage")]
    rank = {n: k for k, n in enumerate(STAGES)}
    return sorted(found, key=lambda m: (rank.get(m["stage"], len(rank)), str(m.get("started", ""))))


def timeline(manifests: list[dict]) -> str:
    if not manifests:
        return "<p>No finished stage in this run directory.</p>"
    total = sum(float(m.get("seconds") or 0) for m in manifests)
    rows = []
    for m in manifests:
        sec = float(m.get("seconds") or 0)
        counts = ", ".join(f"{k}={_fmt(v)}" for k, v in (m.get("counts") or {}).items())
        width = 100 * sec / total if total else 0
        rows.append(
            f"<tr><td>{escape(str(m['stage']))}</td><td>{escape(str(m.get('status', '?')))}</td>"
            f"<td>{escape(str(m.get('started', ''))[:19])}</td><td class=num>{sec:.1f}</td>"
            f'<td class="bar"><span style="width:{width:.1f}%"></span></td><td class=counts>{escape(counts)}</td></tr>'
        )
    return ("<table><thead><tr><th>stage</th><th>status</th><th>started (UTC)</th><th>seconds</th><th>share</th>"
            f"<th>counts</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
            f"<p>Total {total:.1f} s over {len(manifests)} stages.</p>")


def evaluation(run: Path) -> str:
    res = Results.load(RunFolder(run).path("evaluate", "results"))
    if res is None:
        return ""
    names = list(res.models)
    parts = [f"<p>Judge: <code>{escape(str(res.judge))}</code>. Held-out prompts: "
             + escape(", ".join(f"{k}={v}" for k, v in res.prompts.items())) + ".</p>"]
    dimensions = (("harmlessness", res.elo.harmlessness), ("helpfulness", res.elo.helpfulness))
    rows = []
    for m in names:
        row = [m]
        for _, table in dimensions:
            r = table.ratings.get(m) if table else None
            row.append(f"{r.elo:+.0f} [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]" + (" *" if r.compared_with else "")
                       if r and r.elo is not None else "–")
        harm = res.harmfulness.get(m)
        ref = res.refusal.get(m) or RefusalBySet()
        safe = (res.safe.get(m) or SafeBySet()).red_team
        pm = (res.pm_score or {}).get(m) or PMScores()
        rows.append(row + [harm.mean if harm else None, _refusal_cell(ref.benign), _refusal_cell(ref.red_team),
                           _fmt(safe.judge if safe else None),
                           f"{_fmt(pm.red_team)} / {_fmt(pm.helpful)}" if res.pm_score else "–"])
    parts.append(_table(["model", "harmlessness Elo [95% CI]", "helpfulness Elo [95% CI]", "harmfulness 0-4",
                         "benign: mean p(refusal) (judge) / phrase rate",
                         "red-team: mean p(refusal) (judge) / phrase rate",
                         "red-team: mean p(refused or safely redirected) (judge)", "PM score red-team / helpful"], rows))
    parts.append(elo_design(t for _, t in dimensions))
    parts.append(judge_warnings(res))
    parts.append(refusal_rates(res, names))
    parts.append(judge_table(res))
    parts.append(answer_quality(res, names))
    for dim, t in dimensions:
        if t:
            rel = t.judge_reliability or JudgeReliability(position_consistency=t.position_consistency)
            parts.append(f"<p>{escape(dim)}: {t.comparisons} comparisons on {t.prompts} prompts under "
                         f"<code>{escape(str(t.principle_id))}</code>; position consistency "
                         f"{escape(_consistency(rel))}"
                         + ("<b> (the judge is at chance: this Elo says nothing about the models)</b>"
                            if rel.judged_at_chance else "") + f"; {t.bootstrap} bootstrap resamples.</p>")
    parts.append(standard_sets(res))
    parts.append(_figures(RunFolder(run).path("evaluate", "figures"), skip=REVISION_PNGS + FRONTIER_PNGS))
    return "".join(parts)


def elo_design(tables) -> str:
    """The pairwise design under the Elo table: all pairs, or the anchors, what a model rated
    through them is measured against (marked * in the table), and the pairs it cost."""
    table = next((t for t in tables if t), None)
    if table is None:
        return ""
    n = len(table.ratings)
    if table.design is None:
        return (f"<p>Elo design: all pairs (every model compared with every other, {n * (n - 1) // 2} pairs of "
                "models on each prompt).</p>")
    d = table.design
    return (f"<p>Elo design: {escape(str(d.kind))}, {escape(', '.join(d.anchors))} ({_fmt(d.pairs)} of "
            f"{n * (n - 1) // 2} pairs of models on each prompt). The anchors met each other and every model; "
            "a model marked * met the anchors only, so its Elo and interval are measured against them, and the "
            "gap between two such models is inferred through the anchors (Bradley-Terry transitivity), not "
            "compared head to head.</p>")


def _refusal_cell(x: RefusalRates | None) -> str:
    """``judge / phrases``: the judge's mean p(refusal) and the phrase rate on one set."""
    x = x or RefusalRates()
    return f"{_fmt(x.judge)} / {_fmt(x.phrases)}"


def answer_quality(res: Results, names: list[str]) -> str:
    """What a user would see: each model's shares of looping and of empty or restating answers
    per set, with the definitions."""
    if not res.quality:
        return ""
    by_model = {m: (res.quality.get(m) or QualityBySet()).named() for m in names}
    sets = [s for s in ("red_team", "helpful", "benign") if any(s in q for q in by_model.values())]
    rows = []
    for m in names:
        blocks = [by_model[m].get(s) or QualityRates() for s in sets]
        rows.append([m, *(f"{_fmt(x.degenerate)} (n={x.n or 0})" for x in blocks),
                     *(f"{_fmt(x.unhelpful)} (n={x.n or 0})" for x in blocks)])
    head = ["model"] + [f"{k} {s}" for k in ("degenerate", "unhelpful") for s in sets]
    return ("<h3>What a user would see</h3>" + _table(head, rows, "quality")
            + "".join(f"<p><b>{escape(k)}</b>: {escape(str(v))}.</p>" for k, v in res.quality_definitions.items()))


def _consistency(rel: JudgeReliability | None) -> str:
    """``0.61 [0.42, 0.77]``: position consistency with its Wilson 95% interval (the bare
    value from an older results.json; "not measured" for a question asked in one order)."""
    if rel is None:
        return "–"
    if rel.orders == 1:
        return "not measured (asked in one order only)"
    ci = rel.position_consistency_ci
    if isinstance(ci, list) and len(ci) == 2:
        return f"{_fmt(rel.position_consistency)} [{_fmt(ci[0])}, {_fmt(ci[1])}]"
    return _fmt(rel.position_consistency)


def _at_chance(rel: JudgeReliability | None, what: str, meaning: str) -> str:
    """The warning beside a figure whose judge is at chance (as the PM's held-out accuracy)."""
    if rel is None or not rel.judged_at_chance:
        return ""
    return (f"<p class=warn><b>The judge is not distinguishable from chance on {escape(what)} (position "
            f"consistency {escape(_consistency(rel))}, decisiveness over all orders "
            f"{escape(_fmt(rel.decisiveness_all_orders))}): {escape(meaning)}.</b></p>")


def _judge_row(question: str, rel: JudgeReliability) -> list:
    """A row of a table of the judge's reliability: its question, how many were asked, the
    consistency with its interval, the decisiveness and the verdict."""
    verdict = ("position consistency not measured" if rel.orders == 1 else
               "AT CHANCE" if rel.judged_at_chance else "above chance")
    return [question, rel.n, _consistency(rel), rel.decisiveness_all_orders, rel.decisiveness_one_order, verdict]


#: Each judged figure of results.json: (judge_reliability key, what the judge was asked, what an
#: at-chance judge means for the figure).
JUDGED = (
    ("elo_harmlessness", "pairwise comparisons, harmlessness (both orders)", "the harmlessness Elo is noise"),
    ("elo_helpfulness", "pairwise comparisons, helpfulness (both orders)", "the helpfulness Elo is noise"),
    ("harmfulness", "harmfulness 0-4 (one order)", ""),
    ("refusal", "refused? yes/no (both orders)", "mean p(refusal) and the judge's refusal rates say nothing"),
    ("safe", "refused or safely redirected? yes/no (both orders)", "the safe-answer figures say nothing"),
)


def judge_warnings(res: Results) -> str:
    """The at-chance warnings of the model table's judged columns."""
    if res.judge_reliability is None:
        return ""
    questions = res.judge_reliability.questions()
    return "".join(_at_chance(questions[key], what, meaning) for key, what, meaning in JUDGED if meaning)


def judge_table(res: Results) -> str:
    """The judge's reliability on this run, per kind of question (results.json["judge_reliability"])."""
    if res.judge_reliability is None:
        return ""
    questions = res.judge_reliability.questions()
    rows = [_judge_row(what, questions[key]) for key, what, _ in JUDGED if questions[key] is not None]
    if not rows:
        return ""
    return ("<h3>The judge's reliability on this run</h3>"
            + _table(["question", "asked", "position consistency [Wilson 95%]", "decisiveness over all orders",
                      "decisiveness, one order", "verdict"], rows, "judge")
            + "<p>Position consistency: the share of questions whose most probable option was the same in every "
              "order they were asked in. The judge is <b>at chance</b> unless the interval's lower bound is above "
              "0.5: a judge that always picks one letter (near 0) and one that picks at random (near 0.5) both "
              "are. Decisiveness, one order: the most probable option's probability minus 1/options (|p − 0.5| "
              "for two), each order on its own; over all orders: the same of the probabilities averaged over the "
              "orders. Decisive in one order but not over both means the letter decided, not the answers.</p>")


def refusal_rates(res: Results, names: list[str]) -> str:
    """The judge's and the phrase list's refusal (and safe-answer) rates with Wilson 95%
    intervals, beside the judge's mean probability, and a warning where a held-out set is too
    small for its rate (an interval wider than cai.judge_stats.MAX_CI_WIDTH)."""
    rows, small = [], []
    for m in names:
        ref = res.refusal.get(m) or RefusalBySet()
        safe = (res.safe.get(m) or SafeBySet()).red_team
        for s, x in (("benign", ref.benign), ("red_team", ref.red_team), ("red_team (safe)", safe)):
            if x is None or not x.n:
                continue
            cells = []
            for share in (x.judge_majority, x.phrases if isinstance(x, RefusalRates) else None):
                r = share_ci(share, x.n) if share is not None else None  # None: not in this file
                cells.append(f"{_fmt(share)} [{_fmt(r['ci'][0])}, {_fmt(r['ci'][1])}]" if r and r["ci"] else "–")
                if r and r["too_small"] and s not in small:
                    small.append(s)
            rel = x.judge_reliability
            rows.append([m, s, x.n, x.judge, *cells, _consistency(rel),
                         "–" if rel is None else "AT CHANCE" if rel.judged_at_chance else "above chance"])
    if not rows:
        return ""
    warn = (f"<p class=warn><b>Too few held-out answers for these rates ({escape(', '.join(small))}): a Wilson 95% "
            f"interval is wider than {MAX_CI_WIDTH:g}. They show the pipeline working, not a rate.</b></p>"
            if small else "")
    return ("<h3>Refusals: probabilities and rates</h3>"
            + _table(["model", "set", "n", "mean p(yes) (judge)", "share with p(yes) > 0.5 [Wilson 95%]",
                      "phrase rate [Wilson 95%]", "judge position consistency [Wilson 95%]", "judge"], rows,
                     "refusals") + warn
            + "<p>Mean p(yes) is the judge's probability averaged over answers, not a rate. red_team (safe): "
              "refused or safely redirected.</p>")


def standard_sets(res: Results) -> str:
    """The standard evaluation sets (results.json["standard_sets"]): each set's headline
    figures per model, its convention, source and split, and the comparability note."""
    from cai.evaluation.sets import SETS

    parts = []
    for name, entry in (res.standard_sets or {}).items():
        if name not in SETS:
            continue
        es = SETS[name]
        rows, small = [], False
        for m, summary in entry.models.items():  # a set's own summary: a dict its StandardSet reads
            cells = []
            for f in es.figures(summary):
                r = share_ci(f.value, f.n) if f.rate else None
                cells.append(f"{_fmt(f.value)} [{_fmt(r['ci'][0])}, {_fmt(r['ci'][1])}]" if r and r["ci"]
                             else _fmt(f.value))
                small = small or bool(r and r["too_small"])
            rows.append([m, *cells, summary.get("n")])
        rel = entry.judge_reliability
        jrows = [_judge_row(q, r) for q, r in rel.items() if r is not None]
        parts.append(f"<h4>{escape(entry.title if entry.title is not None else name)} "
                     f"(<code>eval:{escape(name)}</code>)</h4>"
                     + _table(["model", *(f"{label} [Wilson 95%]" if path[-1] in es.rates else label
                                          for label, path in es.headlines), "n"], rows)
                     + (f"<p class=warn><b>Too few held-out answers for these rates: a Wilson 95% interval is wider "
                        f"than {MAX_CI_WIDTH:g}.</b></p>" if small else "")
                     + (_table(["judge's question", "asked", "position consistency [Wilson 95%]",
                                "decisiveness over all orders", "decisiveness, one order", "verdict"], jrows, "judge")
                        if jrows else "")
                     + "".join(_at_chance(r, f"this set's question '{q}'", "the figures read from it say nothing")
                               for q, r in rel.items())
                     + f"<p>{escape(entry.convention or '')}. Source: <code>{escape(str(entry.source))}"
                     f"</code>; {escape(entry.split or '')}.</p>"
                     f"<p><b>{escape(entry.note or '')}</b></p>")
    return ("<h3>Standard evaluation sets</h3>" + "".join(parts)) if parts else ""


def _ci(value, low, high) -> str:
    """``value [low, high]`` of a revisions.json figure (the value alone without an interval)."""
    if low is None or high is None:
        return _fmt(value)
    return f"{_fmt(value)} [{_fmt(low)}, {_fmt(high)}]"


def revisions(run: Path) -> str:
    """The PM score of the SL-CAI chains' answers against the number of revision rounds,
    and each principle's effect (evaluate/revisions.json, the paper's Fig. 5)."""
    rev = Revisions.load(RunFolder(run).path("evaluate", "revisions"))
    if rev is None or not rev.rounds:
        return ""
    parts = [f"<p>The run's preference model scored the first answer and the answer in effect after each "
             f"critique/revision round of {escape(_fmt(rev.chains))} chains "
             f"(split: {escape(', '.join(rev.splits))}; at most "
             f"{escape(_fmt(rev.max_chains))} per split). A round that did not revise (no issue found, "
             "empty, or rejected by the quality gates) keeps the previous answer. Intervals: 95% bootstrap over "
             f"prompts, {escape(_fmt(rev.bootstrap))} resamples; none (–) for a number with fewer than "
             f"{escape(_fmt(rev.min_ci_prompts))} prompts behind it.</p>"]
    h = rev.pm_heldout
    if h is not None:
        verdict = ("<b>not distinguishable from chance: these scores say nothing about harmlessness</b>"
                   if h.at_chance else "above chance")
        parts.append(f"<p>The PM agrees with the held-out AI labels on {escape(_fmt(h.accuracy))} of "
                     f"{escape(_fmt(h.pairs))} pairs (Wilson 95% [{escape(_fmt(h.ci_low))}, "
                     f"{escape(_fmt(h.ci_high))}]): {verdict}.</p>")
    rows = [[r.round, r.chains, r.revised if r.round else "–", _ci(r.mean, r.mean_ci_low, r.mean_ci_high),
             _ci(r.change, r.change_ci_low, r.change_ci_high)] for r in rev.rounds]
    parts.append(_table(["rounds", "chains", "revised in this round", "mean PM score [95% CI]",
                         "change from the first answer [95% CI]"], rows, "revision-rounds"))
    parts.append(_figures(RunFolder(run).path("evaluate", "figures"), only=REVISION_PNGS))
    prow = [[p.id, p.sampled, p.revised, p.prompts, _ci(p.delta, p.delta_ci_low, p.delta_ci_high)]
            for p in rev.principles]
    if prow:
        parts.append(_table(["principle", "rounds sampled", "revisions", "prompts",
                             "mean PM change per revision [95% CI]"], prow, "revision-principles")
                     + "<p>A principle's change is the PM score after its round minus before, over the rounds "
                       "where it revised; the interval resamples prompts.</p>")
    return "".join(parts)


def _elo_ci(e: Rating | None) -> str:
    """``+12 [-40, 61]`` from a frontier entry's Elo (``–`` when it has none)."""
    if e is None or e.elo is None:
        return "–"
    if e.ci_low is None or e.ci_high is None:
        return f"{e.elo:+.0f}"
    return f"{e.elo:+.0f} [{e.ci_low:+.0f}, {e.ci_high:+.0f}]"


def _holds_zero(e: Rating | None) -> bool:
    return e is not None and e.ci_low is not None and e.ci_high is not None and e.ci_low <= 0 <= e.ci_high


def frontier(run: Path) -> str:
    """The policies rl and dpo kept along training, each scored against the initial model
    alone (evaluate/frontier.json, the paper's Fig. 2)."""
    fr = Frontier.load(RunFolder(run).path("evaluate", "frontier"))
    if fr is None or not fr.points:
        return ""
    parts = ["<p>Each policy that rl and dpo kept along training answered the held-out prompts and was compared "
             "with the initial model alone by the judge (both orders): its harmlessness and helpfulness Elo come "
             "from a two-model Bradley-Terry fit against the initial model (0), with 95% bootstrap intervals over "
             f"prompts ({escape(_fmt(fr.bootstrap))} resamples). A stage's last point is its final model; "
             "the Elo columns can differ from the evaluation table above, which fits all models together.</p>"]

    def scores(e: FrontierScores) -> list:
        ref = e.refusal or RefusalBySet()
        return [_elo_ci(e.harmlessness), _elo_ci(e.helpfulness), e.harmfulness, _refusal_cell(ref.benign),
                _refusal_cell(ref.red_team)]

    rows = [[name, "–", "–", "–", *scores(e), "reference"] for name, e in fr.reference.items()]
    scored = []
    for p in fr.points:
        e = p.scores or FrontierScores()
        if e.harmlessness or e.helpfulness:
            scored.append(e)
        status = str(p.status)
        if p.weights_deleted and status != "weights deleted":
            status += " (weights deleted)"
        rows.append([p.stage, p.step, p.samples, p.kl, *scores(e), status])
    if scored and all(_holds_zero(e.harmlessness) and _holds_zero(e.helpfulness) for e in scored):
        parts.append("<p><b>Every point's intervals hold 0 on both axes: no policy kept along training is "
                     "distinguishable from the initial model at this sample size. The figure shows noise, not a "
                     "frontier.</b></p>")
    parts.append(_figures(RunFolder(run).path("evaluate", "figures"), only=FRONTIER_PNGS))
    parts.append(_table(["stage", "step", "samples seen", "KL", "harmlessness Elo [95% CI]", "helpfulness Elo [95% CI]",
                         "harmfulness 0-4", "benign: mean p(refusal) (judge) / phrase rate",
                         "red-team: mean p(refusal) (judge) / phrase rate", "status"], rows, "frontier"))
    parts.append("<p>Samples seen: rollouts for rl, preference pairs for dpo. KL: the mean sequence KL to the "
                 "reference of that step's rollouts (rl only).</p>")
    return "".join(parts)


def quality_gates(run: Path) -> str:
    """The critique_revision stage's quality gates: what was rejected, why, and what
    happened to it (from its manifest counts)."""
    m = read_json(RunFolder(run).manifest_path("critique_revision"))
    counts = (m or {}).get("counts") or {} if isinstance(m, dict) else {}
    gate = {k: v for k, v in counts.items() if k.startswith("gate_")}
    if not gate:
        return ""
    cfg = ((m.get("config") or {}).get("critique_revision") or {}) if isinstance(m.get("config"), dict) else {}
    labels = {
        "gate_rejected": "revision attempts rejected", "gate_retries": "retries asked for",
        "gate_replaced": "rounds accepted on a retry", "gate_helpful_rejected": "helpful answers rejected",
        "gate_helpful_dropped": "helpful answers left out after retries",
        "gate_first_answer_rejected": "first answers rejected (rounds: 0, they are the SFT data)",
        "gate_first_answer_dropped": "first answers still rejected after retries (not trained on)",
    }
    rows = [[labels.get(k, "rejected texts: " + k[len("gate_"):].replace("_", " ")), v] for k, v in gate.items()]
    for k, label in (("rejected_rounds", "rounds rejected (previous answer kept)"),
                     ("prompts_without_sft_example", "prompts with no SFT example")):
        if k in counts:
            rows.append([label, counts[k]])
    note = (f"gate_retries={_fmt(cfg.get('gate_retries'))}, best_of={_fmt(cfg.get('best_of'))}. " if cfg else "")
    return (_table(["critique_revision quality gates", "count"], rows, "gates")
            + f"<p>{escape(note)}A revision is not trained on when it is empty, loops, copies its critique or the "
              "principle's requests, talks about “the assistant's response”, or only restates the prompt "
              "(reasons per text; one text can have several). The chain browser shows each rejected text and its "
              "reasons.</p>")


def _scalars(d: dict, prefix: str = "") -> list[list]:
    rows = []
    for k, v in d.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            rows.append([prefix + k, v])
        elif isinstance(v, dict) and not prefix:
            rows += _scalars(v, f"{k}.")
    return rows


def stage_details(run: Path) -> str:
    """Metrics tables and plots of the training stages (PM, SFT, RL, DPO...)."""
    parts, folder = [], RunFolder(run)
    for stage in STAGES:
        outputs = OUTPUTS.get(stage, {})
        if stage in ("evaluate", "report") or not folder.finished(stage):
            continue
        metrics = read_json(folder.path(stage, "metrics")) if "metrics" in outputs else None
        figs = _figures(folder.path(stage, "figures")) if "figures" in outputs else ""
        if not figs and not isinstance(metrics, dict):
            continue
        parts.append(f"<h3>{escape(stage)}</h3>")
        if isinstance(metrics, dict):
            rows = _scalars(metrics)
            if rows:
                parts.append(f"<details><summary>metrics.json ({len(rows)} values)</summary>"
                             f"{_table(['metric', 'value'], rows, 'metrics')}</details>")
        parts.append(figs)
    return "".join(parts)


def change(before: str | None, after: str | None) -> float:
    """How much a revision changed the answer: 1 - difflib's similarity ratio."""
    return 1.0 - difflib.SequenceMatcher(None, before or "", after or "", autojunk=False).ratio()


def principle_stats(chains: list[dict], feedback_stats: dict | None, constitution: dict | None) -> list[dict]:
    per: dict[str, dict] = {}
    texts = {}
    for p in (constitution or {}).get("principles") or []:
        texts[p.get("id")] = p.get("critique", "")
    for key in ("comparison_principles", "helpfulness_principles"):
        for p in (constitution or {}).get(key) or []:
            texts[p.get("id")] = p.get("text", "")
    for c in chains:
        latest = c.get("initial_response")
        for r in c.get("rounds") or []:
            d = per.setdefault(r.get("principle_id"), {"sampled": 0, "revised": 0, "changes": []})
            d["sampled"] += 1
            if r.get("status") == REVISED:
                d["revised"] += 1
                d["changes"].append(change(latest, r.get("revision")))
                latest = r.get("revision")
    fb = (feedback_stats or {}).get("per_principle") or {}
    out = []
    for pid in sorted(set(per) | set(fb), key=str):
        d = per.get(pid, {"sampled": 0, "revised": 0, "changes": []})
        f = fb.get(pid) or {}
        out.append({
            "id": pid, "text": texts.get(pid, ""), "kind": "critique/revision" if pid in per else "comparison",
            "sampled": d["sampled"], "revised": d["revised"],
            "mean_change": round(sum(d["changes"]) / len(d["changes"]), 4) if d["changes"] else None,
            "feedback_questions": f.get("questions"), "position_consistency": f.get("position_consistency"),
            "position_consistency_ci": f.get("position_consistency_ci"),
            # per principle, the old name (mean_abs_p_minus_half) was the one-order figure
            "decisiveness_one_order": f.get("decisiveness_one_order", f.get("mean_abs_p_minus_half")),
            "decisiveness_all_orders": f.get("decisiveness_all_orders"),
        })
    return out


def feedback_judge(stats) -> str:
    """The feedback model's reliability over all its comparisons (feedback/stats.json), with
    the at-chance warning; an older stats.json names decisiveness over both orders
    ``mean_abs_p_minus_half``."""
    if not isinstance(stats, dict) or stats.get("position_consistency") is None:
        return ""
    rel = JudgeReliability(position_consistency=stats.get("position_consistency"),
                           position_consistency_ci=stats.get("position_consistency_ci"),
                           decisiveness_all_orders=stats.get("decisiveness_all_orders",
                                                             stats.get("mean_abs_p_minus_half")))
    return (f"<p>Feedback model over all its comparisons: position consistency {escape(_consistency(rel))}, "
            f"decisiveness over both orders {escape(_fmt(rel.decisiveness_all_orders))}.</p>"
            + _at_chance(rel, "the feedback comparisons", "its preference labels carry no signal, and neither does "
                         "a PM trained on them"))


def _agreement(rate) -> str:
    """``0.75 [0.53, 0.89] of 20``: the judge's agreement with the contrast pairs' construction
    (a :func:`cai.judge_stats.rate` record); "not asked" without one."""
    if not isinstance(rate, dict) or not rate.get("n"):
        return "not asked"
    ci = rate.get("ci")
    low, high = ci if isinstance(ci, list) and len(ci) == 2 else (None, None)
    return f"{_ci(rate.get('rate'), low, high)} of {_fmt(rate.get('n'))}"


def contrast_section(stats) -> str:
    """The contrast prompts each principle gave (feedback.mode=contrast: feedback/stats.json),
    how many pairs it made and how often the feedback model, when asked, preferred the
    constructed chosen answer. Every cell is escaped: the prompts come from a constitution file."""
    if not isinstance(stats, dict) or stats.get("mode") != "contrast":
        return ""
    per = stats.get("contrast_prompts") if isinstance(stats.get("contrast_prompts"), dict) else {}
    rows = [[pid, d.get("source"), d.get("origin"), d.get("positive"), d.get("negative"), d.get("comparisons"),
             d.get("identical_pairs"), _agreement(d.get("judge_agreement"))]
            for pid, d in per.items() if isinstance(d, dict)]
    return ("<h3>Contrast pairs (RLCD, beyond the paper)</h3>"
            f"<p>feedback.mode=contrast: each pair is the policy's answers to one prompt under the principle's "
            f"positive and negative system prompt; the positive answer is chosen by construction with "
            f"p_chosen = {escape(_fmt(stats.get('contrast_label')))}. Pairs whose two answers are the same text are "
            f"left out. Judge agreement: how often the feedback model (feedback.contrast_judge) gave the "
            f"constructed chosen answer p &gt; 0.5, with its Wilson 95% interval; overall "
            f"{escape(_agreement(stats.get('judge_agreement')))}. It measures the judge and filters nothing.</p>"
            + _table(["principle", "source", "prompts from", "positive prompt", "negative prompt", "pairs",
                      "identical answers", "judge agreement [Wilson 95%]"], rows, "contrast"))


def _splits(run: Path, stage: str, name: str) -> list[dict]:
    """Both splits of a per-split output (``chains``, ``comparisons``), each record with its split."""
    out = []
    for split in ("train", "test"):
        for rec in _read_jsonl(RunFolder(run).path(stage, name, split=split)):
            out.append({**rec, "split": rec.get("split", split)})
    return out


def _load_constitution(run: Path) -> dict | None:
    import yaml

    path = RunFolder(run).path("prepare", "constitution")
    try:
        return yaml.safe_load(read_text(path, "artifact")) if path.is_file() else None
    except yaml.YAMLError:
        return None


def build_report(run_dir: str | Path) -> str:
    run = Path(run_dir)
    if not run.is_dir():
        raise CaiError(f"'{run_dir}' is not a run directory")
    manifests = stage_manifests(run)
    if not manifests:
        raise CaiError(f"'{run_dir}' has no finished stage (no <stage>/manifest.json): nothing to report")
    for m in manifests:  # what the page shows is what the stages wrote (model weights are not read here)
        verify_stage(run, m["stage"], only=REPORTED)
    chains = _splits(run, "critique_revision", "chains")
    comparisons = _splits(run, "feedback", "comparisons")
    fb_stats = read_json(RunFolder(run).path("feedback", "stats"))
    fb_stats = fb_stats if isinstance(fb_stats, dict) else None
    # in contrast mode the feedback model's own figures, when it was asked, are under "judge"
    judge_stats = fb_stats.get("judge") if fb_stats and fb_stats.get("mode") == "contrast" else fb_stats
    constitution = _load_constitution(run)
    pstats = principle_stats(chains, judge_stats if isinstance(judge_stats, dict) else None, constitution)
    contrast = contrast_section(fb_stats)
    data = {
        "chains": [{k: c.get(k) for k in ("id", "split", "category", "messages", "initial_system_prompt",
                                          "initial_response", "rounds", "final_response", "revised", "trained_on")}
                   for c in chains],
        "comparisons": [{k: c.get(k) for k in ("id", "split", "source", "category", "prompt", "response_a",
                                               "response_b", "principle_ids", "queries", "p_a", "p_a_unclamped",
                                               "position_consistent", "status")} for c in comparisons],
        "principles": pstats,
    }
    blob = safe_json(data)
    script = (HERE / "report.js").read_text(encoding="utf-8")
    nonce = hashlib.sha256((blob + script).encode()).hexdigest()[:24]
    prow = []
    for p in pstats:
        rel = JudgeReliability(position_consistency=p["position_consistency"],
                               position_consistency_ci=p["position_consistency_ci"])
        prow.append([p["id"], p["kind"], p["sampled"], p["revised"], p["mean_change"], p["feedback_questions"],
                     _consistency(rel), p["decisiveness_one_order"], p["decisiveness_all_orders"],
                     "AT CHANCE" if rel.judged_at_chance else "–" if not p["position_consistency_ci"] else
                     "above chance"])
    principles = (_table(["principle", "kind", "sampled (rounds)", "revised", "mean change (1 − difflib ratio)",
                          "feedback questions", "position consistency [Wilson 95%]", "decisiveness, one order",
                          "decisiveness over both orders", "feedback judge"], prow, "principles")
                  + feedback_judge(judge_stats)
                  + "<p>Change is 1 − <code>difflib.SequenceMatcher.ratio()</code> between the answer before and "
                    "after each revision under the principle. Position consistency: how often the feedback model "
                    "preferred the same answer in both orders (feedback/stats.json); at chance unless its interval's "
                    "lower bound is above 0.5. Decisiveness, one order: mean |p − 0.5| of each question on its own; "
                    "over both orders: |p − 0.5| of p averaged over the two orders.</p>") if pstats else ""
    sections = [
        ("timeline", "Stage timeline", timeline(manifests)),
        ("expand", "Red-team prompt expansion", expansion(run)),
        ("evaluation", "Evaluation", evaluation(run)),
        ("frontier", "Harmlessness vs helpfulness along training", frontier(run)),
        ("revisions", "PM score vs revisions", revisions(run)),
        ("gates", "SL-CAI quality gates", quality_gates(run)),
        ("training", "Training stages", stage_details(run)),
        ("principles", "Principles", contrast + principles),
        ("chains", f"Critique/revision chains ({len(chains)})", _browser("chains") if chains else ""),
        ("comparisons", f"AI comparisons ({len(comparisons)})", _browser("comparisons") if comparisons else ""),
    ]
    nav = " · ".join(f'<a href="#{sid}">{escape(title)}</a>' for sid, title, body in sections if body)
    body = "".join(f'<section id="{sid}"><h2>{escape(title)}</h2>{html}</section>' for sid, title, html in sections if html)
    csp = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'nonce-{nonce}'; "
           "base-uri 'none'; form-action 'none'")
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>cai report: {escape(run.resolve().name)}</title>"
        f"<style>{(HERE / 'report.css').read_text(encoding='utf-8')}</style></head><body>"
        f"<header><h1>cai audit report</h1><p><code>{escape(str(run.resolve()))}</code> · generated {now}</p>"
        f"<nav>{nav}</nav></header><main>{body}</main>"
        f'<script type="application/json" id="cai-data" nonce="{nonce}">{blob}</script>'
        f'<script nonce="{nonce}">{script}</script></body></html>\n'
    )


def _browser(kind: str) -> str:
    """The controls of a browser; report.js fills its list."""
    return (
        f'<div class="controls" data-kind="{kind}">'
        f'<input type="search" id="{kind}-search" placeholder="search text…" aria-label="search {kind}">'
        f'<select id="{kind}-principle" aria-label="filter {kind} by principle"><option value="">all principles</option></select>'
        f'<select id="{kind}-split" aria-label="filter {kind} by split"><option value="">all splits</option>'
        '<option>train</option><option>test</option></select>'
        f'<span class="count" id="{kind}-count"></span></div><div class="list" id="{kind}-list"></div>'
        f'<button type="button" class="more" id="{kind}-more" hidden>show more</button>'
    )


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    html = build_report(run_dir)  # first: a bad RUN_DIR must not gain a report/ folder
    path = Path(out) if out else RunFolder(run_dir).path("report", "page")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path
