"""Tables and summaries the verbs print."""

from __future__ import annotations


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def mesh_shape(mesh) -> str:
    return " x ".join(f"{a}={n}" for a, n in mesh.shape.items())


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """`columns`: (key, title, format) each; a missing value shows as '-'."""
    cells = [[title for _, title, _ in columns]]
    cells += [["-" if r.get(key) is None else fmt.format(r[key]) for key, _, fmt in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def sync_table(m, tensor: int, rows: list[dict]) -> str:
    lines = [
        f"{m.name}, {m.n_layers} layers, tensor={tensor}: all-reduces over 'tensor' in one decode step",
        f"{'variant':28s} {'all-reduces':>11s} {'blocking':>9s} {'overlap':>8s} {'bytes/token':>12s}",
    ]
    for r in rows:
        lines.append(
            f"{r['variant']:28s} {r['all_reduces']:11d} {r['blocking_all_reduces']:9d} {r['overlappable_all_reduces']:8d} {r['bytes_per_token']:12,d}"
        )
    return "\n".join(lines)


def memory_summary(cfg, mesh, target, r: dict) -> str:
    tr = cfg.train
    what = (
        f"{cfg.model.name} train step on {target.name} ({target.devices} devices, {mesh_shape(mesh)}), "
        f"batch {tr.batch_size} x {tr.seq_len} tokens"
    )
    if "refused" in r:
        return f"{what}: does NOT fit; the compiler refused it: {r['refused']}"
    return (
        f"{what}{f', grad_accum {tr.grad_accum}' if tr.grad_accum > 1 else ''}: per device arguments {gib(r['arguments'])}, "
        f"outputs {gib(r['outputs'])} ({gib(r['aliased'])} of them over donated arguments), temporaries {gib(r['temporaries'])}, "
        f"code {gib(r['code'])}; total {gib(r['total'])} of {gib(r['hbm'])} HBM: {'fits' if r['fits'] else 'does NOT fit'} ({r['total'] / r['hbm']:.0%})"
    )


def schedule_report(m, mesh, target, batch: int, cache_len: int, flags: str, rows: list[dict]) -> str:
    lines = [
        f"{m.name}, {m.n_layers} layers, {m.dtype}, one decode step on {target.name} ({mesh_shape(mesh)}), "
        f"batch {batch * mesh.shape['data']}, KV cache {min(cache_len, m.max_seq_len)}; XLA flags: {flags}"
    ]
    for r in rows:
        lines.append(
            f"\n{r['variant']}: {r['all_reduces']} all-reduces over 'tensor', {r['async']} async, {r['overlapped']} with GEMMs inside "
            f"({r['overlap_next_module']} with the next module's), {r['merged']} merged; ladder acceptance: {'yes' if r['ladder_overlaps'] else 'no'}"
        )
        lines.append(
            f"  memory traffic per device: {r['hbm_bytes'] / 2**20:.1f} MiB against a floor of {r['floor_bytes'] / 2**20:.1f} MiB "
            f"(weights once, KV cache up to the position): {r['hbm_over_floor']:.2f}x; {r['kernels']} kernels per step; "
            f"{r['host_synced_loops']} loops of unknown trip count (XLA:GPU waits on the host at each iteration)"
        )
        shown = r["exposed"][:12] + ([f"... {len(r['exposed']) - 12} more"] if len(r["exposed"]) > 12 else [])
        lines.append(f"  exposed ({len(r['exposed'])}): {', '.join(shown) or 'none'}")
        lines.append(f"  {'#':>3s} {'all-reduce':26s} {'kind':5s} {'bytes':>9s} {'reduces':28s} GEMMs inside")
        for k, a in enumerate(r["all_reduce_list"]):
            kind = "async" if a["async_"] else "sync"
            lines.append(
                f"  {k:3d} {a['name'][:26]:26s} {kind:5s} {a['bytes']:9,d} {'+'.join(a['reduces'])[:28]:28s} "
                f"{len(a['gemms_inside'])}: {gemm_names(a['gemms_inside'])}"
            )
    return "\n".join(lines)


def gemm_names(labels: list[str]) -> str:
    """'layers.1.attn.q_proj x2, layers.1.attn.kv' (each GEMM kernel once; GPU and TPU split a
    matrix-vector product into two kernels)."""
    counts = dict.fromkeys(labels, 0)
    for x in labels:
        counts[x] += 1
    return ", ".join(f"{x} x{n}" if n > 1 else x for x, n in counts.items())
