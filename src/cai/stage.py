"""The stage contract: what a stage is given, what it declares, and where artifacts live.

Every stage module (``cai/stages/*.py``) imports this module and the shared ones
(``conversations``, ``training``, ``engines``...), never another stage and never the
pipeline. A stage is a :class:`StageSpec`: a ``run(ctx)`` that writes its artifacts into
``ctx.out`` and returns counts for the manifest, the config sections it reads (its
fingerprint), the stages it needs, and an ``estimate`` of its cost for ``cai plan``.

Artifact paths that one stage writes and another reads are spelled once, here
(:func:`model_dir`, :func:`prompt_file`, :func:`split_file`), as are the shared readers
(:func:`prepared_prompts`, :func:`load_inputs`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from cai.errors import CaiError
from cai.prompts import SPLITS, Prompt, load_prompt_file

if TYPE_CHECKING:  # pragma: no cover
    from cai.config import RunConfig

#: A model setting that names the SL-CAI model this run's ``sft`` stage trains.
SL_CAI = "sl-cai"
#: The prompt sets ``prepare`` freezes, each with train/test splits.
PROMPT_SETS = ("red_team", "helpful", "benign")
#: Where a training stage saves its model inside its folder.
MODEL = "model"
#: The run's managed servers: their logs and pid files (``RUN_DIR/servers``).
SERVERS = "servers"


# -- artifact paths -------------------------------------------------------------------------


def model_dir(run_dir: Path, stage: str) -> Path:
    """The ``save_pretrained`` folder of a training stage: ``RUN_DIR/<stage>/model``."""
    return Path(run_dir) / stage / MODEL


def prompt_file(prep_dir: Path, name: str, split: str) -> Path:
    """A frozen prompt split of the prepare stage: ``prepare/prompts/<set>/<split>.jsonl``."""
    return Path(prep_dir) / "prompts" / name / f"{split}.jsonl"


def split_file(folder: Path, split: str) -> Path:
    """One split of an artifact folder (``chains/``, ``sft/``, ``prefs/``...): ``<split>.jsonl``."""
    return Path(folder) / f"{split}.jsonl"


def file_sha256(path: Path, sync: bool = False) -> str:
    """A file's sha256; with ``sync``, also flush it to disk (fsync) first."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if sync:
            import os

            os.fsync(fh.fileno())
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- shared readers -------------------------------------------------------------------------


def prepared_prompts(prep_dir: Path, name: str, limit: int | None = None) -> dict[str, list[Prompt]]:
    """One prompt set's frozen train/test splits from a finished prepare stage, at most
    ``limit`` prompts per split (None: all)."""
    return {s: load_prompt_file(prompt_file(prep_dir, name, s))[:limit] for s in SPLITS}


#: The optional stage whose kept prompts join the red-team train split (``expand/train.jsonl``).
EXPAND = "expand"


def with_expansion(cfg: "RunConfig", needs: tuple[str, ...]) -> tuple[str, ...]:
    """``needs`` plus the ``expand`` stage when the config expands the red-team prompts
    (``expand.count`` > 0): the stages that read red-team train prompts declare it so."""
    return tuple(needs) + ((EXPAND,) if cfg.expand.count > 0 else ())


def expanded_prompts(ctx: "StageContext") -> list[Prompt]:
    """The ``expand`` stage's kept prompts (none when ``expand.count`` is 0). They are more
    red-team *train* prompts; test splits are never expanded."""
    if ctx.cfg.expand.count <= 0:
        return []
    path = split_file(ctx.stage_dir(EXPAND), "train")
    ctx.record_input("expand", path)
    return load_prompt_file(path) if path.is_file() and path.stat().st_size else []


def red_team_prompts(ctx: "StageContext", limit: int | None = None) -> dict[str, list[Prompt]]:
    """The red-team splits a data stage reads: the prepared ones, at most ``limit`` per split,
    with the ``expand`` stage's kept prompts after them in train (all of them: their number
    is ``expand.count``'s business)."""
    prompts = prepared_prompts(ctx.stage_dir("prepare"), "red_team", limit)
    prompts["train"] = prompts["train"] + expanded_prompts(ctx)
    return prompts


def load_inputs(cfg: "RunConfig"):
    """The constitution and the three prompt sets of a config, validated: what ``prepare``
    freezes, ``cai validate`` checks and ``cai plan`` counts."""
    from cai.constitution import load_constitution
    from cai.evalsets import load_source

    const = load_constitution(cfg.data.constitution)
    sets = {}
    for name in PROMPT_SETS:
        splits = load_source(getattr(cfg.data, name), cfg.data.test_fraction, cfg.seed)
        if cfg.data.max_per_split is not None:
            splits = {s: ps[: cfg.data.max_per_split] for s, ps in splits.items()}
        needed = ("train", "test") if name == "red_team" else ("test",)
        for split in needed:
            if not splits.get(split):
                n = sum(len(ps) for ps in splits.values())
                raise CaiError(
                    f"data.{name} '{getattr(cfg.data, name)}': its {split} split is empty ({n} prompts in all, "
                    f"test_fraction {cfg.data.test_fraction}); add prompts, give train/test files, or change "
                    "data.test_fraction"
                )
        sets[name] = splits
    return const, sets


