"""The stage contract: what a stage is given and what it declares.

Every stage module (``cai/stages/*.py``) imports this module and the shared ones
(``inputs``, ``cost``, ``conversations``, ``training``, ``engines``...), never another
stage and never the pipeline. A stage is a :class:`StageSpec`: a ``run(ctx)`` that writes
its outputs into ``ctx.out`` and returns counts for the manifest, the config sections it
reads (its fingerprint), the stages it needs, and an ``estimate`` of its cost for ``cai
plan`` (:mod:`cai.cost`).

A stage reads another stage's outputs by name, ``ctx.artifact(stage, name)``, and
writes its own with ``ctx.output(name)``: the paths are spelled once, in
:mod:`cai.layout`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from cai.cost import Cost, PlanInputs
from cai.errors import CaiError
from cai.layout import CACHE, OUTPUTS, SERVERS, RunFolder, output_path
from cai.stage_names import SL_CAI

if TYPE_CHECKING:  # pragma: no cover
    from cai.config import RunConfig


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

    @property
    def outputs(self) -> dict[str, str]:
        """The outputs this stage declares for others to read: name -> path in its folder
        (its row of :data:`cai.layout.OUTPUTS`)."""
        return dict(OUTPUTS.get(self.name, {}))


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
    tracker: Any = None  # the run's experiment trackers (cai.tracking.RunTracker), main process only; None: off

    @property
    def run_folder(self) -> RunFolder:
        return RunFolder(self.run_dir)

    def finished(self, stage: str) -> bool:
        """Whether ``stage`` has finished in this run (its outputs can be read)."""
        return self.run_folder.finished(stage)

    def artifact(self, stage: str, name: str, /, required: bool = True, **fields: str) -> Path:
        """The path of ``stage``'s output ``name`` (:mod:`cai.layout`), e.g.
        ``ctx.artifact("feedback", "prefs", split="train")``. ``required``: the stage must
        have finished (a one-line error otherwise); False gives the path, there or not."""
        if required and not self.finished(stage):
            raise CaiError(f"stage '{self.name}' needs the finished stage '{stage}' in {self.run_dir}")
        return self.run_folder.path(stage, name, **fields)

    def output(self, name: str, /, **fields: str) -> Path:
        """Where this stage writes its declared output ``name`` (in ``ctx.out``), its folder made."""
        path = output_path(self.out, self.name, name, **fields)
        (path if path == Path(self.out) else path.parent).mkdir(parents=True, exist_ok=True)
        return path

    def model_path(self, spec: str) -> str:
        """A model setting as a path or id: ``sl-cai`` is this run's SFT model."""
        if spec == SL_CAI:
            return str(self.artifact("sft", "model"))  # it must be finished
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
            self.engines[path] = build_engine(cfg, self.run_dir / CACHE, progress=self.log,
                                              server_dir=self.run_dir / SERVERS)
        return self.engines[path]

    def judge_engine(self, section: str):
        """A judge's engine and how to release it (``section``: 'evaluate' or 'rl', whose
        ``judge`` settings it reads): the run's engine on the judge's model
        (:func:`cai.config.judge_model`), shared with the other stages; or with
        ``<section>.judge_endpoints`` an OpenAI-compatible engine on those servers (a larger
        served model, failing over between them), through the run's request cache, closed on
        release."""
        from cai.config import judge_engine_config, judge_model

        settings = getattr(self.cfg, section)
        if not settings.judge_endpoints:
            model = judge_model(self.cfg, section)
            return self.engine(model), lambda: self.release_engine(model)
        from cai.engines import build_engine

        engine = build_engine(judge_engine_config(self.cfg, section), self.run_dir / CACHE, progress=self.log)
        self.log(f"[{self.name}] judge: {settings.judge} on {', '.join(settings.judge_endpoints)}")
        return engine, engine.close

    def release_engine(self, model: str | None = None) -> None:
        """Close the engine on ``model`` (default: ``engine.model``) and free its memory, so
        that the next model loads into the room it leaves."""
        path = self.model_path(model) if model else self.cfg.engine.model
        if isinstance(self.engines, Engines):
            self.engines.release([path])
        elif path in self.engines:
            self.engines.pop(path).close()

    def track(self, metrics: dict, step: int) -> None:
        """Send ``metrics`` (name -> number) at ``step`` to the run's experiment trackers
        (``report_to``), each name prefixed by the stage (``sft/loss``); None values are left
        out. Does nothing without trackers, and in every process but the main one."""
        if self.tracker is None:
            return
        values = {f"{self.name}/{k}": float(v) for k, v in metrics.items() if v is not None}
        if values:
            self.tracker.log(self.name, values, step)

    def progress(self, total: int, desc: str, unit: str = "req"):
        """A progress bar with an ETA; yields ``update(n)``."""
        return progress_bar(total, f"[{self.name}] {desc}", unit, disable=not self.is_main)

    def record_input(self, label: str, path: Path) -> None:
        from cai.io import file_sha256

        if path.is_file():
            self.inputs[label] = file_sha256(path)

    def training_rows(self, upstream: str | None, name: str) -> tuple[dict[str, list[dict]], object]:
        """The train/test rows a training stage learns from, and where they come from (for its
        messages): the user's file when the stage's data setting names one (read and checked by
        :mod:`cai.datafiles`, recorded in the manifest), else ``upstream``'s artifact ``name``."""
        from cai.datafiles import outside_data, read_data
        from cai.io import read_jsonl

        spec = outside_data(self.cfg, self.name)
        if spec is not None:
            self.record_data()
            return read_data(self.cfg, self.name), spec
        paths = {s: self.artifact(upstream, name, split=s) for s in ("train", "test")}
        return {s: read_jsonl(p) for s, p in paths.items()}, paths["train"]

    def record_data(self) -> None:
        """Record the files this stage reads from outside the run (its data setting, see
        :mod:`cai.datafiles`) in the manifest: the setting's name, with a folder's file names."""
        from cai.datafiles import data_field, data_files

        d = data_field(self.name)
        spec = d.spec(self.cfg) if d else None
        for f in data_files(spec) if spec else []:
            self.record_input(d.field if Path(spec).expanduser().is_file() else f"{d.field}:{f.name}", f)


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str = "req", disable: bool = False):
    """A progress bar with an ETA on stderr; yields ``update(n)``."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, disable=disable)
    try:
        yield bar.update
    finally:
        bar.close()
