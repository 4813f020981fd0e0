"""Sync analysis: read the compiled HLO and say which all-reduces block and which can overlap.

An all-reduce is *blocking* when every matmul of the program either feeds it or depends on it:
nothing is left to run while it is in flight. It is *overlappable* when some matmul does neither
(ladder: the next module's GEMMs). This is a property of the data dependencies, so it can be read
from a CPU compile; whether the GPU/TPU scheduler then really overlaps is a separate question
(`analysis schedule`, a later instrument).

XLA:CPU merges independent all-reduces into one tuple all-reduce (it has no async collectives, so
merging costs it nothing). That would hide exactly the structure we want to see, so the CPU
compile here disables its combiner; a merged all-reduce that remains is reported as one
collective with several operands.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_MATMUL_OPS = {"dot", "convolution"}
_MATMUL_TARGETS = ("matmul", "gemm", "cublas", "onednn$matmul")
NO_COMBINER = {"xla_disable_hlo_passes": "cpu-all-reduce-combiner"}


@dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    calls: list[str]
    attrs: str


@dataclass
class AllReduce:
    name: str
    axis: str  # "tensor", "data", "all" or "other"
    operands: int  # > 1 when XLA merged several all-reduces into one
    bytes: int
    blocking: bool
    op_name: str = ""


@dataclass
class SyncReport:
    all_reduces: list[AllReduce] = field(default_factory=list)

    def on(self, axis: str) -> list[AllReduce]:
        return [a for a in self.all_reduces if a.axis == axis]

    def summary(self, axis: str = "tensor") -> dict:
        ars = self.on(axis)
        return {
            "all_reduces": sum(a.operands for a in ars),
            "blocking_all_reduces": sum(a.operands for a in ars if a.blocking),
            "overlappable_all_reduces": sum(a.operands for a in ars if not a.blocking),
            "bytes": sum(a.bytes for a in ars),
        }

    def to_json(self) -> dict:
        return {"all_reduces": [asdict(a) for a in self.all_reduces]}


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
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)|(?:branch_computations|called_computations)=\{([^}]*)\}")


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


def parse_replica_groups(attrs: str) -> list[tuple[int, ...]] | None:
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


def mesh_axis_groups(mesh) -> dict[str, set[tuple[int, ...]]]:
    """Device-id groups of each mesh axis, to tell which axis a collective runs over."""
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    return {
        "tensor": {tuple(sorted(row)) for row in ids.tolist()},
        "data": {tuple(sorted(col)) for col in ids.T.tolist()},
        "all": {tuple(sorted(ids.ravel().tolist()))},
    }


def _is_matmul(ins: Instr, comps: dict, cache: dict) -> bool:
    if ins.opcode in _MATMUL_OPS:
        return True
    if ins.opcode == "custom-call" and any(t in ins.attrs.lower() for t in _MATMUL_TARGETS):
        return True
    if ins.opcode in ("fusion", "call"):
        for c in ins.calls:
            if c not in cache:
                cache[c] = False
                cache[c] = any(_is_matmul(i, comps, cache) for i in comps.get(c, []))
            if cache[c]:
                return True
    return False


def analyze(text: str, mesh) -> SyncReport:
    """All-reduces of the entry computation, their mesh axis, bytes, and whether they block."""
    comps, entry = parse_hlo(text)
    body = comps[entry]
    index = {ins.name: k for k, ins in enumerate(body)}
    cache: dict = {}
    matmuls = [k for k, ins in enumerate(body) if _is_matmul(ins, comps, cache)]
    bit = {k: 1 << n for n, k in enumerate(matmuls)}
    every = (1 << len(matmuls)) - 1

    above = [0] * len(body)  # matmuls each instruction depends on
    users: list[list[int]] = [[] for _ in body]
    for k, ins in enumerate(body):
        acc = 0
        for op in ins.operands:
            j = index.get(op)
            if j is not None:
                acc |= above[j] | bit.get(j, 0)
                users[j].append(k)
        above[k] = acc
    below = [0] * len(body)  # matmuls depending on each instruction
    for k in range(len(body) - 1, -1, -1):
        acc = 0
        for u in users[k]:
            acc |= below[u] | bit.get(u, 0)
        below[k] = acc

    groups = mesh_axis_groups(mesh)
    report = SyncReport()
    for k, ins in enumerate(body):
        if ins.opcode not in ("all-reduce", "all-reduce-start"):
            continue
        done = k
        if ins.opcode == "all-reduce-start":  # async (GPU): the wait is the matching done
            done = next((u for u in users[k] if body[u].opcode == "all-reduce-done"), k)
        rg = parse_replica_groups(ins.attrs)
        found = {tuple(sorted(g)) for g in rg} if rg else None
        axis = "other"
        for name in ("tensor", "data", "all"):
            if found == groups[name]:
                axis = name
                break
        if axis == "all":  # a mesh with one of the two axes of size 1
            axis = "tensor" if len(groups["data"]) == 1 else "data"
        blocking = (above[k] | below[done] | bit.get(k, 0)) == every
        op_name = re.search(r'op_name="([^"]*)"', ins.attrs)
        report.all_reduces.append(AllReduce(ins.name, axis, len(ins.operands), shape_bytes(ins.shape), blocking, op_name.group(1) if op_name else ""))
    return report


def compiled_text(jitted, *args, combine: bool = False) -> str:
    """Optimised HLO of `jitted(*args)` (abstract args are fine); see the module note on `combine`."""
    lowered = jitted.lower(*args)
    return lowered.compile(compiler_options=None if combine else NO_COMBINER).as_text()


def forward_report(cfg, mesh, batch: int | None = None, seq: int = 16) -> SyncReport:
    """Sync report of one causal forward of this model config on this mesh (abstract parameters)."""
    import jax
    import jax.numpy as jnp

    from . import model

    tokens = jax.ShapeDtypeStruct((batch or mesh.shape["data"], seq), jnp.int32)
    fn = model.forward_fn(cfg, mesh)
    return analyze(compiled_text(fn, model.abstract_params(cfg), tokens, tokens), mesh)


def decode_report(cfg, mesh, batch: int | None = None, max_len: int = 64) -> SyncReport:
    """Sync report of one decode step (one new token per row, reading a KV cache of `max_len`)."""
    import jax
    import jax.numpy as jnp

    from . import decode, model

    batch = batch or mesh.shape["data"]
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    kv = jax.ShapeDtypeStruct(model.cache_shape(cfg, mesh.shape[model.TENSOR], batch, max_len), jnp.dtype(cfg.dtype))
    cache = [(kv, kv)] * cfg.n_layers
    return analyze(compiled_text(decode.step_fn(cfg, mesh), model.abstract_params(cfg), rows, rows, cache), mesh)


def sync_rows(cfg, mesh, variants: list[str], batch: int = 1, seq: int = 16) -> list[dict]:
    """One row per variant (a plan): all-reduces over `tensor` in a forward and a decode step."""
    import dataclasses

    from .config import parse_plan

    rows = []
    for plan in variants:
        parse_plan(plan, cfg.n_layers)
        c = dataclasses.replace(cfg, plan=plan)
        fwd = forward_report(c, mesh, batch=batch * mesh.shape["data"], seq=seq)
        step = decode_report(c, mesh, batch=batch * mesh.shape["data"])
        s, f = step.summary(), fwd.summary()
        rows.append(
            {
                "variant": plan,
                "layers": c.n_layers,
                "tensor": mesh.shape["tensor"],
                "all_reduces": s["all_reduces"],
                "blocking_all_reduces": s["blocking_all_reduces"],
                "overlappable_all_reduces": s["overlappable_all_reduces"],
                "bytes_per_token": s["bytes"] // (batch * mesh.shape["data"]),
                "forward": {**f, "bytes_per_token": f["bytes"] // (batch * mesh.shape["data"] * seq)},
            }
        )
    return rows


def main(argv=None) -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m ladder_jax.analysis", description="Where the all-reduces are, and which of them block.")
    sub = ap.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="all-reduces per decode step and forward, blocking or overlappable, from the compiled HLO")
    sync.add_argument("--config", default="tiny", help="preset name or YAML path")
    sync.add_argument("overrides", nargs="*", help="key=value, e.g. model.n_layers=4")
    sync.add_argument("--tensor", type=int, default=8, help="tensor-parallel degree (fake CPU devices; nothing is allocated)")
    sync.add_argument("--variant", action="append", help="a plan to compare; repeat it (default: the config's plan), e.g. --variant standard --variant ladder")
    sync.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)

    from .config import load_config
    from .mesh import force_cpu_devices, make_mesh

    cfg = load_config(args.config, [*args.overrides, f"mesh.tensor={args.tensor}", "mesh.data=1"])
    force_cpu_devices(args.tensor)
    import jax

    mesh = make_mesh(cfg, jax.devices()[: args.tensor])
    variants = args.variant or [cfg.model.plan]
    rows = sync_rows(cfg.model, mesh, variants)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{cfg.model.name}, {cfg.model.n_layers} layers, tensor={args.tensor}: all-reduces over 'tensor' in one decode step")
    print(f"{'variant':28s} {'all-reduces':>11s} {'blocking':>9s} {'overlap':>8s} {'bytes/token':>12s}")
    for r in rows:
        print(f"{r['variant']:28s} {r['all_reduces']:11d} {r['blocking_all_reduces']:9d} {r['overlappable_all_reduces']:8d} {r['bytes_per_token']:12,d}")


if __name__ == "__main__":
    main()
