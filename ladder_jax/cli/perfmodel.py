"""`perfmodel [predict]`, `perfmodel calibrate`: the latency model of tensor-parallel decoding.

`perfmodel` alone is `perfmodel predict`: its own parser takes predict's options, the sub-verb
is optional. Key=value overrides need the sub-verb (`perfmodel predict --config C key=value`):
without it argparse would read the first override as one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import storage
from ..config import load_config
from ..instruments.perf import calibrate, cost, hardware
from ..mesh import force_cpu_devices
from ._common import overrides, verb_group


def add(sub) -> None:
    p, verbs = verb_group(
        sub, "perfmodel", "latency model of tensor-parallel decoding per variant", cost.__doc__, required=False
    )
    _predict_options(p)
    p.set_defaults(handler=predict, overrides=[])
    q = verbs.add_parser("predict", help="per-token latency, tokens/s and speed-up over standard (the default verb)")
    _predict_options(q, given_only=True)
    overrides(q, "model.n_layers=40")
    c = verbs.add_parser("calibrate", help="fit a profile's calibrated constants to the published 70B TP8 table")
    c.add_argument(
        "--hardware",
        default="h100-nvlink",
        help="the profile to fit: h100-nvlink (the published table's 8xH100 NVLink machine; the default) "
        "or a YAML profile of that machine",
    )
    c.add_argument("--write", action="store_true", help="write the fitted values back into the profile file")
    c.set_defaults(handler=fit)


def _predict_options(q, given_only: bool = False) -> None:
    """`perfmodel`'s options, and again `perfmodel predict`'s: there (`given_only`) an option not
    given sets nothing, so `perfmodel --tensor 4 predict` keeps the 4 (argparse would otherwise
    put the sub-verb's defaults over it)."""

    def default(value):
        return argparse.SUPPRESS if given_only else value

    q.add_argument("--config", default=default("llama-2-70b"), help="preset name or YAML path")
    q.add_argument("--tensor", type=int, default=default(8), help="tensor-parallel degree (default 8)")
    q.add_argument(
        "--hardware",
        default=default("h100-nvlink"),
        help=f"profile name ({', '.join(hardware.known_hardware())}) or YAML path",
    )
    q.add_argument("--batch", type=int, nargs="+", default=default([1, 4, 64]), help="batch sizes (default 1 4 64)")
    q.add_argument(
        "--variant",
        action="append",
        default=default(None),
        help=f"a layer plan; repeat it (default: {' '.join(cost.DEFAULT_VARIANTS)})",
    )
    q.add_argument("--prompt", type=int, default=default(1024), help="prompt tokens per sequence (default 1024)")
    q.add_argument("--gen", type=int, default=default(512), help="generated tokens per sequence (default 512)")
    q.add_argument(
        "--sweep-batch",
        type=int,
        default=default(None),
        help="batch of the tensor-size sweep in the plot (default: the first --batch)",
    )
    q.add_argument("--json", action="store_true", default=default(False), help="print JSON instead of a table")
    q.add_argument(
        "--out",
        type=storage.Path,
        default=default(None),
        help="write perfmodel.json and perfmodel.png here (local or gs://)",
    )


def predict(args) -> int:
    hw = hardware.load_hardware(args.hardware)
    m = load_config(args.config, args.overrides).model
    variants = cost.check_request(m, hw, args.tensor, args.variant, args.batch, args.prompt, args.gen)
    force_cpu_devices(max(cost.TP_SWEEP) if args.out else args.tensor)
    sweep_batch = (args.sweep_batch or args.batch[0]) if args.out else None
    result = cost.prediction(m, hw, args.tensor, variants, args.batch, args.prompt, args.gen, sweep_batch)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(
            f"{m.name} on {hw.name}, tensor={args.tensor}, prompt {args.prompt}, {args.gen} generated (model, not measured)"
        )
        print(cost.format_table(result["rows"]))
    if args.out:
        published = calibrate.published_speedups(m, hw, args.tensor, args.prompt, args.gen)
        path, png = cost.write_prediction(result, args.out, published)
        print(f"wrote {path}" + (f" and {png}" if png else " (matplotlib missing: no plot)"), file=sys.stderr)
    return 0


def fit(args) -> int:
    hw = hardware.load_hardware(args.hardware)
    calibrate.check_anchor_hardware(hw, args.hardware)
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
