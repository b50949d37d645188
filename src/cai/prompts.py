"""Prompt sets: load prompts from files, directories, saved datasets or the hub.

Every prompt becomes a :class:`Prompt` whose ``messages`` is a chat conversation that
ends with a user turn. Accepted record shapes (first match wins):

* ``messages``: a list of ``{"role", "content"}`` (TRL's conversational format);
* ``prompt`` / ``text`` / ``question`` / ``instruction`` / ``chosen``: a string, either
  a plain single-turn prompt or an Anthropic transcript
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``. A transcript's trailing assistant turn
  (the answer in hh-rlhf's ``chosen``) is dropped, so the conversation ends on the
  human's last turn.

Files: ``.jsonl``, ``.json`` (a list of records), ``.csv``, ``.txt`` (one prompt a
line), ``.parquet``; a directory holding ``train.*`` and ``test.*`` files, or a
dataset saved with ``save_to_disk``; ``hf:NAME``, ``hf:NAME:SPLIT`` or
``hf:NAME?name=SUBSET&data_dir=DIR&split=SPLIT&column=COL`` from the hub (online only,
:func:`parse_hf_spec`). Built-in sets are ``builtin:red_team``, ``builtin:helpful`` and
``builtin:benign``, each with fixed train/test splits.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cai.errors import CaiError
from cai.io import read_text

BUILTIN_DIR = Path(__file__).parent / "data" / "prompts"
TEXT_COLUMNS = ("prompt", "text", "question", "instruction", "chosen")
SUFFIXES = (".jsonl", ".json", ".csv", ".txt", ".parquet")
SPLITS = ("train", "test")

Message = dict


@dataclass
class Prompt:
    id: str
    messages: list[Message]
    category: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The last user turn (the prompt itself for single-turn prompts)."""
        return self.messages[-1]["content"]

    def to_record(self) -> dict:
        return {
            "id": self.id,
            "category": self.category,
            "prompt": self.text,
            "messages": self.messages,
        }


_TRANSCRIPT_RE = re.compile(r"(?:^|\n\n)(Human|Assistant|H|A):[ \t]?")


def looks_like_transcript(text: str) -> bool:
    return bool(re.match(r"^\s*(Human|H):", text)) or "\n\nHuman:" in text


def parse_transcript(text: str, where: str = "transcript", keep_answer: bool = False) -> list[Message]:
    """Parse Anthropic's ``\\n\\nHuman: ...\\n\\nAssistant: ...`` format.

    Turns are split only at a role name that starts the text or follows a blank line,
    so a colon inside a turn ("Note: ...", "Assistant: is a word here") is content.
    """
    text = text.lstrip()
    pieces = _TRANSCRIPT_RE.split(text)
    if pieces[0].strip():
        raise CaiError(f"{where}: text before the first 'Human:' turn: {pieces[0][:40]!r}")
    messages = []
    for role, content in zip(pieces[1::2], pieces[2::2]):
        role = "user" if role in ("Human", "H") else "assistant"
        content = content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": role, "content": content})
    if keep_answer:  # a whole exchange (hh-rlhf's chosen/rejected): keep its final answer
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise CaiError(f"{where}: the transcript does not end with an 'Assistant:' answer")
        return messages
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()  # the answer (hh-rlhf) or an empty "Assistant:" cue
    if not messages or not messages[-1]["content"]:
        raise CaiError(f"{where}: the transcript has no non-empty Human turn")
    return messages


def _record_to_prompt(rec, where: str, index: int, column: str | None) -> Prompt:
    if isinstance(rec, str):
        rec = {"prompt": rec}
    if not isinstance(rec, dict):
        raise CaiError(f"{where}: expected an object with a 'prompt' or 'messages' field")
    meta = {}
    if column:
        if column not in rec:
            raise CaiError(
                f"{where}: missing column '{column}' (columns here: {', '.join(map(str, rec))})"
            )
        value = rec[column]
        key = column
    else:
        key = "messages" if rec.get("messages") is not None else None
        if key is None:
            key = next((c for c in TEXT_COLUMNS if rec.get(c) not in (None, "")), None)
        if key is None:
            cols = ", ".join(map(str, rec)) or "none"
            raise CaiError(
                f"{where}: no prompt column; expected 'messages' or one of "
                f"{', '.join(TEXT_COLUMNS)} (columns here: {cols})"
            )
        value = rec[key]
    if isinstance(value, list):
        messages = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise CaiError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
            if m["role"] not in ("system", "user", "assistant"):
                raise CaiError(f"{where}: {key}[{i}].role must be system, user or assistant, got {m['role']!r}")
            messages.append({"role": m["role"], "content": str(m["content"])})
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
            raise CaiError(f"{where}: '{key}' must contain a non-empty user turn")
    elif isinstance(value, str):
        if not value.strip():
            raise CaiError(f"{where}: '{key}' is empty")
        if looks_like_transcript(value):
            messages = parse_transcript(value, where)
        else:
            messages = [{"role": "user", "content": value.strip()}]
    else:
        raise CaiError(f"{where}: '{key}' must be a string or a list of messages, got {type(value).__name__}")
    if isinstance(rec.get("split"), str):
        meta["split"] = rec["split"]
    pid = rec.get("id")
    if pid is None:
        pid = "p-" + hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:12]
    category = rec.get("category")
    return Prompt(id=str(pid), messages=messages, category=None if category is None else str(category), meta=meta)