# -- cost estimates (cai plan) --------------------------------------------------------------


@dataclass
class Cost:
    """What a stage will do, counted before it runs (``cai plan``).

    ``generate``/``score`` count engine requests; the token counts assume every answer
    uses its whole budget. ``seconds`` comes later, from the plan's calibration.
    """

    generate: int = 0
    score: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    decode_steps: int = 0  # the engine's sequential decoding steps (see decode_steps); 0: not counted
    train_tokens: int = 0
    note: str = ""
    # a training stage: its passes (each call costs a fixed part plus its tokens) and its fixed costs
    train_passes: int = 0  # forward+backward micro-batch passes (of train_tokens in all)
    steps: int = 0  # optimizer steps
    loads: int = 0  # models loaded from disk
    eval_tokens: int = 0  # no-grad forward tokens of a training model (held-out evaluation, reference passes)
    eval_passes: int = 0  # no-grad forward calls (of eval_tokens in all)
    policy_tokens: int = 0  # new tokens sampled by the training model itself (rl's rollouts), not the engine
    saves: int = 0  # save_pretrained models written (and hashed into the manifest)
    checkpoints: int = 0  # resumable checkpoints written (weights + AdamW state)
    figures: int = 0  # PNG figures drawn
    #: peak memory per process (a :class:`cai.memory.Memory`); None: nothing local to hold
    memory: object = None


def decode_steps(rows: float, batch_size: int, max_new_tokens: int) -> int:
    """The sequential decoding steps of one generate call of ``rows`` samples: the engine
    decodes ``batch_size`` rows at a time, each batch for up to ``max_new_tokens`` steps. A
    step costs a fixed part whatever the batch (the plan's calibration), so a call of few
    rows gets fewer new tokens a second than a full batch."""
    import math

    return math.ceil(rows / max(1, batch_size)) * max_new_tokens if rows > 0 else 0


def passes(items: float, micro: int, world: int = 1) -> int:
    """The micro-batch calls one process makes for ``items`` split over ``world`` processes."""
    import math

    return math.ceil(math.ceil(items / world) / max(1, micro)) if items > 0 else 0


#: Model shapes already built on the meta device, by (setting, revision).
_SHAPES: dict = {}


@dataclass
class PlanInputs:
    """What every stage's estimate reads: the config, its inputs and a token counter."""

    cfg: "RunConfig"
    constitution: object
    sets: dict  # set name -> {split: [Prompt]}
    count: Callable[[list[dict]], int]  # tokens of a conversation
    world: int = 1  # processes of the launch (each training stage's batch is split over them)
    device: str = "cpu"  # where the models run ('auto' resolved)

    def capped(self, name: str, n: int | None) -> dict[str, list[Prompt]]:
        """A prompt set's splits, at most ``n`` prompts each (None: all). With the red-team
        prompts expanded, train also counts ``expand.count`` new prompts (at most that many
        are kept), stood in for by the seeds, whose lengths they resemble."""
        out = {s: (ps if n is None else ps[:n]) for s, ps in self.sets[name].items()}
        train = self.sets[name].get("train", [])
        if name == "red_team" and self.cfg.expand.count > 0 and train:
            out["train"] = out.get("train", []) + [train[k % len(train)] for k in range(self.cfg.expand.count)]
        return out

    def feedback_pairs(self, split: str = "train") -> float:
        """About how many comparisons of ``split`` the feedback stage will write."""
        import math

        fb = self.cfg.feedback
        reds = self.capped("red_team", fb.max_prompts)
        return len(reds.get(split, [])) * math.comb(fb.samples_per_prompt, 2) * (1 + fb.helpful_ratio)

    # -- what memory estimates read (cai.memory) --

    def shape(self, setting: str | None):
        """The :class:`cai.memory.ModelShape` of a model setting (``sl-cai``: the model ``sft``
        fine-tunes, same shape), from its config alone; None for a remote engine's model or
        a model not on this machine."""
        from cai.memory import model_config, shape_of

        e = self.cfg.engine
        name = setting or e.model
        if name == SL_CAI:
            name = self.cfg.sft.model or e.model
        if e.kind != "local" and name == e.model:
            return None
        key = (name, e.revision)
        if key not in _SHAPES:
            config = model_config(name, e.revision, e.trust_remote_code)
            _SHAPES[key] = shape_of(config) if config is not None else None
        return _SHAPES[key]

    def engine_bytes(self) -> int:
        """Bytes per weight of the inference engine (``engine.dtype`` on this device)."""
        from cai.memory import DTYPE_BYTES
        from cai.models import pick_dtype

        return DTYPE_BYTES[str(pick_dtype(self.cfg.engine.dtype, self.device)).replace("torch.", "")]


    def helpful_beside(self, red: dict[str, list[Prompt]], ratio: float) -> list[Prompt]:
        """The helpfulness prompts mixed in beside ``red``: per split, ``ratio`` per red-team prompt."""
        helpful = self.sets["helpful"]
        return [p for s in red for p in helpful.get(s, [])[: min(len(helpful.get(s, [])), round(ratio * len(red[s])))]]


