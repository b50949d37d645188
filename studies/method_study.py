"""The dose-response study of the method on the embedded model (docs/method-study.md).

Each row is one `cai run` in its own run directory under ``--root``: the cpu-full preset
with a few settings changed. A row whose early stages are the same as another row's
starts from a copy of that row's finished stages (hard links for the artifacts, a copy of
the request cache), so shared work is done once; every row resumes where it stopped,
because `cai run` does. `compare` evaluates the final model of every finished row beside
the initial model in one evaluate run (evaluate.extra_models), so all rows are measured on
the same held-out prompts with the same judge; the pairwise Elo compares every row with two
anchors only, the initial model and the preset's own row (PRESET_ROW; evaluate.anchors), so
a row added to the study costs the judge a fixed number of comparisons, not one per row
(`compare evaluate.anchors=all` compares every pair, as before); `table` writes the
markdown table.

    python studies/method_study.py run                 # every row, in order (hours)
    python studies/method_study.py run sl-2r-2e dpo-sl  # some rows
    python studies/method_study.py compare             # after the rows
    python studies/method_study.py table               # prints the table
    python studies/method_study.py samples dpo-sl      # 10 seeded before/after answers
    python studies/method_study.py commands            # the cai command of every row
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SL = "stages=[prepare, critique_revision, sft]"


@dataclass
class Row:
    name: str
    what: str
    overrides: list[str]
    parent: str | None = None  # a row whose finished stages this one starts from
    cache_from: str | None = None  # a row whose request cache this one starts from (no stages)
    preset: str = "cpu-full"
    columns: dict = field(default_factory=dict)


ROWS = [
    Row("tiny", "the default preset (cpu-tiny): 12 prompts, 1 round, SFT 1 epoch, RLOO 6 steps", [
        "stages=[prepare, critique_revision, sft, feedback, preference_model, rl]"], preset="cpu-tiny"),
    Row("sl-1r-1e", "SL-CAI: 132 prompts, 1 round, 1 epoch, gates on",
        [SL, "critique_revision.rounds=1", "sft.epochs=1"], cache_from="sl-2r-2e"),
    Row("sl-2r-2e", "SL-CAI: 132 prompts, 2 rounds, 2 epochs, gates on", [SL]),
    Row("sl-2r-2e-nogates", "as sl-2r-2e, quality gates off (the paper's data)",
        [SL, "critique_revision.quality_gates=false"], cache_from="sl-2r-2e"),
    Row("sl-2r-2e-nohelp", "as sl-2r-2e, no helpful answers mixed into SFT",
        [SL, "critique_revision.helpful_ratio=0"], cache_from="sl-2r-2e"),
    Row("sl-2r-2e-direct", "ablation: direct revision, no critique (paper Fig. 7)",
        [SL, "critique_revision.critique=false"], cache_from="sl-2r-2e"),
    Row("dpo-sl", "sl-2r-2e, then DPO on revision > first answer (cpu-full)",
        ["stages=[prepare, critique_revision, sft, dpo]"], parent="sl-2r-2e"),
    Row("dpo-fb", "sl-2r-2e, then DPO on the AI-feedback pairs (soft labels)",
        ["stages=[prepare, critique_revision, sft, feedback, dpo]", "dpo.data=feedback"], parent="sl-2r-2e"),
    Row("rloo", "sl-2r-2e, then RLOO 24 steps against the soft-label PM",
        ["stages=[prepare, critique_revision, sft, feedback, preference_model, rl]"], parent="dpo-fb"),
    Row("rl-hard-pm", "ablation: as rloo, PM trained on hard labels",
        ["stages=[prepare, critique_revision, sft, feedback, preference_model, rl]", "preference_model.loss=hard"],
        parent="dpo-fb"),
    Row("rl-cot", "ablation: as rloo, chain-of-thought labels clamped to [0.4, 0.6]",
        ["stages=[prepare, critique_revision, sft, feedback, preference_model, rl]",
         "feedback.chain_of_thought=true", "feedback.cot_clamp=[0.4, 0.6]"], parent="sl-2r-2e"),
    Row("rl-cot-unclamped", "ablation: as rl-cot, labels not clamped",
        ["stages=[prepare, critique_revision, sft, feedback, preference_model, rl]",
         "feedback.chain_of_thought=true", "feedback.cot_clamp=[0.0, 1.0]"], parent="rl-cot"),
    Row("direct-dpo", "sl-2r-2e-direct, then DPO on revision > first answer",
        ["stages=[prepare, critique_revision, sft, dpo]", "critique_revision.critique=false"],
        parent="sl-2r-2e-direct"),
    Row("direct-1e", "as sl-2r-2e-direct, 1 SFT epoch",
        [SL, "critique_revision.critique=false", "sft.epochs=1"], parent="sl-2r-2e-direct"),
    Row("direct-1e-dpo", "direct-1e, then DPO on revision > first answer",
        ["stages=[prepare, critique_revision, sft, dpo]", "critique_revision.critique=false", "sft.epochs=1"],
        parent="direct-1e"),
    # Feedback without a capable judge (issue 34): levers that do not ask the 135M model to judge.
    Row("contrast-dpo", "sl-2r-2e, then DPO on contrast pairs (RLCD: labelled by construction, judge agreement kept)",
        ["stages=[prepare, critique_revision, sft, feedback, dpo]", "dpo.data=feedback", "feedback.mode=contrast",
         "feedback.contrast_judge=true"], parent="sl-2r-2e"),
    Row("contrast-rloo", "contrast-dpo's pairs, then a PM and RLOO 24 steps against it",
        ["stages=[prepare, critique_revision, sft, feedback, preference_model, rl]", "feedback.mode=contrast",
         "feedback.contrast_judge=true"], parent="contrast-dpo"),
    Row("context-distill", "context distillation: first answers under the constitution's system prompt, SFT "
        "without it, no revisions", [SL, "critique_revision.system_prompt=constitution", "critique_revision.rounds=0"],
        cache_from="sl-2r-2e"),
    Row("judge-rloo", "sl-2r-2e, then RLOO 24 steps with the judge as the reward (direct RLAIF), no PM",
        ["stages=[prepare, critique_revision, sft, rl]", "rl.reward=judge"], parent="sl-2r-2e"),
]
BY_NAME = {r.name: r for r in ROWS}
#: The row that is the cpu-full preset as shipped (sl-2r-2e, then DPO on revision > first
#: answer: the preset's stages and nothing else changed). With the initial model it is an
#: anchor of `compare`: every row meets those two in the Elo comparisons and no other row.
PRESET_ROW = "dpo-sl"


def command(row: Row, root: Path) -> list[str]:
    return [sys.executable, "-m", "cai", "run", "--config", row.preset, f"run_dir={root / row.name}", *row.overrides]


def seed_from_parent(row: Row, root: Path) -> None:
    """Start ``row`` from its parent's finished stages: artifacts are hard-linked (cai never
    writes a finished file in place), the request cache is copied. A row with ``cache_from``
    starts from that row's request cache only: its stages run anew, and every request they
    share with the other row (the same first answers, the same round-1 critiques...) is
    read from the cache instead of generated."""
    donor = row.parent or row.cache_from
    dest, src = root / row.name, root / donor
    if dest.exists() or not src.is_dir():
        return
    dest.mkdir(parents=True)
    if row.parent:
        for stage in src.iterdir():
            if stage.is_dir() and (stage / "manifest.json").is_file():
                shutil.copytree(stage, dest / stage.name, copy_function=os.link)
    if (src / "cache.sqlite").is_file():
        shutil.copy2(src / "cache.sqlite", dest / "cache.sqlite")


def run_rows(names: list[str], root: Path) -> int:
    for name in names:
        row = BY_NAME[name]
        donor = row.parent or row.cache_from
        if donor:
            if not (root / donor / "config.yaml").is_file():
                print(f"[study] {name}: run {donor} first", flush=True)
                return 2
            seed_from_parent(row, root)
        print(f"[study] {name}: {' '.join(command(row, root)[2:])}", flush=True)
        started = time.time()
        code = subprocess.call(command(row, root))
        print(f"[study] {name}: exit {code} after {time.time() - started:.0f}s", flush=True)
        if code != 0:
            return code
    return 0


def stages_of(row: Row) -> list[str]:
    """The stages a row's ``stages=[...]`` override lists (read as YAML, as cai reads it)."""
    import yaml

    for o in row.overrides:
        if o.startswith("stages="):
            return yaml.safe_load(o[len("stages="):])
    return []


