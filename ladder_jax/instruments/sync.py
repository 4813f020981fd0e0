"""Sync analysis: read the compiled HLO and say which all-reduces block and which can overlap.

An all-reduce is *blocking* when every matmul of the program either feeds it or depends on it:
nothing is left to run while it is in flight. It is *overlappable* when some matmul does neither
(ladder: the next module's GEMMs). This is a property of the data dependencies, so it can be read
from a CPU compile (`sync`). Whether the GPU/TPU scheduler then really overlaps is read from the
schedule XLA:GPU / XLA:TPU produce for a target, compiled here without one (`schedule`); the same
deviceless compile of the train step says whether it fits a pod slice (`memory`).

XLA:CPU merges independent all-reduces into one tuple all-reduce (it has no async collectives, so
merging costs it nothing). That would hide exactly the structure we want to see, so the CPU
compile here disables its combiner; a merged all-reduce that remains is reported as one
collective with several operands.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from .. import decode, model
from ..config import ModelConfig
from ..mesh import batch_shards
from ..plan import parse_plan
from .hlo import collective_axis, is_matmul, mesh_axis_groups, parse_hlo, shape_bytes

NO_COMBINER = {"xla_disable_hlo_passes": "cpu-all-reduce-combiner"}
OTHER_COLLECTIVES = ("all-gather", "all-gather-start", "reduce-scatter", "all-to-all", "collective-permute")


@dataclass
class AllReduce:
    name: str
    axis: str  # "tensor", "fsdp", "data", "batch", "all" or "other" (hlo.collective_axis)
    operands: int  # > 1 when XLA merged several all-reduces into one
    bytes: int
    blocking: bool
    op_name: str = ""


@dataclass
class SyncReport:
    all_reduces: list[AllReduce] = field(default_factory=list)
    # Every other collective, counted by kind and mesh axis, e.g. {"all-gather@fsdp": 14}: with an
    # fsdp axis, the weight gathers (reported apart so the tensor all-reduce counts stay exact).
    other_collectives: dict[str, int] = field(default_factory=dict)

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
        return {"all_reduces": [asdict(a) for a in self.all_reduces], "other_collectives": self.other_collectives}


def analyze(text: str, mesh: Mesh) -> SyncReport:
    """All-reduces of the entry computation, their mesh axis, bytes, and whether they block."""
    comps, entry = parse_hlo(text)
    body = comps[entry]
    index = {ins.name: k for k, ins in enumerate(body)}
    cache: dict = {}
    matmuls = [k for k, ins in enumerate(body) if is_matmul(ins, comps, cache)]
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
        if ins.opcode in OTHER_COLLECTIVES:
            key = f"{ins.opcode.removesuffix('-start')}@{collective_axis(ins.attrs, groups)}"
            report.other_collectives[key] = report.other_collectives.get(key, 0) + 1
        if ins.opcode not in ("all-reduce", "all-reduce-start"):
            continue
        done = k
        if ins.opcode == "all-reduce-start":  # async (GPU): the wait is the matching done
            done = next((u for u in users[k] if body[u].opcode == "all-reduce-done"), k)
        axis = collective_axis(ins.attrs, groups)
        blocking = (above[k] | below[done] | bit.get(k, 0)) == every
        op_name = re.search(r'op_name="([^"]*)"', ins.attrs)
        report.all_reduces.append(
            AllReduce(
                ins.name, axis, len(ins.operands), shape_bytes(ins.shape), blocking, op_name.group(1) if op_name else ""
            )
        )
    return report


def compiled_text(jitted, *args, combine: bool = False, options: dict | None = None) -> str:
    """Optimised HLO of `jitted(*args)` (abstract args are fine); see the module note on `combine`."""
    lowered = jitted.lower(*args)
    return lowered.compile(compiler_options={**({} if combine else NO_COMBINER), **(options or {})} or None).as_text()


def cpu_analysis_config(cfg: ModelConfig) -> ModelConfig:
    """The model config to compile for a CPU sync analysis: XLA:CPU promotes bfloat16 all-reduces to
    float32 (twice the bytes a GPU or TPU sends); float16 has bfloat16's size and it leaves alone."""
    return dataclasses.replace(cfg, dtype="float16") if cfg.dtype == "bfloat16" else cfg


def forward_report(cfg: ModelConfig, mesh: Mesh, batch: int | None = None, seq: int = 16) -> SyncReport:
    """Sync report of one causal forward of this model config on this mesh (abstract parameters)."""
    tokens = jax.ShapeDtypeStruct((batch or batch_shards(mesh), seq), jnp.int32)
    fn = model.forward_fn(cfg, mesh)
    return analyze(compiled_text(fn, model.abstract_params(cfg), tokens, tokens), mesh)


def decode_report(
    cfg: ModelConfig, mesh: Mesh, batch: int | None = None, max_len: int = 64, options: dict | None = None
) -> SyncReport:
    """Sync report of one decode step (one new token per row, reading a KV cache of `max_len`);
    `options`: extra compiler options."""
    args = decode.abstract_step_args(cfg, mesh, batch or batch_shards(mesh), max_len)
    return analyze(compiled_text(decode.step_fn(cfg, mesh), *args, options=options), mesh)


def sync_rows(cfg: ModelConfig, mesh: Mesh, variants: list[str], batch: int = 1, seq: int = 16) -> list[dict]:
    """One row per variant (a plan): all-reduces over `tensor` in a forward and a decode step."""
    rows = []
    for plan in variants:
        parse_plan(plan, cfg.n_layers)
        c = cpu_analysis_config(dataclasses.replace(cfg, plan=plan))
        fwd = forward_report(c, mesh, batch=batch * batch_shards(mesh), seq=seq)
        step = decode_report(c, mesh, batch=batch * batch_shards(mesh))
        s, f = step.summary(), fwd.summary()
        rows.append(
            {
                "variant": plan,
                "layers": c.n_layers,
                "tensor": mesh.shape["tensor"],
                "all_reduces": s["all_reduces"],
                "blocking_all_reduces": s["blocking_all_reduces"],
                "overlappable_all_reduces": s["overlappable_all_reduces"],
                "bytes_per_token": s["bytes"] // (batch * batch_shards(mesh)),
                "forward": {**f, "bytes_per_token": f["bytes"] // (batch * batch_shards(mesh) * seq)},
                "other_collectives": step.other_collectives,
            }
        )
    return rows
