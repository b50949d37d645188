"""The audit report: built from whatever stages exist, safe against hostile model text
(checked in the page source and in real headless Chromium), searchable and filterable."""

import json

import pytest

from cai.cli import main
from cai.io import write_json, write_jsonl
from cai.report import build_report, safe_json, write_report
from cai.report.browser import find_chromium

# Each payload would set window.__pwned or change the title if it ever ran.
PAYLOADS = [
    "<script>window.__pwned = 1; document.title = 'pwned'</script>",
    "</script><script>window.__pwned = 2; document.title = 'pwned'</script>",
    "<img src=x onerror=\"window.__pwned = 3; document.title = 'pwned'\">",
    "<!-- <script>window.__pwned = 4</script> \u2028 \u2029 &amp; &lt;",
]
EVIL = " ".join(PAYLOADS)


def _manifest(run, stage, seconds, counts):
    (run / stage).mkdir(parents=True, exist_ok=True)
    write_json(run / stage / "manifest.json", {"stage": stage, "status": "complete", "seconds": seconds,
                                               "started": f"2025-01-01T00:00:0{len(stage) % 10}+00:00",
                                               "counts": counts})


def make_run(run, chains=6, comparisons=4, evil=True):
    """A run directory with prepare + critique_revision (+ feedback): chains and comparisons
    whose answers, critiques and principle texts carry script payloads."""
    bad = EVIL if evil else "plain"
    _manifest(run, "prepare", 1.5, {"principles": 2, "note": bad})
    (run / "prepare" / "constitution.yaml").write_text(
        "name: evil\nprinciples:\n"
        f"  - {{id: harmful-general, critique: {json.dumps('Critique ' + bad)}, revision: 'Revise.'}}\n"
        f"  - {{id: {json.dumps('evil<script>x</script>')}, critique: {json.dumps(bad)}, revision: 'Revise.'}}\n"
        "comparison_principles:\n  - {id: less-harmful, text: 'Which is less harmful?'}\n", encoding="utf-8")
    _manifest(run, "critique_revision", 12.0, {"chains_train": chains, "gate_rejected": 1, "gate_retries": 1,
                                               "gate_loops": 1, "gate_replaced": 1, "prompts_without_sft_example": 0})
    rows = []
    for k in range(chains):
        pid = "harmful-general" if k % 2 == 0 else "evil<script>x</script>"
        rows.append({
            "id": f"rt-{k}", "category": "violence", "messages": [{"role": "user", "content": f"prompt {k} {bad}"}],
            "initial_response": f"first answer {k} {bad}", "final_response": f"revised answer {k} banana" if k == 3 else f"revised {k}",
            "revised": True,
            "rounds": [{"round": 1, "principle_id": pid, "critique_request": "c?", "critique": f"critique {k} {bad}",
                        "revision_request": "r?", "revision": f"revised answer {k} banana" if k == 3 else f"revised {k}",
                        "status": "revised", "reasons": [],
                        # a rejected first try (quality gates) and best-of-n samples, hostile too
                        "attempts": [{"principle_id": pid, "critique": f"first critique {bad}",
                                      "revision": f"rejected try {k} {bad}", "reasons": ["loops", bad]}] if k == 1 else [],
                        "candidates": [{"revision": f"other sample {k} {bad}", "reasons": [], "p_better": 0.25}]
                        if k == 2 else []}],
            "trained_on": None if k == 4 else "revision",
        })
    (run / "critique_revision" / "chains").mkdir(parents=True, exist_ok=True)
    write_jsonl(run / "critique_revision" / "chains" / "train.jsonl", rows[: chains - 1])
    write_jsonl(run / "critique_revision" / "chains" / "test.jsonl", rows[chains - 1:])
    if comparisons:
        _manifest(run, "feedback", 5.0, {"comparisons": comparisons})
        (run / "feedback" / "comparisons").mkdir(parents=True)
        write_jsonl(run / "feedback" / "comparisons" / "train.jsonl", [{
            "id": f"rt-{k}/0-1", "split": "train", "source": "harmlessness", "prompt": [{"role": "user", "content": bad}],
            "response_a": f"answer A {bad}", "response_b": f"answer B {k}", "principle_ids": ["less-harmful"],
            "queries": [{"principle_id": "less-harmful", "k": 0, "order": "ab", "p_first": 0.7, "p_a": 0.7,
                         "reasoning": bad},
                        {"principle_id": "less-harmful", "k": 0, "order": "ba", "p_first": 0.4, "p_a": 0.6}],
            "p_a": 0.65, "p_a_unclamped": 0.65, "position_consistent": [True], "status": "labelled",
        } for k in range(comparisons)])
        write_json(run / "feedback" / "stats.json", {"per_principle": {
            "less-harmful": {"questions": 2 * comparisons, "position_consistency": 1.0, "mean_abs_p_minus_half": 0.15}}})
    return run