def final_model(run: Path, row: Row | None = None) -> Path | None:
    """The row's final model (rl, else dpo, else sft), once every stage the row runs has
    finished: a row started from its parent's stages holds the parent's sft model before
    its own stages are done, and is not yet a row of its own."""
    if row is not None and not all((run / s / "manifest.json").is_file() for s in stages_of(row)):
        return None
    for stage in ("rl", "dpo", "sft"):
        if (run / stage / "model" / "config.json").is_file():
            return run / stage / "model"
    return None


def compare_command(root: Path, models: dict[str, str], extra: list[str]) -> list[str]:
    """The evaluate run over the rows' final models (name -> folder): the anchors are the
    initial model and PRESET_ROW when it is finished (else the initial model alone), so each
    row costs the judge two comparisons per prompt, whatever the number of rows. ``extra``
    overrides come last and win (``evaluate.anchors=all``: every pair)."""
    mapping = "{" + ", ".join(f"{k}: {v}" for k, v in models.items()) + "}"
    anchors = ["initial"] + ([PRESET_ROW] if PRESET_ROW in models else [])
    return [sys.executable, "-m", "cai", "run", "--config", "cpu-full", f"run_dir={root / 'compare'}",
            "stages=[prepare, evaluate, report]", f"evaluate.extra_models={mapping}",
            f"evaluate.anchors=[{', '.join(anchors)}]", *extra]


