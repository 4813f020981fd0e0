"""Hugging Face Llama checkpoints in and out, checked against transformers itself: tiny random
LlamaForCausalLMs saved with save_pretrained, imported, run on 8 fake CPU devices and exported."""

import dataclasses
import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ladder_jax import checkpoint as ckpt
from ladder_jax import decode
from ladder_jax import model as M
from ladder_jax.cli import main
from ladder_jax.config import load_config
from ladder_jax.interop import hf as convert
from ladder_jax.mesh import make_mesh
from ladder_jax.tokenizer import HFTokenizer, get_tokenizer

# GQA (8 query heads over 2 KV heads), vocab 300 (padded to 384), head_dim 16 != hidden/heads, and
# Llama-3 rope scaling whose bands all occur: with theta 10000 and head_dim 16 the wavelengths are
# 6.3 (< 64/4: kept), 20 and 63 (between: smoothed) and 200.. (> 64: divided by the factor).
LLAMA3 = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
)
TIED = dict(LLAMA3, num_hidden_layers=2, tie_word_embeddings=True, rope_scaling=None, max_position_embeddings=256)
HF_CONFIGS = {"llama3-rope-untied": LLAMA3, "tied": TIED}
TOKENS = np.random.RandomState(0).randint(3, 300, (4, 24))
TEXTS = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "the quick brown fox jumps over the lazy dog. " * 3,
    "import os\nprint(os.getcwd())\n",
]


def byte_level_tokenizer(path: Path) -> None:
    """A small byte-level BPE whose special tokens sit at the ids LLAMA3 names (pad 0, bos 1, eos 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXTS * 20, trainer)
    tok.save(str(path))


@dataclass
class HFModel:
    dir: Path
    model: LlamaForCausalLM
    logits: np.ndarray  # transformers' own, on TOKENS
    run: Path  # the converted run directory


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict[str, HFModel]:
    """Each HF_CONFIGS model, saved with save_pretrained (and a tokenizer.json) and converted."""
    models = {}
    for name, config in HF_CONFIGS.items():
        torch.manual_seed(0)
        # A wide init makes the logits peaked enough that greedy choices are not near-ties.
        model = LlamaForCausalLM(LlamaConfig(**config, initializer_range=0.3)).eval()
        hf_dir = tmp_path_factory.mktemp("hf") / name
        model.save_pretrained(hf_dir, safe_serialization=True)
        byte_level_tokenizer(hf_dir / "tokenizer.json")
        with torch.no_grad():
            logits = model(torch.tensor(TOKENS)).logits.numpy()
        run = tmp_path_factory.mktemp("runs") / name
        convert.from_hf(hf_dir, run)
        models[name] = HFModel(hf_dir, model, logits, run)
    return models


def on_mesh(run_dir, data, tensor):
    """A run's config, mesh and restored parameters on a (data, tensor) mesh."""
    cfg = load_config(Path(run_dir) / "config.yaml", [f"mesh.data={data}", f"mesh.tensor={tensor}"])
    mesh = make_mesh(cfg)
    return cfg, mesh, ckpt.restore_params(run_dir, cfg, mesh)


BOTH = pytest.mark.parametrize("name", list(HF_CONFIGS))
LLAMA3_NAME = "llama3-rope-untied"


@BOTH
@pytest.mark.parametrize("mesh_shape", [(1, 8), (2, 4)], ids=lambda s: f"data{s[0]}xtensor{s[1]}")
def test_imported_logits_equal_transformers(hf, name, mesh_shape, devices):
    cfg, mesh, params = on_mesh(hf[name].run, *mesh_shape)
    got = np.asarray(M.logits(cfg.model, mesh, params, TOKENS))
    np.testing.assert_array_less(np.abs(got - hf[name].logits).max(), 1e-4)
    assert np.abs(hf[name].logits).max() > 1.0  # logits of real size, so the bound means something


