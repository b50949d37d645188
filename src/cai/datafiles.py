"""A user's own training data, in TRL's formats (docs/formats.md#your-own-training-data).

Three training stages read a file instead of their upstream stage's artifact when it is
given (``sft.data``, ``preference_model.data``, ``dpo.data``), and the feedback stage mixes
in human comparisons (``feedback.human_preferences``). All four read through here:

* SFT rows: ``messages`` (a list of ``{role, content}`` ending with the assistant answer
  to learn), or ``prompt`` / ``completion`` (strings, or lists of messages);
* preference rows: ``prompt`` / ``chosen`` / ``rejected`` (strings or message lists; TRL's
  implicit-prompt form, where ``chosen`` repeats the prompt, and hh-rlhf transcripts with
  no ``prompt`` are read too), optionally ``p_chosen``: the soft label the feedback stage
  writes, the probability that ``chosen`` is the better answer (1 when left out).

Files: ``.jsonl``, ``.json`` (a list of rows), ``.parquet``, or a folder with ``train.*``
and ``test.*``. A single file is split by a hash of each row's id (its ``id``, else its
position) and the run's seed: ``data.test_fraction`` of it is held out, the same rows
every run. Every fault is one line naming the file, the row, the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from cai.errors import CaiError
from cai.prompts import SPLITS, in_test, parse_transcript, read_records, split_files

if TYPE_CHECKING:  # pragma: no cover
    from cai.config import RunConfig

#: The file types a data file may have.
SUFFIXES = (".jsonl", ".json", ".parquet")
ROLES = ("system", "user", "assistant")
#: ``dpo.data`` values that name the run's own pairs rather than a file.
DPO_PAIRS = {"feedback": "feedback", "sl_prefs": "critique_revision"}


@dataclass(frozen=True)
class DataField:
    """A config field that names a user's file: the stage that reads it and its rows' kind."""

    stage: str
    field: str  # the dotted config field
    kind: str  # "sft" or "pairs"
    ids: str = "row"  # a row without an id is "<ids>-<n>"

    def spec(self, cfg: "RunConfig") -> str | None:
        section, name = self.field.split(".")
        value = getattr(getattr(cfg, section), name)
        return None if not value or (self.field == "dpo.data" and value in DPO_PAIRS) else value


DATA_FIELDS = (
    DataField("sft", "sft.data", "sft"),
    DataField("feedback", "feedback.human_preferences", "pairs", ids="human"),
    DataField("preference_model", "preference_model.data", "pairs"),
    DataField("dpo", "dpo.data", "pairs"),
)


def data_field(stage: str) -> DataField | None:
    return next((d for d in DATA_FIELDS if d.stage == stage), None)


def outside_data(cfg: "RunConfig", stage: str) -> str | None:
    """The file (or folder) the config gives ``stage`` to read, None when it reads the run."""
    d = data_field(stage)
    return d.spec(cfg) if d else None


def read_data(cfg: "RunConfig", stage: str) -> dict[str, list[dict]]:
    """``stage``'s file as checked rows by split (:func:`sft_row` or :func:`preference_row`)."""
    d = data_field(stage)
    reader = sft_row if d.kind == "sft" else preference_row
    return read_rows(d.spec(cfg), d.field, reader, cfg.seed, cfg.data.test_fraction, d.ids)


