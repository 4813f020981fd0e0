"""`analysis sync`, `analysis schedule`, `analysis memory`: where the all-reduces are, on CPU and in
deviceless GPU/TPU compiles. `analysis trace`: where a profiled step's device time went."""

from __future__ import annotations

import json

import jax

from .. import storage
from ..checkpoint import load_run_config
from ..config import load_config, profile_steps
from ..instruments import deviceless, sync, timeline
from ..memory import refusal
from ..mesh import apply_xla_flags, force_cpu_devices, make_mesh
from ..plan import parse_plan
from . import _format
from ._common import overrides, verb_group

TARGETS = "h100-8, a100-8, h200-8 (needs ladder_jax[cuda]); v5e-8, v5p-8, v5p-N (needs ladder_jax[tpu])"


def add(sub) -> None:
    help = "where the all-reduces are, which block, and what the GPU/TPU compilers make of them"
    _, verbs = verb_group(sub, "analysis", help, sync.__doc__)
    s = verbs.add_parser(
        "sync", help="all-reduces per decode step and forward, blocking or overlappable, from the compiled HLO"
    )
    s.add_argument("--config", default="tiny", help="preset name or YAML path")
    overrides(s)
    s.add_argument(
        "--tensor", type=int, default=8, help="tensor-parallel degree (fake CPU devices; nothing is allocated)"
    )
    s.add_argument(
        "--variant",
        action="append",
        help="a plan to compare; repeat it (default: the config's plan), e.g. --variant standard --variant ladder",
    )
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(handler=sync_analysis)
    c = verbs.add_parser(
        "schedule",
        help="the decode step as XLA:GPU/TPU schedules it for a target (compiled here, deviceless): "
        "which GEMMs run while each all-reduce is in flight",
    )
    c.add_argument("--config", default="tiny", help="preset name or YAML path")
    overrides(c)
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
    c.set_defaults(handler=schedule)
    m = verbs.add_parser(
        "memory", help="per-device memory of the train step compiled for a target (deviceless): does it fit?"
    )
    m.add_argument("--config", default="ladder-1b", help="preset name or YAML path")
    overrides(m, "train.batch_size=256 train.seq_len=2048")
    m.add_argument("--target", required=True, help=TARGETS + "; any v5p-N slice")
    m.add_argument("--data", type=int, help="data-parallel degree (default: every device the tensor axis leaves over)")
    m.add_argument("--tensor", type=int, help="tensor-parallel degree (default: the config's mesh.tensor)")
    m.set_defaults(handler=memory)
    t = verbs.add_parser(
        "trace",
        help="a jax.profiler trace's steps: kernels per step, the device's busy share, idle gaps, the ops that took the time",
    )
    t.add_argument(
        "trace", help="a trace folder (jax.profiler.trace's DIR), a run directory (train.profile) or an .xplane.pb"
    )
    t.add_argument(
        "--steps",
        type=int,
        help="steps in the trace, for a trace whose events carry no run id (a GPU's): its totals are shared by "
        "them (default: a run directory's train.profile, else one)",
    )
    t.add_argument("--top", type=int, default=8, help="how many ops and gaps to list (default 8)")
    t.add_argument("--json", action="store_true", help="print JSON instead of a table")
    t.set_defaults(handler=trace)
    for q in (c, m):
        q.add_argument(
            "--no-xla-flags",
            action="store_true",
            help="compile without the library's XLA flags (mesh.TPU_FLAGS, mesh.GPU_FLAGS), to see XLA's defaults",
        )
        q.add_argument("--json", action="store_true", help="print JSON instead of a table")


def sync_analysis(args) -> int:
    cfg = load_config(args.config, [*args.overrides, f"mesh.tensor={args.tensor}", "mesh.data=1"])
    variants = args.variant or [cfg.model.plan]
    for plan in variants:
        parse_plan(plan, cfg.model.n_layers)
    force_cpu_devices(args.tensor)
    rows = sync.sync_rows(cfg.model, make_mesh(cfg, jax.devices()[: args.tensor]), variants)
    print(json.dumps(rows, indent=1) if args.json else _format.sync_table(cfg.model, args.tensor, rows))
    return 0


def _target(args) -> deviceless.Target:
    """The target, its compiler plugin checked, the library's XLA flags applied unless --no-xla-flags."""
    target = deviceless.get_target(args.target)
    deviceless.check_extra(target)
    if not args.no_xla_flags:  # before the compiler plugin loads: libtpu reads its flags once
        apply_xla_flags()
    return target


def schedule(args) -> int:
    target = _target(args)
    cfg = load_config(args.config, [*args.overrides, f"mesh.tensor={args.tensor or target.devices}", "mesh.data=-1"])
    mesh = deviceless.target_mesh(cfg, target)
    try:
        rows = deviceless.schedule_rows(
            cfg.model, mesh, args.variant or [cfg.model.plan], args.batch, args.cache_len, dump=args.dump
        )
    except Exception as e:
        if refusal(e) is None:
            raise
        raise deviceless.TargetError(
            f"the decode step does not fit {target.name} with {_format.mesh_shape(mesh)}: {refusal(e)}; "
            f"use more devices (--target, --tensor) or a smaller --batch/--cache-len"
        ) from None
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    flags = (
        "XLA defaults" if args.no_xla_flags else f"ladder_jax.mesh {'TPU' if target.platform == 'tpu' else 'GPU'}_FLAGS"
    )
    print(_format.schedule_report(cfg.model, mesh, target, args.batch, args.cache_len, flags, rows))
    return 0


def memory(args) -> int:
    target = _target(args)
    tensor = args.tensor or load_config(args.config, args.overrides).mesh.tensor
    cfg = load_config(args.config, [*args.overrides, f"mesh.tensor={tensor}", f"mesh.data={args.data or -1}"])
    mesh = deviceless.target_mesh(cfg, target)
    r = deviceless.train_memory(cfg, mesh, target.hbm_bytes)
    if args.json:
        print(json.dumps({"target": target.name, "mesh": dict(mesh.shape), **r}, indent=1))
    else:
        print(_format.memory_summary(cfg, mesh, target, r))
    return 0


def trace(args) -> int:
    if args.steps is not None and args.steps < 1 or args.top < 1:
        raise timeline.TraceError(f"--steps {args.steps} --top {args.top}: give whole numbers of at least 1")
    steps, folder = args.steps, storage.path(args.trace)
    if steps is None and (folder / "config.yaml").exists():  # a run directory: the steps train.profile traced
        traced = profile_steps(load_run_config(folder).train)
        steps = len(traced) if traced else None
    summary = timeline.read(folder, steps, args.top)
    print(json.dumps(summary, indent=1) if args.json else f"{summary['trace']}\n\n{timeline.table(summary)}")
    return 0
