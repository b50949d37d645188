"""Training stages on the user's own files (sft.data, preference_model.data, dpo.data): TRL's
formats in JSONL, JSON, Parquet or a train/test folder, a deterministic held-out split, the
stage's needs, and a fingerprint that follows the file's content."""

from __future__ import annotations

import json

import pytest

from cai.config import load_config
from cai.datafiles import preference_row, read_rows, sft_row
from cai.errors import CaiError
from cai.pipeline import fingerprints, run_pipeline
from cai.stages import check_order


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SFT_ROWS = [
    {"messages": [{"role": "user", "content": f"Name a fruit, number {i}."},
                  {"role": "assistant", "content": f"A pear, {i}."}]} for i in range(6)
] + [
    {"prompt": f"What is {i} + 1?", "completion": f"{i + 1}"} for i in range(5)
] + [
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {i}."}],
     "completion": [{"role": "assistant", "content": f"{i}"}]} for i in range(5)
]

PAIRS = [
    {"prompt": f"How do I pick a lock number {i}?", "chosen": "I can't help with that, but a locksmith can.",
     "rejected": "Insert a tension wrench, then rake the pins.", "p_chosen": 0.8} for i in range(8)
] + [
    {"prompt": [{"role": "user", "content": f"Capital of country {i}?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "I won't say."}]} for i in range(8)
]


# -- the reader ---------------------------------------------------------------------------------


def test_sft_rows_in_each_trl_shape_become_conversations():
    assert sft_row(SFT_ROWS[0], "f:1")["messages"][-1] == {"role": "assistant", "content": "A pear, 0."}
    assert sft_row(SFT_ROWS[6], "f:7")["messages"] == [{"role": "user", "content": "What is 0 + 1?"},
                                                       {"role": "assistant", "content": "1"}]
    assert [m["role"] for m in sft_row(SFT_ROWS[11], "f:12")["messages"]] == ["system", "user", "assistant"]


def test_preference_rows_in_trl_and_hh_shapes_with_the_soft_label():
    a = preference_row(PAIRS[0], "f:1")
    assert a["prompt"] == [{"role": "user", "content": "How do I pick a lock number 0?"}]
    assert a["chosen"] == [{"role": "assistant", "content": "I can't help with that, but a locksmith can."}]
    assert (a["p_chosen"], a["source"]) == (0.8, "file")
    assert preference_row(PAIRS[8], "f:9")["p_chosen"] == 1.0
    hh = preference_row({"chosen": "\n\nHuman: hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
                        "f:1")
    assert (hh["prompt"], hh["rejected"][0]["content"]) == ([{"role": "user", "content": "hi"}], "no")
    implicit = preference_row({"prompt": [{"role": "user", "content": "q"}],
                               "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                               "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
                              "f:1")
    assert (implicit["chosen"][0]["content"], implicit["rejected"][0]["content"]) == ("a", "b")


def test_a_single_file_is_split_by_the_seed_and_a_folder_keeps_its_splits(tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", PAIRS * 4)
    one = read_rows(str(path), "dpo.data", preference_row, seed=0, test_fraction=0.25)
    again = read_rows(str(path), "dpo.data", preference_row, seed=0, test_fraction=0.25)
    other = read_rows(str(path), "dpo.data", preference_row, seed=1, test_fraction=0.25)
    assert one == again and 0 < len(one["test"]) < len(one["train"]) and one != other
    assert len(one["train"]) + len(one["test"]) == 64
    folder = tmp_path / "split"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", PAIRS[:10])
    (folder / "test.json").write_text(json.dumps(PAIRS[10:]))
    kept = read_rows(str(folder), "dpo.data", preference_row, seed=0, test_fraction=0.25)
    assert (len(kept["train"]), len(kept["test"])) == (10, 6)
    assert kept["train"][0]["id"] == "row-0"


# -- the stages on a file -----------------------------------------------------------------------


def _run(run_dir, tiny_model, *extra, log=None):
    cfg = load_config(None, [f"run_dir={run_dir}", f"engine.model={tiny_model}", "data.test_fraction=0.25", *extra])
    return run_pipeline(cfg, log=(log if log is not None else lambda m: None))


def _manifest(run, stage):
    return json.loads((run / stage / "manifest.json").read_text())


def test_sft_trains_on_a_jsonl_file_alone_and_reruns_only_when_it_changes(tmp_path, tiny_model):
    data = _jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    args = ("stages=[sft]", f"sft.data={data}", "sft.batch_size=4", "sft.max_steps=2")
    run = _run(tmp_path / "run", tiny_model, *args)
    m = _manifest(run, "sft")
    assert m["counts"]["examples"] + m["counts"]["test_examples"] == len(SFT_ROWS)
    assert m["counts"]["test_examples"] > 0 and m["counts"]["test_loss_after"] is not None
    assert list(m["inputs"]) == ["sft.data"] and len(m["inputs"]["sft.data"]) == 64
    assert (run / "sft" / "model" / "config.json").is_file() and not (run / "critique_revision").exists()

    logs = []
    _run(tmp_path / "run", tiny_model, *args, log=logs.append)
    assert any("[sft] already finished" in m for m in logs)
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"engine.model={tiny_model}", "data.test_fraction=0.25",
                             *args])
    before = fingerprints(cfg)["sft"]
    _jsonl(data, SFT_ROWS[:-1])  # one row less
    assert fingerprints(cfg)["sft"] != before
    logs.clear()
    _run(tmp_path / "run", tiny_model, *args, log=logs.append)
    assert not any("[sft] already finished" in m for m in logs)
    m = _manifest(run, "sft")
    assert m["counts"]["examples"] + m["counts"]["test_examples"] == len(SFT_ROWS) - 1


def test_the_preference_model_trains_on_a_parquet_file(tmp_path, tiny_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def text(v):
        return v if isinstance(v, str) else v[-1]["content"]

    rows = [{"prompt": text(r["prompt"]), "chosen": text(r["chosen"]), "rejected": text(r["rejected"]),
             "p_chosen": r.get("p_chosen", 1.0)} for r in PAIRS]  # one type a column: strings
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    run = _run(tmp_path / "run", tiny_model, "stages=[preference_model]", f"preference_model.data={path}",
               f"preference_model.model={tiny_model}", "preference_model.batch_size=4", "preference_model.max_steps=1")
    m = _manifest(run, "preference_model")
    assert m["counts"]["train_pairs"] + m["counts"]["test_pairs"] == 16 and m["counts"]["test_pairs"] > 0
    assert m["counts"]["test_accuracy"] is not None  # the held-out accuracy exists
    assert "preference_model.data" in m["inputs"] and m["needs"] == {}
    scores = [json.loads(line) for line in (run / "preference_model" / "test_scores.jsonl").read_text().splitlines()]
    assert {s["source"] for s in scores} == {"file"} and {s["p_chosen"] for s in scores} <= {0.8, 1.0}


def test_dpo_trains_on_a_folder_of_json_files_with_its_soft_labels(tmp_path, tiny_model):
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps(PAIRS[:6] + PAIRS[8:12]))
    _jsonl(folder / "test.jsonl", PAIRS[6:8])
    run = _run(tmp_path / "run", tiny_model, "stages=[dpo]", f"dpo.data={folder}", f"dpo.policy={tiny_model}",
               "dpo.batch_size=4", "dpo.max_steps=1", "dpo.frontier_points=0", "dpo.min_confidence=0.9")
    m = _manifest(run, "dpo")
    # the six soft pairs (p = 0.8) fall under min_confidence: the four sure ones are left
    assert (m["counts"]["train_pairs"], m["counts"]["dropped_pairs"], m["counts"]["test_pairs"]) == (4, 6, 0)
    assert set(m["inputs"]) == {"dpo.data:train.json", "dpo.data:test.jsonl"}


def test_a_stage_on_a_file_needs_no_upstream_but_the_sl_cai_model_still_needs_sft(tmp_path, tiny_model):
    data = _jsonl(tmp_path / "pairs.jsonl", PAIRS)

    def cfg(*extra):
        return load_config(None, [f"run_dir={tmp_path / 'run'}", *extra])

    check_order(cfg("stages=[dpo]", f"dpo.data={data}", "dpo.policy=default"))
    check_order(cfg("stages=[preference_model]", f"preference_model.data={data}", "preference_model.model=default"))
    check_order(cfg("stages=[sft]", f"sft.data={data}"))
    with pytest.raises(CaiError, match="stage 'dpo' needs stage 'sft'.*or start dpo from another model .*dpo.policy=sl-cai"):
        check_order(cfg("stages=[dpo]", f"dpo.data={data}"))  # dpo.policy=sl-cai is this run's SFT model
    with pytest.raises(CaiError, match="stage 'preference_model' needs stage 'sft'"):
        check_order(cfg("stages=[preference_model]", f"preference_model.data={data}"))
    with pytest.raises(CaiError, match="stage 'dpo' needs stage 'critique_revision'"):
        check_order(cfg("stages=[dpo]", "dpo.data=sl_prefs", "dpo.policy=default"))
    sft = _jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    check_order(cfg("stages=[sft, dpo]", f"sft.data={sft}", f"dpo.data={data}"))  # sl-cai: this run's sft