def data_files(spec: str) -> list[Path]:
    """The files a data setting reads: the file itself, or a folder's train/test files."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return [split_files(path)[s] for s in SPLITS if s in split_files(path)]
    return [path] if path.is_file() else []


def data_fingerprint(cfg: "RunConfig", stage: str) -> dict:
    """What ``stage``'s fingerprint adds for the files it reads from outside the run: the
    sha256 of each (an edited file reruns the stage) and the share held out of a file with
    no test split; {} when it reads none."""
    from cai.io import file_sha256

    spec = outside_data(cfg, stage)
    if spec is None:
        return {}
    files = data_files(spec)
    return {"files": {f.name: file_sha256(f) for f in files} if files else {spec: "missing"},
            "test_fraction": cfg.data.test_fraction}


def check_data(cfg: "RunConfig") -> None:
    """Every data file a listed stage reads, read and checked row by row (``cai validate``)."""
    for d in DATA_FIELDS:
        if d.stage in cfg.stages and d.spec(cfg) is not None:
            read_data(cfg, d.stage)


# -- reading ----------------------------------------------------------------------------------


def read_rows(spec: str, field: str, parse: Callable[[object, str], dict], seed: int, test_fraction: float,
              ids: str = "row") -> dict[str, list[dict]]:
    """Every row of ``spec`` parsed by ``parse(row, where)``, by split; a file with no test
    split is split by a hash of each row's id and ``seed``."""
    if spec.startswith("hf:"):
        raise CaiError(f"config field '{field}': '{spec}': hub datasets are not read here; save it as a file "
                       "(datasets' to_json or to_parquet) and give its path")
    path = Path(spec).expanduser()
    if not path.exists():
        names = ", ".join(DPO_PAIRS) + ", " if field == "dpo.data" else ""
        raise CaiError(f"config field '{field}': '{spec}' does not exist; give {names}a JSONL/JSON/Parquet file or "
                       "a folder with train/test files")
    files = split_files(path) if path.is_dir() else {"all": path}
    if not files:
        raise CaiError(f"config field '{field}': folder '{spec}' has no train/test files (train.jsonl and "
                       "test.jsonl, or .json/.parquet)")
    if path.is_dir() and "train" not in files:
        raise CaiError(f"config field '{field}': folder '{spec}' has no train file; add train.jsonl (or "
                       ".json/.parquet) beside {files['test'].name}")
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for split, file in files.items():
        if file.suffix.lower() not in SUFFIXES:
            raise CaiError(f"{file}: unknown format '{file.suffix or '(none)'}' for {field}; give a .jsonl, .json "
                           "or .parquet file (or a folder of them)")
        records = read_records(file)
        if not records:
            raise CaiError(f"{file}: no rows; {field} needs at least one")
        for n, (where, rec) in enumerate(records):
            row = parse(rec, f"{where} ({field})")
            row["id"] = str(rec["id"]) if isinstance(rec, dict) and rec.get("id") is not None else f"{ids}-{n}"
            if split == "all":
                split_of = "test" if in_test(f"{row['id']}:{n}", test_fraction, seed) else "train"
                out[split_of].append(row)
            else:
                out[split].append(row)
    if not out["train"]:
        raise CaiError(f"config field '{field}': '{spec}' leaves no rows to train on (all {len(out['test'])} "
                       "went to the test split); add rows or lower data.test_fraction")
    return out


