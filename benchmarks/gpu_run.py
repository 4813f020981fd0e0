"""Every single-GPU figure the project needs, in one command: one JSON and one Markdown table.

    python benchmarks/gpu_run.py --out gpu_run          # one H100/H200: about 7 minutes, compiles included
    python benchmarks/gpu_run.py --dry-run --out /tmp/g # every part on CPU with tiny shapes, well under a minute
    python benchmarks/gpu_run.py --out gpu_run2 --resume gpu_run/gpu_run.json   # a second call: the rows left

Parts, in this order, each with its own time budget (seconds of wall time, compiles included).
A row is skipped with a line when its part's budget or the whole run's `--budget` is spent, or
when what it took last time (`--costs`: earlier reports of this device) would not fit in what is
left. A row that overruns anyway is cut at `--hard-stop` seconds: the report is written with the
row marked as cut and the process exits (status 3), so one call always returns a complete report
of what it measured. `--resume REPORT` keeps the rows an earlier call measured and runs the rest:
two calls on two fresh machines make one report.

- decode: per-token latency of llama-3.1-8b (random bfloat16 weights, tensor 1) at batch 1, 8,
  32, 64 with every row's new token at position 1023 (a 1024-token context); the bytes a step
  must read (`ladder_jax.instruments.traffic.floor_bytes`) over that time, as a fraction of the device's spec
  bandwidth (ladder_jax/accelerators.yaml) and of a plain copy measured here first, each step's
  token read before the next is sent; then batch 1 and 64 with the steps queued back to back (as
  `decode.generate` keeps the next step queued: the device's time per step); batch 1 and 64 with
  the keys read in a loop up to the position, as every step ran before 2026-12-05
  (XLA:GPU's runtime fetches such a loop's condition to the host at every iteration), and a
  `jax.profiler` trace of three batch-1 steps in --out/profile, summed up into the report here
  (`ladder_jax.instruments.timeline`: kernels per step, busy share, idle gaps, top ops);
- prefill: 8192 tokens of llama-3.1-8b, `model.attention=cudnn` against `xla`;
- layer: `layer_decode.py`'s table (llama-2-70b at tensor 8: one device's shapes) against the
  latency model (the h100-nvlink profile, with the spec numbers of the device at hand);
- serve: llama-3.2-1b's continuous-batching engine (ladder_jax/engine.py, driven in-process
  without HTTP: the GPU machine has no fastapi/uvicorn/openai, and HTTP adds nothing to a
  throughput on one device) against the same requests as static batches (`decode.generate`);
- train: a train step of llama-3.2-1b and ladder-1b at 8 x 2048, tokens/s and MFU, `triton`
  against `xla` attention, remat none and full (the layers as one scan: it compiles one layer);
  at the first kernel and remat, two more steps of each model traced and summed up in the report.

Needs jax, flax, optax, orbax and pyyaml only (none of grain, array_record or the serving extras).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# JAX preallocates 75% of a GPU by default; the train rows at remat none need more (llama-3.2-1b
# at 8 x 2048 with xla attention: 63.9 GiB of an H100's 79.1). Read when the backend starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import layer_decode  # noqa: E402 (the benchmarks beside this one)
import serve_throughput  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shapes:
    decode_config: str
    decode_batches: tuple[int, ...]
    context: int
    prefill_tokens: int
    layer_config: str
    layer_tensor: int
    layer_batches: tuple[int, ...]
    layer_cache: int
    layer_layers: tuple[int, int]
    serve_config: str
    serve_requests: int
    serve_concurrency: int
    serve_max_tokens: int
    train_configs: tuple[tuple[str, str, tuple[str, ...]], ...]  # (label, preset, overrides)
    train_grid: tuple[tuple[str, str], ...]  # (attention, remat) pairs
    train_batch: int
    train_seq: int
    probe_mib: int
    runs: int
    train_runs: int  # a train step is 0.3-1 s and steady: fewer of them
    budgets: dict  # part -> seconds
    overrides: tuple[str, ...] = ()  # applied to every model (the dry run's tiny shapes)


GPU = Shapes(
    decode_config="llama-3.1-8b",
    decode_batches=(1, 8, 32, 64),
    context=1024,
    prefill_tokens=8192,
    layer_config="llama-2-70b",
    layer_tensor=8,
    layer_batches=(1, 8, 32, 64),
    layer_cache=1536,
    layer_layers=(2, 6),
    serve_config="llama-3.2-1b",
    serve_requests=64,
    serve_concurrency=16,
    serve_max_tokens=128,
    train_configs=(("llama-3.2-1b", "llama-3.2-1b", ()), ("ladder-1b", "ladder-1b", ())),
    # xla attention without a remat last: the largest step, refused on an H100 for ladder-1b
    train_grid=(("triton", "none"), ("triton", "full"), ("xla", "full"), ("xla", "none")),
    train_batch=8,
    train_seq=2048,
    probe_mib=2048,
    runs=10,
    train_runs=5,
    # Estimates: the first H200 run (2026-12-04) paid a minute of init compiles per model, since
    # gone; its other costs and deviceless XLA:GPU compiles of each row's program (2 CPU cores,
    # no autotuning: 8B decode step 4-6 s, 8B prefill 4 s cuDNN and 26 s xla, 1B train step 4-5 s
    # triton and 14-18 s xla) give these. The parts' sum passes the run's budget:
    # the train rows take what the others leave, and a second call with --resume the rest.
    budgets={"bandwidth": 15, "decode": 100, "prefill": 70, "layer": 50, "serve": 100, "train": 220},
)
TINY = ("model.n_layers=2", "model.d_model=128", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=256")
DRY = Shapes(
    decode_config="tiny",
    decode_batches=(1, 4),
    context=64,
    prefill_tokens=128,
    layer_config="tiny",
    layer_tensor=2,
    layer_batches=(1,),
    layer_cache=64,
    layer_layers=(1, 5),
    serve_config="tiny",
    # enough requests and rows that their prefills take shapes the warm-up took only because it
    # made the same lengths (with EOS, a compile landed in the timed run at these shapes)
    serve_requests=12,
    serve_concurrency=4,
    serve_max_tokens=24,
    train_configs=(("llama-3.2-1b", "tiny", ()), ("ladder-1b", "tiny", ("model.plan=ladder",))),
    train_grid=(("triton", "none"), ("xla", "full")),  # both kernels and both remats in half the compiles
    train_batch=2,
    train_seq=128,
    probe_mib=8,
    runs=2,
    train_runs=2,
    budgets={"bandwidth": 30, "decode": 60, "prefill": 60, "layer": 60, "serve": 60, "train": 60},
    overrides=TINY,
)


def median_seconds(fn, runs: int, warmup: int = 1) -> tuple[float, float]:
    """(median seconds of `fn()` over `runs` calls, seconds of the first call: the compile)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), first


