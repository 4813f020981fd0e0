"""HLO text: parse a compiled module, and the facts both analyses read from it (bytes, replica
groups, which mesh axis a collective runs over, which instructions are matmuls)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from jax.sharding import Mesh

_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}
_MATMUL_OPS = {"dot", "convolution"}
_MATMUL_TARGETS = ("matmul", "gemm", "cublas", "onednn$matmul")


@dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    calls: list[str]
    attrs: str


def _matching(text: str, start: int, open_c: str, close_c: str) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_c:
            depth += 1
        elif text[i] == close_c:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {open_c}{close_c} in HLO line: {text[:120]}")


_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLS = re.compile(
    r"(?:calls|to_apply|body|condition)=%([\w.\-]+)|(?:branch_computations|called_computations)=\{([^}]*)\}"
)


def _parse_instr(line: str) -> Instr | None:
    m = _LINE.match(line)
    if not m:
        return None
    name, rest = m.group(1), m.group(2)
    if rest.startswith("("):
        end = _matching(rest, 0, "(", ")")
        shape, rest = rest[: end + 1], rest[end + 1 :].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    paren = rest.find("(")
    if paren < 0:
        return None
    opcode = rest[:paren].strip()
    end = _matching(rest, paren, "(", ")")
    operands = re.findall(r"%([\w.\-]+)", rest[paren : end + 1])
    attrs = rest[end + 1 :]
    calls = []
    for a, b in _CALLS.findall(attrs):
        calls += [a] if a else re.findall(r"%([\w.\-]+)", b)
    return Instr(name, shape, opcode, operands, calls, attrs)


def parse_hlo(text: str) -> tuple[dict[str, list[Instr]], str]:
    """Computations of an HLO module text: name -> instructions (in order), and the entry's name."""
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        s = line.strip()
        if s.endswith("{") and ("->" in s or s.startswith("ENTRY")) and " = " not in s.split("(")[0]:
            header = s[len("ENTRY ") :] if s.startswith("ENTRY") else s
            current = header.split()[0].lstrip("%")
            comps[current] = []
            if s.startswith("ENTRY"):
                entry = current
        elif s == "}":
            current = None
        elif current is not None:
            ins = _parse_instr(s)
            if ins is not None:
                comps[current].append(ins)
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text")
    return comps, entry


def shape_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
        if dtype in _DTYPE_BYTES:
            total += int(np.prod([int(d) for d in dims.split(",") if d] or [1])) * _DTYPE_BYTES[dtype]
    return total


def result_shape(ins: Instr) -> str:
    """The shape `ins` produces. Newer XLA gives an all-reduce-start the shape (its operands, its
    result), older XLA the result's alone."""
    if ins.opcode == "all-reduce-start" and ins.shape.startswith("(("):
        return ins.shape[_matching(ins.shape, 1, "(", ")") + 1 : -1].strip(" ,")
    return ins.shape


def parse_replica_groups(attrs: str) -> list[tuple[int, ...]] | None:
    """A collective's device groups, from any of XLA's forms: explicit ({{0,1},{2,3}}), iota
    ([2,2]<=[4]T(1,0)) or, in newer XLA, mesh axes and those it runs over (mesh['a'=2,'b'=2] {'b'});
    None for a form not known here."""
    m = re.search(r"replica_groups=mesh\[((?:'[^']+'=\d+,?)*)\]\s*\{((?:'[^']+',?)*)\}", attrs)
    if m:
        axes = [(a, int(n)) for a, n in re.findall(r"'([^']+)'=(\d+)", m.group(1))]
        over = [[a for a, _ in axes].index(a) for a in re.findall(r"'([^']+)'", m.group(2))]
        ids = np.arange(math.prod(n for _, n in axes)).reshape([n for _, n in axes])
        moved = np.moveaxis(ids, over, range(ids.ndim - len(over), ids.ndim))
        return [tuple(row) for row in moved.reshape(-1, math.prod(axes[k][1] for k in over)).tolist()]
    m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attrs)
    if m:
        return [tuple(int(x) for x in g.split(",") if x) for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        out = [int(x) for x in m.group(1).split(",")]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return [tuple(int(i) for i in row) for row in ids.reshape(out[0], -1)]
    return None


def mesh_axis_groups(mesh: Mesh) -> dict[str, set[tuple[int, ...]]]:
    """Device-id groups of each mesh axis, of the batch (data x fsdp) and of all devices: what a
    collective's replica groups are compared with to tell which axis it runs over."""
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    names = list(mesh.axis_names)

    def along(*axes):
        keep = [names.index(a) for a in axes]
        moved = np.moveaxis(ids, keep, range(ids.ndim - len(keep), ids.ndim))
        return {tuple(sorted(g)) for g in moved.reshape(-1, math.prod(ids.shape[k] for k in keep)).tolist()}

    groups = {a: along(a) for a in names}
    if {"data", "fsdp"} <= set(names):
        groups["batch"] = along("data", "fsdp")
    groups["all"] = along(*names)
    return groups


def is_matmul(ins: Instr, comps: dict, cache: dict) -> bool:
    if ins.opcode in _MATMUL_OPS:
        return True
    # GPU and TPU strength-reduce a matrix-vector dot (decode at batch 1) into multiply + reduce;
    # those ops keep the dot's op_name.
    if ins.opcode in ("multiply", "reduce") and re.search(r'op_name="[^"]*dot_general"', ins.attrs):
        return True
    if ins.opcode == "custom-call" and any(t in ins.attrs.lower() for t in _MATMUL_TARGETS):
        return True
    if ins.opcode in ("fusion", "call"):
        for c in ins.calls:
            if c not in cache:
                cache[c] = False
                cache[c] = any(is_matmul(i, comps, cache) for i in comps.get(c, []))
            if cache[c]:
                return True
    return False


# Where axes of size 1 make several names describe the same groups, the first one wins.
AXIS_ORDER = ("tensor", "fsdp", "data", "batch", "all")


def collective_axis(attrs: str, groups: dict) -> str:
    """The mesh axis ("tensor", "fsdp", "data", "batch", "all" or "other") a collective with these
    attributes runs over."""
    rg = parse_replica_groups(attrs)
    found = {tuple(sorted(g)) for g in rg} if rg else None
    return next((name for name in AXIS_ORDER if name in groups and found == groups[name]), "other")
