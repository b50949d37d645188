"""The shape of the code: who may import whom, one stage order, and the adapter that
holds the engine's transformers internals."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from cai.errors import CaiError

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_names() -> dict[str, Path]:
    out = {}
    for path in (SRC / "cai").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports() -> dict[str, set[str]]:
    """Every cai module's imports of other cai modules, deferred (in-function) ones included."""
    modules = _module_names()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            graph[name] |= {f for f in found if f in modules and f != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Groups of modules that reach each other (Tarjan's strongly connected components)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(group)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycle():
    assert _cycles(_imports()) == []


def test_stages_are_leaves_and_only_the_pipeline_and_plan_reach_them():
    graph = _imports()
    for name, deps in graph.items():
        stage_deps = {d for d in deps if d == "cai.stages" or d.startswith("cai.stages.")}
        if name.startswith("cai.stages."):
            # A stage imports the contract and shared modules: no other stage, no pipeline.
            assert stage_deps == set(), f"{name} imports {stage_deps}"
            assert "cai.pipeline" not in deps and "cai.plan" not in deps, name
        elif name != "cai.stages":
            assert not stage_deps or name in ("cai.pipeline", "cai.plan", "cai.cli"), f"{name} imports {stage_deps}"
    assert not any(d.startswith("cai.stages") for d in graph["cai.stage"] | graph["cai.stage_names"])


def test_the_stage_order_is_written_once_and_every_stage_estimates_itself():
    from cai.config import RunConfig
    from cai.stage_names import DEFAULT_STAGES, OPTIONAL_STAGES, STAGES
    from cai.stages import registry

    specs = registry()
    assert tuple(specs) == STAGES
    # The default runs every stage in order but the optional ones (listed by the user).
    assert tuple(RunConfig().stages) == DEFAULT_STAGES == tuple(s for s in STAGES if s not in OPTIONAL_STAGES)
    assert set(OPTIONAL_STAGES) <= set(STAGES)
    for name, spec in specs.items():
        assert spec.name == name and callable(spec.estimate)
    source = "\n".join(p.read_text(encoding="utf-8") for p in _module_names().values())
    # The order as a literal appears in stage_names.py alone.
    assert source.count('"critique_revision",\n    "sft",') == 1


def test_training_configs_share_one_set_of_optimizer_fields():
    import dataclasses

    from cai.config import DPOConfig, OptimizerConfig, PreferenceModelConfig, RLConfig, SFTConfig, TrainingConfig

    shared = {f.name for f in dataclasses.fields(TrainingConfig)}
    for cls in (SFTConfig, PreferenceModelConfig, DPOConfig):
        assert issubclass(cls, TrainingConfig) and shared <= {f.name for f in dataclasses.fields(cls)}
    assert issubclass(RLConfig, OptimizerConfig)
    # The stages keep their own defaults (flat keys, as before).
    assert (SFTConfig().learning_rate, PreferenceModelConfig().learning_rate, DPOConfig().learning_rate,
            RLConfig().learning_rate) == (2e-5, 1e-5, 1e-6, 1e-6)
    assert RLConfig().checkpoint_every == 20 and SFTConfig().checkpoint_every == 50


def test_transformers_internals_pass_the_adapter_check():
    from cai.engines import hf_compat

    hf_compat._checked = False
    hf_compat.check()
    cache = hf_compat.growing_cache()
    assert hf_compat.layer_kv(cache) == []


def test_a_transformers_release_that_moves_an_internal_fails_with_one_clear_line(monkeypatch):
    import transformers.cache_utils

    from cai.engines import hf_compat

    monkeypatch.setattr(hf_compat, "_checked", False)
    monkeypatch.delattr(transformers.cache_utils.DynamicLayer, "batch_select_indices")
    with pytest.raises(CaiError, match=r"transformers .* changed transformers\.cache_utils\.DynamicLayer\."
                                       r"batch_select_indices.*engine\.kind=openai"):
        hf_compat.check()


def test_use_attention_restores_the_model_setting_on_error(tiny_engine):
    from cai.engines import hf_compat

    config = tiny_engine.model.config
    before = config._attn_implementation
    with pytest.raises(RuntimeError):
        with hf_compat.use_attention(tiny_engine.model, "cai_shared_prefix"):
            assert config._attn_implementation == "cai_shared_prefix"
            raise RuntimeError("boom")
    assert config._attn_implementation == before


def test_return_free_memory_gives_a_released_heap_back():
    """Memory freed into the C heap goes back to the OS (glibc's malloc_trim), so the next
    model does not load on top of the last one's. In a child process: the malloc settings
    it changes (blocks from the heap, no automatic trim, as glibc ends up after large
    frees) must not leak into the test process."""
    import subprocess
    import sys

    child = """
import ctypes, ctypes.util, json
from cai.hardware import return_free_memory
libc = ctypes.CDLL(ctypes.util.find_library("c"))
if not hasattr(libc, "malloc_trim"):
    print(json.dumps(None)); raise SystemExit
def rss():
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(1 << 20) for _ in range(200)]
for b in blocks:
    ctypes.memset(b, 1, 1 << 20)
held = rss()
for b in reversed(blocks):
    libc.free(b)
freed = rss()
return_free_memory()
print(json.dumps([held, freed, rss()]))
"""
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    if got is None:
        pytest.skip("not glibc: nothing to trim")
    held, freed, trimmed = got
    assert freed > held - 20  # freed but still resident: what a released model leaves behind
    assert trimmed < held - 150  # ~200 MiB handed back


GROUND_FLOOR = {"cai.errors", "cai.io", "cai.stage_names", "cai.layout", "cai.seeds"}


def test_config_is_a_leaf_over_the_ground_floor():
    """The config imports nothing of cai's but the ground floor; what needs engines,
    evaluation sets or models is checked in cai.checks, above them."""
    graph = _imports()
    assert graph["cai.config"] <= {"cai.errors", "cai.io", "cai.stage_names"}, graph["cai.config"]
    for name in GROUND_FLOOR:
        assert graph[name] <= GROUND_FLOOR, (name, graph[name] - GROUND_FLOOR)


def _path_words() -> set[str]:
    """What a path to a stage's artifact starts with: a stage's name, or the first part of a
    declared output's path (``results.json``, ``chains``, ``model``...)."""
    from cai.layout import OUTPUTS
    from cai.stage_names import STAGES

    words = set(STAGES)
    for outputs in OUTPUTS.values():
        for pattern in outputs.values():
            first = pattern.split("/")[0]
            if first and "{" not in first:
                words.add(first)
    return words


def test_only_the_accessors_join_a_stage_or_an_artifact_name_to_a_path():
    """``run_dir / "feedback" / "prefs"`` is spelled in cai.layout alone (and the pipeline,
    which makes the stage folders; cai.artifacts, which reads manifests): every other
    module asks for an artifact by name (``ctx.artifact``, ``ctx.output``, ``RunFolder``)."""
    words = _path_words()
    allowed = {"cai.layout", "cai.pipeline", "cai.artifacts"}
    bad = []
    for name, path in _module_names().items():
        if name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and not any(
                    isinstance(n, ast.Name) and n.id == "__file__" for n in ast.walk(node)):  # package data
                for side in (node.left, node.right):
                    if isinstance(side, ast.Constant) and isinstance(side.value, str) \
                            and side.value.split("/")[0] in words:
                        bad.append(f"{name}:{node.lineno}: / {side.value!r}")
            if isinstance(node, ast.Attribute) and node.attr in ("_stage_dir", "stage_dir") and name != "cai.stage":
                bad.append(f"{name}:{node.lineno}: .{node.attr}")
    assert bad == []


def test_the_check_catches_a_spelled_path(tmp_path):
    """The rule above is not vacuous: it finds the old spelling."""
    words = _path_words()
    tree = ast.parse('res = run / "evaluate" / "results.json"\nx = folder / "prefs"')
    found = [n.right.value for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.right, ast.Constant)
             and n.right.value.split("/")[0] in words]
    assert sorted(found) == ["evaluate", "prefs", "results.json"]


def test_every_stage_declares_its_outputs_and_writes_them(tmp_path, tiny_model):
    """Each StageSpec names its outputs (its row of cai.layout.OUTPUTS), and a finished run
    holds every declared output that its configuration produces."""
    from cai.config import load_config
    from cai.layout import OUTPUTS, RunFolder
    from cai.pipeline import run_pipeline
    from cai.stages import registry

    specs = registry()
    assert set(OUTPUTS) == set(specs)
    for name, spec in specs.items():
        assert spec.outputs == OUTPUTS[name]
    run = run_pipeline(load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"engine.model={tiny_model}", "stages=[prepare, critique_revision, sft, feedback]",
        "critique_revision.rounds=1", "critique_revision.max_prompts=2", "critique_revision.max_new_tokens=8",
        "critique_revision.critique_max_new_tokens=8", "sft.max_steps=1", "feedback.max_prompts=2",
        "feedback.max_new_tokens=4", "feedback.helpful_ratio=0", "data.max_per_split=4",
    ]), log=lambda m: None)
    folder = RunFolder(run)
    for stage in ("prepare", "critique_revision", "sft", "feedback"):
        for name, pattern in OUTPUTS[stage].items():
            fields = {"split": "train", "set": "red_team", "name": "x"}
            assert folder.path(stage, name, **{k: v for k, v in fields.items() if "{" + k + "}" in pattern}).exists(), \
                (stage, name)


