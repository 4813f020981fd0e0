"""`python -m ladder_jax analysis schedule` / `analysis memory`: the decode step as XLA:GPU and XLA:TPU really schedule
it, and the train step's memory on a pod slice, compiled here without an accelerator.

The compiles need the cuda or tpu extra (marker `deviceless`; they skip without it). The HLO
reading, the targets, the flags and the one-line errors are checked always, cheaply.
"""

import importlib.util

import pytest

from ladder_jax import accelerators
from ladder_jax.cli import main
from ladder_jax.config import load_config
from ladder_jax.instruments import deviceless
from ladder_jax.instruments.deviceless import (
    TargetError,
    get_target,
    ladder_overlaps,
    schedule_rows,
    scheduled_all_reduces,
    target_mesh,
)
from ladder_jax.mesh import GPU_FLAGS, apply_xla_flags, gpu_flags, tpu_flags

from .conftest import SMALL


class FakeMesh:  # 1 x 1 x 8 mesh of device ids 0..7: every collective here runs over `tensor`
    import numpy as np

    axis_names = ("data", "fsdp", "tensor")
    devices = np.array([[[type("D", (), {"id": i})() for i in range(8)]]])


GROUPS = "replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add"
ADD = """%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}
"""
PARAMS = """  %x = f32[1,8]{1,0} parameter(0), metadata={op_name="args[0]"}
  %wo = f32[8,8]{1,0} parameter(1), metadata={op_name="params['layers'][0]['attn']['o_proj']"}
  %wu = f32[8,8]{1,0} parameter(2), metadata={op_name="params['layers'][0]['mlp']['up_proj']"}
"""


@pytest.mark.parametrize(
    "start_shape, groups",
    [
        ("f32[1,8]{1,0}", GROUPS),  # jax 0.10
        # jax 0.11: the start's shape holds its operands, the groups name mesh axes
        (
            "((f32[1,8]{1,0}), f32[1,8]{1,0})",
            "replica_groups=mesh['data'=1,'fsdp'=1,'tensor'=8] {'tensor'}, to_apply=%add",
        ),
    ],
)
def test_gpu_async_all_reduce_reports_the_gemms_scheduled_inside(start_shape, groups):
    hlo = f"""HloModule m, is_scheduled=true
{ADD}ENTRY %main (x: f32[1,8], wo: f32[8,8], wu: f32[8,8]) -> f32[1,8] {{
{PARAMS}  %o = f32[1,8]{{1,0}} dot(%x, %wo), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}
  %ars = {start_shape} all-reduce-start(%o), {groups}
  %u = f32[1,8]{{1,0}} dot(%x, %wu), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}
  %ard = f32[1,8]{{1,0}} all-reduce-done(%ars)
  ROOT %r = f32[1,8]{{1,0}} add(%ard, %u)
}}
"""
    (ar,) = scheduled_all_reduces(hlo, FakeMesh())
    assert (ar.axis, ar.async_, ar.bytes, ar.reduces) == ("tensor", True, 32, ["layers.0.attn"])
    assert ar.gemms_inside == ["layers.0.mlp.up_proj"] and ar.overlaps_next