class Run:
    """The device, its spec, the whole run's deadline, and each part's rows and skip lines."""

    def __init__(self, shapes: Shapes, budget: float, cpu: bool = False, costs=(), resume=None, out=Path("gpu_run")):
        import jax

        from ladder_jax import accelerators, memory

        self.shapes, self.start, self.out = shapes, time.perf_counter(), out
        self.end = self.start + budget
        self.device = jax.devices("cpu" if cpu else None)[0]
        self.spec = accelerators.for_device_kind(self.device.device_kind)
        limit = memory.device_memory(self.device)
        self.report = {
            "device": self.device.device_kind,
            "platform": self.device.platform,
            "spec": dataclasses.asdict(self.spec) if self.spec else None,
            "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "driver": gpu_driver() if self.device.platform == "gpu" else None,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "budget_s": budget,
            "memory_limit_gib": None if limit is None else round(limit[0] / 2**30, 2),  # what JAX's allocator may hold
            "parts": {},
        }
        self.costs = row_costs(costs, self.device.device_kind)
        self.kept = {} if resume is None else measured_rows(resume, self.device.device_kind)
        self.current: str | None = None  # the row being measured (the hard stop names it)
        # What compiling took so far, from JAX's own events: where a row's seconds go besides its
        # timed calls (a fresh machine compiles everything, and autotunes its kernels while at it)
        self.spent = {"compiles": 0, "compile_s": 0.0, "trace_s": 0.0}
        jax.monitoring.register_event_duration_secs_listener(self._compile_event)

    def _compile_event(self, event: str, seconds: float, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.spent["compiles"] += 1
            self.spent["compile_s"] += seconds
        elif event in ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration"):
            self.spent["trace_s"] += seconds

    def mesh(self):
        from ladder_jax.config import Config, MeshConfig
        from ladder_jax.mesh import make_mesh

        return make_mesh(Config(mesh=MeshConfig(data=1, tensor=1)), [self.device])

    def why_not(self, name: str, label: str, deadline: float) -> str | None:
        """Why a row must not start now (a skip line), or None."""
        left, cost = deadline - time.perf_counter(), self.costs.get(label)
        if left <= 0:
            return f"{label}: skipped, the {name} budget ({self.shapes.budgets[name]} s) or the run's is spent"
        if cost is not None and cost > left:
            return f"{label}: skipped, it took {cost:.0f} s last time and {left:.0f} s of the {name} budget or the run's are left"
        return None

    def part(self, name: str, rows_of):
        """Run a part: `rows_of(keep)` yields (label, measure) pairs; each measure() returns a row
        dict. A row that must not start is skipped with a line; a row that raises records one line."""
        budget = self.shapes.budgets[name]
        deadline = min(self.end, time.perf_counter() + budget)
        out = self.report["parts"][name] = {"budget_s": budget, "rows": [], "skipped": []}
        start = time.perf_counter()
        print(f"== {name} (budget {budget} s)", flush=True)
        rows = rows_of()
        while True:
            try:  # setting a part up (a config, a check) may fail too: one line, and the part ends
                label, measure = next(rows)
            except StopIteration:
                break
            except Exception as e:
                out["skipped"].append(f"{name}: {_line(e)}")
                break
            if label in self.kept:
                out["rows"].append(self.kept[label])
                print(f"   {label}: kept from the report resumed", flush=True)
                continue
            line = self.why_not(name, label, deadline)
            if line is None:
                self.current, row_start, before = label, time.perf_counter(), dict(self.spent)
                try:
                    row = measure()
                    spent = {k: round(v - before[k], 1) for k, v in self.spent.items()}
                    seconds = round(time.perf_counter() - row_start, 1)
                    out["rows"].append({"label": label, **row, **spent, "seconds": seconds})
                    line = json.dumps(out["rows"][-1])
                except Exception as e:  # one line in the report; the other rows and parts still run
                    line = f"{label}: {_line(e)}"
                self.current = None
            if not line.startswith("{"):
                out["skipped"].append(line)
            print(f"   {line}", flush=True)
            gc.collect()
        out["seconds"] = round(time.perf_counter() - start, 1)


def gpu_driver() -> str | None:
    """The NVIDIA driver's version (nvidia-smi), or None where it cannot be asked."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.split()
    return lines[0] if done.returncode == 0 and lines else None


def _reports(paths) -> list[dict]:
    return [json.loads(Path(p).read_text()) for p in paths]


def row_costs(paths, device_kind: str) -> dict[str, float]:
    """label -> seconds a row took in earlier reports of this device kind (the latest report wins).
    Rows without their own seconds are not costs: they come from the first run (2026-12-04), when
    every model's random init compiled each layer's kernels anew (a minute a model, since gone)."""
    costs: dict[str, float] = {}
    for report in sorted(_reports(paths), key=lambda r: r["date"]):
        if report["device"] != device_kind:
            continue
        for part in report["parts"].values():
            for row in part["rows"]:
                if row.get("seconds") and not row.get("from"):  # a kept row took nothing in that call
                    costs[row["label"]] = row["seconds"]
    return costs


def measured_rows(path, device_kind: str) -> dict[str, dict]:
    """label -> row of an earlier report of this device kind, marked with where it came from."""
    (report,) = _reports([path])
    if report["device"] != device_kind:
        raise ValueError(
            f"{path} was measured on {report['device']}, not this {device_kind}; resume a report of this device"
        )
    return {
        row["label"]: {**row, "from": row.get("from") or f"{report['date']} ({Path(path).name})"}
        for part in report["parts"].values()
        for row in part["rows"]
    }


def write_report(run: Run, out: Path) -> str:
    run.report.update(
        seconds=round(time.perf_counter() - run.start, 1), **{k: round(v, 1) for k, v in run.spent.items()}
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_run.json").write_text(json.dumps(run.report, indent=1))
    table = markdown(run.report)
    (out / "gpu_run.md").write_text(table)
    return table


def hard_stop(run: Run, out: Path, after: float) -> threading.Timer:
    """A timer that, `after` seconds from now, writes the report with the row still running
    marked as cut and ends the process: a compile or a step cannot be interrupted from Python."""

    def stop():
        label = run.current or "between rows"
        for part in run.report["parts"].values():
            if "seconds" not in part:  # the part that was running
                part["skipped"].append(f"{label}: cut at the hard stop ({after:.0f} s)")
                part["seconds"] = None
        run.report["cut"] = label
        print(write_report(run, out), flush=True)
        print(f"hard stop after {after:.0f} s: {label} was cut", file=sys.stderr, flush=True)
        os._exit(3)

    timer = threading.Timer(after, stop)
    timer.daemon = True
    timer.start()
    return timer


# ---------------------------------------------------------------------------------------------
# The parts


def bandwidth_rows(run: Run):
    sh = run.shapes

    def probe():
        copy = layer_decode.copy_bandwidth(sh.probe_mib, sh.runs)
        read = layer_decode.read_bandwidth(sh.probe_mib, sh.runs)
        run.copy_bytes_s = copy
        peak = run.spec.hbm_bandwidth if run.spec else None
        return {
            "mib": sh.probe_mib,
            "copy_gb_s": copy / 1e9,
            "read_gb_s": read / 1e9,
            "copy_of_peak": _share(copy, peak),
        }

    yield "plain copy and read", probe


def decode_rows(run: Run):
    import jax

    from ladder_jax import model as M
    from ladder_jax.config import load_config
    from ladder_jax.instruments.traffic import floor_bytes

    sh = run.shapes
    m = load_config(sh.decode_config, sh.overrides).model
    mesh, peak = run.mesh(), run.spec.hbm_bandwidth if run.spec else None
    shared = {}  # the random weights, made once for every row of the part

    def params():
        if "params" not in shared:
            shared["params"] = M.init_params(m, mesh, 0)
        return shared["params"]

    def row(b, reads=None, queued=False):
        t = layer_decode.time_steps(m, mesh, b, sh.context, sh.runs, 3, sh.context - 1, params(), reads, queued)
        floor = floor_bytes(m, 1, b, sh.context, sh.context)
        rate = floor["total"] / t
        return {
            "batch": b,
            "reads": reads or "platform",
            "dispatch": "queued" if queued else "each read",
            "ms_per_token": t * 1e3,
            "tokens_per_s": b / t,
            "floor_mb": floor["total"] / 1e6,
            "gb_s": rate / 1e9,
            "of_peak": _share(rate, peak),
            "of_copy": _share(rate, getattr(run, "copy_bytes_s", None)),
        }

    for b in sh.decode_batches:
        yield f"{m.name} batch {b}", lambda b=b: row(b)
    # The same steps sent back to back, as `decode.generate` keeps the next step queued: the device's
    # time per step without the host's turn between steps
    for b in (sh.decode_batches[0], sh.decode_batches[-1]):
        yield f"{m.name} batch {b}, queued", lambda b=b: row(b, queued=True)
    # The same steps with the keys read in a loop up to the position, whose trip count XLA:GPU's
    # runtime fetches to the host at every iteration (how every step ran before 2026-12-05)
    for b in (sh.decode_batches[0], sh.decode_batches[-1]):
        yield f"{m.name} batch {b}, keys read up to the position", lambda b=b: row(b, "written")

    def profile():
        # A trace of three batch-1 steps (kernels, gaps, host waits) for xprof's or TensorBoard's
        # trace viewer, compiled before it starts. The files are moved up to --out/profile (the
        # device tool brings back files at most two folders down) and gzipped past 8 MiB.
        import gzip
        import shutil

        layer_decode.time_steps(m, mesh, 1, sh.context, 1, 1, sh.context - 1, params())
        folder = run.out / "profile"
        with jax.profiler.trace(str(folder / "trace")):
            t = layer_decode.time_steps(m, mesh, 1, sh.context, 3, 0, sh.context - 1, params())
        summary = timeline_of(folder / "trace", 3)  # here: the files may be too large to bring back
        files = []
        for p in sorted((folder / "trace").rglob("*")):
            if p.is_file():
                dest = folder / p.name
                if p.stat().st_size > 8 * 2**20 and p.suffix != ".gz":
                    dest = folder / (p.name + ".gz")
                    with p.open("rb") as src, gzip.open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
                else:
                    shutil.copy(p, dest)
                files.append(f"{dest.name} ({dest.stat().st_size / 2**20:.1f} MiB)")
        shutil.rmtree(folder / "trace")
        return {
            "batch": 1,
            "reads": "platform",
            "dispatch": "each read",
            "ms_per_token": t * 1e3,
            "trace_files": files,
            **summary,
        }

    yield f"{m.name} batch 1, profiled", profile


def prefill_rows(run: Run):
    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    from ladder_jax import attention, decode
    from ladder_jax import model as M
    from ladder_jax.config import load_config
    from ladder_jax.training import flops_per_token

    sh, mesh, n = run.shapes, run.mesh(), run.shapes.prefill_tokens
    for impl in ("cudnn", "xla"):

        def measure(impl=impl):
            cfg = load_config(sh.decode_config, [*sh.overrides, f"model.attention={impl}", f"train.seq_len={n}"])
            attention.check_platform(impl, run.device.platform)  # cudnn on a CPU: one line, no compile
            params = M.init_params(cfg.model, mesh, 0)
            fn = decode.prefill_fn(cfg.model, mesh, n)
            tokens = jax.device_put(np.ones((1, n), np.int32), NamedSharding(mesh, decode.ROWS_BY_SEQ))
            lengths = jax.device_put(np.full(1, n, np.int32), NamedSharding(mesh, decode.ROWS))
            t, first = median_seconds(lambda: jax.block_until_ready(fn(params, tokens, lengths)), sh.runs)
            flops = flops_per_token(cfg) / 3 * n  # the forward: a third of a train step's FLOPs per token
            return {
                "attention": impl,
                "tokens": n,
                "ms": t * 1e3,
                "tokens_per_s": n / t,
                "mfu": _share(flops / t, run.spec.matmul_flops if run.spec else None),
                "first_call_s": first,
            }

        yield f"{sh.decode_config} prefill {n} tokens, attention={impl}", measure


def layer_rows(run: Run):
    from ladder_jax.config import load_config
    from ladder_jax.instruments.perf.cost import check_tensor, module_costs
    from ladder_jax.instruments.perf.hardware import load_hardware

    sh = run.shapes
    m = load_config(sh.layer_config, sh.overrides).model
    hw = load_hardware("h100-nvlink")
    if run.spec and run.spec.name != hw.name:  # the calibrated profile, on the spec sheet of the device at hand
        hw = dataclasses.replace(hw, hbm_bandwidth=run.spec.hbm_bandwidth, matmul_flops=run.spec.matmul_flops)
    check_tensor(m, hw, sh.layer_tensor)
    costs = module_costs(dataclasses.replace(m, plan="standard"), sh.layer_tensor)
    layer_decode.check_layer_bytes(m, costs, sh.layer_tensor, sh.layer_layers)
    mesh = run.mesh()
    for b in sh.layer_batches:

        def measure(b=b):
            args = (m, hw, costs, mesh, sh.layer_tensor, b, sh.layer_cache, sh.layer_layers, sh.runs, 3)
            row = layer_decode.layer_row(*args)
            if row is None:
                raise RuntimeError("the layers' time is below the timing noise")
            return {
                "model_over_measured": row["model_ms_per_layer"] / row["ms_per_layer"],
                "mb_read": row["bytes_per_layer"] / 1e6,
                **row,
            }

        yield f"{m.name} tensor {sh.layer_tensor} (one device's shapes) batch {b}", measure


def serve_rows(run: Run):
    import jax
    import numpy as np

    from ladder_jax import decode
    from ladder_jax import model as M
    from ladder_jax.config import load_config
    from ladder_jax.engine import Engine

    sh = run.shapes
    cfg = load_config(sh.serve_config, [*sh.overrides, "mesh.data=1", "mesh.tensor=1"])
    m, mesh = cfg.model, run.mesh()
    wants = [n for _, n in serve_throughput.workload(sh.serve_requests, sh.serve_max_tokens, 0)]
    rng = np.random.default_rng(0)
    prompts = [[m.bos_id, *rng.integers(0, m.vocab_size, rng.integers(8, 49)).tolist()] for _ in wants]
    # The warm-up's prompts: as long as the measured ones, other tokens. So both modes compile the
    # shapes the measured run takes, and the engine's prefix cache holds none of its prompts.
    warm = [[m.bos_id, *rng.integers(0, m.vocab_size, len(p) - 1).tolist()] for p in prompts]
    # EOS ignored, as vLLM's serving benchmark does with random data: every request makes the
    # tokens it wants, so which prefill shapes run depends on the lengths alone, and the warm-up
    # compiles all the timed run takes (with random weights, where EOS falls moved them).
    stop = set()
    compiles = []

    def compiled(event, seconds, **kwargs):  # JAX's own compile events, with the program's name
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(kwargs.get("fun_name", "?"))

    def measure():
        params = M.init_params(m, mesh, 0)
        cache_len = decode.bucket_length(50, m.max_seq_len) + sh.serve_max_tokens
        engine = Engine(m, mesh, params, sh.serve_concurrency, cache_len)
        serve_throughput.run_static(cfg, mesh, params, warm, wants, sh.serve_concurrency, stop)
        serve_throughput.run_engine(engine, warm, wants, stop)
        jax.monitoring.register_event_duration_secs_listener(compiled)
        try:
            static = serve_throughput.run_static(cfg, mesh, params, prompts, wants, sh.serve_concurrency, stop)
            engine_s, engine_tokens = serve_throughput.run_engine(engine, prompts, wants, stop)
        finally:
            jax.monitoring.unregister_event_duration_listener(compiled)
        static_s, static_tokens = static
        return {
            "compiles_while_timed": len(compiles),
            "compiled_while_timed": compiles,  # the programs' names
            "requests": len(prompts),
            "concurrency": sh.serve_concurrency,
            "static_tokens_per_s": static_tokens / static_s,
            "engine_tokens_per_s": engine_tokens / engine_s,
            "static_requests_per_s": len(prompts) / static_s,
            "engine_requests_per_s": len(prompts) / engine_s,
            "engine_over_static": (engine_tokens / engine_s) / (static_tokens / static_s),
        }

    yield f"{m.name} engine (no HTTP) against static batches of {sh.serve_concurrency}", measure


def train_rows(run: Run):
    import tempfile

    import jax
    import numpy as np

    from ladder_jax import memory
    from ladder_jax import model as M
    from ladder_jax.config import load_config
    from ladder_jax.data import PackedWindows, val_batches
    from ladder_jax.mesh import make_mesh
    from ladder_jax.training import Trainer, flops_per_token

    sh = run.shapes
    # Kernels and remat policies outermost: a run short of time still compares both models.
    for impl, remat in sh.train_grid:
        for label, preset, extra in sh.train_configs:

            def measure(label=label, preset=preset, extra=extra, impl=impl, remat=remat):
                over = [*sh.overrides, *extra, f"train.batch_size={sh.train_batch}", f"train.seq_len={sh.train_seq}"]
                over += [f"model.attention={impl}", f"train.remat={remat}", "mesh.data=1", "mesh.tensor=1"]
                # the layers as one scan: a compile of one layer instead of 16 or 40 (minutes of a
                # 7-minute run); the same computation (Transformer.residual)
                cfg = load_config(preset, [*over, "train.scan_layers=true"])
                setup = time.perf_counter()
                mesh = make_mesh(cfg, [run.device])
                trainer = Trainer(cfg, mesh)
                # the step compiled, and refused in one line if it cannot fit this device (xla
                # attention keeps every layer's scores without a remat), before any state exists
                memory.check_step_fits(trainer)
                state = [trainer.init_state(M.init_params(cfg.model, mesh, 0))]
                n = sh.train_batch * (sh.train_seq + 1) + 1
                ids = np.random.default_rng(0).integers(0, cfg.model.vocab_size, n).astype(np.int32)
                (batch,) = val_batches(PackedWindows.of_arrays([ids], sh.train_seq), sh.train_batch, 1)

                def step():
                    state[0], metrics = trainer.step(state[0], batch)
                    float(metrics["loss"])

                setup = time.perf_counter() - setup  # the step's compile, params and optimizer state
                t, first = median_seconds(step, sh.train_runs)
                tokens_s = sh.train_batch * sh.train_seq / t
                profiled = {}
                if (impl, remat) == sh.train_grid[0]:  # where each model's step time goes: two steps traced
                    with tempfile.TemporaryDirectory() as folder:
                        with jax.profiler.trace(folder):
                            step()
                            step()
                        profiled = timeline_of(folder, 2)
                return {
                    "config": label,
                    "attention": impl,
                    "remat": remat,
                    "step_s": t,
                    "tokens_per_s": tokens_s,
                    "mfu": _share(flops_per_token(cfg) * tokens_s, run.spec.matmul_flops if run.spec else None),
                    "first_call_s": first,
                    "setup_s": setup,
                    **profiled,
                }

            yield f"{label} train {sh.train_batch}x{sh.train_seq} attention={impl} remat={remat}", measure


PARTS = {
    "bandwidth": bandwidth_rows,
    "decode": decode_rows,
    "prefill": prefill_rows,
    "layer": layer_rows,
    "serve": serve_rows,
    "train": train_rows,
}


def timeline_of(folder, steps: int) -> dict:
    """The trace in `folder` summed up (`analysis trace`), or the line saying why it could not be."""
    from ladder_jax.instruments import timeline

    try:
        return {"timeline": timeline.read(folder, steps=steps)}
    except Exception as e:  # the trace's layout is the profiler's: keep the row and its numbers
        return {"timeline_error": _line(e)}


def _line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _share(x: float, of: float | None) -> float | None:
    return None if not of else x / of


# ---------------------------------------------------------------------------------------------
# The report


def _f(x, spec: str = ".1f") -> str:
    return "—" if x is None else (f"{x:.0%}" if spec == "%" else format(x, spec))


def markdown(report: dict) -> str:
    from ladder_jax.instruments import timeline

    p = report["parts"]
    spec = report["spec"]
    out = [
        f"# gpu_run: {report['device']} ({report['platform']}), jax {report['jax']}, "
        + (f"driver {report['driver']}, " if report.get("driver") else "")
        + report["date"],
        "",
        f"Spec ({spec['name'] if spec else 'none: not an accelerator in ladder_jax/accelerators.yaml'}): "
        + (
            f"{spec['hbm_bandwidth'] / 1e9:.0f} GB/s HBM, {spec['matmul_flops'] / 1e12:.0f} TFLOP/s bf16."
            if spec
            else ""
        )
        + (f" JAX's allocator may hold {report['memory_limit_gib']} GiB." if report.get("memory_limit_gib") else "")
        + (f" XLA_FLAGS: `{report['xla_flags']}`." if report.get("xla_flags") else ""),
        "",
        f"{_f(report.get('seconds'), '.0f')} s in all, of which {_f(report.get('compile_s'), '.0f')} s compiling "
        f"({report.get('compiles')} programs) and {_f(report.get('trace_s'), '.0f')} s tracing and lowering.",
    ]

    def table(name, title, cols):
        part = p.get(name)
        if part is None:
            return
        out.extend(["", f"## {title} ({_f(part['seconds'])} s of {part['budget_s']} s)", ""])
        cols = [*cols, ("compile s", "compile_s", ".0f"), ("row s", "seconds", ".0f")]
        out.append("| " + " | ".join(h for h, _, _ in cols) + " |")
        out.append("|" + " --- |" * len(cols))
        for r in part["rows"]:
            out.append("| " + " | ".join(_f(r.get(k), f) if f else str(r.get(k)) for _, k, f in cols) + " |")
        out.extend(f"- {r['label']}: kept from {r['from']}" for r in part["rows"] if r.get("from"))
        out.extend(f"- {line}" for line in part["skipped"])

    table(
        "bandwidth",
        "Plain copy and read",
        [
            ("MiB", "mib", ""),
            ("copy GB/s (read+write)", "copy_gb_s", ".0f"),
            ("read GB/s", "read_gb_s", ".0f"),
            ("copy of spec", "copy_of_peak", "%"),
        ],
    )
    table(
        "decode",
        "Decode, tensor 1, 1024-token context",
        [
            ("batch", "batch", ""),
            ("keys read", "reads", ""),
            ("dispatch", "dispatch", ""),
            ("ms/token", "ms_per_token", ".2f"),
            ("tokens/s", "tokens_per_s", ".0f"),
            ("floor MB", "floor_mb", ".0f"),
            ("GB/s", "gb_s", ".0f"),
            ("of spec", "of_peak", "%"),
            ("of copy", "of_copy", "%"),
        ],
    )
    table(
        "prefill",
        "Prefill",
        [
            ("attention", "attention", ""),
            ("tokens", "tokens", ""),
            ("ms", "ms", ".1f"),
            ("tokens/s", "tokens_per_s", ".0f"),
            ("MFU", "mfu", "%"),
            ("first call s", "first_call_s", ".1f"),
        ],
    )
    table(
        "layer",
        "layer_decode (latency model)",
        [
            ("batch", "batch", ""),
            ("ms/layer", "ms_per_layer", ".4f"),
            ("model ms", "model_ms_per_layer", ".4f"),
            ("model/meas", "model_over_measured", ".2f"),
            ("MB read", "mb_read", ".1f"),
            ("GB/s", "achieved_gb_s", ".0f"),
            ("of spec", "share_of_spec", "%"),
        ],
    )
    table(
        "serve",
        "Serving: engine against static batches",
        [
            ("requests", "requests", ""),
            ("concurrency", "concurrency", ""),
            ("static tok/s", "static_tokens_per_s", ".0f"),
            ("engine tok/s", "engine_tokens_per_s", ".0f"),
            ("engine/static", "engine_over_static", ".2f"),
            ("compiles while timed", "compiles_while_timed", ""),
        ],
    )
    table(
        "train",
        "Train step",
        [
            ("config", "config", ""),
            ("attention", "attention", ""),
            ("remat", "remat", ""),
            ("step s", "step_s", ".3f"),
            ("tokens/s", "tokens_per_s", ".0f"),
            ("MFU", "mfu", "%"),
            ("first call s", "first_call_s", ".1f"),
            ("setup s", "setup_s", ".1f"),
        ],
    )
    profiled = [r for part in p.values() for r in part["rows"] if r.get("timeline") or r.get("timeline_error")]
    if profiled:
        out.extend(["", "## Profiles (`analysis trace`)"])
    for r in profiled:
        if r.get("timeline"):
            out.extend(["", f"### {r['label']}: where a step's time goes", "", timeline.table(r["timeline"])])
        else:
            out.extend(["", f"### {r['label']}: the trace could not be read: {r['timeline_error']}"])
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_run"), help="folder for gpu_run.json and gpu_run.md")
    ap.add_argument("--dry-run", action="store_true", help="every part on CPU with tiny shapes")
    ap.add_argument("--budget", type=float, default=380.0, help="seconds for the whole run (each part has its own too)")
    ap.add_argument(
        "--hard-stop",
        type=float,
        help="seconds after which the report is written and the run ends (default: budget + 30: 7 minutes)",
    )
    ap.add_argument(
        "--costs",
        nargs="*",
        default=sorted(glob.glob(str(HERE / "gpu_run_*.json"))),
        help="earlier reports: rows that took longer there than is left are skipped (default: benchmarks/gpu_run_*.json; those of other devices are ignored)",
    )
    ap.add_argument("--resume", type=Path, help="an earlier report of this device: its rows are kept, the others run")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"error: unknown part '{unknown[0]}'; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    for p in [*args.costs, *([args.resume] if args.resume else [])]:
        if not Path(p).is_file():
            print(f"error: no report at {p}; give the gpu_run.json of an earlier call", file=sys.stderr)
            return 2
    from ladder_jax.mesh import apply_xla_flags

    apply_xla_flags()  # the flags train.py and infer.py run with, before the backend starts
    import jax

    try:
        run = Run(
            DRY if args.dry_run else GPU,
            args.budget,
            cpu=args.dry_run,
            costs=args.costs,
            resume=args.resume,
            out=args.out,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    timer = hard_stop(run, args.out, args.budget + 30 if args.hard_stop is None else args.hard_stop)
    with jax.default_device(run.device):  # the probes' arrays too
        for name in parts:
            run.part(name, lambda name=name: PARTS[name](run))
    timer.cancel()
    print(write_report(run, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
