"""Where a train step's time goes, ladder_jax against transformers' PyTorch Llama, on this CPU.

Same setup as train_speed.py (tiny, batch 8 x 256, AdamW, clipping, float32, one device each).
Three parts:

1. Phases, each compiled (JAX) or run (PyTorch) on its own and timed alternately: forward (the
   loss), forward + backward, the optimizer (clipping + AdamW from given gradients), the whole
   step. Medians of --runs calls each, in milliseconds, from the second of two alternating rounds.
2. Inside the whole step. JAX: a `jax.profiler` trace of XLA:CPU's per-thunk events
   (XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true, set here) joined to the compiled HLO, each op
   put in the part of the model its Python stack names (the HLO's stack frames: a backward op
   keeps its forward's stack) and in a kind (matmul, copy/transpose, elementwise/reduce,
   collective). The figures are thread time summed over the threads that ran thunks, so they can
   exceed the step; "busy" is that sum over (cores x step). PyTorch: `torch.profiler`'s self time
   on the main thread by op class (its matmuls and attention use both cores inside one call).
3. One layer's attention core alone, ours (the xla path) against PyTorch's fused CPU kernel, and
   the MLP's GEMM alone (XLA and torch.mm) against the same GEMMs inside the step.

    python benchmarks/train_profile.py [--runs 5] [--top 25] [key=value ...]
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_speed  # noqa: E402  (the shared setup and the load check)


def median_ms(fn, runs: int) -> float:
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


MODULES = (  # innermost function of an op's Python stack -> the part of the model it belongs to
    (("_softmax_attend", "_attend_fwd", "_attend_bwd", "_mask", "xla_attention"), "attention softmax core"),
    (("apply_rope", "rope_tables", "rope_frequencies"), "rope"),
    (("Attention.__call__",), "attention projections"),
    (("MLP.__call__",), "mlp"),
    (("RMSNorm.__call__",), "norms"),
    (("vocab_parallel_nll", "LMHead.__call__", "Transformer.head", "Embed.__call__"), "embedding, head, loss"),
    (("update_fn", "tree_norm", "apply_updates", "tree_update_moment", "schedule"), "optimizer"),
)


def stack_frames(hlo: str) -> dict:
    """stack_frame_id -> the function names of its Python stack, innermost first, from the
    FunctionNames / FileLocations / StackFrames tables at the end of a compiled HLO module."""

    def section(name, following=None):
        i = hlo.index(f"\n{name}\n") + len(name) + 2
        return hlo[i : hlo.index(f"\n{following}\n", i)] if following else hlo[i:]

    fns = dict(re.findall(r'^(\d+) "(.*)"$', section("FunctionNames", "FileLocations"), re.M))
    locs = dict(
        re.findall(r"^(\d+) \{file_name_id=\d+ function_name_id=(\d+)", section("FileLocations", "StackFrames"), re.M)
    )
    parents = {
        i: (loc, p)
        for i, loc, p in re.findall(
            r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)", section("StackFrames"), re.M
        )
    }
    out = {}
    for frame in parents:
        names, f = [], frame
        while f in parents and len(names) < 64:
            loc, parent = parents[f]
            names.append(fns[locs[loc]])
            f = str(int(parent) - 1)  # parent ids count from 1 past the printed ones; 0 = none
        out[frame] = names
    return out


def op_class(name: str, opcode: str, line: str, frames: dict) -> tuple[str, str, str]:
    """(part of the model, forward/backward/update, kind of op) of one XLA:CPU thunk."""
    frame = re.search(r"stack_frame_id=(\d+)", line)
    stack = frames.get(frame.group(1), []) if frame else []
    module = "residual stream, other"
    for fn in stack:
        hit = next((label for keys, label in MODULES if any(k in fn for k in keys)), None)
        if hit:
            module = hit
            break
    phase = "backward" if "transpose(jvp" in line or "_attend_bwd" in stack else "forward"
    if module == "optimizer":
        phase = "update"
    if name.startswith(("ynn_fusion", "xnn_fusion", "onednn")) or opcode in ("dot", "convolution"):
        kind = "matmul"
    elif opcode in ("all-reduce", "all-gather", "reduce-scatter", "collective-permute"):
        kind = "collective"
    elif opcode == "fusion" and ("copy" in name or "transpose" in name):
        kind = "copy/transpose"
    else:
        kind = "elementwise/reduce"
    return module, phase, kind


def jax_op_table(b, steps: int):
    import jax

    hlo = b.trainer._step.lower(b.state, b.global_batch).compile().as_text()
    frames = stack_frames(hlo)
    instr = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w-]+)\(", line)
        if m and m.group(1) not in instr:
            instr[m.group(1)] = (m.group(2), line)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        t = time.perf_counter()
        for _ in range(steps):
            b.ours()
        wall = (time.perf_counter() - t) / steps
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    classes, per_op, threads = collections.Counter(), collections.Counter(), set()
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name not in instr:  # executor and thread-pool events, Python frames
                    continue
                threads.add(line.name)
                opcode, text = instr[ev.name]
                cls = op_class(ev.name, opcode, text, frames)
                classes[cls] += ev.duration_ns / steps / 1e6
                per_op[(ev.name, " / ".join(cls))] += ev.duration_ns / steps / 1e6
    return classes, per_op, wall * 1e3, len(threads)


def torch_op_table(b, steps: int) -> tuple[collections.Counter, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            b.theirs()
        wall = (time.perf_counter() - t) / steps
    classes = collections.Counter()
    for ev in prof.key_averages():
        name, ms = ev.key, ev.self_cpu_time_total / 1e3 / steps
        if name in ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear"):
            cls = "matmul"
        elif "scaled_dot_product" in name or "flash_attention" in name:
            cls = "attention (fused kernel)"
        elif "Optimizer" in name or name.startswith(("aten::_foreach", "aten::lerp", "aten::addcdiv")):
            cls = "optimizer"
        elif name.startswith("aten::"):
            cls = "elementwise and other aten"
        else:
            cls = "autograd and python"
        classes[cls] += ms
    return classes, wall * 1e3


def attention_alone(b, runs: int) -> dict:
    """One layer's causal self-attention core at the step's shape, forward and forward + backward
    of a sum of squares: our xla path (ladder_jax.attention.xla_attention) against PyTorch's
    scaled_dot_product_attention (its fused CPU flash kernel), medians in ms."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ladder_jax.attention import xla_attention

    m = b.cfg.model
    bsz, seq = b.ids.shape
    g = m.n_heads // m.n_kv_heads
    r = np.random.default_rng(0)
    q = r.normal(size=(bsz, seq, m.n_kv_heads, g, m.hd)).astype(np.float32)
    k, v = (r.normal(size=(bsz, seq, m.n_kv_heads, m.hd)).astype(np.float32) for _ in range(2))
    pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None], (bsz, seq))
    seg = jnp.ones((bsz, seq), jnp.int32)
    loss = lambda q, k, v: (xla_attention(q, k, v, pos, seg, jnp.float32) ** 2).sum()  # noqa: E731
    fwd, grad = jax.jit(loss), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    jq, jk, jv = map(jnp.asarray, (q, k, v))
    tq = torch.tensor(q.reshape(bsz, seq, m.n_heads, m.hd)).transpose(1, 2).contiguous().requires_grad_()
    tk, tv = (torch.tensor(x).transpose(1, 2).contiguous().requires_grad_() for x in (k, v))

    def torch_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)

    def torch_grad():
        (F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True) ** 2).sum().backward()

    fns = {
        ("forward", "ladder_jax"): lambda: fwd(jq, jk, jv).block_until_ready(),
        ("forward", "transformers"): torch_fwd,
        ("forward+backward", "ladder_jax"): lambda: jax.block_until_ready(grad(jq, jk, jv)),
        ("forward+backward", "transformers"): torch_grad,
    }
    for fn in fns.values():
        fn()
    return {key: median_ms(fn, 4 * runs) for key, fn in fns.items()}