def test_tpu_async_collective_fusion_counts_the_compute_fused_with_its_steps():
    # XLA:TPU's form: fusions async-collective-start ... -done, each with one step of the
    # all-reduce (same chain_id); the steps in between are fused into compute kernels.
    step = lambda n, extra="": (
        f"""%{n} (p: f32[1,8], w: f32[8,8]) -> f32[1,8] {{
  %p = f32[1,8]{{1,0}} parameter(0)
  %w = f32[8,8]{{1,0}} parameter(1)
  %ar.{n} = f32[1,8]{{1,0}} all-reduce(%p), {GROUPS}, frontend_attributes={{chain_id="0"}}
{extra}  ROOT %t = f32[1,8]{{1,0}} add(%ar.{n}, %p)
}}
"""
    )
    conv = "  %c = f32[1,8]{1,0} convolution(%p, %w), dim_labels=bf_io->bf\n"
    hlo = f"""HloModule m, is_scheduled=true
{ADD}{step("s")}{step("mid", conv)}{step("d")}ENTRY %main (x: f32[1,8], wo: f32[8,8], wu: f32[8,8]) -> f32[1,8] {{
{PARAMS}  %o = f32[1,8]{{1,0}} dot(%x, %wo), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}
  %async-collective-start = f32[1,8]{{1,0}} fusion(%o, %wo), kind=kCustom, calls=%s
  %f = f32[1,8]{{1,0}} fusion(%async-collective-start, %wu), kind=kOutput, calls=%mid
  ROOT %async-collective-done = f32[1,8]{{1,0}} fusion(%f, %wu), kind=kCustom, calls=%d
}}
"""
    (ar,) = scheduled_all_reduces(hlo, FakeMesh())
    assert (
        ar.async_
        and ar.reduces == ["layers.0.attn"]
        and ar.gemms_inside == ["layers.0.mlp.up_proj"]
        and ar.overlaps_next
    )


def test_targets_and_their_one_line_errors():
    assert (get_target("v5e-8").topology, get_target("v5e-8").devices) == ("v5e:2x4", 8)
    assert (get_target("v5p-64").topology, get_target("v5p-64").devices) == ("v5p:2x4x4", 32)  # 2 TensorCores a chip
    h100, a100, h200 = (get_target(n) for n in ("h100-8", "a100-8", "h200-8"))
    assert max(a100.hbm_bytes, h100.hbm_bytes) < 90e9 < h200.hbm_bytes and "core_count: 108" in a100.gpu_config
    with pytest.raises(TargetError, match="unknown target 'v4-8'; pick one of h100-8"):
        get_target("v4-8")
    cfg = load_config("tiny", ["model.d_model=96", "model.n_heads=6", "model.n_kv_heads=3", "mesh.tensor=3"])
    with pytest.raises(TargetError, match="--tensor 3 does not divide the 8 devices of h100-8"):
        target_mesh(cfg, h100)  # refused before any compiler is needed


def test_gpu_target_protos_agree_with_the_accelerator_table():
    import re

    def field(text, key):
        return float(re.search(rf"{key}:\s*([\d.]+)", text).group(1))

    for gpu in (a for a in accelerators.accelerators().values() if a.gpu_target):
        text = (deviceless.TARGETS_DIR / gpu.gpu_target).read_text()
        assert field(text, "device_memory_size") == gpu.hbm_bytes, gpu.name
        assert field(text, "memory_bandwidth") == gpu.hbm_bandwidth, gpu.name
        assert any(k in re.search(r'device_description_str: "(.*)"', text).group(1) for k in gpu.kinds), gpu.name
    assert {deviceless.GPU_TARGETS[n] for n in deviceless.GPU_TARGETS} <= set(accelerators.accelerators())


