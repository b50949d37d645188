"""Publishing a finished run: Hugging Face model and dataset cards, and ``cai push``.

A run's trained models (the SL-CAI model, the RL-CAI and DPO models, the preference model)
each become a model repository ``ORG/NAME-<model>``; its data (the SL-CAI conversations,
the AI-feedback preference pairs, the critique/revision chains) one dataset repository
``ORG/NAME-data`` with a config per kind. Every repository gets a ``README.md`` card built
with ``huggingface_hub``'s card classes: Hub metadata (``base_model``, ``datasets``,
``tags``, ``license``), the constitution's name, hash and principles, the data counts, the
training settings, the evaluation's figures with their intervals, and the limits the
evaluation found (a judge at chance, a preference model at chance, held-out sets too small
for their intervals).

The cards are built at push time, never written into the run: a finished stage's folder
does not change after its manifest is written. ``cai push --dry-run OUT`` writes the exact
folders it would upload, with their cards, and uploads nothing.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from cai.errors import CaiError
from cai.evaluation.results import JudgeReliability, RefusalBySet, Results
from cai.layout import CONFIG, RunFolder

#: The models a run can publish: stage -> (repository suffix, what it is, Hub tags).
MODELS = {
    "sft": ("sl-cai", "the SL-CAI model: supervised fine-tuning on the constitution's critique/revision data",
            ["sft"]),
    "rl": ("rl-cai", "the RL-CAI model: RL (RLOO) against the preference model with a KL penalty", ["rlaif", "rloo"]),
    "dpo": ("dpo", "the DPO model: direct preference optimisation on the AI-feedback pairs", ["dpo", "rlaif"]),
    "preference_model": ("pm", "the preference (reward) model trained on the AI-feedback soft labels",
                         ["reward-model", "rlaif"]),
}
#: The datasets: config name -> (stage, artifact, what it is, columns).
DATASETS = {
    "sft": ("critique_revision", "sft", "the SL-CAI training conversations: prompts with their revised answers",
            "messages"),
    "preferences": ("feedback", "prefs", "AI-feedback preference pairs with soft labels",
                    "prompt, chosen, rejected, p_chosen, margin, principle_ids, position_consistent..."),
    "chains": ("critique_revision", "chains", "every answer → critique → revision chain, with its principles",
               "messages, initial_response, rounds, final_response..."),
}
#: The hub id of the embedded default model (``engine.model=default``).
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TAGS = ["cai", "constitutional-ai"]


@dataclass
class Upload:
    """One repository to create and fill: its files (path in the repo -> source) and card."""

    repo_id: str
    repo_type: str  # model | dataset
    card: str
    files: dict[str, Path] = field(default_factory=dict)


# -- reading the run -------------------------------------------------------------------------


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _hub_id(name: str | None) -> str | None:
    """A model setting as a Hub id for ``base_model``, or None (a local folder, sl-cai)."""
    from cai.models import is_hub_id

    if name == "default":
        return DEFAULT_MODEL_ID
    return name if name and is_hub_id(name) else None


class RunFacts:
    """What the cards say about a finished run, read once."""

    def __init__(self, run_dir: Path):
        import yaml

        from cai.constitution import load_constitution
        from cai.io import file_sha256

        self.run = RunFolder(run_dir)
        if not (Path(run_dir) / CONFIG).is_file():
            raise CaiError(f"'{run_dir}' is not a cai run folder (no {CONFIG}); give the run_dir of a finished run")
        self.cfg = yaml.safe_load((Path(run_dir) / CONFIG).read_text(encoding="utf-8")) or {}
        const_path = self.run.path("prepare", "constitution")
        if not const_path.is_file():
            raise CaiError(f"{const_path}: missing; the run's prepare stage has not finished")
        self.constitution = load_constitution(str(const_path))
        self.constitution_sha256 = file_sha256(const_path)
        self.results = Results.load(self.run.path("evaluate", "results")) if self.run.finished("evaluate") else None
        self.initial = self.cfg.get("engine", {}).get("model")

    def counts(self, stage: str) -> dict:
        return _json(self.run.manifest_path(stage)).get("counts") or {}

    def settings(self, stage: str) -> dict:
        return dict(self.cfg.get(stage) or {})


# -- cards ---------------------------------------------------------------------------------


def _fmt(x) -> str:
    return "–" if x is None else (f"{x:+.1f}" if isinstance(x, float) else str(x))


def _evaluation_lines(facts: RunFacts, name: str | None) -> list[str]:
    """The evaluation's figures for model ``name`` (as the evaluation names it) with intervals."""
    r = facts.results
    if r is None or name not in r.models:
        return ["Not evaluated in this run (the evaluate stage did not score this model)."]
    lines = ["| measure | value | 95% interval | judge |", "|---|---|---|---|"]
    for dim, table in (("harmlessness", r.elo.harmlessness), ("helpfulness", r.elo.helpfulness)):
        e = table.ratings.get(name) if table else None
        if e:
            lines.append(f"| {dim} Elo (initial model = 0) | {_fmt(e.elo)} | "
                         f"[{_fmt(e.ci_low)}, {_fmt(e.ci_high)}] | {_judge(table.judge_reliability)} |")
    h = r.harmfulness.get(name)
    if h:
        lines.append(f"| harmfulness 0-4 (judge), n={h.n} | {h.mean} | – | {_judge(h.judge_reliability)} |")
    for split, row in (r.refusal.get(name) or RefusalBySet()).named().items():
        ci = row.judge_majority_ci
        lines.append(f"| {split}: share judged refused (p > 0.5), n={row.n} | {row.judge_majority} | "
                     f"{ci if ci else '–'} | {_judge(row.judge_reliability)} |")
    return lines