def test_adding_a_config_field_and_an_artifact_touches_one_place_each(tmp_path, monkeypatch):
    """A new field is declared once, with its range, and is checked; a new artifact is one
    line in cai.layout.OUTPUTS, written with ctx.output and read with ctx.artifact."""
    import dataclasses

    from cai import config as config_mod
    from cai import layout
    from cai.config import _f, load_config
    from cai.stage import StageContext

    @dataclasses.dataclass
    class Section:
        widgets: int = _f(3, "How many widgets (a new field).", low=1, high=10)

    assert Section.__dataclass_fields__["widgets"].metadata["bounds"].high == 10
    with pytest.raises(CaiError, match=r"config field 'extra.widgets' must be in \[1, 10\]; got 11"):
        config_mod._check_ranges(Section(widgets=11), "extra")
    monkeypatch.setitem(layout.OUTPUTS, "feedback", {**layout.OUTPUTS["feedback"], "widgets": "widgets/{split}.json"})
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    writer = StageContext(cfg=cfg, run_dir=tmp_path, out=tmp_path / "feedback", name="feedback")
    writer.output("widgets", split="train").write_text("[]")
    (tmp_path / "feedback" / "manifest.json").write_text("{}")
    reader = StageContext(cfg=cfg, run_dir=tmp_path, out=tmp_path / "sft.partial", name="sft")
    assert reader.artifact("feedback", "widgets", split="train").read_text() == "[]"
    with pytest.raises(CaiError, match="stage 'sft' needs the finished stage 'dpo'"):
        reader.artifact("dpo", "model")


