"""The report's section on the ``expand`` stage: what was generated, kept and dropped (and
why), with samples. Every text is model output: it goes through ``html.escape``."""

from __future__ import annotations

import json
import random
from html import escape
from pathlib import Path

from cai.io import read_jsonl
from cai.layout import RunFolder

#: Samples shown: kept prompts, and dropped ones per reason (a seeded draw, the same on every build).
KEPT_SAMPLES = 20
DROPPED_SAMPLES = 5


def _fmt(v) -> str:
    return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _rows(rows: list[list]) -> str:
    return "".join("<tr>" + "".join(f"<td>{escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)


def _table(head: list[str], rows: list[list], cls: str) -> str:
    return (f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{escape(h)}</th>" for h in head)
            + f"</tr></thead><tbody>{_rows(rows)}</tbody></table>")


def expansion(run: Path) -> str:
    folder = RunFolder(run)
    stats_file, kept_file = folder.path("expand", "stats"), folder.path("expand", "prompts", split="train")
    dropped_file = folder.path("expand", "dropped")
    if not folder.finished("expand") or not stats_file.is_file():
        return ""
    stats = json.loads(stats_file.read_text(encoding="utf-8"))
    kept = read_jsonl(kept_file) if kept_file.is_file() else []
    dropped = read_jsonl(dropped_file) if dropped_file.is_file() else []
    th = stats.get("thresholds") or {}
    parts = [
        f"<p>{escape(_fmt(stats.get('generated')))} new red-team prompts generated from "
        f"{escape(_fmt(stats.get('seeds')))} seed prompts in {escape(_fmt(stats.get('requests')))} requests; "
        f"{escape(_fmt(stats.get('kept')))} kept and added to the red-team train split. Near-copy threshold "
        f"{escape(_fmt(th.get('near')))} (Jaccard), paraphrase threshold {escape(_fmt(th.get('paraphrase')))} "
        f"(cosine of <code>{escape(str(stats.get('embed_model')))}</code>'s hidden states); the filter model "
        f"<code>{escape(str(stats.get('filter_model')))}</code> keeps p(plausible) ≥ "
        f"{escape(_fmt(th.get('min_plausible')))} and p(needs care) ≥ {escape(_fmt(th.get('min_care')))}.</p>",
        _table(["outcome", "count"], [["kept", stats.get("kept")]]
               + [[f"dropped: {r}", n] for r, n in (stats.get("dropped_by_reason") or {}).items()], "expand-counts"),
    ]
    rng = random.Random(0)
    sample = sorted(rng.sample(range(len(kept)), min(KEPT_SAMPLES, len(kept))))
    if sample:
        parts.append(f"<h3>Kept prompts ({len(sample)} of {len(kept)}, a seeded random draw)</h3>")
        parts.append(_table(["id", "category", "prompt", "p(plausible)", "p(needs care)", "seed ids"],
                            [[kept[i].get("id"), kept[i].get("category"), kept[i].get("prompt"),
                              kept[i].get("p_plausible"), kept[i].get("p_care"),
                              ", ".join(map(str, kept[i].get("seed_ids") or []))] for i in sample], "expand-kept"))
    by_reason: dict[str, list[dict]] = {}
    for d in dropped:
        by_reason.setdefault(str(d.get("reason")), []).append(d)
    rows = []
    for reason, ds in by_reason.items():
        for i in sorted(rng.sample(range(len(ds)), min(DROPPED_SAMPLES, len(ds)))):
            d = ds[i]
            detail = d.get("detail") or {}
            why = ", ".join(f"{k}={_fmt(v)}" for k, v in detail.items())
            rows.append([reason, d.get("prompt"), why, d.get("p_plausible"), d.get("p_care")])
    if rows:
        parts.append(f"<h3>Dropped (up to {DROPPED_SAMPLES} per reason)</h3>"
                     + _table(["reason", "text", "detail", "p(plausible)", "p(needs care)"], rows, "expand-dropped"))
    return "".join(parts)