def compare(root: Path, extra: list[str]) -> int:
    models = {r.name: str(m) for r in ROWS if (m := final_model(root / r.name, r))}
    if not models:
        print("[study] no finished row to compare", flush=True)
        return 2
    cmd = compare_command(root, models, extra)
    print("[study] compare: " + " ".join(cmd[2:]), flush=True)
    return subprocess.call(cmd)


def stage_seconds(run: Path, parent: Path | None = None) -> float:
    """Wall seconds of the row's own stages: a stage hard-linked from the parent row's
    folder counts in the parent."""
    total = 0.0
    for m in run.glob("*/manifest.json"):
        theirs = parent / m.parent.name / "manifest.json" if parent is not None else None
        if theirs is not None and theirs.is_file() and os.path.samefile(m, theirs):
            continue
        total += json.loads(m.read_text()).get("seconds", 0.0)
    return total


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def table(root: Path, evaluate: Path | None = None) -> str:
    """The results table of ``compare``'s evaluate run, or of any run's ``evaluate`` folder
    (a run's own models: initial, sl-cai, final...)."""
    from cai.evaluation.results import Results

    path = (evaluate or root / "compare" / "evaluate") / "results.json"
    res = Results.load(path)
    if res is None:
        raise SystemExit(f"{path}: no such file; run `compare` first, or name an evaluate folder with --evaluate")
    lines = ["| row | what | red-team safe (judge) | red-team refusal (phrases) | benign over-refusal (judge / phrases) "
             "| degenerate (red-team / benign / helpful) | helpfulness Elo [95% CI] | harmlessness Elo [95% CI] "
             "| stage time (s) |", "|" + "---|" * 9]
    names = ["initial", *[r.name for r in ROWS]] if evaluate is None else list(res.refusal)
    for name in names:
        if name not in res.refusal:
            continue
        what = "the embedded model before training" if name == "initial" else (
            BY_NAME[name].what if name in BY_NAME and evaluate is None else f"this run's {name} model")
        rt, bn = res.refusal[name].red_team, res.refusal[name].benign
        safe = res.safe[name].red_team if name in res.safe else None
        hel, hrm = (t.ratings.get(name) if t else None for t in (res.elo.helpfulness, res.elo.harmlessness))
        fmt = lambda r: "-" if not r else f"{r.elo:+.0f} [{r.ci_low}, {r.ci_high}]"  # noqa: E731
        q = res.quality[name]
        row = BY_NAME.get(name) if evaluate is None else None
        parent = root / row.parent if row is not None and row.parent else None
        secs = "-" if row is None else f"{stage_seconds(root / name, parent):.0f}"
        lines.append(
            f"| {name} | {what} | {_pct(safe.judge_majority if safe else None)} | {_pct(rt.phrases)} "
            f"| {_pct(bn.judge_majority)} / {_pct(bn.phrases)} "
            f"| {_pct(q.red_team.degenerate)} / {_pct(q.benign.degenerate)} / "
            f"{_pct(q.helpful.degenerate)} | {fmt(hel)} | {fmt(hrm)} | {secs} |"
        )
    lines.append(f"\nmean harmfulness (0-4, judge): " + ", ".join(f"{k} {v.mean}" for k, v in res.harmfulness.items()))
    design = next((t.design for t in (res.elo.helpfulness, res.elo.harmlessness) if t and t.design), None)
    if design is not None:
        lines.append(f"\nElo design: {design.kind} ({', '.join(design.anchors)}): every other row met the anchors "
                     "only, so its Elo and interval are measured against them, and the gap between two such rows "
                     "is inferred through the anchors, not compared head to head.")
    return "\n".join(lines)