# -- the contract ----------------------------------------------------------------------------


@dataclass
class StageSpec:
    name: str
    run: Callable[["StageContext"], dict]
    config_keys: tuple[str, ...]
    #: Upstream stages, or a function of the config giving them (a stage that reads the
    #: SL-CAI model needs ``sft`` only when its model setting is ``sl-cai``).
    needs: tuple[str, ...] | Callable[["RunConfig"], tuple[str, ...]] = ()
    help: str = ""
    #: Runs in every process under ``accelerate launch`` (a training loop that takes its
    #: share of each batch). The run's inference engines are released before it starts, so
    #: their weights do not sit in (GPU) memory beside the model being trained. False: the
    #: main process runs it while the others wait.
    distributed: bool = False
    #: The stage's cost for ``cai plan``, from the config and its inputs alone.
    estimate: Callable[[PlanInputs], Cost] = lambda inputs: Cost()

    def upstream(self, cfg: "RunConfig") -> tuple[str, ...]:
        return tuple(self.needs(cfg) if callable(self.needs) else self.needs)


class Engines(dict):
    """The run's engines by model path, shared by the stages of one ``cai run``, with the
    request-cache counts of those already released."""

    hits = misses = 0
    used = False

    def release(self, paths=None) -> None:
        """Close the engines on ``paths`` (default: all), drop them and free their memory;
        a later ``StageContext.engine`` call loads the model again."""
        from cai.hardware import return_free_memory

        for path in list(self) if paths is None else [p for p in paths if p in self]:
            engine = self.pop(path)
            self.hits += getattr(engine, "hits", 0)
            self.misses += getattr(engine, "misses", 0)
            self.used = True
            engine.close()
            del engine
        return_free_memory()

    def release_served(self) -> None:
        """Close the engines that run on managed servers, stopping the servers (at the end
        of every stage, finished or not: a server never outlives the stage that needed it)."""
        self.release([p for p, e in self.items() if getattr(getattr(e, "engine", e), "served", False)])


@dataclass
class StageContext:
    cfg: "RunConfig"
    run_dir: Path
    out: Path
    name: str
    log: Callable[[str], None] = print
    inputs: dict = field(default_factory=dict)  # name -> sha256, recorded in the manifest
    engines: Engines = field(default_factory=Engines)  # model path -> engine, shared across stages
    is_main: bool = True  # the main process (or the only one): it alone shows progress bars

    def stage_dir(self, name: str) -> Path:
        path = self.run_dir / name
        if not (path / "manifest.json").is_file():
            raise CaiError(f"stage '{self.name}' needs the finished stage '{name}' in {self.run_dir}")
        return path

    def model_path(self, spec: str) -> str:
        """A model setting as a path or id: ``sl-cai`` is this run's SFT model."""
        if spec == SL_CAI:
            self.stage_dir("sft")  # it must be finished
            return str(model_dir(self.run_dir, "sft"))
        return spec

    def engine(self, model: str | None = None):
        """The engine on ``model`` (default: ``engine.model``) with the run's settings.

        Engines are built once per model and shared by the stages of one ``cai run``;
        they all write to the run's request cache.
        """
        path = self.model_path(model) if model else self.cfg.engine.model
        if path not in self.engines:
            from cai.engines import build_engine

            cfg = dataclasses.replace(self.cfg.engine, model=path)
            if cfg.kind != "local" and Path(path).is_dir() and cfg.serve == "none":
                # A checkpoint this run trained (or any local folder) is not on the
                # user's servers: without managed servers (engine.serve) it runs on the
                # local engine with the same settings.
                cfg = dataclasses.replace(cfg, kind="local")
            self.engines[path] = build_engine(cfg, self.run_dir / "cache.sqlite", progress=self.log,
                                              server_dir=self.run_dir / SERVERS)
        return self.engines[path]

    def release_engine(self, model: str | None = None) -> None:
        """Close the engine on ``model`` (default: ``engine.model``) and free its memory, so
        that the next model loads into the room it leaves."""
        path = self.model_path(model) if model else self.cfg.engine.model
        if isinstance(self.engines, Engines):
            self.engines.release([path])
        elif path in self.engines:
            self.engines.pop(path).close()

    @contextlib.contextmanager
    def progress(self, total: int, desc: str, unit: str = "req"):
        """A progress bar with an ETA; yields ``update(n)``."""
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"[{self.name}] {desc}", unit=unit, dynamic_ncols=True, leave=False,
                   disable=not self.is_main)
        try:
            yield bar.update
        finally:
            bar.close()

    def record_input(self, label: str, path: Path) -> None:
        if path.is_file():
            self.inputs[label] = file_sha256(path)