def gemm_alone(b, runs: int) -> dict:
    """The step's MLP up-projection GEMM (tokens x d_model x ffn) alone, float32: XLA (jit of a
    matmul) and torch.mm, medians in ms; against its thunks in the step's trace."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    m = b.cfg.model
    r = np.random.default_rng(0)
    x = r.normal(size=(b.tokens, m.d_model)).astype(np.float32)
    w = r.normal(size=(m.d_model, m.ffn_dim)).astype(np.float32)
    mm = jax.jit(jnp.matmul)
    jx, jw, tx, tw = jnp.asarray(x), jnp.asarray(w), torch.tensor(x), torch.tensor(w)
    fns = {"ladder_jax": lambda: mm(jx, jw).block_until_ready(), "transformers": lambda: torch.mm(tx, tw)}
    for fn in fns.values():
        fn()
    return {name: median_ms(fn, 8 * runs) for name, fn in fns.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--top", type=int, default=20, help="the JAX step's most expensive thunks to list")
    ap.add_argument("overrides", nargs="*", help="ladder_jax config overrides")
    args = ap.parse_args()
    train_speed.report_load()
    b = train_speed.Bench(devices=1, batch=args.batch, seq=args.seq, overrides=args.overrides)

    import jax
    import torch

    phases_jax, phases_torch = b.jax_phases(), b.torch_phases()
    for fn in (*phases_jax.values(), *phases_torch.values()):
        fn()  # compile and warm up
    rows = collections.defaultdict(dict)
    for _ in range(2):  # alternate, so machine noise hits both alike
        for name in phases_jax:
            rows[name]["ladder_jax"] = median_ms(phases_jax[name], args.runs)
            rows[name]["transformers"] = median_ms(phases_torch[name], args.runs)
    print(
        f"\nphases, median ms ({b.shape}, batch {args.batch} x {args.seq}, jax {jax.__version__}, torch {torch.__version__})"
    )
    print(f"{'phase':22s} {'ladder_jax':>11s} {'transformers':>13s} {'ratio':>6s}")
    for name, r in rows.items():
        print(
            f"{name:22s} {r['ladder_jax']:11.1f} {r['transformers']:13.1f} {r['ladder_jax'] / r['transformers']:6.2f}"
        )

    jc, per_op, jwall, threads = jax_op_table(b, args.runs)
    tc, twall = torch_op_table(b, args.runs)
    print("\nladder_jax step: ms of XLA thread time per step, by part of the model and op kind")
    print(f"({threads} threads ran thunks; step {jwall:.0f} ms under the profiler)")
    kinds = ("matmul", "copy/transpose", "elementwise/reduce", "collective")
    print(f"  {'part':24s} {'phase':9s}" + "".join(f"{k:>20s}" for k in kinds) + f"{'total':>9s}")
    keys = sorted({(m, p) for m, p, _ in jc}, key=lambda mp: -sum(jc[(*mp, k)] for k in kinds))
    for m, p in keys:
        row = [jc[(m, p, k)] for k in kinds]
        print(f"  {m:24s} {p:9s}" + "".join(f"{x:20.1f}" for x in row) + f"{sum(row):9.1f}")
    total = sum(jc.values())
    by_kind = [sum(v for (m, p, k), v in jc.items() if k == kind) for kind in kinds]
    print(f"  {'total':34s}" + "".join(f"{x:20.1f}" for x in by_kind) + f"{total:9.1f}")
    cores = os.cpu_count()
    print(f"  busy: {total / (cores * jwall):.0%} of {cores} cores x {jwall:.0f} ms")
    print(f"\ntransformers step, op classes (ms of main-thread self time per step; step {twall:.0f} ms)")
    for cls, ms in tc.most_common():
        print(f"  {cls:30s} {ms:8.1f}")
    att = attention_alone(b, args.runs)
    print(
        f"\none layer's attention core alone ({b.ids.shape[0]} x {b.ids.shape[1]}, {b.cfg.model.n_heads} heads), median ms"
    )
    for phase in ("forward", "forward+backward"):
        ours, theirs = att[(phase, "ladder_jax")], att[(phase, "transformers")]
        print(f"  {phase:18s} ladder_jax {ours:7.1f}   PyTorch sdpa {theirs:7.1f}   ratio {ours / theirs:.2f}")
    gemm = gemm_alone(b, args.runs)
    m = b.cfg.model
    in_step = [ms for (name, cls), ms in per_op.items() if cls == "mlp / forward / matmul"]
    print(
        f"\nthe MLP's {b.tokens} x {m.d_model} x {m.ffn_dim} GEMM alone, median ms: XLA {gemm['ladder_jax']:.1f}, "
        f"torch.mm {gemm['transformers']:.1f}; the step's forward MLP GEMM thunks take "
        f"{min(in_step):.1f}-{max(in_step):.1f} ms each (gate and up: this shape; down: the transposed one)"
    )
    print(f"\nladder_jax step, the {args.top} most expensive thunks (ms of thread time per step)")
    for (name, op_name), ms in per_op.most_common(args.top):
        print(f"  {ms:7.2f}  {name:28s} {op_name}")
    train_speed.report_load(before=False)


if __name__ == "__main__":
    main()
