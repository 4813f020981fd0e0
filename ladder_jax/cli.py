"""`python -m ladder_jax VERB ...` (installed as `ladder-jax VERB ...` too): every command besides
train.py and infer.py.

    describe     a preset's size and plan, nothing allocated
    convert      Hugging Face Llama directories in (from-hf) and out (to-hf)
    spd          Sync-Point Drop: sensitivity per block, apply a budget to a new run
    lp           Layer Parallelism: sweep the number of paired layers; effective depth; transform layer ranges
    eval         lm-evaluation-harness tasks and rolling-window perplexity of text, on any run and plan
    analysis     where the all-reduces are: sync (CPU), schedule and memory (deviceless GPU/TPU)
    perfmodel    latency model of TP decoding: predict, calibrate
    plot         loss curves of runs
    data         prepare: tokenize a corpus once into ArrayRecord shards for train.data=DIR
    serve        an OpenAI-compatible HTTP server over a run (continuous batching)

Each verb parses its arguments here and calls the library. Input the library refuses prints one
line, `error: ...`, on stderr, and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import jax
from jax.sharding import Mesh

from . import checkpoint, model
from .checkpoint import CheckpointError
from .config import Config, ConfigError, load_config, parse_plan
from .data import DataError
from .decode import DecodeError
from .instruments import deviceless, plots, sync
from .instruments.perf import calibrate, cost, hardware
from .interop import hf
from .memory import MemoryCheckError
from .mesh import apply_xla_flags, force_cpu_devices, init_runtime, make_mesh
from .methods import depth, lp, spd


class ServeError(ValueError):
    """A serve command line that cannot work."""


# Errors that mean "this input cannot work": one line and exit status 2, never a traceback.
USER_ERRORS = (
    ConfigError,
    CheckpointError,
    DataError,
    DecodeError,
    hf.ConvertError,
    spd.SPDError,
    hardware.PerfModelError,
    deviceless.TargetError,
    plots.PlotError,
    MemoryCheckError,
    ServeError,
)


def _overrides(p: argparse.ArgumentParser, example: str = "model.n_layers=4") -> None:
    p.add_argument("overrides", nargs="*", help=f"key=value, e.g. {example}")


def _verb_group(sub, name: str, help: str, description: str | None):
    """A command with verbs of its own (`spd sensitivity`, `spd apply`); returns it and its verbs."""
    p = sub.add_parser(name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    return p, p.add_subparsers(dest="verb", required=True)


def _cpu_devices(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cpu-devices", type=int, default=8, help="fake CPU devices when no accelerator is present (default 8)"
    )


# ---------------------------------------------------------------------------------------------
# describe


def add_describe(sub) -> None:
    p = sub.add_parser("describe", help="a preset's parameter count, plan and bytes per device, without allocating it")
    p.add_argument("--config", default="tiny", help="preset name or YAML path")
    _overrides(p, "model.plan=ladder mesh.tensor=8")
    p.set_defaults(handler=run_describe)


def run_describe(args) -> int:
    print(model.describe(load_config(args.config, args.overrides)))
    return 0


# ---------------------------------------------------------------------------------------------
# convert


def add_convert(sub) -> None:
    p, verbs = _verb_group(sub, "convert", "Hugging Face Llama checkpoints in and out", hf.__doc__)
    a = verbs.add_parser("from-hf", help="HF Llama directory -> run directory")
    a.add_argument("hf_dir")
    a.add_argument("out_run")
    a.add_argument(
        "--plan", default="standard", help="layer plan of the run, e.g. standard,ladder@-16: (default standard)"
    )
    a.add_argument(
        "--dtype", choices=list(hf.NUMPY_DTYPES), help="parameter and compute dtype (default: the checkpoint's)"
    )
    a.add_argument(
        "--tensor",
        type=int,
        default=1,
        help="the run's mesh.tensor; the parameters are split over this many devices while converting (default 1)",
    )
    b = verbs.add_parser("to-hf", help="standard-plan run -> HF Llama directory")
    b.add_argument("run")
    b.add_argument("out_dir")
    b.add_argument(
        "--dtype", choices=list(hf.NUMPY_DTYPES), help="dtype of the written tensors (default: the run's param_dtype)"
    )
    b.add_argument(
        "--max-shard-mb",
        type=float,
        default=5000,
        help="largest safetensors file before splitting into shards (default 5000)",
    )
    for q in (a, b):
        _cpu_devices(q)
    p.set_defaults(handler=run_convert)


def run_convert(args) -> int:
    init_runtime(args.cpu_devices)
    if args.verb == "from-hf":
        cfg = hf.from_hf(args.hf_dir, args.out_run, args.plan, args.dtype, args.tensor)
        print(f"wrote {args.out_run}: {cfg.model.n_layers} layers, plan '{cfg.model.plan}', {cfg.model.param_dtype}")
        print(
            f"fine-tune: python train.py --init-from {args.out_run} --config {args.out_run}/config.yaml train.data=..."
        )
    else:
        hf.to_hf_dir(args.run, args.out_dir, args.dtype, int(args.max_shard_mb * 10**6))
        print(f"wrote {args.out_dir}: LlamaForCausalLM.from_pretrained('{args.out_dir}') loads it")
    return 0


# ---------------------------------------------------------------------------------------------
# spd


def add_spd(sub) -> None:
    p, verbs = _verb_group(sub, "spd", "Sync-Point Drop: which blocks can skip their attention all-reduce", spd.__doc__)
    for name in ("sensitivity", "apply"):
        q = verbs.add_parser(name)
        q.add_argument(
            "--checkpoint", required=True, type=Path, help="a run directory with a standard plan (trained or converted)"
        )
        q.add_argument(
            "--tensor",
            type=int,
            help="tensor-parallel degree to measure at (sensitivity depends on it; default: the run's)",
        )
        q.add_argument(
            "--calibration",
            type=int,
            help="calibration sequences: the first N of the run's validation windows (sensitivity: default 128; "
            "apply: default the sequences the sensitivity file was measured on)",
        )
        _cpu_devices(q)
        _overrides(q, "train.batch_size=4")
    s = verbs.choices["sensitivity"]
    s.add_argument(
        "--sensitive",
        type=float,
        default=0.005,
        help="relative ppl increase from which a block is sensitive (default 0.005)",
    )
    s.add_argument("--extreme", type=float, default=0.05, help="... and extremely sensitive (default 0.05)")
    s.add_argument(
        "--out", type=Path, help="where spd_sensitivity_t<T>.json/png go (default: the checkpoint directory)"
    )
    _metric_option(s, "--sensitive and --extreme")
    a = verbs.choices["apply"]
    a.add_argument("--sensitivity", required=True, help="the JSON written by `spd sensitivity`")
    budget = a.add_mutually_exclusive_group(required=True)
    budget.add_argument("--blocks", type=int, help="drop the sync of this many least sensitive blocks")
    budget.add_argument(
        "--max-increase", type=float, help="drop as many blocks as fit this relative perplexity increase, e.g. 0.01"
    )
    budget.add_argument("--drop", help="drop exactly these blocks, e.g. 3,5")
    a.add_argument("--steps", type=int, default=200, help="distillation steps per repaired block (default 200)")
    a.add_argument("--lr", type=float, help="distillation peak learning rate (default: the run's train.lr / 10)")
    a.add_argument(
        "--held-out",
        type=int,
        default=16,
        help="calibration sequences kept out of distillation to check it (default 16)",
    )
    a.add_argument("--out", required=True, type=Path, help="the new run directory (must not exist)")
    p.set_defaults(handler=run_spd)


def run_spd(args) -> int:
    return spd_sensitivity(args) if args.verb == "sensitivity" else spd_apply(args)


def spd_sensitivity(args) -> int:
    if not 0 <= args.sensitive <= args.extreme:  # before anything loads
        raise spd.SPDError(f"--sensitive={args.sensitive} must be at least 0 and at most --extreme={args.extreme}")
    tm = _metric_tasks(args)  # an unknown task is refused before the run loads
    init_runtime(args.cpu_devices)
    run = spd.open_run(args.checkpoint, args.tensor, args.overrides)
    measure = _evaluation().task_measure(run, args.metric, tm, args.limit) if tm else None
    calib = spd.calibration_batches(run, args.calibration or 128) if measure is None else []
    report = spd.sensitivity_report(run, calib, args.sensitive, args.extreme, measure=measure)
    path, png = spd.write_sensitivity(report, args.out or args.checkpoint)
    counts = {c: sum(b["class"] == c for b in report["blocks"]) for c in spd.CLASSES}
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    print(", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


def spd_apply(args) -> int:
    # Everything that can be refused from the files alone is refused before the run loads.
    checkpoint.check_new_directory(args.out)
    report = spd.read_sensitivity(args.sensitivity)
    saved = checkpoint.load_run_config(args.checkpoint)
    drop = None
    if args.drop is not None:
        try:
            drop = [int(b) for b in args.drop.split(",")]
        except ValueError:
            raise spd.SPDError(f"--drop={args.drop!r}: give block indices such as 3,5") from None
    tensor = args.tensor or report.get("tensor")
    spd.check_sensitivity(report, saved, tensor, args.sensitivity)
    chosen = spd.choose_blocks(report, args.blocks, args.max_increase, drop)
    plan = spd.spd_plan(saved.model.plan, saved.model.n_layers, chosen)
    recorded = spd.report_calibration(report)
    init_runtime(args.cpu_devices)
    # The sensitivity run's batch size (and so its sequences) unless an override says otherwise.
    batch = [f"train.batch_size={recorded['batch_size']}"] if recorded else []
    run = spd.open_run(args.checkpoint, tensor, [*batch, *args.overrides])
    spd.check_sensitivity(report, run.cfg, run.cfg.mesh.tensor, args.sensitivity, spd.fingerprint(run.params))
    calib = spd.calibration_batches(run, args.calibration or (recorded["windows"] if recorded else 128))
    print(spd.compare_calibration(report, spd.calibration_record(run, calib), args.sensitivity))
    base_ppl, zero_shot = spd.perplexity(run, run.cfg.model.plan, calib), spd.perplexity(run, plan, calib)
    print(f"standard (every block synced): calibration ppl {base_ppl:.4f}")
    print(
        f"dropping the attention sync of blocks {chosen}: calibration ppl {base_ppl:.4f} -> {zero_shot:.4f} zero-shot "
        f"({zero_shot / base_ppl - 1:+.2%})"
    )
    new, rows = spd.apply(run, calib, report, chosen, args.steps, args.lr or run.cfg.train.lr / 10, args.held_out)
    final = spd.perplexity(run, plan, calib, params=new)
    print(
        f"after repair: calibration ppl {final:.4f} ({final / base_ppl - 1:+.2%} over standard's {base_ppl:.4f}, same sequences)"
    )
    out_cfg = dataclasses.replace(run.cfg, model=dataclasses.replace(run.cfg.model, plan=plan))
    extra = {
        "source": str(args.checkpoint),
        "sensitivity": str(args.sensitivity),
        "plan": plan,
        "tensor": run.cfg.mesh.tensor,
        "ppl_standard": base_ppl,
        "ppl_zero_shot": zero_shot,
        "ppl_final": final,
        "calibration": spd.calibration_record(run, calib),
        "blocks": rows,
    }
    checkpoint.save_run(args.out, out_cfg, new, args.checkpoint, ("spd_apply.json", extra))
    print(f"wrote {args.out} (model.plan={plan}); decode it with: python infer.py --checkpoint {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# lp


def add_lp(sub) -> None:
    p, verbs = _verb_group(sub, "lp", "Layer Parallelism: perplexity against the number of paired layers", lp.__doc__)
    sw = verbs.add_parser("sweep", help="perplexity and greedy agreement against the number of paired layers")
    sw.add_argument("--checkpoint", required=True, type=Path, help="a run directory (trained or converted)")
    _overrides(sw, "mesh.tensor=2 train.eval_batches=16")
    sw.add_argument("--max-delta", type=int, help="largest number of paired layers (even; default: all)")
    sw.add_argument(
        "--budget",
        type=float,
        default=0.05,
        help="allowed relative perplexity increase for the suggestion (default 0.05)",
    )
    sw.add_argument("--search", choices=("auto", "exhaustive", "greedy"), default="auto")
    sw.add_argument(
        "--prompts", type=int, default=4, help="validation windows whose first 32 tokens prompt the agreement check"
    )
    sw.add_argument("--gen-tokens", type=int, default=32)
    sw.add_argument("--out", type=Path, help="where lp_sweep.json/png go (default: the checkpoint directory)")
    _metric_option(sw, "--budget")
    _cpu_devices(sw)
    fmt = argparse.RawDescriptionHelpFormatter
    d = verbs.add_parser(
        "depth",
        help="effective depth: perplexity after shuffling, merging, pruning or pairing Δ middle layers",
        description=depth.__doc__,
        formatter_class=fmt,
    )
    d.add_argument("--checkpoint", required=True, type=Path, help="a run directory (trained or converted)")
    _overrides(d, "mesh.tensor=2 train.eval_batches=16")
    d.add_argument(
        "--transform", default=",".join(depth.TRANSFORMS), help="comma-separated, default shuffle,merge,prune,parallel"
    )
    d.add_argument("--delta", help="range lengths Δ, comma-separated (default 2,4,... up to the number of layers)")
    d.add_argument("--seeds", type=int, default=5, help="random orders averaged for shuffle (default 5)")
    d.add_argument("--seed", type=int, default=0, help="seed of the shuffle orders (default 0)")
    d.add_argument("--start", type=int, help="first layer of every range (default: each range centred, (n - Δ) // 2)")
    d.add_argument("--out", type=Path, help="where lp_depth.json/png go (default: the checkpoint directory)")
    _cpu_devices(d)
    t = verbs.add_parser(
        "transform",
        help="write a new run with a layer range pruned, merged, shuffled or paired",
        description=depth.__doc__,
        formatter_class=fmt,
    )
    t.add_argument("--checkpoint", required=True, type=Path, help="a run directory (trained or converted)")
    kind = t.add_mutually_exclusive_group(required=True)
    kind.add_argument("--prune", metavar="A:B", help="drop layers A..B-1 (from the end: --prune=-2:)")
    kind.add_argument(
        "--merge", metavar="A:B", help="average layers A..B-1 in consecutive groups (--group, default pairs)"
    )
    kind.add_argument(
        "--shuffle", metavar="A:B", help="run layers A..B-1 in another order (--order, or random by --seed)"
    )
    kind.add_argument("--parallel", metavar="A:B", help="pair layers A..B-1 side by side (plan lp@A:B)")
    t.add_argument("--order", help="--shuffle: the range's layers in their new order, e.g. 5,4,3,2")
    t.add_argument("--seed", type=int, default=0, help="--shuffle without --order: seed of the random order")
    t.add_argument("--group", type=int, default=2, help="--merge: layers averaged into one (default 2)")
    t.add_argument("--out", required=True, type=Path, help="the new run directory (must not exist)")
    _overrides(t, "mesh.tensor=2")
    _cpu_devices(t)
    p.set_defaults(handler=run_lp)


def run_lp(args) -> int:
    if args.verb in ("depth", "transform"):
        return lp_depth(args) if args.verb == "depth" else lp_transform(args)
    cfg = checkpoint.load_run_config(args.checkpoint, args.overrides)
    checkpoint.require_shared_layout(cfg, "lp sweep")
    max_delta = lp.check_max_delta(args.max_delta, cfg.model.n_layers)
    lp.lp_plan(cfg.model.plan, cfg.model.n_layers, 0, 2)
    tm = _metric_tasks(args)  # an unknown task is refused before the run loads
    init_runtime(args.cpu_devices)
    run = checkpoint.load_run(args.checkpoint, args.overrides)
    val = run.validation_batches()
    prompts = [[int(t) for t in b["inputs"][r][:32]] for b in val for r in range(len(b["inputs"]))][: args.prompts]
    measure = _evaluation().task_measure(run, args.metric, tm, args.limit) if tm else None
    rows = lp.sweep(lp.Evaluator(run, val, prompts, args.gen_tokens, measure), max_delta, args.search)
    pick, path, png = lp.write_report(args.out or args.checkpoint, args.checkpoint, args.budget, rows, cfg.model.name)
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    what = "perplexity" if measure is None else measure[0]
    if pick["delta"] == 0:
        print(
            f"no pairing stays within the budget ({args.budget} {'relative' if measure is None else 'absolute'} {what} cost)"
        )
    else:
        value = pick.get("val_ppl", pick.get("score"))
        print(
            f"suggested: Δ={pick['delta']} (model.plan={pick['plan']}), {what} {value:.3f} (cost {pick['cost']:+.1%})"
        )
        print(
            f"fine-tune the pairs: python train.py --init-from {args.checkpoint} --config {Path(args.checkpoint) / 'config.yaml'} "
            f"'model.plan={pick['plan']}' train.trainable=lp_pairs train.steps=100"
        )
    return 0


def _metric_option(p: argparse.ArgumentParser, thresholds: str) -> None:
    p.add_argument(
        "--metric",
        default="perplexity",
        help="perplexity (default) or task:NAME[:METRIC], an lm-eval task's score (METRIC default acc); "
        f"with a task, {thresholds} are absolute score drops (0.01 = one point)",
    )
    p.add_argument("--limit", type=float, help="--metric task: at most N documents of the task")
    p.add_argument("--include-path", type=Path, help="--metric task: a directory of extra task YAMLs")
    p.add_argument(
        "--no-builtin-tasks", action="store_true", help="--metric task: look the task up in --include-path only"
    )


def _metric_tasks(args):
    """The task manager for --metric task:NAME (None for perplexity), checked before anything loads."""
    if args.metric == "perplexity":
        return None
    if args.no_builtin_tasks and args.include_path is None:
        raise ConfigError("--no-builtin-tasks needs --include-path DIR")
    return _evaluation().parse_metric(args.metric, args.include_path, not args.no_builtin_tasks)


def lp_depth(args) -> int:
    # Every range, order and Δ is checked against the saved config before the run loads.
    cfg = checkpoint.load_run_config(args.checkpoint, args.overrides)
    checkpoint.require_shared_layout(cfg, "lp depth")
    kinds = depth.parse_transforms(args.transform)
    deltas = depth.parse_deltas(args.delta, cfg.model.n_layers, kinds)
    if args.seeds < 1:
        raise depth.DepthError(f"--seeds {args.seeds}: give at least one shuffle order")
    cells = depth.plan_study(cfg.model, kinds, deltas, args.seeds, args.start, args.seed)
    init_runtime(args.cpu_devices)
    run = checkpoint.load_run(args.checkpoint, args.overrides)
    val = run.validation_batches()
    result = depth.study(run, val, cells)
    settings = {
        "transforms": kinds,
        "deltas": deltas,
        "seeds": args.seeds,
        "seed": args.seed,
        "start": args.start,
        "eval_windows": sum(len(b["inputs"]) for b in val),
        "seq_len": run.cfg.train.seq_len,
    }
    path, png = depth.write_report(args.out or args.checkpoint, run, result, settings)
    print(depth.format_table(result))
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return 0


def lp_transform(args) -> int:
    checkpoint.check_new_directory(args.out)  # everything that can be refused is refused before the run loads
    cfg = checkpoint.load_run_config(args.checkpoint, args.overrides)
    checkpoint.require_shared_layout(cfg, "lp transform")
    kind = next(k for k in depth.TRANSFORMS if getattr(args, k) is not None)
    t = depth.make_transform(kind, getattr(args, kind), cfg.model.n_layers, args.order, args.seed, args.group)
    new_cfg = depth.transformed_run_config(cfg, t)
    init_runtime(args.cpu_devices)
    run = checkpoint.load_run(args.checkpoint, args.overrides)
    model_cfg, params = depth.apply(t, run.cfg.model, run.params, run.mesh)
    record = {
        "source": str(args.checkpoint),
        "transform": dataclasses.asdict(t),
        "layers": [list(g) for g in depth.recipe(t, cfg.model.n_layers)],
        "n_layers": model_cfg.n_layers,
        "plan": model_cfg.plan,
    }
    checkpoint.save_run(args.out, new_cfg, params, args.checkpoint, ("lp_transform.json", record))
    print(f"{t}: {cfg.model.n_layers} -> {model_cfg.n_layers} layers, model.plan={model_cfg.plan}")
    print(f"wrote {args.out}; decode: python infer.py --checkpoint {args.out}")
    print(
        f"fine-tune: python train.py --init-from {args.out} --config {Path(args.out) / 'config.yaml'} train.steps=100"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# eval


def _evaluation():
    """ladder_jax.evaluation, imported on first use: it needs lm-eval (the `eval` extra), which
    takes a second to import; its EvalError joins the one-line errors."""
    global USER_ERRORS
    try:
        from . import evaluation
    except ImportError as e:
        raise ConfigError(f"this command needs lm-eval ({e}); pip install 'ladder_jax[eval]'") from None
    USER_ERRORS = tuple(dict.fromkeys((*USER_ERRORS, evaluation.EvalError)))
    return evaluation


def add_eval(sub) -> None:
    p, verbs = _verb_group(sub, "eval", "lm-evaluation-harness tasks and perplexity of text on any run", None)
    h = verbs.add_parser("harness", help="lm-eval tasks (ARC, HellaSwag, PIQA, ...) through our sharded model")
    h.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names, e.g. arc_easy,piqa")
    h.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    h.add_argument("--limit", type=float, help="at most N documents per task (a fraction below 1); for quick checks")
    h.add_argument("--batch-size", type=int, default=8, help="rows per compiled call (default 8)")
    h.add_argument("--max-gen-toks", type=int, default=256, help="generation tasks: new tokens unless the task says")
    h.add_argument("--gen-kwargs", help="generation settings over the tasks', e.g. max_gen_toks=64 (lm-eval syntax)")
    h.add_argument("--include-path", type=Path, help="a directory of extra task YAMLs (local datasets)")
    h.add_argument(
        "--no-builtin-tasks",
        action="store_true",
        help="look tasks up in --include-path only (skips indexing lm-eval's ~14,700 built-in task files)",
    )
    h.add_argument("--bootstrap-iters", type=int, default=100000, help="stderr bootstrap iterations (0: none)")
    h.add_argument("--out", type=Path, help="write the results JSON (as lm-eval writes it) here")
    p_ = verbs.add_parser("perplexity", help="token, word and byte perplexity of text with rolling windows")
    src = p_.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", nargs="+", type=Path, help="UTF-8 text files, each one document")
    src.add_argument("--data", type=Path, help="a directory made by `data prepare` with this run's tokenizer")
    p_.add_argument("--split", default="val", choices=("train", "val"), help="with --data: which split (default val)")
    p_.add_argument("--max-documents", type=int, help="with --data: score only the first N documents")
    p_.add_argument("--context", type=int, help="tokens per window (default: model.max_seq_len)")
    p_.add_argument(
        "--stride", type=int, help="new tokens scored per window after the first (default: the context, no overlap)"
    )
    p_.add_argument("--batch-size", type=int, default=8, help="windows per compiled call (default 8)")
    p_.add_argument("--out", type=Path, help="write the numbers as JSON here")
    for q in (h, p_):
        q.add_argument("--checkpoint", required=True, type=Path, help="a run directory (trained, converted, SPD, LP)")
        _overrides(q, "model.plan=standard,ladder@-1: mesh.tensor=2")
        _cpu_devices(q)
    p.set_defaults(handler=run_eval)


def run_eval(args) -> int:
    ev = _evaluation()
    if args.batch_size < 1:
        raise ev.EvalError(f"--batch-size {args.batch_size}: give at least 1")
    if args.verb == "harness":
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if args.no_builtin_tasks and args.include_path is None:
            raise ev.EvalError("--no-builtin-tasks needs --include-path DIR (where else to find the tasks?)")
        tm = ev.task_manager(names, args.include_path, not args.no_builtin_tasks)  # before the run loads
        lm = ev.LadderLM(args.checkpoint, args.overrides, args.batch_size, args.max_gen_toks)
        init_runtime(args.cpu_devices)
        results = ev.harness(
            lm,
            names,
            args.num_fewshot,
            args.limit,
            tm=tm,
            bootstrap_iters=args.bootstrap_iters,
            gen_kwargs=args.gen_kwargs,
        )
        print(ev.results_table(results))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(ev.results_json(results))
            print(f"wrote {args.out}")
        return 0
    lm = ev.LadderLM(args.checkpoint, args.overrides, args.batch_size, context=args.context)
    if args.data is not None:
        if args.max_documents is not None and args.max_documents < 1:
            raise ev.EvalError(f"--max-documents {args.max_documents}: give at least 1")
        documents = ev.prepared_documents(lm, args.data, args.split, args.max_documents)
    else:
        missing = [f for f in args.file if not f.is_file()]
        if missing:
            raise ev.EvalError(f"--file {missing[0]} is not a file; give UTF-8 text files")
        try:
            documents = [f.read_text(encoding="utf-8") for f in args.file]
        except UnicodeDecodeError as e:
            raise ev.EvalError(
                f"a --file is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8"
            ) from None
    init_runtime(args.cpu_devices)
    r = ev.perplexity(lm, documents, args.stride)
    print(
        f"{r['documents']} document(s), {r['tokens']:,} tokens, {r['words']:,} words, {r['bytes']:,} bytes; "
        f"context {r['context']}, stride {r['stride']} ({r['windows']} windows)"
    )
    for k in ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        print(f"  {k:16s} {r[k]:.4f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint), **r}, indent=1))
        print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# analysis


TARGETS = "h100-8, a100-8, h200-8 (needs ladder_jax[cuda]); v5e-8, v5p-8, v5p-N (needs ladder_jax[tpu])"


def add_analysis(sub) -> None:
    help = "where the all-reduces are, which block, and what the GPU/TPU compilers make of them"
    p, verbs = _verb_group(sub, "analysis", help, sync.__doc__)
    s = verbs.add_parser(
        "sync", help="all-reduces per decode step and forward, blocking or overlappable, from the compiled HLO"
    )
    s.add_argument("--config", default="tiny", help="preset name or YAML path")
    _overrides(s)
    s.add_argument(
        "--tensor", type=int, default=8, help="tensor-parallel degree (fake CPU devices; nothing is allocated)"
    )
    s.add_argument(
        "--variant",
        action="append",
        help="a plan to compare; repeat it (default: the config's plan), e.g. --variant standard --variant ladder",
    )
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c = verbs.add_parser(
        "schedule",
        help="the decode step as XLA:GPU/TPU schedules it for a target (compiled here, deviceless): "
        "which GEMMs run while each all-reduce is in flight",
    )
    c.add_argument("--config", default="tiny", help="preset name or YAML path")
    _overrides(c)
    c.add_argument("--target", required=True, help=TARGETS)
    c.add_argument("--tensor", type=int, help="tensor-parallel degree (default: every device of the target)")
    c.add_argument("--variant", action="append", help="a plan to compare; repeat it (default: the config's plan)")
    c.add_argument("--batch", type=int, default=1, help="decode rows per data shard (default 1)")
    c.add_argument(
        "--cache-len",
        type=int,
        default=1024,
        help="KV cache positions each row reads (default 1024, at most model.max_seq_len)",
    )
    c.add_argument(
        "--dump", metavar="DIR", help="also write each variant's scheduled HLO text to DIR/<model>-<variant>.hlo.txt"
    )
    m = verbs.add_parser(
        "memory", help="per-device memory of the train step compiled for a target (deviceless): does it fit?"
    )
    m.add_argument("--config", default="ladder-1b", help="preset name or YAML path")
    _overrides(m, "train.batch_size=256 train.seq_len=2048")
    m.add_argument("--target", required=True, help=TARGETS + "; any v5p-N slice")
    m.add_argument("--data", type=int, help="data-parallel degree (default: every device the tensor axis leaves over)")
    m.add_argument("--tensor", type=int, help="tensor-parallel degree (default: the config's mesh.tensor)")
    for q in (c, m):
        q.add_argument(
            "--no-xla-flags",
            action="store_true",
            help="compile without the library's libtpu flags (mesh.TPU_FLAGS), to see XLA's defaults",
        )
        q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=run_analysis)


def run_analysis(args) -> int:
    if args.verb == "sync":
        return analysis_sync(args)
    target = deviceless.get_target(args.target)
    deviceless.check_extra(target)
    if not args.no_xla_flags:  # before the compiler plugin loads: libtpu reads its flags once
        apply_xla_flags()
    if args.verb == "schedule":
        cfg = load_config(
            args.config, [*args.overrides, f"mesh.tensor={args.tensor or target.devices}", "mesh.data=-1"]
        )
    else:
        tensor = args.tensor or load_config(args.config, args.overrides).mesh.tensor
        cfg = load_config(args.config, [*args.overrides, f"mesh.tensor={tensor}", f"mesh.data={args.data or -1}"])
    mesh = deviceless.target_mesh(cfg, target)
    shape = " x ".join(f"{a}={n}" for a, n in mesh.shape.items())
    return (
        analysis_memory(args, cfg, mesh, target, shape)
        if args.verb == "memory"
        else analysis_schedule(args, cfg, mesh, target, shape)
    )


def analysis_sync(args) -> int:
    cfg = load_config(args.config, [*args.overrides, f"mesh.tensor={args.tensor}", "mesh.data=1"])
    variants = args.variant or [cfg.model.plan]
    for plan in variants:
        parse_plan(plan, cfg.model.n_layers)
    force_cpu_devices(args.tensor)
    rows = sync.sync_rows(cfg.model, make_mesh(cfg, jax.devices()[: args.tensor]), variants)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(
        f"{cfg.model.name}, {cfg.model.n_layers} layers, tensor={args.tensor}: all-reduces over 'tensor' in one decode step"
    )
    print(f"{'variant':28s} {'all-reduces':>11s} {'blocking':>9s} {'overlap':>8s} {'bytes/token':>12s}")
    for r in rows:
        print(
            f"{r['variant']:28s} {r['all_reduces']:11d} {r['blocking_all_reduces']:9d} {r['overlappable_all_reduces']:8d} {r['bytes_per_token']:12,d}"
        )
    return 0


def analysis_memory(args, cfg: Config, mesh: Mesh, target: deviceless.Target, shape: str) -> int:
    r = deviceless.train_memory(cfg, mesh, target.hbm_bytes)
    if args.json:
        print(json.dumps({"target": target.name, "mesh": dict(mesh.shape), **r}, indent=1))
        return 0
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    tr = cfg.train
    what = f"{cfg.model.name} train step on {target.name} ({target.devices} devices, {shape}), batch {tr.batch_size} x {tr.seq_len} tokens"
    if "refused" in r:
        print(f"{what}: does NOT fit; the compiler refused it: {r['refused']}")
        return 0
    print(
        f"{what}{f', grad_accum {tr.grad_accum}' if tr.grad_accum > 1 else ''}: per device arguments {gib(r['arguments'])}, "
        f"outputs {gib(r['outputs'])} ({gib(r['aliased'])} of them over donated arguments), temporaries {gib(r['temporaries'])}, "
        f"code {gib(r['code'])}; total {gib(r['total'])} of {gib(r['hbm'])} HBM: {'fits' if r['fits'] else 'does NOT fit'} ({r['total'] / r['hbm']:.0%})"
    )
    return 0


def analysis_schedule(args, cfg: Config, mesh: Mesh, target: deviceless.Target, shape: str) -> int:
    try:
        rows = deviceless.schedule_rows(
            cfg.model, mesh, args.variant or [cfg.model.plan], args.batch, args.cache_len, dump=args.dump
        )
    except Exception as e:
        if deviceless.refusal(e) is None:
            raise
        raise deviceless.TargetError(
            f"the decode step does not fit {target.name} with {shape}: {deviceless.refusal(e)}; "
            f"use more devices (--target, --tensor) or a smaller --batch/--cache-len"
        ) from None
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    m = cfg.model
    flags = "ladder_jax.mesh TPU_FLAGS" if target.platform == "tpu" and not args.no_xla_flags else "XLA defaults"
    print(
        f"{m.name}, {m.n_layers} layers, {m.dtype}, one decode step on {target.name} ({shape}), batch {args.batch * mesh.shape['data']}, "
        f"KV cache {min(args.cache_len, m.max_seq_len)}; XLA flags: {flags}"
    )
    for r in rows:
        print(
            f"\n{r['variant']}: {r['all_reduces']} all-reduces over 'tensor', {r['async']} async, {r['overlapped']} with GEMMs inside "
            f"({r['overlap_next_module']} with the next module's), {r['merged']} merged; ladder acceptance: {'yes' if r['ladder_overlaps'] else 'no'}"
        )
        shown = r["exposed"][:12] + ([f"... {len(r['exposed']) - 12} more"] if len(r["exposed"]) > 12 else [])
        print(f"  exposed ({len(r['exposed'])}): {', '.join(shown) or 'none'}")
        print(f"  {'#':>3s} {'all-reduce':26s} {'kind':5s} {'bytes':>9s} {'reduces':28s} GEMMs inside")
        for k, a in enumerate(r["all_reduce_list"]):
            kind = "async" if a["async_"] else "sync"
            print(
                f"  {k:3d} {a['name'][:26]:26s} {kind:5s} {a['bytes']:9,d} {'+'.join(a['reduces'])[:28]:28s} "
                f"{len(a['gemms_inside'])}: {_gemm_names(a['gemms_inside'])}"
            )
    return 0


def _gemm_names(labels: list[str]) -> str:
    """'layers.1.attn.q_proj x2, layers.1.attn.kv' (each GEMM kernel once; GPU and TPU split a
    matrix-vector product into two kernels)."""
    counts = dict.fromkeys(labels, 0)
    for x in labels:
        counts[x] += 1
    return ", ".join(f"{x} x{n}" if n > 1 else x for x, n in counts.items())


# ---------------------------------------------------------------------------------------------
# perfmodel


def add_perfmodel(sub) -> None:
    p, verbs = _verb_group(sub, "perfmodel", "latency model of tensor-parallel decoding per variant", cost.__doc__)
    q = verbs.add_parser("predict", help="per-token latency, tokens/s and speed-up over standard (the default verb)")
    q.add_argument("--config", default="llama-2-70b", help="preset name or YAML path")
    _overrides(q, "model.n_layers=40")
    q.add_argument("--tensor", type=int, default=8, help="tensor-parallel degree")
    q.add_argument(
        "--hardware", default="h100-nvlink", help=f"profile name ({', '.join(hardware.known_hardware())}) or YAML path"
    )
    q.add_argument("--batch", type=int, nargs="+", default=[1, 4, 64], help="batch sizes")
    q.add_argument(
        "--variant", action="append", help=f"a layer plan; repeat it (default: {' '.join(cost.DEFAULT_VARIANTS)})"
    )
    q.add_argument("--prompt", type=int, default=1024, help="prompt tokens per sequence")
    q.add_argument("--gen", type=int, default=512, help="generated tokens per sequence")
    q.add_argument(
        "--sweep-batch",
        type=int,
        default=None,
        help="batch of the tensor-size sweep in the plot (default: the first --batch)",
    )
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.add_argument("--out", type=Path, help="write perfmodel.json and perfmodel.png here")
    c = verbs.add_parser("calibrate", help="fit a profile's calibrated constants to the published 70B TP8 table")
    c.add_argument("--hardware", default="h100-nvlink")
    c.add_argument("--write", action="store_true", help="write the fitted values back into the profile file")
    p.set_defaults(handler=run_perfmodel)


def run_perfmodel(args) -> int:
    hw = hardware.load_hardware(args.hardware)
    if args.verb == "calibrate":
        if hw.name != "h100-nvlink" and not args.hardware.endswith((".yaml", ".yml")):
            raise hardware.PerfModelError(
                f"the published table was measured on 8xH100 with NVLink; calibrate h100-nvlink (or a .yaml of that machine), "
                f"not '{hw.name}', whose software constants it inherits"
            )
        force_cpu_devices(calibrate.ANCHOR_SHAPE["tensor"])
        fitted, errors = calibrate.calibrate(hw)
        print(f"fitted constants of {hw.name} ({hw.source}):")
        for k in calibrate.FIT_BOUNDS:
            print(f"  {k}: {getattr(hw, k):.4g} -> {getattr(fitted, k):.4g}")
        print(calibrate.format_fit(errors))
        if args.write:
            hardware.write_constants(Path(hw.source), {k: getattr(fitted, k) for k in calibrate.FIT_BOUNDS})
            print(f"wrote {hw.source}")
        return 0
    m = load_config(args.config, args.overrides).model
    for name, v in (("--prompt", args.prompt), ("--gen", args.gen), *(("--batch", b) for b in args.batch)):
        if v < 1:
            raise hardware.PerfModelError(f"{name} must be positive, got {v}")
    cost.check_tensor(m, hw, args.tensor)
    variants = args.variant or list(cost.DEFAULT_VARIANTS)
    for v in variants:
        parse_plan(v, m.n_layers)
    force_cpu_devices(max(cost.TP_SWEEP) if args.out else args.tensor)
    rows = cost.predict(m, hw, args.tensor, variants, args.batch, args.prompt, args.gen)
    sweep = cost.tp_sweep(m, hw, variants, args.sweep_batch or args.batch[0], args.prompt, args.gen) if args.out else []
    result = {
        "config": m.name,
        "hardware": hw.name,
        "tensor": args.tensor,
        "prompt": args.prompt,
        "gen": args.gen,
        "constants": {k: v for k, v in dataclasses.asdict(hw).items() if k != "source"},
        "rows": rows,
        "tp_sweep": sweep,
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(
            f"{m.name} on {hw.name}, tensor={args.tensor}, prompt {args.prompt}, {args.gen} generated (model, not measured)"
        )
        print(cost.format_table(rows))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "perfmodel.json").write_text(json.dumps(result, indent=1))
        png = cost.plot(
            rows,
            sweep,
            args.out / "perfmodel.png",
            f"{m.name} on {hw.name} (latency model)",
            calibrate.published_speedups(m, hw, args.tensor, args.prompt, args.gen),
        )
        print(
            f"wrote {args.out / 'perfmodel.json'}" + (f" and {png}" if png else " (matplotlib missing: no plot)"),
            file=sys.stderr,
        )
    return 0


# ---------------------------------------------------------------------------------------------
# plot


def add_plot(sub) -> None:
    p = sub.add_parser("plot", help="training and validation loss of runs in one figure (needs matplotlib)")
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("loss.png"))
    p.add_argument("--labels", help="comma-separated labels, one per run")
    p.set_defaults(handler=run_plot)


def run_plot(args) -> int:
    print(f"wrote {plots.plot_runs(args.runs, args.out, args.labels.split(',') if args.labels else None)}")
    return 0


# ---------------------------------------------------------------------------------------------
# data


def add_data(sub) -> None:
    p, verbs = _verb_group(
        sub,
        "data",
        "tokenize a corpus once into ArrayRecord shards (train.data=DIR then streams them)",
        "See docs/data.md.",
    )
    q = verbs.add_parser("prepare", help="text files/globs, JSONL(.gz) or Parquet -> DIR of token shards")
    q.add_argument("inputs", nargs="+", help="files or globs: *.txt (one document each), *.jsonl[.gz], *.parquet")
    q.add_argument("--out", required=True, type=Path, help="the prepared directory (a rerun resumes it)")
    q.add_argument("--tokenizer", default="bytes", help="bytes (default), a run directory, or a tokenizer.json")
    q.add_argument("--config", help="with a tokenizer.json: the preset (or YAML) whose BOS/EOS ids to use")
    q.add_argument("--text-field", default="text", help="the JSONL field or Parquet column holding the text")
    q.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes (default: all cores)")
    q.add_argument(
        "--val-fraction", type=float, default=0.05, help="documents held out for validation, by a hash of their name"
    )
    q.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run_data)


def run_data(args) -> int:
    from . import prepare

    tokenizer = prepare.load_tokenizer(args.tokenizer, args.config)
    prepare.prepare(
        args.inputs,
        args.out,
        tokenizer,
        args.text_field,
        args.workers,
        args.val_fraction,
        progress=not args.no_progress,
        log=lambda m: print(m, file=sys.stderr),
    )
    return 0


# serve


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible /v1/completions and /v1/chat/completions over a run",
        description="An OpenAI-compatible HTTP server (FastAPI, uvicorn) over a continuous-batching engine; "
        "see docs/serving.md. Needs the 'serve' extra: pip install -e '.[serve]'",
    )
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="run directory (train.py or convert from-hf)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument(
        "--max-len", type=int, help="positions per slot's KV cache: prompt + new tokens (default model.max_seq_len)"
    )
    p.add_argument("--model-name", help="the model id clients send (default: the run directory's name)")
    _cpu_devices(p)
    _overrides(p, "mesh.tensor=8 model.plan=ladder")
    p.set_defaults(handler=run_serve)


def run_serve(args) -> int:
    try:
        from . import serve
    except ImportError as e:
        raise ServeError(
            f"the server needs fastapi, uvicorn and jinja2 ({e.name} is missing): pip install -e '.[serve]'"
        ) from None
    from .engine import Engine
    from .tokenizer import get_tokenizer

    if args.slots < 1 or not 0 < args.port < 65536:
        raise ServeError(f"--slots {args.slots} / --port {args.port}: give at least 1 slot and a port in 1..65535")
    init_runtime(args.cpu_devices)
    run_dir = Path(args.checkpoint)
    # One host serving one batch gains nothing from splitting it over data (as infer.py).
    overrides = (
        args.overrides if any(o.startswith("mesh.data=") for o in args.overrides) else ["mesh.data=1", *args.overrides]
    )
    cfg = checkpoint.load_run_config(run_dir, overrides)
    try:
        tokenizer = get_tokenizer(cfg, run_dir)
    except ValueError as e:
        raise ServeError(str(e)) from None
    if args.max_len is not None and not 0 < args.max_len <= cfg.model.max_seq_len:
        raise ServeError(f"--max-len {args.max_len}; give 1..model.max_seq_len={cfg.model.max_seq_len}")
    run = checkpoint.load_run(run_dir, overrides)
    engine = Engine(run.cfg.model, run.mesh, run.params, args.slots, args.max_len)
    name = args.model_name or run_dir.resolve().name
    print(
        f"serving '{name}' ({run.cfg.model.plan}) on http://{args.host}:{args.port}/v1 with {engine.slots} slots",
        flush=True,
    )
    serve.serve(serve.Server(engine, tokenizer, name), args.host, args.port)
    return 0


# ---------------------------------------------------------------------------------------------

VERBS = (
    add_describe,
    add_convert,
    add_spd,
    add_lp,
    add_eval,
    add_analysis,
    add_perfmodel,
    add_plot,
    add_data,
    add_serve,
)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m ladder_jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="VERB")
    for add in VERBS:
        add(sub)
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["perfmodel"] and (len(argv) == 1 or argv[1] not in ("predict", "calibrate", "-h", "--help")):
        argv.insert(1, "predict")  # predict is perfmodel's default verb
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
