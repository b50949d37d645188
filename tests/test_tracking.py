"""Experiment tracking (``report_to``): the trackers get each training step's row as
scalars, read back here from TensorBoard's own event files; a resumed run continues the
same experiment; ``report_to=[]`` writes nothing; bad settings are one line."""

import json
import shutil

import pytest

from cai.config import load_config
from cai.errors import CaiError
from cai.pipeline import fingerprints, run_pipeline


def _cfg(run_dir, tiny_model, *extra):
    return load_config(None, [
        f"run_dir={run_dir}", f"engine.model={tiny_model}", "engine.batch_size=8",
        "stages=[prepare, critique_revision, sft]", "critique_revision.rounds=1",
        "critique_revision.max_prompts=4", "critique_revision.max_new_tokens=8",
        "critique_revision.critique_max_new_tokens=4", "sft.batch_size=1", "sft.learning_rate=1e-2", *extra,
    ])


def _scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    """(step, value) of ``tag`` in the run's TensorBoard folder, read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record = json.loads((run_dir / "tracking.json").read_text())
    acc = EventAccumulator(str(run_dir / "tracking" / "tensorboard" / record["id"] / tag.split("/")[0]))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def untracked(tmp_path_factory, tiny_model):
    """A finished sft run with report_to=[] (the default)."""
    run = tmp_path_factory.mktemp("tracking") / "run"
    return run_pipeline(_cfg(run, tiny_model), log=lambda m: None)


def test_no_tracker_writes_no_tracking_folder(untracked):
    assert not (untracked / "tracking").exists() and not (untracked / "tracking.json").exists()
    assert (untracked / "sft" / "metrics.json").is_file()


def test_sft_losses_reach_tensorboard_step_by_step(tmp_path, untracked, tiny_model):
    """sft rerun with report_to=[tensorboard]: each step's sft/loss in the event files is the
    loss of metrics.json at that step (TensorBoard keeps float32)."""
    pytest.importorskip("tensorboard")
    shutil.copytree(untracked, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "sft")
    logs = []
    run = run_pipeline(_cfg(tmp_path / "run", tiny_model, "report_to=[tensorboard]"), log=logs.append)
    # report_to changes no fingerprint: prepare and critique_revision were not rerun
    assert any("[critique_revision] already finished" in m for m in logs), logs
    record = json.loads((run / "tracking.json").read_text())
    assert record["trackers"] == ["tensorboard"] and record["id"].startswith("run-")
    losses = json.loads((run / "sft" / "metrics.json").read_text())["loss"]
    assert len(losses) >= 3
    got = _scalars(run, "sft/loss")
    assert [s for s, _ in got] == [s for s, _ in losses]
    assert [v for _, v in got] == pytest.approx([v for _, v in losses], rel=1e-6)
    print("\n".join(f"sft/loss step {s} value {v:.6f}" for s, v in got))


def test_a_resumed_run_continues_the_same_experiment(tmp_path, untracked, tiny_model, monkeypatch):
    """A NaN stops sft at step 4, a step after its checkpoint; the rerun resumes from the
    checkpoint (step 2), with the same experiment id, into the same TensorBoard folder. Step 3
    is logged twice, and TensorBoard's reader keeps the later: the steps read back are
    metrics.json's. The tracker is closed when the NaN stops the run, as at the end."""
    pytest.importorskip("tensorboard")
    import cai.stages.sft as stage
    import cai.tracking as tracking

    shutil.copytree(untracked, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "sft")
    cfg = _cfg(tmp_path / "run", tiny_model, "report_to=[tensorboard]", "sft.checkpoint_every=2")
    closed = []
    real_finish = tracking.RunTracker.finish
    monkeypatch.setattr(tracking.RunTracker, "finish", lambda self, log=print: (closed.append(self.run_id),
                                                                                 real_finish(self, log)))
    real_loss, calls = stage.NextTokens.loss, []

    def nan_on_fourth(self, items, step):
        calls.append(step)
        loss, logged = real_loss(self, items, step)
        return (loss * float("nan") if len(calls) == 4 else loss), logged

    monkeypatch.setattr(stage.NextTokens, "loss", nan_on_fourth)
    with pytest.raises(CaiError, match="training loss is nan at step 3"):
        run_pipeline(cfg, log=lambda m: None)
    first = json.loads((tmp_path / "run" / "tracking.json").read_text())["id"]
    assert closed == [first]
    stopped = _scalars(tmp_path / "run", "sft/loss")
    assert [s for s, _ in stopped] == [1, 2, 3]

    monkeypatch.setattr(stage.NextTokens, "loss", real_loss)
    logs = []
    run = run_pipeline(cfg, log=logs.append)
    assert any("resuming from checkpoint at step 2/" in m for m in logs), logs
    assert any(f"experiment {first} (resumed)" in m for m in logs), logs
    assert json.loads((run / "tracking.json").read_text())["id"] == first and closed == [first, first]
    assert [p.name for p in (run / "tracking" / "tensorboard").iterdir()] == [first]
    board = run / "tracking" / "tensorboard" / first / "sft"  # one folder, an event file from each run
    assert len(list(board.glob("events.out.tfevents.*"))) == 2
    losses = json.loads((run / "sft" / "metrics.json").read_text())["loss"]
    got = _scalars(run, "sft/loss")
    assert [s for s, _ in got] == [s for s, _ in losses]
    assert [v for _, v in got] == pytest.approx([v for _, v in losses], rel=1e-6)
    assert got[:2] == stopped[:2]  # the steps before the checkpoint, logged once, by the first run
    print("\n".join(f"sft/loss step {s} value {v:.6f}" for s, v in got))


