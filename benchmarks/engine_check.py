"""A check of the paged engine on one accelerator (two decode steps in flight there; the test suite
runs XLA:CPU with one): a small random model, requests joining mid-stream, prompts prefilled in
chunks of PREFILL_CHUNK tokens (default 16: the longer prompts take 2 and 3 chunks between decode
steps) with the prefix cache on, greedy tokens equal to
the dense decoder's (`decode.generate` of each prompt alone), a sampled request's equal to the same
request alone, every page back in the pool at the end. Exit status 0 when all hold.

    python benchmarks/engine_check.py [PLAN] [STEPS_IN_FLIGHT] [PREFILL_CHUNK]   # e.g. ladder; "standard,ladder@-2:" 2 16
"""

import sys
import time

import jax

from ladder_jax import decode
from ladder_jax import model as M
from ladder_jax.config import load_config
from ladder_jax.decode import Sampling
from ladder_jax.engine import Engine, Request
from ladder_jax.mesh import make_mesh

plan = sys.argv[1] if len(sys.argv) > 1 else "ladder"
in_flight = int(sys.argv[2]) if len(sys.argv) > 2 else None
prefill_chunk = int(sys.argv[3]) if len(sys.argv) > 3 else 16
over = [
    "model.d_model=64",
    "model.n_layers=3",
    "model.n_heads=8",
    "model.n_kv_heads=2",
    "model.ffn_dim=128",
    "model.max_seq_len=128",
    "train.seq_len=64",
    "model.init_std=0.1",
    f"model.plan={plan}",
    "mesh.data=1",
    "mesh.tensor=1",
]
cfg = load_config("tiny", over)
mesh = make_mesh(cfg, jax.devices()[:1])
params = M.init_params(cfg.model, mesh, 0)
print("device", jax.devices()[0].device_kind, "plan", plan)
prompts = [[256, *b"Hello"], [256, *range(40, 60)], [256, 7], [256, *b"def fib(n):"], [256, *range(60, 100)]]
new = [40, 24, 9, 30, 17]
eng = Engine(cfg.model, mesh, params, max_running=4, cache_len=96, page_size=16, prefill_chunk=prefill_chunk)
if in_flight:
    eng.max_in_flight = in_flight
print("max_in_flight", eng.max_in_flight, "pages", eng.total_pages, "prefill_chunk", eng.prefill_chunk)
dense = [decode.generate(cfg.model, mesh, params, [p], n).tokens[0] for p, n in zip(prompts, new)]
sampled = Sampling(temperature=0.9, top_p=0.9, seed=5)
alone_s = eng.run([Request(prompts[1], new[1], sampled)])[0].tokens
reqs = [Request(p, n) for p, n in zip(prompts, new)] + [Request(prompts[1], new[1], sampled)]
eng.submit(reqs[0])
eng.submit(reqs[5])
for _ in range(5):
    eng.step()
start = time.perf_counter()
eng.run(reqs[1:5])
while not all(r.done.is_set() for r in reqs):
    eng.step()
ok = all(r.tokens == d for r, d in zip(reqs, dense)) and reqs[5].tokens == alone_s
print(
    "greedy equal dense:",
    [r.tokens == d for r, d in zip(reqs, dense)],
    "sampled equal alone:",
    reqs[5].tokens == alone_s,
)
print(
    "pages in use at end:",
    eng.pages_in_use,
    "steps",
    eng.steps,
    "prefill calls",
    eng.prefills,
    f"prefix hit rate {eng.prefix_hit_rate:.2f}",
    f"{time.perf_counter() - start:.2f}s",
)
sys.exit(0 if ok and eng.pages_in_use == 0 else 1)