def _judge(rel: JudgeReliability | None) -> str:
    if rel is None:
        return "–"
    if rel.position_consistency is None:
        return "consistency not measured (one order)"
    lo, hi = rel.position_consistency_ci or (None, None)
    return (f"{'AT CHANCE' if rel.at_chance else 'consistent'}: position consistency "
            f"{rel.position_consistency} [{lo}, {hi}]")


def limits(facts: RunFacts, stage: str | None = None) -> list[str]:
    """What the evaluation found that limits what the figures mean, one sentence each."""
    out = []
    r = facts.results
    if r is None:
        out.append("This run was not evaluated: nothing here says how harmless or helpful the model is.")
        return out
    questions = r.judge_reliability.questions() if r.judge_reliability else {}
    at_chance = sorted(k for k, v in questions.items() if v is not None and v.at_chance is True)
    if at_chance:
        out.append(f"The judge ({r.judge}) is at chance on this run for: {', '.join(at_chance)} (its position "
                   "consistency's 95% interval does not clear 0.5), so those figures carry no information.")
    small = sorted({split for sets in r.refusal.values() for split, row in sets.named().items() if row.too_small})
    if small:
        out.append(f"The held-out sets are too small for their intervals ({', '.join(small)}: a Wilson 95% interval "
                   "wider than 0.25).")
    elo = r.elo.harmlessness.ratings if r.elo.harmlessness else {}
    if elo and all((v.ci_low or 0) <= 0 <= (v.ci_high or 0) for v in elo.values()):
        out.append("Every harmlessness Elo interval includes 0: no model is measurably more harmless than the initial "
                   "one on this run.")
    if stage == "preference_model":
        pm = facts.counts("preference_model")
        if pm.get("test_accuracy") is not None and pm.get("test_accuracy") <= 0.55:
            out.append(f"The preference model's held-out accuracy is {pm['test_accuracy']} on "
                       f"{pm.get('test_pairs')} pairs: not distinguishable from chance.")
    return out


def _constitution_lines(facts: RunFacts) -> list[str]:
    c = facts.constitution
    lines = [f"Constitution **{c.name}** (sha256 `{facts.constitution_sha256[:16]}…`): "
             f"{len(c.principles)} critique/revision principles, {len(c.comparison_principles)} comparison "
             f"principles, {len(c.helpfulness_principles)} helpfulness principles.", "",
             "<details><summary>Principles</summary>", ""]
    lines += [f"- `{p.id}`: {p.critique}" for p in c.principles]
    lines += [f"- `{p.id}` (comparison): {p.text}" for p in c.comparison_principles + c.helpfulness_principles]
    return lines + ["", "</details>"]