# -- the pieces ------------------------------------------------------------------------------


def test_report_to_is_checked_in_one_line(monkeypatch):
    import importlib.util

    from cai.checks import check_config

    with pytest.raises(CaiError, match=r"config field 'report_to': unknown tracker 'tensorbord'; did you mean "
                                       r"'tensorboard'\? \(available: tensorboard, wandb, trackio, mlflow\)"):
        load_config(None, ["report_to=[tensorbord]"]).check()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(CaiError, match=r"^config field 'report_to' lists mlflow, which is not installed; "
                                       r"pip install mlflow") as err:
        check_config(load_config(None, ["report_to=[mlflow]"]))
    assert "\n" not in str(err.value)


def test_report_to_changes_no_fingerprint():
    base = fingerprints(load_config("cpu-tiny"))
    assert fingerprints(load_config("cpu-tiny", ["report_to=[tensorboard, wandb]"])) == base


def test_track_prefixes_the_stage_and_leaves_out_none(tmp_path):
    from cai.stage import StageContext

    sent = []

    class Tracker:
        def log(self, stage, values, step):
            sent.append((stage, values, step))

    ctx = StageContext(cfg=load_config(None), run_dir=tmp_path, out=tmp_path, name="rl")
    ctx.track({"kl": 0.5}, 1)  # no tracker: nothing
    ctx.tracker = Tracker()
    ctx.track({"kl": 0.5, "judge_consistency": None, "length": 3}, 2)
    assert sent == [("rl", {"rl/kl": 0.5, "rl/length": 3.0}, 2)]


def test_each_objective_names_its_row():
    """The rows of metrics.json as the trackers get them: the step left out, names per stage."""
    from cai.loop import ShareOfBatches
    from cai.simpo import SimPOPairs
    from cai.stages.dpo import PreferencePairs
    from cai.stages.preference_model import SoftPreferences
    from cai.stages.rl import PolicyGradient
    from cai.stages.sft import NextTokens

    for objective in (NextTokens, SoftPreferences):
        assert issubclass(objective, ShareOfBatches) and objective.scalars(objective, [3, 0.25]) == {"loss": 0.25}
    for objective in (PreferencePairs, SimPOPairs):
        assert objective.scalars(objective, [3, 0.6, 0.5, 0.1]) == {"loss": 0.6, "reward_accuracy": 0.5, "margin": 0.1}
    row = {"step": 2, "reward": 0.1, "total_reward": 0.05, "kl": 0.5, "length": 7.0, "entropy": 1.2, "loss": -0.3,
           "judge_decisiveness": None, "judge_consistency": 0.75}
    assert PolicyGradient.scalars(None, row) == {"reward": 0.1, "total_reward": 0.05, "kl": 0.5, "length": 7.0,
                                                 "entropy": 1.2, "loss": -0.3, "judge_consistency": 0.75}


def test_evaluate_logs_a_handful_of_headline_results():
    from cai.evaluation.results import (EloByDimension, EloTable, Harmfulness, PMScores, Rating, RefusalBySet,
                                        RefusalRates, Results)
    from cai.stages.evaluate import headline_scalars

    results = Results(
        elo=EloByDimension(harmlessness=EloTable(ratings={"initial": Rating(elo=0.0), "rl": Rating(elo=42.0)}),
                           helpfulness=None),
        harmfulness={"rl": Harmfulness(mean=1.5)},
        refusal={"rl": RefusalBySet(benign=RefusalRates(judge_majority=0.1), red_team=None)},
        pm_score={"rl": PMScores(red_team=0.3, helpful=None)},
    )
    assert headline_scalars(results) == {
        "initial/elo_harmlessness": 0.0, "rl/elo_harmlessness": 42.0, "rl/harmfulness": 1.5,
        "rl/refusal_benign": 0.1, "rl/refusal_red_team": None, "rl/pm_score_red_team": 0.3,
        "rl/pm_score_helpful": None,
    }


def test_wandb_offline_resumes_the_same_run(tmp_path, monkeypatch):
    """wandb, where it is installed (cai does not depend on it), in offline mode."""
    pytest.importorskip("wandb")
    from cai.tracking import open_tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = open_tracker(["wandb"], tmp_path)
    first.log({"sft/loss": 1.0}, 1)
    first.finish()
    again = open_tracker(["wandb"], tmp_path)
    assert again.run_id == first.run_id and again.trackers[0].run.id == first.run_id
    again.finish()
    assert (tmp_path / "tracking" / "wandb").is_dir()

