"""A decode step's device-memory traffic: the floor, and what the compiled program moves.

The floor of one device's decode step is every weight of its shard read once (the embedding
table aside: a step gathers one row of it per token, unless it is tied to the LM head, which reads
it whole) plus the KV cache as far as the decode attention reads it (`attention.decode_attention`:
key blocks up to the furthest row's position, k and v, every layer).

What the program moves is read from its scheduled HLO (`hbm_traffic`), kernel by kernel: the
bytes of the operands it reads and the results it writes that live in device memory (HBM). Two
things make that differ from XLA's own `cost_analysis()["bytes accessed"]`, which adds up every
operand and result of every instruction wherever it lives:

- on TPU, buffers in on-chip memory spaces (a layout's `S(1)`: VMEM; `S(2)`, `S(4)`: scalar and
  sync-flag memory) are not HBM traffic. The weights reach VMEM through async copies
  (`slice-start`/`copy-start`), which read them from HBM once; the GEMMs then read the VMEM copy.
  An all-reduce overlapped with a GEMM becomes an async collective fusion that passes a 16 MiB
  float32 VMEM scratch buffer in and out: XLA counts it twice per overlapped all-reduce.
- a kernel that slices an operand (a key block of the KV cache, a slice of a weight) reads the
  slice, and one that updates a buffer in place (the cache write) writes the update.

A while loop (the decode attention's key blocks) runs `loop_trips` times; XLA counts its body once.
"""

from __future__ import annotations

import math
import re

import numpy as np

from .hlo import _DTYPE_BYTES, Instr, parse_hlo, result_shape

# Instructions that move no data: layout, tuples, the ends of async pairs (their start is counted).
NO_TRAFFIC = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "copy-done",
    "slice-done",
    "all-reduce-done",
    "all-gather-done",
    "collective-permute-done",
    "async-done",
}
NO_TRAFFIC_CALLS = ("ConcatBitcast",)  # XLA:TPU's custom call that views VMEM slices as one array
SLICING = ("dynamic-slice", "slice", "gather")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\](\{[^{}]*\})?")
_ON_CHIP = re.compile(r"S\([1-9]\d*\)")


def arrays(shape: str) -> list[tuple[int, bool]]:
    """(bytes, lives on chip) of each array of an HLO (tuple) shape."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(shape):
        if dtype in _DTYPE_BYTES:
            n = math.prod(int(d) for d in dims.split(",") if d)
            out.append((n * _DTYPE_BYTES[dtype], bool(_ON_CHIP.search(layout or ""))))
    return out


def hbm_bytes(shape: str) -> int:
    return sum(b for b, chip in arrays(shape) if not chip)


def all_bytes(shape: str) -> int:
    return sum(b for b, _ in arrays(shape))


def _param_index(ins: Instr) -> int | None:
    m = re.match(r"param_(\d+)", ins.name)
    return int(m.group(1)) if m else None


def _users(body: list[Instr]) -> dict[str, list[Instr]]:
    users: dict[str, list[Instr]] = {}
    for i in body:
        for o in i.operands:
            users.setdefault(o, []).append(i)
    return users


def _param_access(body: list[Instr], k: int, comps: dict) -> tuple[str, int] | None:
    """How a fused computation uses its parameter k: ("slices", bytes read) when every use slices
    it (directly or in a nested fusion), ("updates", bytes written) when it is the buffer of an
    in-place update (dynamic-update-slice, scatter), None when it is read whole."""
    param = next((i for i in body if i.opcode == "parameter" and _param_index(i) == k), None)
    if param is None:
        return None
    users = _users(body)
    names, uses = {param.name}, list(users.get(param.name, []))
    while any(u.opcode == "bitcast" for u in uses):  # a bitcast is the same buffer
        for u in [u for u in uses if u.opcode == "bitcast"]:
            names.add(u.name)
            uses.remove(u)
            uses += users.get(u.name, [])
    sliced = updated = 0
    for u in uses:
        position = next(j for j, o in enumerate(u.operands) if o in names)
        if u.opcode in SLICING and position == 0:
            sliced += all_bytes(u.shape)
        elif u.opcode in ("dynamic-update-slice", "scatter") and position == 0:
            update = next((i for i in body if i.name == u.operands[-1 if u.opcode == "scatter" else 1]), None)
            updated += all_bytes(update.shape) if update is not None else 0
        elif u.opcode == "fusion" and u.calls:
            inner = _param_access(comps.get(u.calls[0], []), position, comps)
            if inner is None:
                return None
            sliced, updated = (sliced + inner[1], updated) if inner[0] == "slices" else (sliced, updated + inner[1])
        else:
            return None
    if updated and sliced:
        return None
    return ("updates", updated) if updated else ("slices", sliced)


def _fusion_traffic(ins: Instr, index: dict, comps: dict) -> tuple[int, int]:
    """(HBM bytes a fusion reads, HBM bytes it writes): a parameter that is only sliced is read
    as its slices; one updated in place is written as the update, and is the fusion's result."""
    body = comps.get(ins.calls[0], []) if ins.calls else []
    read = written = 0
    in_place = False
    for k, name in enumerate(ins.operands):
        operand = index.get(name)
        if operand is None or not hbm_bytes(operand.shape):
            continue
        access = _param_access(body, k, comps)
        if access is None:
            read += hbm_bytes(operand.shape)
        elif access[0] == "slices":
            read += access[1]
        else:
            written += access[1]
            in_place = True
    if "output_to_operand_aliasing" not in ins.attrs and not in_place:
        written += hbm_bytes(ins.shape)
    return read, written