def test_loss_and_every_gradient_equal_transformers_autograd(hf, devices):
    # 256 tokens (two query blocks of the xla attention), sharded over data 2 x tensor 4: the
    # vocab-parallel loss and the attention and rope backward passes against torch autograd.
    from ladder_jax.training import loss_sums_fn

    case = hf["tied"]
    tokens = np.random.RandomState(1).randint(3, 300, (2, 257))
    cfg, mesh, params = on_mesh(case.run, 2, 4)
    n = tokens.shape[1] - 1
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(n), (2, n)),
        "segment_ids": np.ones((2, n)),
        "mask": np.ones((2, n)),
    }
    batch = {k: jnp.asarray(v, jnp.float32 if k == "mask" else jnp.int32) for k, v in batch.items()}
    loss_sums = loss_sums_fn(cfg.model, mesh)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: loss_sums(p, batch)[0] / (2 * n)))(params)
    model = case.model
    model.zero_grad(set_to_none=True)
    want = model(input_ids=torch.tensor(tokens), labels=torch.tensor(tokens)).loss
    want.backward()
    try:
        np.testing.assert_allclose(float(loss), want.item(), rtol=1e-5)
        for t in convert.tensor_map(cfg.model):
            theirs = model.get_parameter(t.hf_name).grad.numpy()
            ours = convert.to_hf(t, np.asarray(convert._get(grads, t.path)))
            np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max(), err_msg=t.hf_name)
    finally:
        model.zero_grad(set_to_none=True)


@BOTH
def test_imported_config_says_what_config_json_says(hf, name):
    cfg = ckpt.load_run_config(hf[name].run)
    m = cfg.model
    assert (m.vocab_size, m.d_model, m.n_heads, m.n_kv_heads, m.hd, m.n_layers) == (
        300,
        64,
        8,
        2,
        16,
        HF_CONFIGS[name]["num_hidden_layers"],
    )
    assert m.tie_embeddings == (name == "tied") and (m.rope_scaling is not None) == (name != "tied")
    assert (m.bos_id, m.eos_id, m.pad_id) == (1, 2, 0)
    assert isinstance(get_tokenizer(cfg, hf[name].run), HFTokenizer)


@BOTH
def test_greedy_generation_equals_transformers_generate(hf, name, devices):
    cfg, mesh, params = on_mesh(hf[name].run, 2, 4)
    prompts = [[1, *row[: 3 + 4 * k]] for k, row in enumerate(TOKENS[:3].tolist())]  # different lengths
    ours = decode.generate(cfg, mesh, params, prompts, max_new_tokens=16, eos_id=cfg.model.eos_id)
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            out = hf[name].model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=16,
                do_sample=False,
            )
        want = out[0, len(prompt) :].tolist()
        want = want[: want.index(2)] if 2 in want else want  # ours stops before EOS, transformers keeps it
        assert list(got) == want
    assert sum(len(g) for g in ours) >= 24  # most rows generated a real continuation


@BOTH
def test_round_trip_through_transformers(hf, name, tmp_path, devices):
    original = hf[name]
    # A small shard limit splits the export into several files with an index, as for a large model.
    out = convert.to_hf_dir(original.run, tmp_path / "export", max_shard_bytes=100_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "tokenizer.json").exists()
    back = LlamaForCausalLM.from_pretrained(out).eval()
    want = original.model.state_dict()
    assert set(back.state_dict()) == set(want)
    for k, v in back.state_dict().items():
        assert torch.equal(v, want[k]), k
    with torch.no_grad():
        np.testing.assert_array_less(np.abs(back(torch.tensor(TOKENS)).logits.numpy() - original.logits).max(), 1e-4)
    assert back.config.rope_parameters == original.model.config.rope_parameters
    # And the sharded export (its config.json in the transformers-4 layout: rope_theta and
    # rope_scaling) imports again, to the same parameters.
    again = convert.from_hf(out, tmp_path / "again")
    cfg, _, params = on_mesh(original.run, 1, 1)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(on_mesh(tmp_path / "again", 1, 1)[2])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert again.model.rope_scaling == cfg.model.rope_scaling


