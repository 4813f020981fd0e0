import math
import re

import pytest

from ladder_jax.config import ConfigError, list_presets, load_config
from ladder_jax.model import count_params, describe
from ladder_jax.plan import parse_plan, plan_steps


def test_every_preset_loads_and_validates():
    assert {
        "tiny",
        "ladder-1b",
        "ladder-3b",
        "llama-3.1-8b",
        "llama-3.1-70b",
        "llama-3.1-405b",
        "llama-2-7b",
        "llama-2-70b",
        "llama-3.2-1b",
        "llama-3.2-3b",
    } <= set(list_presets())
    for name in list_presets():
        cfg = load_config(name)
        assert cfg.model.name == name


@pytest.mark.parametrize(
    "preset, expected",
    [  # parameter counts published with the checkpoints (transformers' num_parameters())
        ("llama-2-7b", 6_738_415_616),
        ("llama-3.1-8b", 8_030_261_248),
        ("llama-3.2-1b", 1_235_814_400),
        ("llama-3.2-3b", 3_212_749_824),
    ],
)
def test_large_presets_have_the_published_parameter_count_without_allocating(preset, expected):
    assert count_params(load_config(preset).model) == expected


def test_the_large_presets_train_scanned_by_default_and_describe_says_so():
    scanned = [name for name in list_presets() if load_config(name).train.scan_layers]
    assert set(scanned) == set(list_presets()) - {"tiny"}
    assert describe(load_config("ladder-1b")).endswith("; trains scanned (train.scan_layers=true)")
    unrolled = load_config("ladder-1b", ["train.scan_layers=false"])
    assert describe(unrolled).endswith("; trains unrolled (train.scan_layers=false)")


def test_dotted_overrides_are_typed():
    cfg = load_config(
        "tiny",
        [
            "model.n_layers=3",
            "model.norm_eps=1e-6",
            "model.tie_embeddings=true",
            "mesh.tensor=2",
            "model.plan=ladder@-2:",
        ],
    )
    assert cfg.model.n_layers == 3 and cfg.model.norm_eps == 1e-6 and cfg.model.tie_embeddings is True
    assert cfg.mesh.tensor == 2
    assert cfg.model.layer_schedules == ("standard", "ladder", "ladder")


def test_rope_scaling_override_builds_the_nested_section():
    cfg = load_config("tiny", ["model.rope_scaling={factor: 8.0}"])
    assert cfg.model.rope_scaling.factor == 8.0 and cfg.model.rope_scaling.original_max_len == 8192
    assert load_config("llama-3.1-8b", ["model.rope_scaling=null"]).model.rope_scaling is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.n_layer=4"], "unknown config key 'model.n_layer'"),
        (["trainer.steps=4"], "unknown config key 'trainer'"),
        (["model.n_layers=four"], "model.n_layers must be int"),
        (["model.tie_embeddings=3"], "model.tie_embeddings must be bool"),
        (["mesh.tensor=3"], "model.n_heads=8 does not split over mesh.tensor=3"),
        (["mesh.fsdp=3"], "model.d_model=256 does not split over mesh.fsdp=3"),
        (["mesh.fsdp=0"], "mesh.fsdp must be positive"),
        (["train.remat=some"], "train.remat='some' is not a policy; choose from none, full, save_dots"),
        (
            ["model.n_kv_heads=8", "model.n_heads=24", "model.d_model=240", "mesh.tensor=16"],
            "does not split over mesh.tensor=16",
        ),
        (
            ["model.n_heads=12", "model.n_kv_heads=6", "model.d_model=240", "mesh.tensor=4"],
            "can be neither split nor replicated over mesh.tensor=4",
        ),
        (["model.ffn_dim=100", "mesh.tensor=8"], "model.ffn_dim=100 does not split"),
        (["model.n_heads=6", "model.n_kv_heads=4", "model.head_dim=32"], "not a multiple of model.n_kv_heads"),
        (["model.plan=ladder@40"], "outside 0..5"),
        (["model.plan=ladder@2:50"], "outside 0..5"),
        (["model.plan=ladders"], "unknown schedule 'ladders'"),
        (["model.plan=lp@1:4"], "a run of 3 'lp' layers"),
        (["model.plan=track:4@0:2"], "give the run a multiple of 4 layers"),
        (["model.plan=track"], "needs D"),
        (["model.plan=ladder:2"], "takes no parameter"),
        (["model.plan=lp@0:4,ladder@2:"], "layer 2 is given both"),
        (["model.plan=ladder,parallel"], "two default schedules"),
        (["model.dtype=int8"], "model.dtype='int8' is not supported"),
        (["model.n_layers"], "not key=value"),
        (["train.steps={a"], "train.steps={a: not a YAML value (expected ',' or '}'"),
        (["train.lr=-1"], "train.lr=-1.0 must be in [0, inf)"),
        (["train.lr=nan"], "train.lr=nan must be in [0, inf)"),
        (["train.b1=2"], "train.b1=2.0 must be in [0, 1)"),
        (["train.min_lr_ratio=5"], "train.min_lr_ratio=5.0 must be in [0, 1]"),
        (["train.weight_decay=-1"], "train.weight_decay=-1.0 must be in [0, inf)"),
        (["train.grad_clip=0"], "train.grad_clip=0.0 must be positive and finite"),
        (["train.warmup_steps=-5"], "train.warmup_steps=-5 must be 0 or more"),
        (["train.lr_schedule=step"], "train.lr_schedule='step' is not a schedule; choose from cosine, linear"),
        (["train.lr_schedule=wsd", "train.decay_fraction=0"], "train.decay_fraction=0.0 must be in (0, 1]"),
        (["model.rope_theta=-1"], "model.rope_theta must be positive and finite, got -1.0"),
    ],
)
def test_bad_configs_fail_with_a_message_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny", overrides)


