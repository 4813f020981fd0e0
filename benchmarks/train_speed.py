"""Training-step throughput on this CPU: ladder_jax against Hugging Face transformers' PyTorch
LlamaForCausalLM of the same shape, batch, sequence length, AdamW and gradient clipping, float32.
The two are timed alternately in one process (medians of per-step times), so machine noise hits
both alike.

    python benchmarks/train_speed.py [--devices 1] [--batch 8] [--seq 256] [--runs 5] [key=value ...]

Needs the `bench` extra (torch, transformers): pip install -e '.[bench]' (torch==2.13.0 is the CPU
build on this machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--devices",
        type=int,
        default=1,
        help="fake CPU devices for ladder_jax (1 = the fair single-process comparison)",
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5, help="timed rounds; each times a few steps of both")
    ap.add_argument("--steps-per-run", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("overrides", nargs="*", help="ladder_jax config overrides (model.plan=ladder, mesh.tensor=...)")
    args = ap.parse_args()

    from ladder_jax.mesh import force_cpu_devices

    force_cpu_devices(args.devices)
    import jax
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ladder_jax import model as M
    from ladder_jax.config import load_config
    from ladder_jax.data import PackedWindows, val_batches
    from ladder_jax.mesh import make_mesh
    from ladder_jax.training import Trainer

    cfg = load_config("tiny", [f"train.batch_size={args.batch}", f"train.seq_len={args.seq}", *args.overrides])
    m, tr = cfg.model, cfg.train
    mesh = make_mesh(cfg)
    trainer = Trainer(cfg, mesh)
    state = trainer.init_state(M.init_params(m, mesh, 0))
    rng = np.random.RandomState(0)
    n = args.batch * (args.seq + 1) + 1
    (batch,) = val_batches(
        PackedWindows.of_arrays([rng.randint(0, m.vocab_size, n).astype(np.int32)], args.seq), args.batch, 1
    )

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.d_model,
        intermediate_size=m.ffn_dim,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads,
        max_position_embeddings=m.max_seq_len,
        rope_theta=m.rope_theta,
        rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings,
    )
    hf = LlamaForCausalLM(hf_cfg).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=tr.lr, betas=(tr.b1, tr.b2), weight_decay=tr.weight_decay)
    ids = torch.tensor(batch["inputs"], dtype=torch.long)

    def ours():
        nonlocal state
        state, metrics = trainer.step(state, batch)
        float(metrics["loss"])

    def theirs():
        loss = hf(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), tr.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    ours()
    compile_s = time.perf_counter() - t0
    theirs()  # warm-up
    times = {"ladder_jax": [], "transformers": []}
    for _ in range(args.runs):
        for name, fn in (("ladder_jax", ours), ("transformers", theirs)):
            for _ in range(args.steps_per_run):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    tokens = args.batch * args.seq
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} ({__import__('os').cpu_count()} cores)".strip(),
        "date": time.strftime("%Y-%m-%d"),
        "shape": f"{m.name}: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads}/{m.n_kv_heads} heads, ffn {m.ffn_dim}, vocab {m.vocab_size}",
        "batch": args.batch,
        "seq": args.seq,
        "devices": args.devices,
        "plan": m.plan,
        "jax": jax.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "compile_s": round(compile_s, 2),
    }
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = {"step_s": round(med, 4), "tokens_per_s": round(tokens / med, 1)}
    result["ratio"] = round(result["ladder_jax"]["tokens_per_s"] / result["transformers"]["tokens_per_s"], 3)
    print(f"{'':14s} {'step (s)':>9s} {'tokens/s':>10s}")
    for name in times:
        print(f"{name:14s} {result[name]['step_s']:9.4f} {result[name]['tokens_per_s']:10.1f}")
    print(f"ratio ladder_jax / transformers: {result['ratio']:.2f}x   (ours compiled in {compile_s:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