def test_bfloat16_checkpoints_convert_both_ways(hf, tmp_path, devices, capsys):
    original = hf[LLAMA3_NAME]
    out = tmp_path / "bf16"  # exported from the command line
    assert main(["convert", "to-hf", str(original.run), str(out), "--dtype", "bfloat16"]) == 0
    assert f"wrote {out}: LlamaForCausalLM.from_pretrained" in capsys.readouterr().out
    back = LlamaForCausalLM.from_pretrained(out)
    assert back.dtype == torch.bfloat16
    for k, v in back.state_dict().items():
        assert torch.equal(v, original.model.state_dict()[k].to(torch.bfloat16)), k
    # Importing reads BF16 tensors and keeps the checkpoint's dtype.
    assert convert.from_hf(out, tmp_path / "run").model.param_dtype == "bfloat16"
    for got, want in zip(
        jax.tree.leaves(on_mesh(tmp_path / "run", 1, 1)[2]), jax.tree.leaves(on_mesh(original.run, 1, 1)[2])
    ):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want).astype(jnp.bfloat16))


def test_hybrid_ladder_import_changes_only_the_ladder_layers(hf, tmp_path, devices, capsys):
    original = hf[LLAMA3_NAME]
    out = tmp_path / "hybrid"
    assert (
        main(["convert", "from-hf", str(original.dir), str(out), "--plan", "standard,ladder@-2:", "--tensor", "4"]) == 0
    )
    assert "python train.py --init-from" in capsys.readouterr().out
    cfg, mesh, params = on_mesh(out, 2, 4)
    assert cfg.model.layer_schedules == ("standard", "standard", "ladder", "ladder")

    def hidden(model_cfg):  # the residual after each layer
        tokens = jnp.asarray(TOKENS)
        return np.asarray(
            M.hidden_states_fn(model_cfg, mesh)(params, tokens, M.default_positions(tokens), jnp.zeros_like(tokens))
        )[1:]

    h_std, h_hyb = hidden(dataclasses.replace(cfg.model, plan="standard")), hidden(cfg.model)
    np.testing.assert_allclose(h_hyb[:2], h_std[:2], atol=1e-5)  # layers 0, 1: the imported Llama's own
    with torch.no_grad():
        hf_hidden = original.model(
            torch.tensor(TOKENS), output_hidden_states=True
        ).hidden_states  # (embedding, layer 0, ...)
    # Residuals reach |25| here, so float32 sums taken in another order differ by a few 1e-4.
    np.testing.assert_allclose(h_hyb[:2], np.stack([h.numpy() for h in hf_hidden[1:3]]), atol=1e-3, rtol=1e-4)
    assert np.abs(h_hyb[3] - h_std[3]).max() > 1e-2  # the ladder layers: a different function
    assert np.abs(np.asarray(M.logits(cfg.model, mesh, params, TOKENS)) - original.logits).max() > 1e-2

    # transformers cannot represent a ladder layer: to-hf refuses, and writes nothing.
    assert main(["convert", "to-hf", str(out), str(tmp_path / "export")]) == 2
    assert "transformers' LlamaForCausalLM computes only standard layers" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()


def test_fine_tuning_a_converted_run_uses_its_tokenizer(hf, tmp_path, devices):
    """The README recipe: train --init-from OUT_RUN --config OUT_RUN/config.yaml. The byte
    tokenizer cannot serve a 300-token vocabulary, so a run that trains used tokenizer.json."""
    from ladder_jax.training import train

    run = hf["tied"].run
    (tmp_path / "data.txt").write_text("".join(TEXTS) * 20)
    over = [
        f"train.data={tmp_path / 'data.txt'}",
        "train.steps=2",
        "train.batch_size=8",
        "train.seq_len=32",
        "train.val_fraction=0",
        "mesh.tensor=2",
    ]
    result = train(
        load_config(run / "config.yaml", over), tmp_path / "tuned", init_from=run, progress=False, log=lambda *_: None
    )
    assert result["step"] == 2 and np.isfinite(result["loss"])
    assert (tmp_path / "tuned" / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, and nothing at OUT_RUN


def rewrite_tensors(hf_dir: Path, change) -> None:
    tensors = safetensors.numpy.load_file(hf_dir / "model.safetensors")
    change(tensors)
    safetensors.numpy.save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})


def edit_config(hf_dir: Path, **changes) -> None:
    path = hf_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def truncate(hf_dir: Path) -> None:
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