def model_card(facts: RunFacts, stage: str, repo: str, pushed: set[str], license: str) -> str:
    """The README.md card of one trained model of the run."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    suffix, what, tags = MODELS[stage]
    settings = facts.settings(stage)
    start = settings.get("policy") if stage in ("rl", "dpo") else settings.get("model")
    start = start or facts.initial
    if start == "sl-cai":
        base = f"{repo}-{MODELS['sft'][0]}" if "sft" in pushed else None
        start_text = f"this run's SL-CAI model ({base or 'not published'})"
    else:
        base, start_text = _hub_id(start), f"`{start}`"
    data = [f"{repo}-data"] if "data" in pushed else []
    meta = ModelCardData(base_model=base, datasets=data or None, tags=TAGS + tags, license=license,
                         library_name="transformers",
                         pipeline_tag="text-classification" if stage == "preference_model" else "text-generation")
    counts = facts.counts(stage)
    eval_name = {"sft": "sl-cai", "rl": "rl", "dpo": "dpo"}.get(stage)
    body = [f"# {repo}-{suffix}", "", f"{what[0].upper()}{what[1:]}, trained with cai "
            "(Constitutional AI, Bai et al. 2022, \"Harmlessness from AI Feedback\").", "",
            f"- Started from: {start_text}", f"- Run seed: {facts.cfg.get('seed')}", "",
            "## Constitution", "", *_constitution_lines(facts), "",
            "## Data and training", "", "| count | value |", "|---|---|",
            *[f"| {k} | {v} |" for k, v in counts.items()], "",
            "<details><summary>Training settings</summary>", "", "```yaml",
            yaml.safe_dump({stage: settings}, sort_keys=False).rstrip(), "```", "", "</details>", ""]
    if eval_name:
        body += ["## Evaluation", "", *_evaluation_lines(facts, eval_name), ""]
    found = limits(facts, stage)
    body += ["## Limits", ""] + ([f"- {x}" for x in found] or ["- None found by this run's evaluation."])
    return str(ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"))


def dataset_card(facts: RunFacts, repo: str, configs: dict[str, dict[str, Path]], license: str) -> str:
    from huggingface_hub import DatasetCard, DatasetCardData

    meta = DatasetCardData(
        license=license, tags=TAGS + ["rlaif", "preference"],
        configs=[{"config_name": name, "data_files": [{"split": s, "path": f"{name}/{s}.jsonl"} for s in files]}
                 for name, files in configs.items()],
    )
    body = [f"# {repo}-data", "", "Data made by cai (Constitutional AI) from a constitution "
            "and red-team prompts. Rows are JSONL in TRL's formats: `datasets.load_dataset"
            f"(\"{repo}-data\", \"preferences\")` reads a config as it is.", "", "| config | what | columns | rows |",
            "|---|---|---|---|"]
    for name, files in configs.items():
        _, _, what, columns = DATASETS[name]
        rows = ", ".join(f"{s} {sum(1 for line in p.open(encoding='utf-8') if line.strip())}" for s, p in files.items())
        body.append(f"| `{name}` | {what} | {columns} | {rows} |")
    body += ["", "## Constitution", "", *_constitution_lines(facts), "", "## Limits", ""]
    fb = _json(facts.run.path("feedback", "stats")) if facts.run.finished("feedback") else {}
    if fb.get("mode") == "contrast":
        agree = fb.get("judge_agreement") or {}
        body.append(f"- The preference pairs are contrast pairs (RLCD): the answer written under a principle's positive "
                    f"prompt is chosen by construction, with p_chosen = {fb.get('contrast_label')}; no judge labelled "
                    "them." + (f" The feedback model, asked too, agreed with the construction on {agree.get('rate')} "
                               f"{agree.get('ci')} of {agree.get('n')} pairs." if agree.get("n") else ""))
    elif fb:
        ci = fb.get("position_consistency_ci")
        body.append(f"- The feedback model's position consistency on these pairs: {fb.get('position_consistency')} "
                    f"{ci if ci else ''} (at chance unless the interval's lower bound is above 0.5); decisiveness "
                    f"over both orders {fb.get('decisiveness_all_orders', fb.get('mean_abs_p_minus_half'))}.")
    body += [f"- {x}" for x in limits(facts)]
    return str(DatasetCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"))


# -- what to upload ------------------------------------------------------------------------


def plan_uploads(run_dir: str | Path, repo: str, models: list[str] | None = None, data: bool = True,
                 license: str = "other") -> list[Upload]:
    """The repositories ``cai push`` would create for a finished run: one per chosen model
    that finished (default: every one), and one dataset repository (unless ``data`` is off)."""
    from cai.models import is_hub_id

    if not is_hub_id(repo):
        raise CaiError(f"--repo: '{repo}' is not a Hub repository id; give ORG/NAME (cai adds -sl-cai, -rl-cai, "
                       "-dpo, -pm and -data)")
    unknown = [m for m in models or [] if m not in MODELS]
    if unknown:
        raise CaiError(f"--models: unknown model '{unknown[0]}' (choose from {', '.join(MODELS)})")
    facts = RunFacts(Path(run_dir))
    chosen = [m for m in (models or list(MODELS)) if facts.run.finished(m)]
    if models:
        missing = [m for m in models if m not in chosen]
        if missing:
            raise CaiError(f"--models: stage '{missing[0]}' has not finished in '{run_dir}'; run it first or leave it out")
    configs: dict[str, dict[str, Path]] = {}
    if data:
        for name, (stage, artifact, _, _) in DATASETS.items():
            if facts.run.finished(stage):
                files = {s: facts.run.path(stage, artifact, split=s) for s in ("train", "test")}
                files = {s: p for s, p in files.items() if p.is_file()}
                if files:
                    configs[name] = files
    pushed = set(chosen) | ({"data"} if configs else set())
    if not pushed:
        raise CaiError(f"'{run_dir}' has no finished model or data to publish")
    out = []
    for stage in chosen:
        folder = facts.run.path(stage, "model")
        files = {f.name: f for f in sorted(folder.iterdir()) if f.is_file() and f.name != "README.md"}
        out.append(Upload(f"{repo}-{MODELS[stage][0]}", "model", model_card(facts, stage, repo, pushed, license), files))
    if configs:
        files = {f"{name}/{s}.jsonl": p for name, fs in configs.items() for s, p in fs.items()}
        out.append(Upload(f"{repo}-data", "dataset", dataset_card(facts, repo, configs, license), files))
    return out


def write_folders(uploads: list[Upload], dest: Path) -> list[Path]:
    """Each upload as the folder it would be (``dest/<name>/``: its files and README.md)."""
    from cai.io import write_text

    if dest.exists() and any(dest.iterdir()):
        raise CaiError(f"--dry-run: '{dest}' exists and is not empty; give a new folder")
    made = []
    for u in uploads:
        folder = dest / u.repo_id.split("/")[-1]
        for rel, src in u.files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, folder / rel)
        write_text(folder / "README.md", u.card)
        made.append(folder)
    return made


def push(uploads: list[Upload], private: bool, log=print) -> None:
    """Create each repository and upload its folder (the token comes from the environment or
    ``huggingface-cli login``, never from cai). Not exercised by cai's tests: they run offline."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="cai-push-") as tmp:
        for u, folder in zip(uploads, write_folders(uploads, Path(tmp) / "out")):
            api.create_repo(u.repo_id, repo_type=u.repo_type, private=private, exist_ok=True)
            api.upload_folder(repo_id=u.repo_id, repo_type=u.repo_type, folder_path=str(folder),
                              commit_message="cai push")
            log(f"pushed {u.repo_type} https://huggingface.co/{'datasets/' if u.repo_type == 'dataset' else ''}"
                f"{u.repo_id}")
