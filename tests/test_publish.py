"""`cai push`: which files go where, and the cards, all offline (--dry-run and plan_uploads)."""

import json
import shutil

import pytest
import yaml

from cai.cli import main
from cai.config import RunConfig, to_dict
from cai.layout import MANIFEST
from cai.publish import plan_uploads


def _finish(folder, counts):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(json.dumps({"status": "complete", "counts": counts}))


@pytest.fixture
def run(tmp_path, tiny_model):
    """A finished run folder as the stages leave it (models copied from the tiny model)."""
    from cai.constitution import load_constitution

    run = tmp_path / "run"
    cfg = to_dict(RunConfig())
    cfg["run_dir"] = str(run)
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    _finish(run / "prepare", {})
    const = load_constitution(RunConfig().data.constitution)
    const.save(run / "prepare" / "constitution.yaml")
    _finish(run / "critique_revision", {})
    for kind in ("sft", "chains"):
        (run / "critique_revision" / kind).mkdir()
        for s, n in (("train", 3), ("test", 2)):
            (run / "critique_revision" / kind / f"{s}.jsonl").write_text("".join(
                json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]})
                + "\n" for i in range(n)))
    _finish(run / "feedback", {})
    (run / "feedback" / "prefs").mkdir()
    (run / "feedback" / "prefs" / "train.jsonl").write_text(json.dumps(
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "c"}],
         "rejected": [{"role": "assistant", "content": "r"}], "p_chosen": 0.6}) + "\n")
    (run / "feedback" / "stats.json").write_text(json.dumps(
        {"position_consistency": 0.1, "position_consistency_ci": [0.02, 0.4], "decisiveness_all_orders": 0.02}))
    for stage, counts in (("sft", {"examples": 3, "final_loss": 1.2}), ("dpo", {"train_pairs": 1}),
                          ("preference_model", {"test_accuracy": 0.5, "test_pairs": 1})):
        _finish(run / stage, counts)
        shutil.copytree(tiny_model, run / stage / "model")
    _finish(run / "evaluate", {})
    rel = {"orders": 2, "n": 36, "position_consistency": 0.17, "position_consistency_ci": [0.08, 0.32],
           "decisiveness_all_orders": 0.02, "at_chance": True}
    (run / "evaluate" / "results.json").write_text(json.dumps({
        "models": {"initial": "default", "sl-cai": "x", "dpo": "y"}, "judge": "default",
        "elo": {"harmlessness": {"ratings": {"initial": {"elo": 0.0, "ci_low": 0.0, "ci_high": 0.0},
                                             "sl-cai": {"elo": -7.3, "ci_low": -20.7, "ci_high": 5.0},
                                             "dpo": {"elo": 3.0, "ci_low": -9.0, "ci_high": 15.0}},
                                 "judge_reliability": rel}},
        "harmfulness": {"dpo": {"mean": 3.1, "n": 6}},
        "refusal": {"dpo": {"red_team": {"n": 6, "judge_majority": 0.33, "judge_majority_ci": [0.1, 0.7],
                                         "too_small": True, "judge_reliability": rel}}},
        "judge_reliability": {"elo_harmlessness": rel, "rules": {"at_chance": "text"}},
    }))
    return run