def _counts(run: Path, stage: str) -> dict:
    m = run / stage / "manifest.json"
    return json.loads(m.read_text()).get("counts", {}) if m.is_file() else {}


def levers(root: Path) -> str:
    """What each row's training had to learn from: the share of its SFT revisions that
    contain a refusal phrase (the same list evaluate uses), how many revisions the quality
    gates rejected, the AI-feedback labels' position consistency and distance from 0.5, the
    PM's held-out accuracy, DPO's held-out reward accuracy. It shows where a lever stops: a
    model cannot learn to refuse from data that rarely does."""
    from cai.io import read_jsonl
    from cai.evaluation.measures import refusal_phrase

    lines = ["| row | first answers with a refusal phrase | SFT revisions with a refusal phrase "
             "| revisions the gates rejected (retried, replaced) | feedback position consistency "
             "| feedback decisiveness over both orders | PM held-out accuracy (before → after) "
             "| DPO held-out reward accuracy (data) | RL held-out PM reward (before → after, KL) |", "|" + "---|" * 9]
    for row in ROWS:
        run = root / row.name
        if final_model(run, row) is None:
            continue
        sft = run / "critique_revision" / "sft" / "train.jsonl"
        revs = [r for r in (read_jsonl(sft) if sft.is_file() else []) if r.get("source") == "revision"]
        refused = sum(1 for r in revs if refusal_phrase(r["messages"][-1]["content"]))
        chains_file = run / "critique_revision" / "chains" / "train.jsonl"
        chains = read_jsonl(chains_file) if chains_file.is_file() else []
        first = sum(1 for c in chains if refusal_phrase(c.get("initial_response") or ""))
        own = set(stages_of(row))  # a stage hard-linked from the parent but not in this row's list is not its lever
        cr, pm, dpo, rl = (_counts(run, s) if s in own else {} for s in ("critique_revision", "preference_model",
                                                                          "dpo", "rl"))
        fb_file = run / "feedback" / "stats.json"
        fb = json.loads(fb_file.read_text()) if fb_file.is_file() and "feedback" in own else {}
        gates = (f"{cr['gate_rejected']} ({cr.get('gate_retries', 0)}, {cr.get('gate_replaced', 0)})"
                 if "gate_rejected" in cr else "-")
        lines.append(
            f"| {row.name} | {first} / {len(chains)} ({_pct(first / len(chains) if chains else None)}) "
            f"| {refused} / {len(revs)} ({_pct(refused / len(revs) if revs else None)}) | {gates} "
            f"| {_pct(fb.get('position_consistency'))} | {fb.get('decisiveness_all_orders', fb.get('mean_abs_p_minus_half', '-'))} "
            + (f"| {_pct(pm['test_accuracy_before'])} → {_pct(pm['test_accuracy'])} " if pm else "| - ")
            + (f"| {_pct(dpo['test_reward_accuracy'])} ({dpo['data']}) " if dpo else "| - ")
            + (f"| {rl['eval_reward_before']:.3f} → {rl['eval_reward_after']:.3f}, {rl['eval_kl_after']:.3f} |"
               if "eval_reward_after" in rl else "| - |"))
    return "\n".join(lines)


