"""The method study's runner (studies/method_study.py): its pure helpers."""

import importlib.util
import sys
from pathlib import Path

STUDY = Path(__file__).resolve().parents[1] / "studies" / "method_study.py"


def _study():
    spec = importlib.util.spec_from_file_location("method_study", STUDY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_samples_render_model_text_as_inert_markdown():
    md = _study().md_text("Sure:\n\n```python\nimport os <script>alert(1)</script> *x* | y\n")
    assert "\n" not in md
    assert "```" not in md and "\\`\\`\\`" in md  # an unclosed fence cannot swallow the page
    assert "<script>" not in md and "\\<script\\>" in md
    assert "\\*x\\*" in md and "\\|" in md


def test_a_row_counts_once_all_its_stages_finished(tmp_path):
    m = _study()
    row = m.BY_NAME["dpo-sl"]
    run = tmp_path / "dpo-sl"
    for stage in ("prepare", "critique_revision", "sft"):  # seeded from its parent: sft only
        (run / stage).mkdir(parents=True)
        (run / stage / "manifest.json").write_text("{}")
    (run / "sft" / "model").mkdir()
    (run / "sft" / "model" / "config.json").write_text("{}")
    assert m.final_model(run, row) is None  # not the parent's sft model under this row's name
    (run / "dpo" / "model").mkdir(parents=True)
    (run / "dpo" / "model" / "config.json").write_text("{}")
    (run / "dpo" / "manifest.json").write_text("{}")
    assert m.final_model(run, row) == run / "dpo" / "model"


def test_rows_start_from_a_parents_stages_or_only_from_its_cache(tmp_path):
    m = _study()
    donor = tmp_path / "sl-2r-2e"
    (donor / "sft").mkdir(parents=True)
    (donor / "sft" / "manifest.json").write_text("{}")
    (donor / "sft" / "train.jsonl").write_text("x\n")
    (donor / "critique_revision.partial").mkdir()  # unfinished: never copied
    (donor / "cache.sqlite").write_bytes(b"cache")

    m.seed_from_parent(m.BY_NAME["dpo-sl"], tmp_path)  # parent: its finished stages and cache
    child = tmp_path / "dpo-sl"
    assert (child / "sft" / "train.jsonl").samefile(donor / "sft" / "train.jsonl")
    assert not (child / "critique_revision.partial").exists()
    assert (child / "cache.sqlite").read_bytes() == b"cache"
    assert not (child / "cache.sqlite").samefile(donor / "cache.sqlite")  # a copy: both rows write it

    m.seed_from_parent(m.BY_NAME["sl-2r-2e-nogates"], tmp_path)  # cache_from: the cache only
    other = tmp_path / "sl-2r-2e-nogates"
    assert sorted(p.name for p in other.iterdir()) == ["cache.sqlite"]


def test_levers_count_refusals_in_the_rows_own_training_data(tmp_path):
    import json

    m = _study()
    run = tmp_path / "sl-2r-2e"
    for stage in ("prepare", "critique_revision", "sft"):
        (run / stage).mkdir(parents=True)
        (run / stage / "manifest.json").write_text(json.dumps({"counts": {"gate_rejected": 3, "gate_retries": 2,
                                                                          "gate_replaced": 1}}))
    (run / "sft" / "model").mkdir()
    (run / "sft" / "model" / "config.json").write_text("{}")
    (run / "critique_revision" / "sft").mkdir()
    rows = [{"source": "revision", "messages": [{"role": "assistant", "content": "I can't help with that."}]},
            {"source": "revision", "messages": [{"role": "assistant", "content": "Here is a safer idea."}]},
            {"source": "helpful", "messages": [{"role": "assistant", "content": "I can't help with that."}]}]
    (run / "critique_revision" / "sft" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "critique_revision" / "chains").mkdir()
    (run / "critique_revision" / "chains" / "train.jsonl").write_text(
        json.dumps({"initial_response": "Sure, here is how."}) + "\n")
    (run / "feedback").mkdir()  # not one of this row's stages: not shown as its lever
    (run / "feedback" / "stats.json").write_text(json.dumps({"position_consistency": 0.5}))
    line = m.levers(tmp_path).splitlines()[2]
    assert line.startswith("| sl-2r-2e | 0 / 1 (0%) | 1 / 2 (50%) | 3 (2, 1) | - |"), line


def test_every_row_name_is_a_valid_extra_model_name(tmp_path):
    from cai.checks import check_config
    from cai.config import load_config

    m = _study()
    mapping = "{" + ", ".join(f"{r.name}: {tmp_path / r.name}" for r in m.ROWS) + "}"
    check_config(load_config("cpu-full", [f"evaluate.extra_models={mapping}"]))  # compare would be refused


def test_compare_anchors_every_row_on_the_initial_model_and_the_preset_row(tmp_path):
    """compare's Elo design: every row meets the initial model and the preset's own row
    (PRESET_ROW, whose settings are the cpu-full preset's: its training stages, nothing else),
    or the initial model alone before that row is finished; later overrides win."""
    import yaml

    from cai.checks import check_config
    from cai.config import PRESET_DIR, load_config

    m = _study()
    row = m.BY_NAME[m.PRESET_ROW]
    preset = yaml.safe_load((PRESET_DIR / "cpu-full.yaml").read_text())
    assert row.preset == "cpu-full" and len(row.overrides) == 1
    assert m.stages_of(row) == [s for s in preset["stages"] if s not in ("evaluate", "report")]
    models = {r.name: str(tmp_path / r.name) for r in m.ROWS}
    cmd = m.compare_command(tmp_path, models, ["evaluate.anchors=all"])
    assert cmd[-2:] == [f"evaluate.anchors=[initial, {m.PRESET_ROW}]", "evaluate.anchors=all"]
    assert cmd[4:6] == ["--config", "cpu-full"]
    cfg = load_config("cpu-full", cmd[6:-1])
    check_config(cfg)
    assert cfg.evaluate.anchors == ["initial", m.PRESET_ROW]
    without = m.compare_command(tmp_path, {k: v for k, v in models.items() if k != m.PRESET_ROW}, [])
    assert without[-1] == "evaluate.anchors=[initial]"


def test_options_may_sit_among_the_rows(tmp_path, monkeypatch):
    m = _study()
    ran = []
    monkeypatch.setattr(m, "run_rows", lambda names, root: ran.append((names, root)) or 0)
    assert m.main(["run", "--root", str(tmp_path), "sl-2r-2e", "dpo-sl"]) == 0
    assert m.main(["--root", str(tmp_path), "run", "tiny"]) == 0
    assert ran == [(["sl-2r-2e", "dpo-sl"], tmp_path), (["tiny"], tmp_path)]
