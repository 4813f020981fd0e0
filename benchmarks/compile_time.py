"""Where a train step's compile time goes: trace, lowering and XLA compile, timed apart.

    .venv-tpu/bin/python benchmarks/compile_time.py --config ladder-1b --target v5p-64 --tensor 4 \
        --layers 4,40 mesh.fsdp=8 train.batch_size=256 train.seq_len=2048 train.remat=full \
        [--dump DIR [--passes]]

Compiles the real train step (`training.Trainer`, as `analysis memory` does) deviceless for each
`model.n_layers` in `--layers` and prints, per depth: the seconds of `jax.jit(...).trace()`,
`.lower()` and `.compile()` (and the CPU seconds of the compile: XLA:TPU's backend runs on two
threads), the parameter and optimizer-state leaves, the ops of the StableHLO module and the
instructions of XLA's optimized HLO, and the load average next to the figures (compile times on
a shared machine are upper bounds). On TPU it then reads libtpu's own stage durations (HLO
passes, backend passes, code generation) and the program's size in bundles from its INFO log in
/tmp/tpu_logs. `--dump DIR` writes each depth's optimized HLO to DIR/layersN.hlo.txt, `--passes`
also XLA's per-pass dumps (`xla_dump_to`, `xla_dump_hlo_pass_re=.*`) to DIR/layersN/.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import time
from pathlib import Path


def load() -> str:
    return open("/proc/loadavg").read().split()[0]


def libtpu_stages() -> list[str]:
    """XLA:TPU's own stage durations and code size, one line per compile of this process, from
    libtpu's INFO log (/tmp/tpu_logs; glog writes it out within 30 s)."""
    log = libtpu_log()
    if log is None:
        return []
    text = open(log).read()
    out = []
    for part in text.split("Initial HLO module:")[1:]:
        stages = re.findall(r"(HLO_PASSES|BACKEND_PASSES|CODE_GENERATION) stage duration: (\S+)", part)
        bundles = re.findall(r"final program bundle count: ([\d,]+)", part)
        out.append(", ".join(f"{k} {v}" for k, v in stages) + (f", {bundles[-1]} bundles" if bundles else ""))
    return out


def libtpu_log() -> str | None:
    logs = glob.glob(f"/tmp/tpu_logs/*.INFO.*.{os.getpid()}")
    return logs[0] if logs else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="ladder-1b")
    ap.add_argument("--target", required=True)
    ap.add_argument("--tensor", type=int, required=True)
    ap.add_argument("--layers", default="4,40", help="comma-separated model.n_layers to compile")
    ap.add_argument("--dump", metavar="DIR", help="write each depth's optimized HLO to DIR/layersN.hlo.txt")
    ap.add_argument("--passes", action="store_true", help="with --dump: also XLA's per-pass dumps, DIR/layersN/")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    depths = [int(n) for n in args.layers.split(",")]

    import jax

    from ladder_jax import training
    from ladder_jax.config import load_config
    from ladder_jax.instruments import deviceless
    from ladder_jax.mesh import apply_xla_flags

    target = deviceless.get_target(args.target)
    apply_xla_flags()
    for n in depths:
        over = [*args.overrides, f"model.n_layers={n}", f"mesh.tensor={args.tensor}", "mesh.data=-1"]
        cfg = load_config(args.config, over)
        mesh = deviceless.target_mesh(cfg, target)
        trainer = training.Trainer(cfg, mesh)
        tr = cfg.train
        shape = (tr.grad_accum, tr.batch_size // tr.grad_accum, tr.seq_len)
        batch = {
            k: jax.ShapeDtypeStruct(shape, "float32" if k == "mask" else "int32", sharding=trainer.batch_sharding[k])
            for k in training.BATCH_KEYS
        }
        state = trainer.abstract_state()
        t0 = time.perf_counter()
        traced = trainer._step.trace(state, batch)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2, cpu = time.perf_counter(), time.process_time()
        passes = {"xla_dump_to": f"{args.dump}/layers{n}", "xla_dump_hlo_pass_re": ".*"} if args.passes else None
        compiled = lowered.compile(compiler_options=passes)
        t3, cpu = time.perf_counter(), time.process_time() - cpu
        mlir = lowered.as_text()
        hlo = compiled.as_text()
        if args.dump:
            Path(args.dump).mkdir(parents=True, exist_ok=True)
            Path(f"{args.dump}/layers{n}.hlo.txt").write_text(hlo)
        entry = hlo[hlo.index("ENTRY") :]
        entry = entry[: entry.index("\n}\n")]
        count = lambda text: len(re.findall(r"^\s+(?:ROOT )?%?[\w.-]+ = ", text, re.M))  # noqa: E731
        print(
            f"n_layers={n}: trace {t1 - t0:.1f} s, lower {t2 - t1:.1f} s, compile {t3 - t2:.1f} s "
            f"({cpu:.0f} s of CPU) "
            f"(load {load()}); leaves: params {len(jax.tree.leaves(state['params']))}, "
            f"opt_state {len(jax.tree.leaves(state['opt_state']))}; StableHLO ops {mlir.count(' = ')}, "
            f"optimized HLO instructions {count(hlo)} (entry {count(entry)})",
            flush=True,
        )
    if target.platform == "tpu" and libtpu_log():
        time.sleep(31)
        for n, line in zip(depths, libtpu_stages()):
            print(f"n_layers={n}: XLA:TPU {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