def md_text(text: str) -> str:
    """Model output as inert markdown: one line (line breaks shown as " / "), and every
    character that markdown or HTML would read as markup escaped (an unclosed code fence
    in an answer would otherwise swallow the rest of the page)."""
    line = " / ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return "".join("\\" + c if c in "\\`*_[]<>#|~!{}()" else c for c in line)


def samples(root: Path, row: str, n: int = 10, seed: int = 0, evaluate: Path | None = None) -> str:
    """``n`` held-out prompts drawn by a seeded random draw over the red-team, benign and
    helpful test sets (not picked by hand), with the initial model's and ``row``'s answers."""
    import random

    answers = (evaluate or root / "compare" / "evaluate") / "answers"
    from cai.io import read_jsonl  # not splitlines(): an answer may hold U+2028

    before = {(r["set"], r["id"]): r for r in read_jsonl(answers / "initial.jsonl")}
    after = {(r["set"], r["id"]): r for r in read_jsonl(answers / f"{row}.jsonl")}
    keys = sorted(set(before) & set(after))
    out = [f"{n} answers drawn with random.Random({seed}).sample over {len(keys)} held-out prompts; "
           f"before = the initial model, after = {row}\n"]
    for k in random.Random(seed).sample(keys, min(n, len(keys))):
        b, a = before[k], after[k]
        tag = lambda r: f"safe {r['safe']['p_judge']:.2f}" if "safe" in r else (  # noqa: E731
            f"refusal {r['refusal']['p_judge']:.2f}" if "refusal" in r else "")
        out.append(f"**{k[0]} / {k[1]}**: {md_text(b['prompt'][-1]['content'])}\n")
        shown = lambda r: f" ({tag(r)})" if tag(r) else ""  # noqa: E731
        out.append(f"- before{shown(b)}: {md_text(b['answer'])}")
        out.append(f"- after{shown(a)}: {md_text(a['answer'])}\n")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("run", "compare", "table", "samples", "commands"))
    p.add_argument("rows", nargs="*", help="rows to run (default: all), or extra overrides for compare")
    p.add_argument("--root", default="runs/study", help="folder holding one run directory per row")
    p.add_argument("--evaluate", type=Path, help="table/samples: read this evaluate folder "
                   "(e.g. runs/cpu-full/evaluate) instead of the study's compare run")
    a = p.parse_intermixed_args(argv)  # `run --root DIR row...`: options may sit among the rows
    root = Path(a.root)
    if a.action == "run":
        unknown = [n for n in a.rows if n not in BY_NAME]
        if unknown:
            p.error(f"unknown rows {unknown}; rows: {', '.join(BY_NAME)}")
        return run_rows(a.rows or list(BY_NAME), root)
    if a.action == "compare":
        return compare(root, a.rows)
    if a.action == "table":
        print(table(root, a.evaluate))
        if a.evaluate is None:
            print("\n" + levers(root))
        return 0
    if a.action == "samples":
        print(samples(root, a.rows[0] if a.rows else "dpo-sl", evaluate=a.evaluate))
        return 0
    for r in ROWS:
        start = (f" (starts from {r.parent}'s finished stages)" if r.parent
                 else f" (starts from {r.cache_from}'s request cache)" if r.cache_from else "")
        print(f"# {r.name}: {r.what}{start}")
        print("python " + " ".join(command(r, root)[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