def hbm_traffic(text: str, loop_trips: int = 1, top: int = 0) -> dict:
    """Bytes a run of a scheduled HLO module reads from and writes to device memory, by kernel
    kind, and the on-chip operand bytes XLA's cost analysis adds (a loop runs the trip count XLA
    knows for it, else `loop_trips`): {read, written, total, on_chip,
    by_kind: {opcode: bytes}, top: the `top` instructions that move most, (bytes, name, op_name)}."""
    comps, entry = parse_hlo(text)
    index = {i.name: i for body in comps.values() for i in body}
    by_kind: dict[str, int] = {}
    each: list[tuple[int, str, str]] = []
    totals = {"read": 0, "written": 0, "on_chip": 0}

    def walk(name: str, trips: int):
        for ins in comps.get(name, []):
            if ins.opcode == "while":
                known = re.search(r'known_trip_count":\{"n":"(\d+)"', ins.attrs)
                n = int(known.group(1)) if known else loop_trips
                walk(re.search(r"body=%([\w.\-]+)", ins.attrs).group(1), trips * n)
                continue
            if ins.opcode in NO_TRAFFIC or any(t in ins.attrs for t in NO_TRAFFIC_CALLS):
                continue
            operands = [index[o] for o in ins.operands if o in index]
            if ins.opcode == "all-reduce-start":  # as a synchronous all-reduce: its input in, its result out
                read, written = sum(hbm_bytes(o.shape) for o in operands), hbm_bytes(result_shape(ins))
            elif ins.opcode.endswith("-start"):  # an async copy: the destination buffer crosses once
                sizes = [b for b, _ in arrays(ins.shape)]
                moved = max(0, sum(sizes) - sum(all_bytes(o.shape) for o in operands) - sum(b for b in sizes if b <= 8))
                src_hbm = any(hbm_bytes(o.shape) for o in operands)
                # the result tuple echoes each operand: an HBM array beyond those is an HBM destination
                hbm_arrays = sum(not chip and b > 8 for b, chip in arrays(ins.shape))
                dst_hbm = hbm_arrays > sum(bool(hbm_bytes(o.shape)) for o in operands)
                read, written = moved * src_hbm, moved * dst_hbm
            elif ins.opcode == "fusion":
                read, written = _fusion_traffic(ins, index, comps)
            elif ins.opcode == "dynamic-update-slice":
                update = hbm_bytes(operands[1].shape) if len(operands) > 1 else 0
                read, written = update, update
            elif ins.opcode in SLICING:
                read, written = hbm_bytes(ins.shape), hbm_bytes(ins.shape)
            else:
                read, written = sum(hbm_bytes(o.shape) for o in operands), hbm_bytes(ins.shape)
            on_chip = sum(b for o in operands for b, chip in arrays(o.shape) if chip)
            totals["read"] += trips * read
            totals["written"] += trips * written
            totals["on_chip"] += trips * on_chip
            by_kind[ins.opcode] = by_kind.get(ins.opcode, 0) + trips * (read + written)
            if top:
                op = re.search(r'op_name="([^"]*)"', ins.attrs)
                each.append((trips * (read + written), ins.name, op.group(1) if op else ins.opcode))

    walk(entry, 1)
    top_list = sorted(each, reverse=True)[:top]
    return {**totals, "total": totals["read"] + totals["written"], "by_kind": by_kind, "top": top_list}


def keys_read(context: int, cache_len: int | None = None) -> int:
    """Cache positions the decode attention reads for a row whose new token is at `context - 1`."""
    from ..attention import DECODE_KEY_BLOCK

    block = DECODE_KEY_BLOCK if cache_len is None else min(DECODE_KEY_BLOCK, cache_len)
    return -(-context // block) * block


def floor_bytes(m, tensor: int, batch: int, context: int, cache_len: int | None = None) -> dict:
    """{weights, kv_cache, total}: the bytes one device of a `tensor` axis must read in a decode
    step of `batch` rows (per device) whose new tokens sit at position `context - 1`."""
    from .. import model as M

    weights = M.bytes_per_device(m, tensor)
    if not m.tie_embeddings:  # the table's rows are gathered, not streamed; the head reads its own matrix
        table = M.abstract_params(m)["embed"]["table"]
        weights -= math.prod(table.shape) // tensor * np.dtype(table.dtype).itemsize
    kv = M.cache_bytes_per_device(m, (1, tensor), batch, keys_read(context, cache_len))
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}