def _content(value, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise CaiError(f"{where}: field '{what}' must be a string, got {type(value).__name__}; write the text "
                       "as a JSON string")
    return value


def messages(value, where: str, name: str, role: str) -> list[dict]:
    """A field's turns: a list of ``{role, content}``, a hh-rlhf transcript, or a plain
    string (one ``role`` turn)."""
    if value is None:
        raise CaiError(f"{where}: no field '{name}'")
    if isinstance(value, str):
        if role == "user" and not value.strip():
            raise CaiError(f"{where}: field '{name}' is empty; give the prompt's text")
        if value.lstrip().startswith(("Human:", "H:")):
            return parse_transcript(value, f"{where} field '{name}'", keep_answer=role == "assistant")
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise CaiError(f"{where}: field '{name}' must be a string or a non-empty list of {{role, content}} messages, "
                       f"got {value!r:.40}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise CaiError(f"{where}: field '{name}[{i}]' must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise CaiError(f"{where}: field '{name}[{i}].role' must be system, user or assistant; got {m['role']!r}")
        out.append({"role": m["role"], "content": _content(m["content"], where, f"{name}[{i}].content")})
    return out


def final_answer(turns: list[dict], where: str, name: str) -> str:
    """The assistant answer a field ends with, non-empty."""
    if turns[-1]["role"] != "assistant":
        raise CaiError(f"{where}: field '{name}' must end with an assistant answer (its last turn is "
                       f"'{turns[-1]['role']}')")
    if not turns[-1]["content"].strip():
        raise CaiError(f"{where}: field '{name}' is empty; give the answer's text, or drop the row")
    return turns[-1]["content"]


def require_user_turn(prompt: list[dict], where: str, name: str) -> None:
    if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        raise CaiError(f"{where}: field '{name}' has no non-empty user turn; give the prompt the answer replies to")


def sft_row(rec, where: str) -> dict:
    """``{"messages": [...]}`` from a TRL ``messages`` or ``prompt``/``completion`` row."""
    if not isinstance(rec, dict):
        raise CaiError(f"{where}: expected an object with 'messages', or 'prompt' and 'completion'")
    if rec.get("messages") is not None:
        if not isinstance(rec["messages"], list):
            raise CaiError(f"{where}: field 'messages' must be a list of {{role, content}} messages, got "
                           f"{type(rec['messages']).__name__}")
        turns = messages(rec["messages"], where, "messages", "user")
        final_answer(turns, where, "messages")
        require_user_turn(turns[:-1], where, "messages")
        return {"messages": turns}
    missing = [k for k in ("prompt", "completion") if rec.get(k) is None]
    if missing:
        have = ", ".join(map(str, rec)) or "none"
        raise CaiError(f"{where}: no field '{missing[0]}'; an SFT row needs 'messages', or 'prompt' and "
                       f"'completion' (fields here: {have})")
    prompt = messages(rec["prompt"], where, "prompt", "user")
    completion = messages(rec["completion"], where, "completion", "assistant")
    require_user_turn(prompt, where, "prompt")
    final_answer(completion, where, "completion")
    return {"messages": prompt + completion}


def preference_row(rec, where: str) -> dict:
    """A pair as the feedback stage writes it (``prompt`` messages, ``chosen`` / ``rejected``
    as one assistant turn each, ``p_chosen``) from a TRL or hh-rlhf row."""
    if not isinstance(rec, dict):
        raise CaiError(f"{where}: expected an object with 'prompt', 'chosen' and 'rejected'")
    for name in ("chosen", "rejected"):
        if rec.get(name) is None:
            have = ", ".join(map(str, rec)) or "none"
            raise CaiError(f"{where}: no field '{name}'; a preference row needs 'prompt', 'chosen' and 'rejected', "
                           f"or hh-rlhf transcripts in 'chosen' and 'rejected' (fields here: {have})")
    chosen = messages(rec["chosen"], where, "chosen", "assistant")
    rejected = messages(rec["rejected"], where, "rejected", "assistant")
    if rec.get("prompt") is not None:
        prompt = messages(rec["prompt"], where, "prompt", "user")
        if len(chosen) > 1:  # TRL's implicit-prompt form repeats the prompt inside chosen
            chosen = chosen[len(prompt):] or chosen[-1:]
            rejected = rejected[len(prompt):] or rejected[-1:]
    else:  # hh-rlhf: both transcripts share the conversation and differ in the last answer
        prompt = chosen[:-1]
        if rejected[:-1] != prompt:
            raise CaiError(f"{where}: 'chosen' and 'rejected' transcripts differ before their last answer")
        if not prompt:
            raise CaiError(f"{where}: no field 'prompt'; give the prompt, or whole hh-rlhf transcripts in 'chosen' "
                           "and 'rejected'")
    require_user_turn(prompt, where, "prompt")
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": final_answer(chosen, where, "chosen")}],
           "rejected": [{"role": "assistant", "content": final_answer(rejected, where, "rejected")}]}
    p = rec.get("p_chosen")
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0):
        raise CaiError(f"{where}: field 'p_chosen' is {p!r}; give a number in [0, 1] (the probability that 'chosen' "
                       "is the better answer), or leave it out for 1")
    row["p_chosen"] = 1.0 if p is None else float(p)
    row["source"] = rec["source"] if isinstance(rec.get("source"), str) else "file"
    return row