def test_safe_json_is_inert_inside_a_script_element():
    text = safe_json({"a": EVIL})
    for bad in ("<", ">", "&", "\u2028", "\u2029"):
        assert bad not in text
    assert json.loads(text) == {"a": EVIL}


def test_page_source_has_no_live_payload(tmp_path):
    html = build_report(make_run(tmp_path / "run"))
    assert html.count("<script") == 2  # our JSON data and our code, nothing else
    assert "</script><script>window" not in html and "<img src=x" not in html
    assert "&lt;img src=x onerror=" in html  # the counts and the principle table show it, escaped
    assert "Content-Security-Policy" in html and "'unsafe-inline'" not in html.split("script-src")[1].split(";")[0]
    assert 'id="timeline"' in html and 'id="chains"' in html and 'id="comparisons"' in html
    assert 'id="evaluation"' not in html  # no evaluate stage: no empty section
    assert 'id="gates"' in html and "rejected texts: loops" in html


def test_contrast_prompts_show_per_principle_escaped_and_the_judge_from_its_own_figures(tmp_path):
    """feedback.mode=contrast: a table of each principle's two prompts (from a constitution
    file: hostile), its pairs and the judge's agreement; the judge's reliability comes from
    stats.json's "judge"."""
    run = make_run(tmp_path / "run")
    agreement = {"k": 3, "n": 4, "rate": 0.75, "ci": [0.3, 0.95], "too_small": True}
    write_json(run / "feedback" / "stats.json", {
        "mode": "contrast", "comparisons": 4, "labelled": 4, "identical_pairs": 0, "contrast_label": 0.85,
        "judge_agreement": agreement,
        "contrast_prompts": {"evil<b>id</b>": {
            "source": "harmlessness", "origin": "constitution", "positive": f"Be kind {EVIL}",
            "negative": f"Be cruel {EVIL}", "comparisons": 4, "identical_pairs": 0, "judge_agreement": agreement}},
        "judge": {"position_consistency": 0.25, "position_consistency_ci": [0.05, 0.7], "decisiveness_all_orders": 0.02,
                  "per_principle": {"less-harmful": {"questions": 8, "position_consistency": 0.25,
                                                     "position_consistency_ci": [0.05, 0.7]}}},
    })
    html = build_report(run)
    assert html.count("<script") == 2 and "<img src=x" not in html and "evil<b>" not in html
    assert "Be kind &lt;script&gt;window.__pwned = 1" in html and "Be cruel &lt;script&gt;window.__pwned = 1" in html
    assert "Contrast pairs (RLCD, beyond the paper)" in html and "p_chosen = 0.85" in html
    assert html.count("0.75 [0.3, 0.95] of 4") == 2  # overall and the principle's row
    assert "Feedback model over all its comparisons: position consistency 0.25 [0.05, 0.7]" in html
    without_judge = json.loads((run / "feedback" / "stats.json").read_text()) | {"judge": None}
    without_judge["judge_agreement"] = {"k": 0, "n": 0, "rate": None, "ci": None, "too_small": True}
    write_json(run / "feedback" / "stats.json", without_judge)
    html = build_report(run)
    assert "overall not asked" in html and "Feedback model over all its comparisons" not in html


