"""The ``cai`` command line: ``cai run | plan | validate | config | model | score | report | chat | revise``.

Configuration is one rule everywhere: defaults < ``--config`` (a preset name or a YAML
file) < ``KEY=VALUE`` overrides such as ``engine.batch_size=8`` (values read as YAML).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import textwrap

from cai.errors import CaiError


def _field_lines(section: str | None = None) -> list[str]:
    from cai.config import describe

    lines = []
    for name, default, help_ in describe():
        if section is None or name.startswith(section + ".") or name == section:
            lines.append(f"  {name} = {default}")
            lines += textwrap.wrap(help_, 72, initial_indent="      ", subsequent_indent="      ")
    return lines


def _fields_epilog() -> str:
    from cai.config import list_presets, sections

    lines = ["config fields (override with KEY=VALUE, values read as YAML; one section's fields: "
             "`cai config SECTION`, sections: " + ", ".join(sections()) + "):"]
    lines += _field_lines()
    lines.append("")
    lines.append("presets: " + ", ".join(list_presets()))
    return "\n".join(lines)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="preset name (see `cai config --presets`) or YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. engine.batch_size=8")


def build_parser() -> argparse.ArgumentParser:
    from cai import __version__

    parser = argparse.ArgumentParser(
        prog="cai",
        description="Constitutional AI: critique/revision data, SFT, AI feedback, preference "
        "models, RL and evaluation, from a constitution and red-team prompts.",
    )
    parser.add_argument("--version", action="version", version=f"cai {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "run", help="run the pipeline's stages into a run directory (skips finished stages)",
        description="Run the configured stages. With no arguments: the cpu-tiny preset on the "
        "embedded SmolLM2-135M-Instruct, offline.", epilog=_fields_epilog(), formatter_class=fmt,
    )
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="rerun stages even if finished (the request cache still applies)")

    p = sub.add_parser(
        "validate", help="check a config, constitution or prompt file without running anything",
        description="The pre-flight of a run: check a config (and the constitution and prompt sets it names), "
        "then one line per check, ok / warn / error: the devices, memory per process against them, processes "
        "against devices, the serving engine, each endpoint (/v1/models, the model name, its context), every "
        "model the config names, and the disk. A warning is what this machine cannot check (a GPU config on a "
        "CPU login node, the hub offline). Exits 2 on a bad config or a failed check. Or check single files "
        "given with --constitution / --prompts.",
        epilog=_fields_epilog(), formatter_class=fmt,
    )
    _add_config_args(p)
    p.add_argument("--constitution", help="check only this constitution file (cai YAML, Anthropic or HF JSON)")
    p.add_argument("--prompts", help="check only this prompt file or directory")
    p.add_argument("--strict", action="store_true", help="count warnings (what cannot be checked here) as errors")

    p = sub.add_parser(
        "config", help="print the resolved config, one section's fields (`cai config sft`), or the presets",
        description="Print the resolved configuration as YAML; with a section name (engine, sft, dpo...), "
        "that section's fields with their defaults and help, and its resolved values.",
        epilog=_fields_epilog(), formatter_class=fmt,
    )
    _add_config_args(p)
    p.add_argument("--presets", action="store_true", help="list the shipped presets")

    sub.add_parser(
        "env", help="print versions, CPU features, GPUs and the optional extras found, to paste into a bug report",
        description="Print what a bug report needs: cai's and its libraries' versions, Python and the platform, "
        "the CPU's relevant features (AVX2, AVX-512, bf16, AMX) and whether cai trains in bfloat16 here, the "
        "GPUs, the optional extras installed, and the cai/Hugging Face environment variables that are set "
        "(their names only for tokens and keys).",
    )

    p = sub.add_parser(
        "model", help="resolve a model name to a local checkpoint (converts the embedded default once)",
        description="Resolve 'default', a directory or a hub id and print the checkpoint path.",
    )
    p.add_argument("name", nargs="?", default="default", help="model name (default: the embedded SmolLM2-135M-Instruct)")

    p = sub.add_parser(
        "gguf", help="export a checkpoint to GGUF (f16, q8_0, q4_0) with llama.cpp's converter",
        description="Export 'default', a checkpoint folder or a hub id to GGUF with llama.cpp's "
        "convert_hf_to_gguf.py (f16) and libllama's llama_model_quantize (q8_0, q4_0); cached by the "
        "checkpoint's content. Prints the file's path. Needs `cai serve-setup` once.",
    )
    p.add_argument("name", nargs="?", default="default", help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--type", default="q8_0", choices=("f16", "q8_0", "q4_0"), help="GGUF type (default q8_0)")

    p = sub.add_parser(
        "serve-setup", help="fetch llama.cpp's GGUF converter (and optionally build its server) for engine.serve",
        description="Copy llama.cpp's convert_hf_to_gguf.py out of the source package of the installed "
        "llama-cpp-python (pip downloads it) into cai's cache; with --build-server, also build "
        "llama.cpp's C++ llama-server there (cmake and a C++ compiler; several minutes on 2 cores).",
    )
    p.add_argument("--build-server", action="store_true", help="also build llama-server (for engine.serve=llama-server)")
    p.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")

    p = sub.add_parser(
        "score", help="score answers with a saved preference model",
        description="Print the preference model's reward for one answer (--prompt/--response) or for "
        "every row of a JSONL file with 'prompt' (text or messages) and 'response' fields (--file; "
        "prints JSONL with a 'reward' field added).",
    )
    p.add_argument("model", help="a preference model folder, e.g. RUN_DIR/preference_model/model")
    p.add_argument("--prompt", help="the user's prompt")
    p.add_argument("--response", help="the assistant's answer to score")
    p.add_argument("--file", help="JSONL rows with 'prompt' and 'response'")
    p.add_argument("--batch-size", type=int, default=8, help="answers per forward pass (default 8)")

    p = sub.add_parser(
        "report", help="write the run's self-contained HTML audit report",
        description="Build one HTML file (inline CSS/JS, plots embedded) from whatever stages RUN_DIR has: "
        "stage timeline, evaluation, training plots, principle statistics and a browser of every chain "
        "and AI comparison. Opens from disk with no server.",
    )
    p.add_argument("run_dir", help="a run directory (e.g. runs/cpu-tiny)")
    p.add_argument("--out", help="output file (default: RUN_DIR/report/index.html)")
    p.add_argument("--screenshot", metavar="PNG", help="also save a PNG of the page, taken with headless Chromium")

    for name, help_ in (
        ("chat", "talk to a model that critiques and revises each answer under the constitution (stdin)"),
        ("revise", "answer a file of prompts, then critique and revise each answer under the constitution"),
    ):
        p = sub.add_parser(
            name, help=help_,
            description=help_ + ". The engine, constitution and sampling come from the config "
            "(engine.*, data.constitution, critique_revision.*); principles are the --principle ids in "
            "order, one round each, or else critique_revision.rounds principles sampled per prompt."
            + (" One message per line; '/reset' clears the conversation, '/quit' ends." if name == "chat" else ""),
        )
        _add_config_args(p)
        p.add_argument("--principle", action="append", default=[], metavar="ID",
                       help="a principle id for the next round (repeatable); default: sampled")
        if name == "revise":
            p.add_argument("--prompts", required=True, help="prompt file (JSONL/JSON/CSV/TXT/Parquet, see docs/formats.md)")
            p.add_argument("--out", required=True, help="output JSONL, one chain per prompt")

    p = sub.add_parser(
        "push", help="publish a finished run's models and data to the Hugging Face Hub, with cards (--dry-run: a folder)",
        description="Upload a finished run: each trained model (sft as ORG/NAME-sl-cai, rl as -rl-cai, dpo as -dpo, "
        "preference_model as -pm) as a model repository and its data (SL-CAI conversations, AI-feedback "
        "preference pairs, critique/revision chains) as one dataset repository ORG/NAME-data, each with a "
        "README.md card: Hub metadata, the constitution, data counts, training settings, the evaluation's "
        "figures with intervals and the limits it found. The cards are built now; the run is not changed. "
        "The token comes from HF_TOKEN or `huggingface-cli login`. --dry-run writes the exact folders instead "
        "of uploading. See docs/formats.md#publishing-a-run.",
    )
    p.add_argument("run_dir", help="a finished run folder (e.g. runs/cpu-tiny)")
    p.add_argument("--repo", required=True, help="ORG/NAME: the repositories are ORG/NAME-sl-cai, -rl-cai, -dpo, "
                   "-pm and -data")
    p.add_argument("--models", help="comma-separated stages to publish (sft, rl, dpo, preference_model; "
                   "default: every one that finished)")
    p.add_argument("--no-data", action="store_true", help="publish the models only")
    p.add_argument("--license", default="other", help="the license id the cards declare (default: other; the base "
                   "model's license governs what you may do)")
    p.add_argument("--private", action="store_true", help="create the repositories private")
    p.add_argument("--dry-run", metavar="FOLDER", help="write the folders that would be uploaded here, upload nothing")

    p = sub.add_parser(
        "label", help="label a file of answer pairs with the AI-feedback judge (soft labels, both orders)",
        description="Label each pair of a file with the feedback stage's judge: the feedback model "
        "(feedback.model, else engine.model) reads a multiple-choice question under a comparison principle "
        "(sampled per pair from the constitution, or --principle), in both orders (feedback.both_orders), with "
        "the constitution's demonstrations and optional chain of thought (feedback.chain_of_thought, clamped to "
        "feedback.cot_clamp). The output has the feedback stage's pair rows: prompt/chosen/rejected with the soft "
        "label p_chosen and per-order detail. Answers go to a request cache beside --out, so a rerun after an "
        "interruption asks only what was not answered. See docs/judge.md.",
    )
    _add_config_args(p)
    p.add_argument("--pairs", required=True, help="JSONL/JSON/Parquet: prompt/chosen/rejected (TRL or hh-rlhf), "
                   "or prompt with two responses (responses: [a, b], or response_a/response_b)")
    p.add_argument("--out", required=True, help="output JSONL, one labelled pair a row")
    p.add_argument("--principle", metavar="ID", help="ask every pair under this comparison principle (default: sampled)")
    p.add_argument("--source", choices=("harmlessness", "helpfulness"), default="harmlessness",
                   help="which principles to sample from: the comparison (harmlessness) or helpfulness ones")
    p.add_argument("--cache", help="request-cache file (default: OUT.cache.sqlite beside --out)")

    p = sub.add_parser(
        "plan", help="estimate what a config will do: requests, tokens, peak memory and time per stage",
        description="Print, per stage, the engine requests, tokens (prompt + new), the peak memory per process "
        "(from the models' configs, no weights loaded) beside the device's memory, and an estimated time, "
        "extrapolated from a short calibration on the configured engine (a small generate and a small scoring "
        "batch are timed) and a measured training step (cached). An estimate, not a promise.",
        epilog=_fields_epilog(), formatter_class=fmt,
    )
    _add_config_args(p)
    p.add_argument("--no-calibrate", action="store_true", help="skip the timing; print counts, tokens and memory only")
    p.add_argument("--recalibrate", action="store_true",
                   help="measure training again instead of using the cached calibration (one taken while other "
                        "processes kept the cores busy is never cached)")
    p.add_argument("--processes", type=int, default=None,
                   help="processes the run will be launched with (default: WORLD_SIZE, else 1): each takes its share "
                   "of a training batch, and with sharding=fsdp its share of the weights")
    return parser


def _default_config(args) -> str:
    from cai.config import resolve_config_path

    if args.config:
        return args.config
    resolve_config_path("cpu-tiny")
    return "cpu-tiny"


def cmd_run(args) -> int:
    from cai.config import load_config
    from cai.pipeline import run_pipeline

    cfg = load_config(_default_config(args), args.overrides)
    run_pipeline(cfg, force=args.force)
    return 0


def cmd_validate(args) -> int:
    from cai.checks import check_config, check_run_dir
    from cai.config import load_config
    from cai.constitution import load_constitution
    from cai.stages import check_order
    from cai.evaluation.sets import load_source

    if args.constitution or args.prompts:
        if args.constitution:
            c = load_constitution(args.constitution)
            print(
                f"ok: {args.constitution}: constitution '{c.name}' with {len(c.principles)} principles, "
                f"{len(c.comparison_principles)} comparison principles, "
                f"{len(c.critique_revision_examples)} + {len(c.comparison_examples)} demonstrations"
            )
            for n in c.notes:
                print(f"note: {n}")
        if args.prompts:
            from cai.config import DataConfig
            from cai.inputs import NEEDED_SPLITS, check_splits

            fraction = DataConfig().test_fraction
            splits = load_source(args.prompts, fraction)
            # what data.red_team would be held to (the strictest set): a train and a test split
            check_splits(f"--prompts '{args.prompts}'", splits, fraction, NEEDED_SPLITS["red_team"])
            sizes = ", ".join(f"{s}={len(p)}" for s, p in splits.items())
            print(f"ok: {args.prompts}: {sizes}")
        return 0
    from cai.checks import ERROR, WARN, check_inputs, check_models, longest_request, preflight
    from cai.inputs import load_inputs
    from cai.memory import process_count
    from cai.plan import counter, estimate

    cfg = load_config(_default_config(args), args.overrides)
    check_config(cfg)
    check_run_dir(cfg.run_dir)
    check_order(cfg)
    models = check_models(cfg)  # a model that cannot be there stops it before anything is computed
    bad = [c.message for c in models if c.status == ERROR]
    if bad:
        raise CaiError("; ".join(bad))
    const, sets = load_inputs(cfg)
    check_inputs(cfg, const)
    print(f"ok: config: {', '.join(cfg.stages)} -> {cfg.run_dir}")
    print(f"ok: constitution '{const.name}': {len(const.principles)} principles, {len(const.comparison_principles)} comparison principles")
    for name, splits in sets.items():
        print(f"ok: {name}: " + ", ".join(f"{s}={len(p)}" for s, p in splits.items()))
    world = process_count()
    rows = None
    if cfg.memory_check:
        try:
            rows = estimate(cfg, counter(None), world)
        except CaiError as exc:
            print(f"warn: plan: cannot be made here ({exc})")
    checks = preflight(cfg, rows, world, longest_request(cfg, const, sets), models)
    failed = [c for c in checks if c.status == ERROR or (args.strict and c.status == WARN)]
    for c in checks:
        if c not in failed:  # the failures are said once, in the error line
            print(c.line())
    if failed:
        raise CaiError(("pre-flight (--strict: warnings count): " if args.strict else "") +
                       "; ".join(c.error() for c in failed))
    warned = sum(c.status == WARN for c in checks)
    print(f"pre-flight passed" + (f" with {warned} warning{'s' if warned > 1 else ''} (what this machine cannot "
                                  "check; --strict makes them errors)" if warned else ""))
    return 0


def cmd_config(args) -> int:
    import yaml

    from cai.config import list_presets, load_config, to_dict

    if args.presets:
        print("\n".join(list_presets()))
        return 0
    from cai.config import did_you_mean, sections

    names = [o for o in args.overrides if "=" not in o]
    if len(names) > 1:
        raise CaiError(f"give one section name at a time (got {', '.join(names)})")
    cfg = load_config(_default_config(args), [o for o in args.overrides if "=" in o])
    if not names:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    section = names[0]
    if section not in sections():
        raise CaiError(f"no config section '{section}'{did_you_mean(section, sections())} "
                       f"(sections: {', '.join(sections())})")
    print(f"{section}: fields (override with {section}.FIELD=VALUE)")
    print("\n".join(_field_lines(section)))
    print(f"\nresolved:\n" + yaml.safe_dump({section: to_dict(cfg)[section]}, sort_keys=False), end="")
    return 0


def cmd_env(args) -> int:
    from cai.hardware import environment

    for key, value in environment():
        print(f"- {key}: {value}")
    return 0


def cmd_model(args) -> int:
    from cai.models import resolve_model

    print(resolve_model(args.name, progress=lambda m: print(m, file=sys.stderr)))
    return 0


def cmd_gguf(args) -> int:
    from cai.engines.gguf import export_gguf
    from cai.models import resolve_model

    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    print(export_gguf(resolve_model(args.name, progress=say), args.type, progress=say))
    return 0


def cmd_serve_setup(args) -> int:
    from cai.engines.gguf import setup_tools

    setup_tools(build_server=args.build_server, log=lambda m: print(m, file=sys.stderr), jobs=args.jobs)
    return 0


def cmd_score(args) -> int:
    import json
    from pathlib import Path

    from cai.io import read_jsonl
    from cai.reward import RewardModel

    if bool(args.file) == bool(args.prompt is not None or args.response is not None):
        raise CaiError("give either --file, or both --prompt and --response")
    if not args.file and (args.prompt is None or args.response is None):
        raise CaiError("give both --prompt and --response (or --file)")
    if not Path(args.model, "config.json").is_file():
        raise CaiError(f"'{args.model}' is not a saved model folder (no config.json)")
    if args.file:
        rows = read_jsonl(Path(args.file))
        for n, r in enumerate(rows, 1):
            if not isinstance(r, dict) or "prompt" not in r or "response" not in r:
                raise CaiError(f"{args.file}:{n}: each row needs 'prompt' and 'response' fields")
    pm = RewardModel.load(args.model)
    if not args.file:
        print(f"{pm.score(args.prompt, args.response):.6f}")
        return 0
    scores = pm.score_many([r["prompt"] for r in rows], [str(r["response"]) for r in rows], args.batch_size)
    for r, s in zip(rows, scores):
        print(json.dumps({**r, "reward": round(s, 6)}, ensure_ascii=False))
    return 0


def cmd_report(args) -> int:
    from cai.report import write_report

    path = write_report(args.run_dir, args.out)
    print(path)
    if args.screenshot:
        from cai.report.browser import screenshot

        print(screenshot(path, args.screenshot))
    return 0


def _chain(args):
    from cai.config import load_config
    from cai.constitutional import ConstitutionalChain

    return ConstitutionalChain.from_config(load_config(_default_config(args), args.overrides), args.principle)


def cmd_chat(args) -> int:
    from cai.constitutional import format_record

    chain = _chain(args)
    history: list[dict] = []
    turn = 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = []
            print("(conversation cleared)", flush=True)
            continue
        turn += 1
        history.append({"role": "user", "content": text})
        (rec,) = chain.run([list(history)], ids=[f"chat-{turn}"])
        print(format_record(rec), flush=True)
        history.append({"role": "assistant", "content": rec["final_response"]})


def cmd_revise(args) -> int:
    from pathlib import Path

    from cai.io import write_jsonl
    from cai.prompts import load_prompt_file

    prompts = load_prompt_file(args.prompts)
    chain = _chain(args)
    records = chain.run([p.messages for p in prompts], ids=[p.id for p in prompts])
    for p, rec in zip(prompts, records):
        rec["category"] = p.category
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(Path(args.out), records)
    print(f"{len(records)} prompts, {sum(r['revised'] for r in records)} revised -> {args.out}")
    return 0


def cmd_label(args) -> int:
    import json
    import time
    from pathlib import Path

    from cai.checks import check_config
    from cai.config import load_config
    from cai.io import write_json, write_jsonl
    from cai.judge import Judge, describe_reliability, label_summary, pref_record, read_pairs
    from cai.stage import progress_bar

    cfg = load_config(_default_config(args), args.overrides)
    check_config(cfg)
    out = Path(args.out)
    if out.is_dir():
        raise CaiError(f"--out: '{out}' is a folder; give a .jsonl file name")
    if not out.parent.is_dir():
        raise CaiError(f"--out: folder '{out.parent}' does not exist; create it or pick another --out")
    pairs = read_pairs(args.pairs)
    cache = Path(args.cache) if args.cache else out.with_name(out.name + ".cache.sqlite")
    start = time.time()
    judge = Judge.from_config(cfg, principle=args.principle, source=args.source, cache_path=cache)
    try:
        comps = judge.label([judge.comparison(p.prompt, p.a, p.b, p.id) for p in pairs],
                            lambda total, desc: progress_bar(total, f"[label] {desc}"))
        hits, misses = getattr(judge.engine, "hits", None), getattr(judge.engine, "misses", None)
    finally:
        judge.engine.close()
    rows = []
    for c, p in zip(comps, pairs):
        if c.status == "labelled":
            row = pref_record(c, judge.model_name, judge.fb.both_orders)
            row["source"] = args.source
            if p.given_chosen:
                row["agrees_with_given"] = c.p_a >= 0.5
            rows.append(row)
    write_jsonl(out, rows)
    summary = {**label_summary(comps, pairs), "judge": judge.model_name, "seconds": round(time.time() - start, 1)}
    write_json(out.with_name(out.name + ".stats.json"), summary)
    print(json.dumps(summary))
    print(describe_reliability(summary["judge_reliability"]))
    if hits is not None:
        print(f"engine cache: {hits} hits, {misses} new requests")
    print(f"{summary['labelled']} of {summary['pairs']} pairs labelled -> {out}")
    return 0


def cmd_push(args) -> int:
    from pathlib import Path

    from cai.publish import plan_uploads, push, write_folders

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    uploads = plan_uploads(args.run_dir, args.repo, models, data=not args.no_data, license=args.license)
    if args.dry_run:
        for folder in write_folders(uploads, Path(args.dry_run)):
            files = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())
            print(f"{folder}/ ({len(files)} files): {', '.join(files)}")
        print(f"dry run: {len(uploads)} repositories written under {args.dry_run}; nothing uploaded")
        return 0
    push(uploads, args.private)
    return 0


def cmd_plan(args) -> int:
    from cai.config import load_config
    from cai.plan import plan, render

    cfg = load_config(_default_config(args), args.overrides)
    if args.processes is not None and args.processes < 1:
        raise CaiError(f"--processes must be >= 1; got {args.processes}")
    print(render(plan(cfg, calibrate=not args.no_calibrate, log=lambda m: print(m, file=sys.stderr),
                      world=args.processes, recalibrate=args.recalibrate)))
    return 0


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "config": cmd_config, "env": cmd_env, "model": cmd_model,
            "score": cmd_score,
            "gguf": cmd_gguf, "serve-setup": cmd_serve_setup,
            "report": cmd_report, "chat": cmd_chat, "revise": cmd_revise, "label": cmd_label, "push": cmd_push, "plan": cmd_plan}


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    parser = build_parser()
    # KEY=VALUE overrides may come before and after options (`cai run a=1 --force b=2`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except CaiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader of our output went away (`cai config | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" while writing {exc.filename}" if exc.filename else ""
            print(f"error: no space left on the device{where}; free some space and rerun the same command: "
                  "finished stages and cached answers are kept, the interrupted stage resumes", file=sys.stderr)
            return 2
        if os.environ.get("CAI_TRACEBACK", "") in ("1", "true", "yes"):
            raise
        # a path the user gave that cannot be made, read or written: one line, never a traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}; check that path and its permissions, then rerun "
              "(CAI_TRACEBACK=1 shows where it happened)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
