"""Training-step throughput on this CPU: ladder_jax against Hugging Face transformers' PyTorch
LlamaForCausalLM of the same shape, batch, sequence length, AdamW and gradient clipping, float32.
The two are timed alternately in one process (medians of per-step times), so machine noise hits
both alike. The 1-minute load average is read before anything starts: at or above 0.5 the output
says BUSY, and the ratio is not a result (PyTorch suffers from a busy core more than XLA does).
The load after the run is printed too; the benchmark's own two busy cores raise it.

    python benchmarks/train_speed.py [--devices 1] [--batch 8] [--seq 256] [--runs 5] [key=value ...]

Needs the `bench` extra (torch, transformers): pip install -e '.[bench]' (torch==2.13.0 is the CPU
build on this machine). benchmarks/train_profile.py breaks the same step down by phase and op.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

QUIET_LOAD = 0.5  # 1-minute load average below which a ratio counts


def report_load(before: bool = True) -> float:
    load = os.getloadavg()[0]
    if before:
        verdict = "quiet" if load < QUIET_LOAD else f"BUSY (>= {QUIET_LOAD}): the figures below are not a result"
        print(f"load average before the run {load:.2f} on {os.cpu_count()} cores: {verdict}", flush=True)
    else:
        print(f"load average after the run {load:.2f} (this benchmark's own load included)", flush=True)
    return load


class Bench:
    """Our trainer and a transformers Llama of the same shape, batch, optimizer and clipping."""

    def __init__(self, devices: int = 1, batch: int = 8, seq: int = 256, overrides=()):
        from ladder_jax.mesh import force_cpu_devices

        force_cpu_devices(devices)
        import numpy as np
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from ladder_jax import model as M
        from ladder_jax.config import load_config
        from ladder_jax.data import PackedWindows, val_batches
        from ladder_jax.mesh import make_mesh
        from ladder_jax.training import Trainer, global_batch

        self.cfg = cfg = load_config("tiny", [f"train.batch_size={batch}", f"train.seq_len={seq}", *overrides])
        m, tr = cfg.model, cfg.train
        self.mesh = make_mesh(cfg)
        self.trainer = Trainer(cfg, self.mesh)
        self.state = self.trainer.init_state(M.init_params(m, self.mesh, 0))
        rng = np.random.RandomState(0)
        n = batch * (seq + 1) + 1
        (self.batch,) = val_batches(
            PackedWindows.of_arrays([rng.randint(0, m.vocab_size, n).astype(np.int32)], seq), batch, 1
        )
        self.global_batch = global_batch(self.mesh, self.batch, tr.grad_accum)
        self.tokens = batch * seq
        self.shape = (
            f"{m.name}: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads}/{m.n_kv_heads} heads, "
            f"ffn {m.ffn_dim}, vocab {m.vocab_size}"
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
        self.hf = LlamaForCausalLM(hf_cfg).train()
        self.opt = torch.optim.AdamW(self.hf.parameters(), lr=tr.lr, betas=(tr.b1, tr.b2), weight_decay=tr.weight_decay)
        self.ids = torch.tensor(self.batch["inputs"], dtype=torch.long)

    def ours(self):
        self.state, metrics = self.trainer.step(self.state, self.batch)
        float(metrics["loss"])

    def theirs(self):
        import torch

        loss = self.hf(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.hf.parameters(), self.cfg.train.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def jax_phases(self) -> dict:
        """forward, forward + backward, optimizer, step: each compiled on its own."""
        import jax
        import optax

        from ladder_jax.training import global_batch, loss_sums_fn

        tr = self.cfg.train
        loss_sums = loss_sums_fn(self.cfg.model, self.mesh, tr.remat, tr.scan_layers, self.trainer.lengths)
        mb = global_batch(self.mesh, self.batch)
        fwd = jax.jit(loss_sums)
        fwd_bwd = jax.jit(jax.value_and_grad(loss_sums, has_aux=True))
        tx = self.trainer.tx

        @jax.jit
        def optimizer(grads, opt_state, params):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        params = lambda: self.state["params"]  # noqa: E731 (the step donates and replaces the state)
        grads = {}

        def forward():
            float(fwd(params(), mb)[0])

        def forward_backward():
            grads["g"] = jax.block_until_ready(fwd_bwd(params(), mb)[1])

        def optimizer_step():
            jax.block_until_ready(optimizer(grads["g"], self.state["opt_state"], params()))

        return {
            "forward": forward,
            "forward+backward": forward_backward,
            "optimizer": optimizer_step,
            "step": self.ours,
        }

    def torch_phases(self) -> dict:
        import torch

        def forward():
            self.hf(input_ids=self.ids, labels=self.ids).loss.item()

        def forward_backward():
            self.opt.zero_grad(set_to_none=True)
            self.hf(input_ids=self.ids, labels=self.ids).loss.backward()

        def optimizer_step():
            torch.nn.utils.clip_grad_norm_(self.hf.parameters(), self.cfg.train.grad_clip)
            self.opt.step()

        return {
            "forward": forward,
            "forward+backward": forward_backward,
            "optimizer": optimizer_step,
            "step": self.theirs,
        }


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

    load_before = report_load()
    b = Bench(args.devices, args.batch, args.seq, args.overrides)
    import jax
    import torch

    t0 = time.perf_counter()
    b.ours()
    compile_s = time.perf_counter() - t0
    b.theirs()  # warm-up
    times = {"ladder_jax": [], "transformers": []}
    for _ in range(args.runs):
        for name, fn in (("ladder_jax", b.ours), ("transformers", b.theirs)):
            for _ in range(args.steps_per_run):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    load_after = report_load(before=False)
    m = b.cfg.model
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} cores)".strip(),
        "date": time.strftime("%Y-%m-%d"),
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "quiet": load_before < QUIET_LOAD,
        "shape": b.shape,
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
        result[name] = {"step_s": round(med, 4), "tokens_per_s": round(b.tokens / med, 1)}
    result["ratio"] = round(result["ladder_jax"]["tokens_per_s"] / result["transformers"]["tokens_per_s"], 3)
    print(f"{'':14s} {'step (s)':>9s} {'tokens/s':>10s}")
    for name in times:
        print(f"{name:14s} {result[name]['step_s']:9.4f} {result[name]['tokens_per_s']:10.1f}")
    flag = "" if result["quiet"] else "   [BUSY machine: not a result]"
    print(f"ratio ladder_jax / transformers: {result['ratio']:.2f}x   (ours compiled in {compile_s:.1f} s){flag}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