def test_a_run_with_only_prepare_and_critique_revision_gets_a_report(tmp_path, capsys):
    run = make_run(tmp_path / "run", comparisons=0, evil=False)
    assert main(["report", str(run)]) == 0
    page = (run / "report" / "index.html").read_text()
    assert "critique_revision" in page and 'id="comparisons"' not in page
    assert "harmful-general" in page  # the per-principle statistics
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_principle_statistics_measure_how_much_revisions_change_answers():
    from cai.report.build import change, principle_stats

    assert change("abc", "abc") == 0.0 and change("", "xyz") == 1.0
    chains = [{"initial_response": "aaaa", "rounds": [
        {"principle_id": "p", "status": "revised", "revision": "aaaa"},
        {"principle_id": "q", "status": "revised", "revision": "bbbb"},
        {"principle_id": "p", "status": "skipped_no_issue", "revision": None}]}]
    stats = {s["id"]: s for s in principle_stats(chains, {"per_principle": {"q": {"position_consistency": 0.5}}}, None)}
    assert stats["p"]["sampled"] == 2 and stats["p"]["revised"] == 1 and stats["p"]["mean_change"] == 0.0
    assert stats["q"]["mean_change"] == 1.0 and stats["q"]["position_consistency"] == 0.5


requires_chromium = pytest.mark.skipif(find_chromium() is None, reason="no Chromium on this machine (apt-get install chromium); .ci/run installs it")


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the Playwright driver is not installed (pip install playwright); .ci/run installs it")
    return sync_playwright


@pytest.mark.slow
@requires_chromium
@pytest.mark.parametrize("bypass_csp", [False, True], ids=["with-csp", "escaping-alone"])
def test_hostile_text_never_runs_in_chromium_and_the_browsers_work(tmp_path, bypass_csp):
    """Opens the page in headless Chromium. With ``bypass_csp`` the page's
    Content-Security-Policy is switched off, so the escaping alone must hold."""
    from cai.report.browser import CHROMIUM_ARGS

    path = write_report(make_run(tmp_path / "run"))
    sync_playwright = _playwright()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_chromium(), headless=True, args=CHROMIUM_ARGS)
        ctx = browser.new_context(bypass_csp=bypass_csp)
        page = ctx.new_page()
        errors, dialogs = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        assert page.evaluate("window.__pwned") is None
        assert page.title().startswith("cai report") and not dialogs and not errors
        assert page.locator("#chains-list .item").count() == 6
        assert page.locator("#comparisons-list .item").count() == 4
        # the payload is shown as text, verbatim
        first = page.locator("#chains-list .item").first.inner_text()
        assert "<img src=x onerror=" in first and "</script><script>" in first
        assert page.locator("#chains-list img, #comparisons-list img, main table img").count() == 0
        # the quality gates' rejected try and the other best-of-n sample are shown, as text
        second = page.locator("#chains-list .item").nth(1).inner_text()
        assert "rejected try 1 <script>window.__pwned = 1" in second and "<img src=x onerror=" in second
        assert "rejected: loops" in second.lower()  # labels are upper-cased by the page's CSS
        assert "other sample 2 <script>" in page.locator("#chains-list .item").nth(2).inner_text()
        assert "SFT: not trained on" in page.locator("#chains-list .item").nth(4).inner_text()
        # text search
        page.locator("#chains-search").type("banana")
        assert page.locator("#chains-list .item").count() == 1
        assert "rt-3" in page.locator("#chains-list .item").inner_text()
        assert page.locator("#chains-count").inner_text().startswith("1 of 6")
        page.locator("#chains-search").fill("")
        # principle filter, by the select and by clicking a principle tag
        page.select_option("#chains-principle", "evil<script>x</script>")
        assert page.locator("#chains-list .item").count() == 3
        page.select_option("#chains-principle", "")
        page.locator("#chains-list .tag.principle", has_text="harmful-general").first.click()
        assert page.locator("#chains-list .item").count() == 3
        assert page.input_value("#chains-principle") == "harmful-general"
        page.select_option("#chains-split", "test")
        assert page.locator("#chains-list .item").count() == 0  # rt-5, the test chain, is not harmful-general
        page.select_option("#chains-principle", "")
        assert page.locator("#chains-list .item").count() == 1
        assert page.evaluate("window.__pwned") is None and page.title().startswith("cai report")
        ctx.close()
        browser.close()


