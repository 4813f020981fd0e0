"""The layer plan: which schedule each layer runs (`model.plan`), and how layers group into steps.

Grammar: comma-separated segments `SCHEDULE` or `SCHEDULE@START:END` (python-style range,
negative indices from the end) or `SCHEDULE@I`. A bare segment sets every layer no range names
(default `standard`); ranges may not overlap. A schedule that takes a parameter writes it after a
colon (`track:2`). Examples: `ladder`, `standard,ladder@-16:`, `spd@0:4,spd@6`, `lp@4:10`,
`track:2@0:16`.

Everything here follows the traits of `schedules.SCHEDULES`: a schedule with k layers per step
(lp: 2, track:D: D) groups each contiguous run of its layers into steps of k from the run's start,
so the run's length must be a multiple of k.
"""

from __future__ import annotations

import re

from .errors import ConfigError
from .schedules import Schedule, schedule

DEFAULT = "standard"


def lookup(name: str, segment: str | None = None) -> Schedule:
    """The registry entry for `name`, or a ConfigError that names the plan segment."""
    try:
        return schedule(name)
    except ValueError as e:
        raise ConfigError(f"model.plan: {e}" + (f" (in '{segment}')" if segment and segment != name else "")) from None


def _parse_range(text: str, n_layers: int, segment: str) -> range:
    def index(s: str, default: int) -> int:
        if s == "":
            return default
        if not re.fullmatch(r"-?\d+", s):
            raise ConfigError(
                f"model.plan: '{segment}' has a bad layer index '{s}'; write SCHEDULE@START:END, e.g. ladder@-16:"
            )
        if re.fullmatch(r"-0+", s):  # Python's -0 is 0: '@-0:' would be every layer, not the last 0
            raise ConfigError(
                f"model.plan: '{segment}' has layer index '{s}', which is layer 0 (not the end); write 0 for the "
                f"first layer or -N for the last N, e.g. ladder@-16:"
            )
        i = int(s)
        return i + n_layers if i < 0 else i

    if ":" in text:
        a, b = text.split(":", 1)
        start, stop = index(a, 0), index(b, n_layers)
    else:
        start = index(text, 0)
        stop = start + 1
    if not (0 <= start < stop <= n_layers):
        raise ConfigError(
            f"model.plan: '{segment}' names layers outside 0..{n_layers - 1} of this {n_layers}-layer model; "
            f"use a range inside it (negative indices count from the end)"
        )
    return range(start, stop)


def parse_plan(plan: str, n_layers: int) -> tuple[str, ...]:
    """Resolve a plan string into one schedule name per layer (parameter included: `track:2`)."""
    segments = [s.strip() for s in str(plan).split(",") if s.strip()]
    if not segments:
        raise ConfigError("model.plan is empty; give a schedule such as 'standard' or 'ladder'")
    base, owner = None, [None] * n_layers
    for seg in segments:
        name, at, where = seg.partition("@")
        name = lookup(name, seg).name
        if at and not where.strip():
            raise ConfigError(
                f"model.plan: '{seg}' has no layer range after '@'; write SCHEDULE@START:END (e.g. {name}@-16:), "
                f"or '{name}' alone for every layer"
            )
        if not where:
            if base is not None:
                raise ConfigError(
                    f"model.plan: two default schedules ('{base}' and '{name}'); give all but one a layer range"
                )
            base = name
            continue
        for i in _parse_range(where, n_layers, seg):
            if owner[i] is not None:
                raise ConfigError(
                    f"model.plan: layer {i} is given both '{owner[i][1]}' and '{seg}'; give each layer one schedule"
                )
            owner[i] = (name, seg)
    layers = tuple(o[0] if o else base or DEFAULT for o in owner)
    for name, start, stop in runs(layers):
        k = lookup(name).layers_per_step
        if (stop - start) % k:
            raise ConfigError(
                f"model.plan: layers {start}..{stop - 1} form a run of {stop - start} '{name}' layers; "
                f"'{name}' groups {k} layers a step from the run's start, so give the run a multiple of {k} layers"
            )
    return layers


def runs(layers: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """Contiguous runs of one schedule: (name, first layer, end)."""
    out: list[tuple[str, int, int]] = []
    for i, name in enumerate(layers):
        if out and out[-1][0] == name:
            out[-1] = (name, out[-1][1], i + 1)
        else:
            out.append((name, i, i + 1))
    return out


def plan_steps(layers: tuple[str, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """Group per-layer schedules into steps: each run into steps of its schedule's layers_per_step."""
    steps = []
    for name, start, stop in runs(layers):
        k = lookup(name).layers_per_step
        steps += [(name, tuple(range(i, i + k))) for i in range(start, stop, k)]
    return steps


def segment(name: str, start: int, stop: int, n_layers: int | None = None) -> str:
    """The plan segment that gives layers start..stop-1 `name` (open-ended when stop is the last)."""
    if stop == start + 1:
        return f"{name}@{start}"
    return f"{name}@{start}:{'' if stop == n_layers else stop}"