@pytest.mark.parametrize("target, extra", [("h100-8", "cuda"), ("v5e-8", "tpu")])
def test_missing_extra_prints_how_to_install_it_and_exits_2(target, extra, monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert main(["analysis", "schedule", "--target", target]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"pip install 'ladder_jax[{extra}]'" in err


def test_xla_flags_are_added_without_overriding_the_users(monkeypatch):
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_enable_async_all_reduce=false --foo=1")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    apply_xla_flags()
    import os

    tpu = os.environ["LIBTPU_INIT_ARGS"].split()
    assert (
        tpu[:2] == ["--xla_enable_async_all_reduce=false", "--foo=1"]
        and "--xla_tpu_enable_async_collective_fusion_fuse_all_reduce=true" in tpu
    )
    assert sum(f.startswith("--xla_enable_async_all_reduce") for f in tpu) == 1
    gpu = os.environ["XLA_FLAGS"].split()
    assert gpu[0] == "--xla_force_host_platform_device_count=8"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in gpu and len(gpu) == 1 + len(GPU_FLAGS)
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=false")
    apply_xla_flags()
    gpu = os.environ["XLA_FLAGS"].split()
    assert gpu[0] == "--xla_gpu_enable_latency_hiding_scheduler=false"  # the user's wins
    assert not any(f.startswith("--xla_gpu_enable_latency_hiding_scheduler") for f in gpu[1:])
    monkeypatch.setenv("LADDER_JAX_XLA_FLAGS", "0")
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "")
    monkeypatch.setenv("XLA_FLAGS", "")
    apply_xla_flags()
    assert os.environ["LIBTPU_INIT_ARGS"] == os.environ["XLA_FLAGS"] == ""


# ---------------------------------------------------------------------------------------------
# Deviceless compiles (need the extras). Flags go in as compiler options here: in a test process
# XLA has read XLA_FLAGS already, and libtpu may have loaded.

LAYERS = 3


def needs_compiler(platform: str) -> None:
    if not deviceless.has_compiler(platform):
        pytest.skip(f"no {platform} compiler plugin (pip install 'ladder_jax[{platform}]')")


def _rows(target, plans, batch, options, preset="tiny"):
    cfg = load_config(preset, [f"model.n_layers={LAYERS}", f"mesh.tensor={get_target(target).devices}"])
    return {
        r["variant"]: r
        for r in schedule_rows(
            cfg.model, target_mesh(cfg, get_target(target)), plans, batch=batch, compiler_options=options
        )
    }


@pytest.mark.deviceless
@pytest.mark.parametrize(
    "target, batch, preset", [("h100-8", 1, "tiny"), ("h100-8", 8, "tiny"), ("a100-8", 1, "llama-3.1-8b")]
)
def test_gpu_ladder_overlaps_every_all_reduce_but_the_last_and_standard_none(target, batch, preset):
    # Batch 1 is the hard case: XLA:GPU turns each matrix-vector product into loop fusions, which
    # it would fuse with the late residual add but for the barriers in schedules.Stream.settle_after;
    # the A100 schedule ran attention i+1 before MLP i's add unless that add waits for it. On the
    # A100 target, layers as small as tiny's (32 columns per device) lose the MLP all-reduces'
    # overlap since the decode attention is a loop (its cost model then starts the all-reduce
    # after the next attention); layers of a real model's width keep it (docs/decoding.md).
    needs_compiler("cuda")
    rows = _rows(target, ["standard", "ladder"], batch, gpu_flags(), preset)  # the library's, as it runs
    assert rows["standard"]["overlapped"] == 0
    ladder = rows["ladder"]
    assert ladder["ladder_overlaps"] and ladder["merged"] == 0
    assert ladder["overlap_next_module"] == 2 * LAYERS - 1  # all but the last MLP's
    assert ladder["exposed"] == ["embed", f"layers.{LAYERS - 1}.mlp", "lm_head", "lm_head"]


@pytest.mark.deviceless
def test_tpu_flags_make_the_ladder_all_reduces_async_and_overlapped():
    needs_compiler("tpu")
    default = _rows("v5e-8", ["ladder"], 8, None)["ladder"]
    assert default["merged"] == 0 and default["async"] == 0  # a chain nothing merges, but synchronous
    rows = _rows("v5e-8", ["standard", "ladder"], 8, tpu_flags())
    assert rows["ladder"]["merged"] == 0 and rows["ladder"]["all_reduces"] == 1 + 2 * LAYERS + 2
    assert (
        rows["ladder"]["overlap_next_module"] == 2 * LAYERS - 1 and rows["ladder"]["ladder_overlaps"]
    )  # all but the last MLP's
    assert rows["standard"]["overlapped"] == 0


def ladder_8b_train_all_reduces(target, scan=False):
    """The tensor all-reduces of a ladder train step (gradient of the loss) at the 8B layer shape
    with LAYERS layers, 8 x 512 tokens, compiled for `target` (v5e-8 with the library's TPU flags)."""
    cfg = load_config("llama-3.1-8b", [f"model.n_layers={LAYERS}", "model.plan=ladder", "mesh.tensor=8"])
    mesh = target_mesh(cfg, get_target(target))
    options = tpu_flags() if target == "v5e-8" else gpu_flags()
    text = deviceless.train_hlo(cfg.model, mesh, 8, 512, scan=scan, compiler_options=options)
    return [a for a in scheduled_all_reduces(text, mesh) if a.axis == "tensor"]


@pytest.mark.deviceless
@pytest.mark.parametrize("target, platform", [("v5e-8", "tpu"), ("h100-8", "cuda")])
def test_the_ladder_backward_overlaps_every_layer_gradient_all_reduce(target, platform):
    # The reductions of the gradients at the layers' psums, in the backward pass: each async, and
    # all but the first (the head's gradient: nothing of a layer to run beside it) with GEMMs
    # inside. On XLA:TPU only 2 of the 7 were before Stream.settle_after's third barrier
    # (docs/training.md, "The backward pass's all-reduces"). The 8B layer shape: narrow layers
    # lose overlap for reasons of their own. (The embedding's gradient reduction, the last, is
    # left out: at this shape XLA:TPU merges it with the norm scales' and runs it synchronously.)
    needs_compiler(platform)
    ars = ladder_8b_train_all_reduces(target)
    grads = [a for a in ars if a.backward and a.scope.startswith("layer")]
    assert len(grads) == 2 * LAYERS
    assert all(a.async_ for a in grads) and all(a.overlapped for a in grads[1:])


@pytest.mark.deviceless
@pytest.mark.parametrize("target, platform", [("v5e-8", "tpu"), ("h100-8", "cuda")])
def test_the_scanned_ladder_train_step_overlaps_the_all_reduce_at_its_iteration_boundary(target, platform):
    # train.scan_layers: layer 0 runs alone, layers 1-2 are the loop body (read once). Forward:
    # every layer all-reduce but the last (after the loop) async with GEMMs inside, the MLP
    # output's that each iteration leaves in its carry included (LayerContext.defer_last; without
    # it that all-reduce closed the iteration with nothing inside, synchronously on XLA:TPU).
    # Backward (remat none): both of the loop body's gradient reductions with GEMMs inside, the
    # carried output's included (Stream.issue's tie; before it, it had none: docs/training.md,
    # "Scanned layers"). The last layer's, after the loop, comes first. (An all-reduce with
    # nothing beside it may be async or not: jax 0.11's XLA makes such a one synchronous.)
    needs_compiler(platform)
    ars = [a for a in ladder_8b_train_all_reduces(target, scan=True) if a.scope.startswith(("layer", "scan"))]
    fwd, bwd = [a for a in ars if not a.backward], [a for a in ars if a.backward]
    assert [a.scope for a in fwd] == ["layer0"] + [f"scan_layers1-{LAYERS - 1}"] * 3
    assert all(a.async_ and a.overlapped for a in fwd[:-1])
    assert len(bwd) == 4
    body = [a for a in bwd if a.scope.startswith("scan")]
    assert len(body) == 3 and all(a.overlapped for a in body[1:])


@pytest.mark.deviceless
def test_the_serving_engines_decode_step_for_tpu_runs_the_pallas_paged_attention_kernel():
    # llama-3.1-8b's shapes (bfloat16 cache, head_dim 128) at tensor 8 on v5e-8: one paged
    # attention kernel per layer in the engine's decode step; its numerics: test_attention.py
    needs_compiler("tpu")
    import re

    cfg = load_config("llama-3.1-8b", ["model.n_layers=2", "mesh.tensor=8"])
    mesh = target_mesh(cfg, get_target("v5e-8"))
    text = deviceless.paged_step_hlo(cfg.model, mesh, 8, 256, 16, 64, tpu_flags())
    kernels = re.findall(r"%(paged_attention[.\d]*) = .*custom_call_target=\"tpu_custom_call\"", text)
    assert len(kernels) == 2, kernels


@pytest.mark.deviceless
def test_the_serving_engines_decode_step_for_gpu_runs_the_triton_paged_attention_kernel():
    # llama-3.1-8b's shapes at tensor 8 on h100-8: one Pallas Triton kernel per layer in the
    # engine's decode step, and no while loop left whose trip count XLA:GPU does not know (its
    # runtime would wait on the host at every iteration). Its numerics: test_attention.py
    needs_compiler("cuda")
    import re

    cfg = load_config("llama-3.1-8b", ["model.n_layers=2", "mesh.tensor=8"])
    mesh = target_mesh(cfg, get_target("h100-8"))
    text = deviceless.paged_step_hlo(cfg.model, mesh, 8, 256, 16, 64)
    kernels = re.findall(r'custom_call_target="__gpu\$xla\.gpu\.triton".*op_name="[^"]*/(layer\d)/attention/', text)
    assert kernels == ["layer0", "layer1"], kernels
    # and no loop at all: the sampler's binary searches are unrolled (a loop's iterations are
    # launched one by one from the host: 876 kernels a step before, 208 now, at tensor 1)
    assert not re.search(r"\swhile\(", text)


@pytest.mark.deviceless
def test_no_gpu_prefill_or_train_step_has_a_loop_the_host_waits_on():
    # XLA:GPU's runtime copies the condition of a loop of unknown trip count to the host at every
    # iteration: the prompt's prefill, the engine's chunked prefill (its key loop over the page
    # table) and a train step, unrolled or scanned, have none (one H100, 2 layers of the 1B).
    needs_compiler("cuda")
    from ladder_jax.mesh import make_mesh

    cfg = load_config("llama-3.2-1b", ["model.n_layers=2", "mesh.tensor=1", "mesh.data=1"])
    mesh = make_mesh(cfg, deviceless.target_devices(get_target("h100-8"))[:1])
    programs = {
        "prefill": deviceless.prefill_hlo(cfg.model, mesh, 2, 64, 128),
        "paged prefill": deviceless.paged_prefill_hlo(cfg.model, mesh, 2, 256, 64, 16, 32),
        **{f"train scan={s}": deviceless.train_hlo(cfg.model, mesh, 2, 256, scan=s) for s in (False, True)},
    }
    assert {k: deviceless.host_synced_loops(t) for k, t in programs.items()} == dict.fromkeys(programs, 0)


@pytest.mark.deviceless
@pytest.mark.parametrize("target, platform", [("v5e-8", "tpu"), ("h100-8", "cuda")])
def test_schedule_and_memory_commands_on_a_target(target, platform, tmp_path):
    # The commands end to end as a user runs them, in a process of their own (the library's libtpu
    # flags must be set before libtpu loads, which this process has done already), a schedule
    # added through the registry (track) included, and the kernel counts of the programs they dump.
    needs_compiler(platform)
    import json
    import subprocess
    import sys

    def command(*argv):
        done = subprocess.run([sys.executable, "-m", "ladder_jax", *argv], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    variants = ["--variant", "standard", "--variant", "ladder", "--variant", "track:2"]
    rows = {
        r["variant"]: r
        for r in command(
            *["analysis", "schedule", "--config", "tiny", f"model.n_layers={2 * LAYERS}", "--target", target],
            *[*variants, "--batch", "8", "--dump", str(tmp_path), "--json"],
        )
    }
    assert rows["ladder"]["ladder_overlaps"] and rows["standard"]["overlapped"] == 0
    assert rows["track:2"]["all_reduces"] == 1 + LAYERS + 2  # the embedding, one fusion per 2 layers, the argmax's
    counts = {v: deviceless.kernel_counts((tmp_path / f"tiny-{v}.hlo.txt").read_text()) for v in rows}
    layers = [f"layers.{i}" for i in range(2 * LAYERS)]
    for v, c in counts.items():
        per_layer = [c["gemms"][name] for name in layers]
        # seven weight matrices a layer, which a compiler may fuse down to four (qkv, o, gate-up,
        # down): the same count in every layer
        assert len(set(per_layer)) == 1 and per_layer[0] >= 4, (v, c)
        assert c["kernels"] > sum(per_layer)
    # a residual schedule moves no matmul
    assert counts["track:2"]["gemms"] == counts["ladder"]["gemms"] == counts["standard"]["gemms"]
    memory = ["analysis", "memory", "--config", "tiny", *SMALL, "train.batch_size=8", "--target", target]
    report = command(*memory, "--tensor", "2", "--json")
    assert report["fits"] and report["mesh"]["tensor"] == 2


@pytest.mark.deviceless
def test_train_step_memory_on_a_tpu_slice():
    needs_compiler("tpu")
    cfg = load_config("tiny", [*SMALL, "mesh.tensor=2", "mesh.data=4", "train.batch_size=8"])
    target = get_target("v5e-8")
    r = deviceless.train_memory(cfg, target_mesh(cfg, target), target.hbm_bytes)
    assert r["fits"] and 0 < r["arguments"] < r["total"] < target.hbm_bytes


def test_ladder_acceptance_needs_the_next_modules_gemms():
    mk = lambda module, nxt: deviceless.ScheduledAllReduce(
        "a", "tensor", True, 8, [module], [nxt] if nxt else [], bool(nxt)
    )  # noqa: E731
    ars = [mk("embed", None), mk("layers.0.attn", "layers.0.mlp.up_proj"), mk("layers.0.mlp", None)]
    assert ladder_overlaps(ars)
    assert not ladder_overlaps([ars[0], mk("layers.0.attn", None), ars[2]])


def test_an_all_reduce_says_whether_it_reduces_a_gradient_and_in_which_layer_scope():
    mk = lambda op_name: deviceless.ScheduledAllReduce("a", "tensor", False, 8, [], [], False, op_name)  # noqa: E731
    fwd = mk("jit(loss)/jvp()/shard_map/layer1/psum")
    bwd = mk("jit(loss)/transpose(jvp())/shard_map/scan_layers1-2/while/body/closed_call/psum")
    loss = mk("jit(loss)/transpose(jvp())/shard_map/psum")
    again = mk("jit(loss)/transpose(jvp())/shard_map/layer0/layer0/checkpoint/rematted_computation/psum")
    assert [(a.backward, a.recomputed, a.scope) for a in (fwd, bwd, loss, again)] == [
        (False, False, "layer1"),
        (True, False, "scan_layers1-2"),
        (True, False, ""),
        (False, True, "layer0"),
    ]


TRAFFIC_HLO = """HloModule m, is_scheduled=true

%gemm (param_0.1: bf16[1,1024], param_1.1: bf16[1024,1024]) -> bf16[1,1024] {
  %param_0.1 = bf16[1,1024]{1,0} parameter(0)
  %param_1.1 = bf16[1024,1024]{1,0:S(1)} parameter(1)
  ROOT %d = bf16[1,1024]{1,0:S(1)} dot(%param_0.1, %param_1.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%block (param_0.2: bf16[4,1024,128], param_1.2: s32[]) -> bf16[4,256,128] {
  %param_0.2 = bf16[4,1024,128]{2,1,0} parameter(0)
  %param_1.2 = s32[] parameter(1)
  %z = s32[] constant(0)
  %b = bf16[4,1024,128]{2,1,0} bitcast(%param_0.2)
  ROOT %ds = bf16[4,256,128]{2,1,0:S(1)} dynamic-slice(%b, %z, %param_1.2, %z), dynamic_slice_sizes={4,256,128}
}

%body (p: (s32[], bf16[4,1024,128])) -> (s32[], bf16[4,1024,128]) {
  %p = (s32[], bf16[4,1024,128]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %cache = bf16[4,1024,128]{2,1,0} get-tuple-element(%p), index=1
  %blk = bf16[4,256,128]{2,1,0:S(1)} fusion(%cache, %i), kind=kLoop, calls=%block
  ROOT %t = (s32[], bf16[4,1024,128]{2,1,0}) tuple(%i, %cache)
}

%cond (q: (s32[], bf16[4,1024,128])) -> pred[] {
  %q = (s32[], bf16[4,1024,128]{2,1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (w: bf16[1024,1024], x: bf16[1,1024], kv: bf16[4,1024,128], upd: bf16[4,1,128]) -> bf16[1,1024] {
  %w = bf16[1024,1024]{1,0} parameter(0)
  %x = bf16[1,1024]{1,0} parameter(1)
  %kv = bf16[4,1024,128]{2,1,0} parameter(2)
  %upd = bf16[4,1,128]{2,1,0} parameter(3)
  %cs = (bf16[1024,1024]{1,0:S(1)}, bf16[1024,1024]{1,0}, u32[]{:S(2)}) copy-start(%w)
  %ss = ((bf16[1024,1024]{1,0}), bf16[256,1024]{1,0:S(1)}, s32[]{:S(2)}) slice-start(%w), slice={[0:256], [0:1024]}
  %cd = bf16[1024,1024]{1,0:S(1)} copy-done(%cs)
  %sd = bf16[256,1024]{1,0:S(1)} slice-done(%ss)
  %y = bf16[1,1024]{1,0:S(1)} fusion(%x, %cd), kind=kOutput, calls=%gemm
  %zero = s32[] constant(0)
  %kv2 = bf16[4,1024,128]{2,1,0} dynamic-update-slice(%kv, %upd, %zero, %zero, %zero)
  %init = (s32[], bf16[4,1024,128]{2,1,0}) tuple(%zero, %kv2)
  %loop = (s32[], bf16[4,1024,128]{2,1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = bf16[1,1024]{1,0:S(1)} copy(%y)
}
"""


def test_hbm_traffic_counts_what_crosses_device_memory_once():
    from ladder_jax.instruments.traffic import hbm_traffic

    moved = hbm_traffic(TRAFFIC_HLO, loop_trips=4)
    weight, quarter, x, update, block = 1024 * 1024 * 2, 256 * 1024 * 2, 1024 * 2, 4 * 128 * 2, 4 * 256 * 128 * 2
    # the weight's async copy and slice into VMEM read it from HBM; the GEMM reads the VMEM copy
    # (on-chip, XLA counts it); the cache update reads and writes the new row; each of the 4 key
    # blocks is read once, as a slice of the cache (with its 4-byte block index)
    assert moved["read"] == weight + quarter + x + update + 4 * (block + 4)
    assert moved["written"] == update
    assert moved["on_chip"] == weight + x  # the GEMM's VMEM weight, and the VMEM result `copy` reads
    assert moved["by_kind"]["fusion"] == x + 4 * (block + 4)


@pytest.mark.deviceless
@pytest.mark.parametrize("target, platform", [("v5e-8", "tpu"), ("h100-8", "cuda")])
def test_the_ladder_decode_step_moves_what_standard_moves_near_the_floor(target, platform):
    # The 8B's layer shape with 2 layers (weights dominate, as in the whole model; tiny's embedding
    # and head would). XLA:TPU's cost analysis counts ~29% more bytes for ladder: on-chip buffers of
    # its overlapped all-reduces, not HBM traffic (docs/decoding.md, "Memory traffic"). On XLA:GPU
    # one row per device reads its weights once (one-row products kept GEMMs: layers._gemm_rows;
    # before, 2.4x the floor per layer), and no loop waits on the host at every iteration.
    needs_compiler(platform)
    cfg = load_config("llama-3.1-8b", ["model.n_layers=2", "mesh.tensor=8"])
    mesh = target_mesh(cfg, get_target(target))
    options = tpu_flags() if platform == "tpu" else gpu_flags()
    for batch in (1, 16):
        rows = {
            r["variant"]: r
            for r in schedule_rows(cfg.model, mesh, ["standard", "ladder"], batch, 1024, compiler_options=options)
        }
        standard, ladder = rows["standard"], rows["ladder"]
        assert abs(ladder["hbm_bytes"] / standard["hbm_bytes"] - 1) < 0.01, (batch, ladder, standard)
        if platform == "tpu" or batch == 1:
            assert standard["hbm_over_floor"] < 1.10 and ladder["hbm_over_floor"] < 1.10, (batch, rows)
        if platform == "tpu":
            assert ladder["on_chip_operand_bytes"] > standard["on_chip_operand_bytes"] + 60 * 2**20
        else:
            assert standard["host_synced_loops"] == ladder["host_synced_loops"] == 0, (batch, rows)