def test_dry_run_writes_each_repository_with_its_files_and_card(run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["push", str(run), "--repo", "me/tiny", "--dry-run", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["tiny-data", "tiny-dpo", "tiny-pm", "tiny-sl-cai"]
    assert "nothing uploaded" in printed
    model = out / "tiny-dpo"
    assert {"README.md", "config.json", "model.safetensors"} <= {p.name for p in model.iterdir()}
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model)  # the folder loads as a model
    data = out / "tiny-data"
    assert sorted(str(p.relative_to(data)) for p in data.rglob("*.jsonl")) == [
        "chains/test.jsonl", "chains/train.jsonl", "preferences/train.jsonl", "sft/test.jsonl", "sft/train.jsonl"]
    assert not (run / "dpo" / "model" / "README.md").exists()  # the run is not changed
    assert main(["push", str(run), "--repo", "me/tiny", "--dry-run", str(out)]) == 2  # never over an earlier one
    assert "exists and is not empty" in capsys.readouterr().err


def test_model_card_has_hub_metadata_constitution_counts_settings_evaluation_and_limits(run):
    from huggingface_hub import ModelCard

    up = {u.repo_id: u for u in plan_uploads(run, "me/tiny", license="apache-2.0")}
    card = ModelCard(up["me/tiny-dpo"].card)
    assert card.data.base_model == "me/tiny-sl-cai"  # dpo starts from this run's SL-CAI model, published too
    assert card.data.datasets == ["me/tiny-data"] and card.data.license == "apache-2.0"
    assert {"cai", "constitutional-ai", "dpo"} <= set(card.data.tags)
    text = up["me/tiny-dpo"].card
    assert "Constitution **cai-default** (sha256" in text and "`harmful-general`" in text
    assert "| train_pairs | 1 |" in text and "beta:" in text  # counts and the dpo settings
    assert "| harmlessness Elo (initial model = 0) | +3.0 | [-9.0, +15.0] | AT CHANCE" in text
    assert "The judge (default) is at chance on this run for: elo_harmlessness " in text
    assert "rules" not in text.split("## Limits")[1]
    assert "too small for their intervals (red_team" in text
    sft = ModelCard(up["me/tiny-sl-cai"].card)
    assert sft.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # engine.model=default
    pm = up["me/tiny-pm"].card
    assert "held-out accuracy is 0.5 on 1 pairs: not distinguishable from chance" in pm
    assert "## Evaluation" not in pm


def test_dataset_card_lists_configs_that_load_dataset_reads(run, tmp_path):
    import datasets
    from huggingface_hub import DatasetCard

    up = {u.repo_id: u for u in plan_uploads(run, "me/tiny")}["me/tiny-data"]
    card = DatasetCard(up.card)
    names = [c["config_name"] for c in card.data.configs]
    assert names == ["sft", "preferences", "chains"]
    assert "position consistency on these pairs: 0.1 [0.02, 0.4]" in up.card
    from cai.publish import write_folders

    folder = write_folders([up], tmp_path / "d")[0]
    prefs = next(c for c in card.data.configs if c["config_name"] == "preferences")
    files = {f["split"]: str(folder / f["path"]) for f in prefs["data_files"]}
    ds = datasets.load_dataset("json", data_files=files)
    assert set(ds) == {"train"} and ds["train"][0]["p_chosen"] == 0.6


def test_dataset_card_says_contrast_pairs_were_labelled_by_construction(run):
    (run / "feedback" / "stats.json").write_text(json.dumps(
        {"mode": "contrast", "contrast_label": 0.9, "judge_agreement": {"k": 3, "n": 4, "rate": 0.75, "ci": [0.3, 0.95]}}))
    card = {u.repo_id: u for u in plan_uploads(run, "me/tiny")}["me/tiny-data"].card
    assert "contrast pairs (RLCD)" in card and "p_chosen = 0.9; no judge labelled them" in card
    assert "agreed with the construction on 0.75 [0.3, 0.95] of 4 pairs" in card
    assert "position consistency on these pairs" not in card


@pytest.mark.parametrize("args, message", [
    (["--repo", "no-slash"], "is not a Hub repository id"),
    (["--repo", "me/x", "--models", "sft,nope"], "unknown model 'nope'"),
    (["--repo", "me/x", "--models", "rl"], "stage 'rl' has not finished"),
])
def test_bad_push_arguments_are_one_line(run, args, message, capsys):
    assert main(["push", str(run), *args, "--dry-run", str(run.parent / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    assert main(["push", str(tmp_path), "--repo", "me/x", "--dry-run", str(tmp_path / "o")]) == 2
    assert "is not a cai run folder" in capsys.readouterr().err
