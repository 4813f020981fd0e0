"""`describe`: a preset's size and plan, nothing allocated."""

from __future__ import annotations

from .. import model
from ..config import load_config
from ._common import overrides


def add(sub) -> None:
    p = sub.add_parser(
        "describe",
        help="a preset's parameter count, plan and bytes per device, without allocating it",
        description="Print a config's parameter count, layer plan, shapes and the parameter bytes each device "
        "holds at its mesh.tensor, from the shapes alone: nothing is allocated. --config is a preset or a YAML "
        "file; key=value overrides apply on top (e.g. model.plan=ladder mesh.tensor=8).",
    )
    p.add_argument("--config", default="tiny", help="preset name or YAML path")
    overrides(p, "model.plan=ladder mesh.tensor=8")
    p.set_defaults(handler=describe)


def describe(args) -> int:
    print(model.describe(load_config(args.config, args.overrides)))
    return 0
