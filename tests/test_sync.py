"""The compiled forward holds exactly the all-reduces each schedule promises, and ladder's can
overlap: read from the optimised HLO by ladder_jax.instruments.sync."""

import re

import pytest

from ladder_jax.cli import main
from ladder_jax.instruments.hlo import parse_replica_groups, shape_bytes
from ladder_jax.instruments.sync import analyze, forward_report
from ladder_jax.mesh import make_mesh
from ladder_jax.plan import lookup
from ladder_jax.schedules import SCHEDULES

from .conftest import small_config

N_LAYERS = 4


@pytest.mark.parametrize("schedule", [s.example for s in SCHEDULES.values()])
def test_all_reduces_per_step_match_the_schedule(schedule, devices):
    cfg = small_config(schedule, data=2, tensor=4)
    report = forward_report(cfg.model, make_mesh(cfg))
    tensor = report.on("tensor")
    assert report.on("data") == [] and report.on("other") == []
    embedding = 1  # the vocab-parallel embedding's partial rows are summed once
    entry = lookup(schedule)
    assert sum(a.operands for a in tensor) == embedding + N_LAYERS // entry.layers_per_step * entry.all_reduces
    layer_ars = tensor[1:]
    if schedule == "ladder":
        # every ladder all-reduce but the last has a matmul that neither feeds it nor waits for it
        assert all(not a.blocking for a in layer_ars[:-1])
    else:
        assert all(a.blocking for a in layer_ars)
    assert tensor[0].blocking  # nothing runs before the embedding is complete
    # every layer step runs under a named scope (layer3, layers4-5), so HLO dumps and profiles name it
    assert "/embed/" in tensor[0].op_name and all(re.search(r"/layers?\d+(-\d+)?/", a.op_name) for a in layer_ars)


def test_hybrid_ladder_frees_the_last_standard_mlp_all_reduce(devices):
    cfg = small_config("standard,ladder@-2:", tensor=8)
    blocking = [a.blocking for a in forward_report(cfg.model, make_mesh(cfg)).on("tensor")]
    # embedding, then standard layers 0-1 (A0 M0 A1 M1), then ladder layers 2-3 (A2 M2 A3 M3):
    # M1 overlaps layer 2's attention, since a ladder module reads x_{j-2}.
    assert blocking == [True, True, True, True, False, False, False, False, False]


def test_report_bytes_are_the_reduced_activations(devices):
    cfg = small_config("standard", data=1, tensor=8)
    report = forward_report(cfg.model, make_mesh(cfg), batch=2, seq=16)
    assert {a.bytes for a in report.on("tensor")} == {2 * 16 * 64 * 4}  # (B, S, d_model) float32


def test_hlo_helpers_read_every_replica_group_form_and_tuple_shapes():
    assert parse_replica_groups("replica_groups={{0,1,2,3},{4,5,6,7}}, x") == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert parse_replica_groups("replica_groups=[2,4]<=[8], x") == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert parse_replica_groups("replica_groups=[4,2]<=[2,4]T(1,0), x") == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert parse_replica_groups("replica_groups=mesh['a'=2,'b'=4] {'b'}, x") == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert parse_replica_groups("replica_groups=mesh['a'=2,'b'=4] {'a'}, x") == [(0, 4), (1, 5), (2, 6), (3, 7)]
    three = "replica_groups=mesh['x'=2,'y'=2,'z'=2] {'x','z'}, x"
    assert parse_replica_groups(three) == [(0, 1, 4, 5), (2, 3, 6, 7)]
    assert parse_replica_groups("replica_groups=mesh['a'=2,'b'=4] <=[4,2]T(1,0) {'b'}, x") is None  # unknown: "other"
    assert shape_bytes("(f32[2,3]{1,0}, bf16[4]{0})") == 2 * 3 * 4 + 4 * 2


def test_analysis_counts_a_merged_all_reduce_by_operands():
    class FakeMesh:  # 1 x 1 x 2 mesh of device ids 0, 1
        import numpy as np

        axis_names = ("data", "fsdp", "tensor")
        devices = np.array([[[type("D", (), {"id": 0})(), type("D", (), {"id": 1})()]]])

    hlo = """HloModule m
%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}
ENTRY %main (p: f32[4,4]) -> f32[4,4] {
  %p = f32[4,4]{1,0} parameter(0)
  %d1 = f32[4,4]{1,0} dot(%p, %p), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %d2 = f32[4,4]{1,0} dot(%p, %p), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ar = (f32[4,4]{1,0}, f32[4,4]{1,0}) all-reduce(%d1, %d2), replica_groups={{0,1}}, to_apply=%add
  %g = f32[4,4]{1,0} get-tuple-element(%ar), index=0
  %d3 = f32[4,4]{1,0} dot(%p, %p), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %r = f32[4,4]{1,0} add(%g, %d3)
}
"""
    (ar,) = analyze(hlo, FakeMesh()).all_reduces
    assert (ar.axis, ar.operands, ar.bytes) == ("tensor", 2, 128)
    assert not ar.blocking  # d3 neither feeds nor waits for it


def test_sync_command_reports_the_decode_step_per_variant(capsys, devices):
    main(
        [
            "analysis",
            "sync",
            "--config",
            "tiny",
            "model.n_layers=2",
            "--tensor",
            "4",
            "--variant",
            "standard",
            "--variant",
            "ladder",
            "--variant",
            "track:2",
            "--json",
        ]
    )
    import json

    rows = {r["variant"]: r for r in json.loads(capsys.readouterr().out)}
    # embedding + 2 per layer + the vocab-parallel argmax's two reductions (max, then lowest id)
    assert rows["standard"]["all_reduces"] == rows["ladder"]["all_reduces"] == 1 + 2 * 2 + 2
    assert rows["standard"]["overlappable_all_reduces"] == 0
    assert rows["ladder"]["overlappable_all_reduces"] == 4
    assert rows["ladder"]["bytes_per_token"] == rows["standard"]["bytes_per_token"] > 5 * 256 * 4
    assert rows["track:2"]["all_reduces"] == 1 + 1 + 2  # one fusion for the two layers
    assert rows["track:2"]["blocking_all_reduces"] == 4