def read_records(path: Path) -> list[tuple[str, object]]:
    """(location, raw record) pairs from one file; raises on unreadable content."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(read_text(path, "prompt file").split("\n"), 1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise CaiError(f"{path}:{n}: malformed JSON line ({exc.msg}); fix or remove that line") from None
        return out
    if suffix == ".json":
        try:
            data = json.loads(read_text(path, "prompt file") or "null")
        except json.JSONDecodeError as exc:
            raise CaiError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if data is None:
            return []
        if not isinstance(data, list):
            raise CaiError(f"{path}: expected a JSON list of records (or JSONL, one record a line)")
        return [(f"{path}[{i}]", r) for i, r in enumerate(data)]
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_text(path, "prompt file"), newline=""))
        return [(f"{path}:{n}", dict(row)) for n, row in enumerate(reader, 2)]
    if suffix == ".txt":
        lines = read_text(path, "prompt file").splitlines()
        return [(f"{path}:{n}", line) for n, line in enumerate(lines, 1) if line.strip()]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises many types for a bad file
            raise CaiError(f"{path}: cannot read as Parquet ({exc})") from None
        return [(f"{path}[row {i}]", r) for i, r in enumerate(rows)]
    raise CaiError(
        f"{path}: unknown prompt file format '{suffix or '(none)'}'; use one of {', '.join(SUFFIXES)}"
    )


def load_prompt_file(path: str | Path, column: str | None = None) -> list[Prompt]:
    path = Path(path)
    if not path.is_file():
        raise CaiError(f"prompt file '{path}' does not exist")
    records = read_records(path)
    if not records:
        raise CaiError(f"{path}: the prompt file is empty; add one prompt per record")
    prompts = [_record_to_prompt(r, where, i, column) for i, (where, r) in enumerate(records)]
    _dedupe_ids(prompts, str(path))
    return prompts


def _dedupe_ids(prompts: list[Prompt], source: str) -> None:
    seen = set()
    for p in prompts:
        if p.id in seen:
            raise CaiError(f"{source}: duplicate prompt id '{p.id}'; ids must be unique")
        seen.add(p.id)


def in_test(key: str, test_fraction: float, seed: int) -> bool:
    """Whether the item with id ``key`` falls in the held-out share: a hash of the seed and
    the id, the same on every run and machine."""
    h = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < test_fraction


def split_by_hash(prompts: list[Prompt], test_fraction: float, seed: int) -> dict[str, list[Prompt]]:
    out = {"train": [], "test": []}
    for p in prompts:
        out["test" if in_test(p.id, test_fraction, seed) else "train"].append(p)
    return out


def split_files(directory: Path) -> dict[str, Path]:
    found = {}
    for split in SPLITS:
        for suffix in SUFFIXES:
            cand = directory / f"{split}{suffix}"
            if cand.is_file():
                found[split] = cand
                break
    return found


def _from_datasets(obj, source: str, column: str | None) -> dict[str, list[Prompt]]:
    splits = {}
    items = obj.items() if hasattr(obj, "items") else [("train", obj)]
    for split, ds in items:
        recs = [(f"{source}[{split}][{i}]", r) for i, r in enumerate(ds)]
        splits[split] = [_record_to_prompt(r, w, i, column) for i, (w, r) in enumerate(recs)]
    return splits


def _hub_offline() -> bool:
    from cai.models import offline

    return offline() or os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in ("1", "true", "yes")


HF_KEYS = ("name", "data_dir", "split", "column")
#: Hub datasets whose default load mixes subsets of different kinds: a data_dir is required.
HF_NEEDS_DATA_DIR = {
    "Anthropic/hh-rlhf": "data_dir=harmless-base (red-team prompts) or data_dir=helpful-base (helpful prompts); "
                         "or use eval:hh-rlhf-harmless",
}


def parse_hf_spec(spec: str) -> dict:
    """``hf:PATH``, ``hf:PATH:SPLIT`` or ``hf:PATH?name=SUBSET&data_dir=DIR&split=SPLIT&column=COL``
    -> {"path", "name", "data_dir", "split", "column"} (None where not given). ``name`` is the
    hub subset (``load_dataset``'s config name), ``column`` the prompt column."""
    from urllib.parse import parse_qsl

    body, _, query = spec[3:].partition("?")
    path, _, split = body.partition(":")
    out = {"path": path, "name": None, "data_dir": None, "split": split or None, "column": None}
    if not path:
        raise CaiError(f"prompt set '{spec}': no dataset after 'hf:' (e.g. hf:Anthropic/hh-rlhf?data_dir=harmless-base)")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise CaiError(f"prompt set '{spec}': bad query '?{query}'; use ?key=value&key=value with keys "
                       f"{', '.join(HF_KEYS)}") from None
    for key, value in pairs:
        if key not in HF_KEYS:
            raise CaiError(f"prompt set '{spec}': unknown key '{key}' (use {', '.join(HF_KEYS)})")
        if not value:
            raise CaiError(f"prompt set '{spec}': '{key}' is empty")
        if key == "split" and out["split"] and out["split"] != value:
            raise CaiError(f"prompt set '{spec}': two splits ('{out['split']}' and '{value}'); give one")
        out[key] = value
    if path in HF_NEEDS_DATA_DIR and not out["data_dir"]:
        raise CaiError(f"prompt set '{spec}' would mix {path}'s harmless and helpful subsets as one set; add "
                       f"?{HF_NEEDS_DATA_DIR[path]}")
    return out


def load_prompt_set(
    spec: str,
    test_fraction: float = 0.25,
    seed: int = 0,
    column: str | None = None,
) -> dict[str, list[Prompt]]:
    """Load a prompt set as fixed ``{"train": [...], "test": [...]}`` splits. (The standard
    evaluation sets, ``eval:NAME``, load through :func:`cai.evaluation.sets.load_source`, which
    takes every source.)

    Splits come from the source where it has them (separate files, a ``split``
    field, a DatasetDict); otherwise each prompt goes to test when a hash of its id
    falls under ``test_fraction``, which is stable across runs and machines.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise CaiError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        directory = BUILTIN_DIR / name
        if not directory.is_dir():
            names = ", ".join(sorted(p.name for p in BUILTIN_DIR.iterdir() if p.is_dir()))
            raise CaiError(f"no built-in prompt set '{name}' (available: {names})")
        return {s: load_prompt_file(p, column) for s, p in split_files(directory).items()}
    if spec.startswith("hf:"):
        hub = parse_hf_spec(spec)
        if _hub_offline():
            raise CaiError(
                f"prompt set '{spec}' needs the Hugging Face hub, but HF_HUB_OFFLINE is set; "
                "download it while online or point to a local file"
            )
        import datasets

        kwargs = {k: hub[k] for k in ("data_dir", "split") if hub[k]}
        try:
            ds = datasets.load_dataset(hub["path"], hub["name"], **kwargs)
        except Exception as exc:
            raise CaiError(f"cannot load dataset '{hub['path']}' from the hub: {exc}") from None
        splits = _from_datasets(ds if hub["split"] is None else {hub["split"]: ds}, spec, hub["column"] or column)
        return _normalise_splits(splits, spec, test_fraction, seed)
    path = Path(spec)
    if path.is_dir():
        files = split_files(path)
        if files:
            return {s: load_prompt_file(p, column) for s, p in files.items()}
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            import datasets

            splits = _from_datasets(datasets.load_from_disk(str(path)), spec, column)
            return _normalise_splits(splits, spec, test_fraction, seed)
        raise CaiError(
            f"prompt directory '{path}' has no train/test files (train.jsonl, test.jsonl, ...) "
            "and is not a dataset saved with save_to_disk"
        )
    prompts = load_prompt_file(path, column)
    if any("split" in p.meta for p in prompts):
        splits = {}
        for p in prompts:
            splits.setdefault(p.meta.get("split", "train"), []).append(p)
        return _normalise_splits(splits, spec, test_fraction, seed)
    return split_by_hash(prompts, test_fraction, seed)


def _normalise_splits(splits: dict, source: str, test_fraction: float, seed: int) -> dict:
    if "test" in splits and "train" in splits:
        return {"train": splits["train"], "test": splits["test"]}
    merged = [p for ps in splits.values() for p in ps]
    if not merged:
        raise CaiError(f"{source}: no prompts found")
    return split_by_hash(merged, test_fraction, seed)
