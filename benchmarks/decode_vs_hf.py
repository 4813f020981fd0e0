"""Our standard greedy decoder against Hugging Face transformers' PyTorch Llama generate(), on
this CPU, side by side in one run.

Both run the same tiny Llama (the `tiny` preset: d_model 256, 6 layers, 8 heads, 4 KV heads,
FFN 768, vocab 259) with the same random weights (ours, copied into the HF model), greedy, with
a KV cache, the same batch and prompt/generation lengths, on one device (no fake devices).
Tokens/s counts the generated tokens over the whole generate call, prefill included; our
compile time is reported apart. Each figure is the median of --runs runs after one warm-up.

    pip install torch==2.13.0 transformers
    python benchmarks/decode_vs_hf.py --batch-sizes 1,4 --prompt-len 1024 --gen-len 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ladder_jax import decode
from ladder_jax import model as M
from ladder_jax.config import load_config
from ladder_jax.mesh import make_mesh


def hf_llama(cfg, params) -> LlamaForCausalLM:
    """The HF Llama of this model config holding these parameters (float32, eval mode)."""
    m, v = cfg.model, cfg.model.vocab_size
    hf_cfg = LlamaConfig(
        vocab_size=v,
        hidden_size=m.d_model,
        intermediate_size=m.ffn_dim,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads,
        head_dim=m.hd,
        max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        tie_word_embeddings=False,
        bos_token_id=m.bos_id,
        eos_token_id=m.eos_id,
        pad_token_id=m.pad_id,
    )
    p = jax.tree.map(np.asarray, jax.device_get(params))
    d = m.d_model
    state = {
        "model.embed_tokens.weight": p["embed"]["table"][:v],
        "model.norm.weight": p["final_norm"]["scale"],
        "lm_head.weight": p["lm_head"]["kernel"][:, :v].T,
    }
    for i, layer in p["layers"].items():
        a, f, pre = layer["attn"], layer["mlp"], f"model.layers.{i}."
        # Ours: q/k/v (d, heads, hd) and o (heads, hd, d); HF: Linear weights (out, in).
        state[pre + "self_attn.q_proj.weight"] = a["q_proj"].reshape(d, -1).T
        state[pre + "self_attn.k_proj.weight"] = a["k_proj"].reshape(d, -1).T
        state[pre + "self_attn.v_proj.weight"] = a["v_proj"].reshape(d, -1).T
        state[pre + "self_attn.o_proj.weight"] = a["o_proj"].reshape(-1, d).T
        state[pre + "mlp.gate_proj.weight"] = f["gate_proj"].T
        state[pre + "mlp.up_proj.weight"] = f["up_proj"].T
        state[pre + "mlp.down_proj.weight"] = f["down_proj"].T
        state[pre + "input_layernorm.weight"] = layer["attn_norm"]["scale"]
        state[pre + "post_attention_layernorm.weight"] = layer["mlp_norm"]["scale"]
    hf = LlamaForCausalLM(hf_cfg)
    hf.load_state_dict({k: torch.from_numpy(np.array(w, np.float32)) for k, w in state.items()}, strict=True)
    return hf.eval()


def time_ours(cfg, mesh, params, prompts, gen_len, runs):
    """(seconds per generation, prefill seconds, compile seconds, tokens): medians of `runs`."""
    shape = decode.decode_shape(cfg.model, mesh, prompts, gen_len)
    compile_seconds = decode.precompile(cfg.model, mesh, params, shape)
    decode.generate(cfg.model, mesh, params, prompts, gen_len)  # warm-up
    results = [decode.generate(cfg.model, mesh, params, prompts, gen_len) for _ in range(runs)]
    total = statistics.median(g.prefill_seconds + g.decode_seconds for g in results)
    prefill = statistics.median(g.prefill_seconds for g in results)
    return total, prefill, compile_seconds, np.array(results[-1].tokens)


@torch.inference_mode()
def time_hf(hf, prompts, gen_len, runs):
    """(seconds per generation, prefill seconds, tokens): medians of `runs`; the prefill is timed
    as a generate() of one token."""
    ids = torch.tensor(prompts)

    def generate(n):
        kwargs = {
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": n,
            "min_new_tokens": n,
            "do_sample": False,
            "num_beams": 1,
            "use_cache": True,
        }
        start = time.perf_counter()
        out = hf.generate(ids, **kwargs)
        return time.perf_counter() - start, out

    generate(gen_len)  # warm-up
    totals, prefills = [], []
    for _ in range(runs):
        seconds, out = generate(gen_len)
        totals.append(seconds)
        prefills.append(generate(1)[0])
    return statistics.median(totals), statistics.median(prefills), out[:, ids.shape[1] :].numpy()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--gen-len", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    cfg = load_config("tiny", ["mesh.data=1", "mesh.tensor=1"])
    if cfg.model.max_seq_len < args.prompt_len + args.gen_len:  # random weights: the context limit is only a shape
        cfg = load_config(
            "tiny", ["mesh.data=1", "mesh.tensor=1", f"model.max_seq_len={args.prompt_len + args.gen_len}"]
        )
    mesh = make_mesh(cfg, jax.devices()[:1])
    params = M.init_params(cfg.model, mesh, args.seed)
    hf = hf_llama(cfg, params)
    rng = np.random.default_rng(args.seed)
    print(
        f"{M.describe(cfg)}\nCPU, {torch.get_num_threads()} torch threads; jax {jax.__version__}, torch {torch.__version__}"
    )
    print(f"prompt {args.prompt_len}, generate {args.gen_len}, median of {args.runs} runs after 1 warm-up\n")
    print(
        "| batch | ours tok/s | HF tok/s | ours / HF | prefill ms ours / HF | decode ms/token ours / HF | our compile s | greedy tokens equal |"
    )
    print(
        "|-------|------------|----------|-----------|----------------------|---------------------------|---------------|---------------------|"
    )
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        prompts = rng.integers(0, cfg.model.vocab_size, (b, args.prompt_len)).tolist()
        ours_s, ours_prefill, compile_s, ours_tokens = time_ours(cfg, mesh, params, prompts, args.gen_len, args.runs)
        hf_s, hf_prefill, hf_tokens = time_hf(hf, prompts, args.gen_len, args.runs)
        # Random weights give nearly flat logits, so float32 rounding may flip a near-tie late in
        # a sequence; the count of equal tokens up to the first difference checks the copy.
        first_diff = [int(np.argmax(o != h)) if (o != h).any() else len(o) for o, h in zip(ours_tokens, hf_tokens)]
        ours_rate, hf_rate = b * args.gen_len / ours_s, b * args.gen_len / hf_s
        per_token = [
            (total - prefill) / (args.gen_len - 1) * 1e3
            for total, prefill in ((ours_s, ours_prefill), (hf_s, hf_prefill))
        ]
        print(
            f"| {b} | {ours_rate:.1f} | {hf_rate:.1f} | {ours_rate / hf_rate:.2f}x | {ours_prefill * 1e3:.0f} / {hf_prefill * 1e3:.0f} "
            f"| {per_token[0]:.1f} / {per_token[1]:.1f} | {compile_s:.1f} | {sum(first_diff)}/{b * args.gen_len} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