def test_a_config_file_that_is_not_yaml_is_refused_with_where(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML \(.*at line 2, column 1\); fix the file"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "mine").write_text("train:\n  steps: 7\n")  # a config file without a .yaml suffix
    assert load_config(str(tmp_path / "mine")).train.steps == 7
    with pytest.raises(ConfigError, match="is a directory; give a preset"):
        load_config(str(tmp_path))


def test_error_on_32_layer_model_names_layer_40():
    with pytest.raises(ConfigError, match="outside 0..31 of this 32-layer model"):
        load_config("llama-3.1-8b", ["model.plan=ladder@40"])


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="choose from .*tiny"):
        load_config("llama-9")


def test_plan_grammar():
    assert parse_plan("ladder", 3) == ("ladder",) * 3
    assert parse_plan("standard,ladder@-2:", 4) == ("standard", "standard", "ladder", "ladder")
    assert parse_plan("spd@0,spd@2", 4) == ("spd", "standard", "spd", "standard")
    assert parse_plan("ladder,lp@1:3", 4) == ("ladder", "lp", "lp", "ladder")
    assert plan_steps(parse_plan("lp@0:4,ladder@4:", 5)) == [("lp", (0, 1)), ("lp", (2, 3)), ("ladder", (4,))]
    assert plan_steps(parse_plan("track:2@1:5", 5)) == [("standard", (0,)), ("track:2", (1, 2)), ("track:2", (3, 4))]


def test_fsdp_sizes_that_do_not_fit_the_devices_or_the_batch_are_refused(devices):
    from ladder_jax.config import mesh_shape
    from ladder_jax.mesh import make_mesh
    from ladder_jax.training import Trainer

    cfg = load_config("tiny", ["mesh.fsdp=16"])
    with pytest.raises(ConfigError, match="mesh fsdp=16 x tensor=1 does not divide the 8 available devices"):
        mesh_shape(cfg.mesh, 8)
    cfg = load_config("tiny", ["mesh.fsdp=4", "mesh.tensor=2", "train.batch_size=6", "train.grad_accum=1"])
    with pytest.raises(ConfigError, match="does not split over mesh data x fsdp=4; make it a multiple of 4"):
        Trainer(cfg, make_mesh(cfg))


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "wsd"])
def test_learning_rate_schedules_follow_their_formulas(kind):
    """Each schedule against its formula, written out here: warmup, then decay (or none)."""
    from ladder_jax.training import lr_schedule

    lr, low, warmup, steps, decay = 1e-3, 1e-4, 10, 100, 30  # wsd: decay_fraction 0.3
    overrides = ["train.lr=1e-3", "train.min_lr_ratio=0.1", "train.warmup_steps=10", "train.steps=100"]
    schedule = lr_schedule(load_config("tiny", [*overrides, f"train.lr_schedule={kind}", "train.decay_fraction=0.3"]))

    def want(step):
        if step < warmup:
            return lr * step / warmup
        t = min(1.0, (step - warmup) / (steps - warmup))
        if kind == "cosine":
            return low + (lr - low) * 0.5 * (1 + math.cos(math.pi * t))
        if kind == "linear":
            return lr + (low - lr) * t
        if kind == "constant":
            return lr
        return lr if step < steps - decay else lr + (low - lr) * min(1.0, (step - (steps - decay)) / decay)

    for step in [0, 5, 10, 11, 40, 69, 70, 71, 85, 99, 100, 120]:
        assert float(schedule(step)) == pytest.approx(want(step), rel=1e-5, abs=1e-9), (kind, step)