def test_the_elo_fit_is_pure_and_the_evaluation_wing_imports_no_stage():
    """cai.evaluation.elo needs numpy alone (no torch, no engine, no other cai module), and
    no module of the evaluation wing imports a stage: the evaluate stage composes them."""
    path = _module_names()["cai.evaluation.elo"]
    top = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            top.add(node.module.split(".")[0])
    assert top <= {"__future__", "itertools", "math", "numpy"}, top
    for name, deps in _imports().items():
        if name.startswith("cai.evaluation"):
            assert not any(d.startswith("cai.stages") for d in deps), (name, deps)


#: What only a training loop does: these belong to cai.loop.train, which every training stage runs.
LOOP_CALLS = {"backward", "no_sync", "optimizer_step", "save_checkpoint", "warmup_lr", "clip_grad_norm_", "step"}


def _loop_calls(path: Path) -> set[str]:
    """The loop-only calls in a module: ``f(...)`` or ``x.f(...)`` for f in LOOP_CALLS
    (``x.step()`` only where it is an optimizer's or a scaler's)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if name == "step" and not (isinstance(f, ast.Attribute) and "optim" in ast.unparse(f.value).lower()
                                   or isinstance(f, ast.Attribute) and "scaler" in ast.unparse(f.value).lower()):
            continue
        if name in LOOP_CALLS:
            found.add(name)
    return found


def test_no_stage_holds_a_training_loop_of_its_own():
    """sft, preference_model, dpo and rl supply an objective to cai.loop.train; none of them (or
    any other stage) backpropagates, steps an optimizer or saves a checkpoint itself."""
    stages = SRC / "cai" / "stages"
    held = {p.name: sorted(_loop_calls(p)) for p in stages.glob("*.py") if _loop_calls(p)}
    assert not held, held
    assert {"backward", "no_sync", "optimizer_step", "save_checkpoint", "warmup_lr"} <= _loop_calls(
        SRC / "cai" / "loop.py")


def test_the_loop_check_finds_a_loop_written_in_a_stage(tmp_path):
    stage = tmp_path / "mine.py"
    stage.write_text("def run(ctx):\n    for step in range(3):\n        loss = ctx.model(step)\n"
                     "        ctx.accelerator.backward(loss)\n        ctx.optimizer.step()\n", encoding="utf-8")
    assert _loop_calls(stage) == {"backward", "step"}


ROUND_STEPS = {"critique_conversation", "revision_conversation", "says_no_issue", "best_of_conversations"}


@pytest.mark.parametrize("module", ["cai/stages/critique_revision.py", "cai/constitutional.py"])
def test_the_critique_revision_round_is_written_once(module):
    """The critique -> revision round lives in cai.revision_loop: the stage and `cai chat` /
    `cai revise` run it and build no critique or revision request of their own (a second copy
    of the round drifts from the first)."""
    tree = ast.parse((SRC / module).read_text(encoding="utf-8"))
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            used.add(node.id)
        elif isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            used |= {alias.name for alias in node.names}
    assert not used & ROUND_STEPS, f"{module} builds its own round: {sorted(used & ROUND_STEPS)}"