class WouldRunCode:
    """Unpickling this creates the marker file: proof that the pickle was (not) loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def pickle_only(hf_dir: Path) -> None:
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(pickle.dumps(WouldRunCode(hf_dir / "PWNED")))


BAD_INPUTS = {
    "missing tensor": (
        lambda d: rewrite_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        r"no tensor model\.layers\.1\.mlp\.up_proj\.weight",
    ),
    "wrong shape": (
        lambda d: rewrite_tensors(
            d, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 64), np.float32)})
        ),
        r"tensor model\.layers\.0\.self_attn\.k_proj\.weight has shape \(16, 64\) but config\.json implies \(32, 64\)",
    ),
    "extra tensor": (
        lambda d: rewrite_tensors(
            d, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(128, np.float32)})
        ),
        r"q_proj\.bias, which a plain Llama does not",
    ),
    "not llama": (
        lambda d: edit_config(d, model_type="mistral", architectures=["MistralForCausalLM"]),
        r"'mistral'.*only Llama checkpoints",
    ),
    "biases": (lambda d: edit_config(d, attention_bias=True), r"attention_bias is true"),
    "other rope scaling": (
        lambda d: edit_config(d, rope_scaling={"rope_type": "yarn", "factor": 4.0}),
        r"rope scaling 'yarn' is not supported",
    ),
    "truncated": (truncate, r"model\.safetensors is truncated.*download it again"),
    "pickle only": (pickle_only, r"pytorch_model\.bin, a PyTorch pickle.*never read.*Convert it to safetensors"),
    "no config.json": (lambda d: (d / "config.json").unlink(), r"has no config\.json"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_and_leaves_nothing(case, hf, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf[LLAMA3_NAME].dir, broken)
    damage, message = BAD_INPUTS[case]
    damage(broken)
    with pytest.raises(convert.ConvertError, match=message):
        convert.from_hf(broken, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no OUT_RUN, no temporary directory
    assert not (broken / "PWNED").exists()


def test_an_existing_output_directory_is_not_touched(hf, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ckpt.CheckpointError, match="already exists and is not empty"):
        convert.from_hf(hf[LLAMA3_NAME].dir, tmp_path / "out")
    with pytest.raises(ckpt.CheckpointError, match="already exists and is not empty"):
        convert.to_hf_dir(hf[LLAMA3_NAME].run, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"] and len(list(tmp_path.iterdir())) == 1


def test_an_output_directory_that_cannot_be_written_is_refused_in_one_line(hf, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    h = hf[LLAMA3_NAME]
    for verb, source, out in [
        ("from-hf", h.dir, "/proc/o1"),
        ("to-hf", h.run, "/proc/x"),
        ("from-hf", h.dir, tmp_path / "afile" / "out"),
        ("to-hf", h.run, tmp_path / "afile" / "sub" / "out"),
    ]:
        assert main(["convert", verb, str(source), str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot write to {out}") and err.count("\n") == 1, err
        assert err.rstrip().endswith("choose another output directory"), err
    assert (tmp_path / "afile").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# What Meta's model cards and transformers report for three of them, written down independently.
PUBLISHED_PARAMETERS = {
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.1-405b": 405_853_388_800,
    "llama-2-70b": 68_976_648_192,
}


def test_describe_counts_the_parameters_transformers_counts_for_every_llama_preset():
    from transformers import AutoModelForCausalLM

    presets = ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"]
    for preset in [*presets, "llama-2-7b", "llama-2-70b"]:
        cfg = load_config(preset)
        with torch.device("meta"):  # shapes only: nothing allocated
            hf = AutoModelForCausalLM.from_config(LlamaConfig(**convert.hf_config_json(cfg.model, "bfloat16")))
        n = sum(p.numel() for p in hf.parameters())  # tied embeddings count once
        assert M.count_params(cfg.model) == n == PUBLISHED_PARAMETERS.get(preset, n), preset
        assert f"({n:,})" in M.describe(cfg), preset


def test_convert_help_names_every_positional(capsys):
    for verb, names in [("from-hf", ["hf_dir", "out_run"]), ("to-hf", ["run", "out_dir"])]:
        with pytest.raises(SystemExit):
            main(["convert", verb, "--help"])
        lines = capsys.readouterr().out.split("positional arguments:")[1].split("options:")[0].splitlines()
        for name in names:
            row = next(line.split() for line in lines if line.split()[:1] == [name])
            assert len(row) > 1, f"{verb} {name} has no help"