@pytest.mark.slow
@requires_chromium
def test_cli_screenshot(tmp_path):
    _playwright()
    run = make_run(tmp_path / "run", evil=False)
    assert main(["report", str(run), "--out", str(tmp_path / "r.html"), "--screenshot", str(tmp_path / "r.png")]) == 0
    png = (tmp_path / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_stage_depends_on_every_stage_before_it():
    from cai.config import load_config
    from cai.stages import report

    cfg = load_config(None, [])
    assert cfg.stages[-2:] == ["evaluate", "report"]
    assert report.STAGE.upstream(cfg) == tuple(cfg.stages[:-1])


def test_rl_stage_metrics_and_curves_are_shown(tmp_path):
    """Stages this branch does not know (rl, dpo) still get their metrics and plots."""
    from cai.plots import plot_curve

    run = make_run(tmp_path / "run", evil=False)
    _manifest(run, "rl", 30.0, {"steps": 4})
    write_json(run / "rl" / "metrics.json", {"mean_reward": 0.25, "kl": 0.01, "history": [[1, 0.1]]})
    plot_curve(run / "rl" / "reward.png", {"reward": [(1, 0.1), (2, 0.3)]}, "RL", ylabel="reward")
    html = build_report(run)
    assert "<h3>rl</h3>" in html and "mean_reward" in html and "history" not in html
    assert "rl/reward.png" in html


def test_pm_score_vs_revisions_section_shows_its_numbers_escaped(tmp_path):
    """evaluate/revisions.json with a hostile principle id: the section has the per-round and
    per-principle tables with their numbers, the two figures, the chance warning, and no
    live markup; the plots draw the id as text (a '$' is not mathtext)."""
    from cai.evaluation.results import Revisions
    from cai.plots import plot_revision_principles, plot_revisions

    run = make_run(tmp_path / "run")
    _manifest(run, "evaluate", 3.0, {"revision_chains": 2})
    rev = {"schema": 1, "splits": ["test"], "max_chains": 100, "chains": 2, "bootstrap": 1000, "min_ci_prompts": 1,
           "pm_heldout": {"accuracy": 0.5, "pairs": 18, "ci_low": 0.2903, "ci_high": 0.7097, "at_chance": True},
           "rounds": [{"round": 0, "chains": 2, "revised": 0, "mean": 0.5, "mean_ci_low": 0.0, "mean_ci_high": 1.0,
                       "change": 0.0, "change_ci_low": 0.0, "change_ci_high": 0.0},
                      {"round": 1, "chains": 2, "revised": 1, "mean": 1.25, "mean_ci_low": 1.0, "mean_ci_high": 1.5,
                       "change": 0.75, "change_ci_low": 0.0, "change_ci_high": 1.5}],
           "principles": [{"id": EVIL + " $\\frac$", "sampled": 2, "revised": 1, "prompts": 1, "delta": 1.5,
                           "delta_ci_low": 1.5, "delta_ci_high": 1.5},
                          {"id": "harmful-general", "sampled": 3, "revised": 2, "prompts": 2, "delta": -0.125,
                           "delta_ci_low": -0.5, "delta_ci_high": 0.25},
                          {"id": "few", "sampled": 1, "revised": 1, "prompts": 1, "delta": 0.375,
                           "delta_ci_low": None, "delta_ci_high": None},
                          {"id": "never", "sampled": 1, "revised": 0, "prompts": 0, "delta": None,
                           "delta_ci_low": None, "delta_ci_high": None}]}
    write_json(run / "evaluate" / "revisions.json", rev)
    write_json(run / "evaluate" / "results.json", {"models": {"initial": "default"}, "judge": "default", "prompts": {}})
    plot_revisions(run / "evaluate" / "revisions.png", Revisions.from_json(rev))
    plot_revision_principles(run / "evaluate" / "revision_principles.png", Revisions.from_json(rev))
    html = build_report(run)
    section = html.split('<section id="revisions">')[1].split("</section>")[0]
    assert html.count("<script") == 2 and "<img src=x" not in html
    assert "&lt;img src=x onerror=" in section and "$\\frac$" in section
    assert "not distinguishable from chance" in section and "0.5 of 18 pairs" in section
    assert "<td>1.25 [1, 1.5]</td>" in section and "<td>0.75 [0, 1.5]</td>" in section
    assert "<td>-0.125 [-0.5, 0.25]</td>" in section and "<td>1.5 [1.5, 1.5]</td>" in section
    assert "<td>few</td><td>1</td><td>1</td><td>1</td><td>0.375</td>" in section
    assert "<td>never</td><td>1</td><td>0</td><td>0</td><td>–</td>" in section
    assert "fewer than 1 prompts" in section
    assert section.index("evaluate/revisions.png") < section.index("evaluate/revision_principles.png")
    assert 'href="#revisions"' in html
    evaluation = html.split('<section id="evaluation">')[1].split("</section>")[0]
    assert "<table" in evaluation and "revisions.png" not in evaluation  # each figure shows once


def test_frontier_section_escapes_hostile_text(tmp_path):
    """frontier.json's strings reach the page escaped; a point's intervals that all hold 0
    make the section say plainly that the figure shows noise."""
    run = make_run(tmp_path / "run")
    _manifest(run, "evaluate", 3.0, {})
    entry = {"harmlessness": {"elo": 12.0, "ci_low": -30.0, "ci_high": 50.0},
             "helpfulness": {"elo": -5.0, "ci_low": -40.0, "ci_high": 20.0}, "harmfulness": 1.5,
             "refusal": {"benign": {"judge": 0.2, "phrases": 0.0}, "red_team": {"judge": 0.4, "phrases": 0.5}}}
    write_json(run / "evaluate" / "frontier.json", {"schema": 1, "bootstrap": 100, "reference": {EVIL: entry},
               "points": [{**entry, "stage": EVIL, "step": 4, "samples": 32, "kl": 0.5, "status": EVIL}]})
    page = build_report(run)
    assert 'id="frontier"' in page and "+12 [-30, +50]" in page
    assert "The figure shows noise, not a frontier." in page
    section = page.split('id="frontier"')[1].split("</section>")[0]
    assert "<script" not in section and "<img src=x" not in section and "&lt;script&gt;" in section


def test_the_elo_design_shows_under_the_elo_table_escaped(tmp_path):
    """An anchor design: the paragraph under the model table names the design, its anchors
    (escaped), its pairs and what a model rated through the anchors is measured against, and
    marks that model's Elo with *; a table without a design says all pairs."""
    run = make_run(tmp_path / "run")
    _manifest(run, "evaluate", 3.0, {})
    rating = lambda elo, met=None: {"elo": elo, "ci_low": elo - 10, "ci_high": elo + 10,  # noqa: E731
                                    **({"compared_with": met} if met else {})}
    table = {"ratings": {"initial": rating(0.0), EVIL: rating(5.0), "x": rating(-7.0, ["initial", EVIL]),
                         "y": rating(2.0, ["initial", EVIL])},
             "comparisons": 20, "prompts": 4, "bootstrap": 10, "principle_id": "less-harmful",
             "design": {"kind": "anchors", "anchors": ["initial", EVIL], "pairs": 5}}
    write_json(run / "evaluate" / "results.json", {"models": {"initial": "default", EVIL: "a", "x": "b", "y": "c"},
                                                   "judge": "default", "prompts": {}, "elo": {"harmlessness": table}})
    section = build_report(run).split('<section id="evaluation">')[1].split("</section>")[0]
    assert "<script" not in section and "<img src=x" not in section
    assert "Elo design: anchors, initial, &lt;script&gt;" in section and "(5 of 6 pairs of models" in section
    assert "<td>-7 [-17, 3] *</td>" in section and "<td>+5 [-5, 15]</td>" in section
    assert "inferred through the anchors" in section
    del table["design"], table["ratings"]["x"]["compared_with"], table["ratings"]["y"]["compared_with"]
    del table["ratings"][EVIL]
    write_json(run / "evaluate" / "results.json", {"models": {"initial": "default", "x": "b", "y": "c"}, "judge": "default",
                                                   "prompts": {}, "elo": {"harmlessness": table}})
    assert "Elo design: all pairs (every model compared with every other, 3 pairs" in build_report(run)
