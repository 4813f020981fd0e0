"""The greedy decoder on 8 fake CPU devices: for every schedule its cached tokens are the argmax
of full forwards, batching does not change a prompt's tokens, the decode step compiles once per
shape, and bad requests fail with one line saying what to change."""

import functools
import io
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import infer
from ladder_jax import checkpoint, decode
from ladder_jax import model as M
from ladder_jax.cli import infer as infer_verb
from ladder_jax.config import load_config, replace
from ladder_jax.mesh import make_mesh
from ladder_jax.tokenizer import ByteTokenizer

from .conftest import SMALL, FakeGPU, small_config

# Three layers keep compiles short and still give the hybrid a standard layer before two ladder
# ones, and lp (and track) a step of two layers followed by a standard layer.
TEST_MODEL = {"model__n_layers": 3, "model__init_std": 0.1}
CASES = [
    (plan, (2, 4))
    for plan in ("standard", "parallel", "ladder", "standard,ladder@-2:", "spd", "lp@0:2", "track:2@0:2", "desync")
]
CASES += [(plan, (1, 8)) for plan in ("standard", "ladder")]
PROMPTS = [[256, *b"Hello"], [256, *range(40, 52)]]  # 6 and 13 tokens: different lengths, one bucket (16)
NEW = 16


@functools.cache
def host_params():
    """Random parameters of the standard layout, made once (initialising compiles per mesh)."""
    cfg = small_config(**TEST_MODEL)
    return jax.device_get(M.init_params(cfg.model, make_mesh(cfg), seed=0))


@functools.cache
def model_on(plan, data, tensor):
    """(config, mesh, parameters placed on the mesh); cached so tests share compiled functions."""
    cfg = small_config(plan, data, tensor, **TEST_MODEL)
    params = host_params()
    if plan == "parallel":  # a parallel layer has one norm: the standard parameters minus mlp_norm
        params = {
            **params,
            "layers": {i: {k: v for k, v in layer.items() if k != "mlp_norm"} for i, layer in params["layers"].items()},
        }
    mesh = make_mesh(cfg)
    return cfg, mesh, jax.device_put(params, M.param_shardings(cfg.model, mesh))


@pytest.mark.parametrize("plan, mesh_shape", [pytest.param(p, m, id=f"{p}-data{m[0]}xtensor{m[1]}") for p, m in CASES])
def test_cached_greedy_tokens_are_the_argmax_of_full_forwards(plan, mesh_shape, devices):
    cfg, mesh, params = model_on(plan, *mesh_shape)
    got = decode.generate(cfg.model, mesh, params, PROMPTS, NEW).tokens
    # The full forward is causal, so one pass over each finished sequence gives at every position
    # the logits a recomputation over the growing prefix gives; right padding does not reach them.
    seqs = np.full((len(PROMPTS), 32), cfg.model.pad_id, np.int32)
    for r, p in enumerate(PROMPTS):
        seqs[r, : len(p) + NEW] = p + got[r]
    logits = np.asarray(M.logits(cfg.model, mesh, params, seqs))
    for r, p in enumerate(PROMPTS):
        assert got[r] == logits[r, len(p) - 1 : len(p) - 1 + NEW].argmax(-1).tolist(), f"row {r}"


def test_a_prompt_gets_the_same_tokens_in_a_batch_as_alone(devices):
    cfg, mesh, params = model_on("ladder", 2, 4)
    batch = decode.generate(cfg.model, mesh, params, PROMPTS, NEW).tokens
    assert len(batch) == len(PROMPTS) and all(len(t) == NEW for t in batch)
    for p, tokens in zip(PROMPTS, batch):  # alone: one prompt and one padding row on data=2
        assert decode.generate(cfg.model, mesh, params, [p], NEW).tokens[0] == tokens


def test_the_decode_step_compiles_once_per_shape(compiles, devices):
    _, mesh, params = model_on("standard", 1, 8)
    # Another max_seq_len (same parameter shapes) gives functions no other test has compiled.
    cfg = load_config("tiny", [*SMALL, "model.n_layers=3", "model.max_seq_len=48", "mesh.tensor=8"]).model
    shape = decode.decode_shape(cfg, mesh, PROMPTS, NEW)
    decode.precompile(cfg, mesh, params, shape)
    assert len(compiles) == 2, compiles  # the prefill and the step
    compiles.clear()
    first = decode.generate(cfg, mesh, params, PROMPTS, NEW)
    other_lengths = decode.generate(cfg, mesh, params, [[256, 9], [256, *range(9)]], NEW)  # same bucket
    assert first.decode_steps == other_lengths.decode_steps == NEW - 1
    assert compiles == []


def test_vocab_parallel_argmax_picks_the_global_max_and_the_lowest_id_on_ties(devices):
    mesh = make_mesh(small_config(tensor=8))
    logits = np.full((3, 64), -1.0, np.float32)  # 8 vocab columns per device
    logits[0, [13, 50]] = 5.0  # a tie across devices 1 and 6
    logits[1, 63] = 2.0  # the max on the last device
    logits[2] = -np.inf
    logits[2, 8:16] = np.arange(8)  # every other device holds only -inf
    fn = jax.jit(jax.shard_map(decode.vocab_parallel_argmax, mesh=mesh, in_specs=P(None, "tensor"), out_specs=P()))
    assert np.asarray(fn(jnp.asarray(logits))).tolist() == [13, 63, 15]


def test_a_row_stops_at_eos_and_the_callback_streams_every_token_in_order(devices):
    cfg, mesh, params = model_on("ladder", 2, 4)
    full = decode.generate(cfg.model, mesh, params, PROMPTS, NEW).tokens
    eos = full[0][5]
    want = [t[: t.index(eos)] if eos in t else t for t in full]
    streamed = [[], []]
    got = decode.generate(
        cfg.model, mesh, params, PROMPTS, NEW, eos_id=eos, on_token=lambda row, t: streamed[row].append(t)
    ).tokens
    assert got == want == streamed
    assert len(got[0]) <= 5


# ---------------------------------------------------------------------------------------------
# Bad input: one line, before anything compiles


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "prompts, new, message",
    [
        ([], 4, "no prompts given"),
        ([[256, 1], []], 4, "prompt 1 is empty"),
        ([[256, 300]], 4, "prompt 0 has token id 300 outside the vocabulary 0..258"),
        ([[256] * 60], 8, r"is 68, above model.max_seq_len=64; ask for at most 4 new tokens"),
        ([[256] * 64], 1, r"above model.max_seq_len=64; shorten the prompt"),
        ([[256]], 0, "ask for at least 1 new token"),
    ],
)
def test_bad_requests_are_refused_in_one_line(prompts, new, message):
    cfg = small_config(**TEST_MODEL).model
    with pytest.raises(decode.DecodeError, match=message) as e:
        decode.check_request(cfg, prompts, new)
    one_line(e)


def test_a_cache_larger_than_the_free_device_memory_is_refused(devices):
    cfg, mesh, _ = model_on("standard", 2, 4)
    shape = decode.decode_shape(cfg.model, mesh, PROMPTS, NEW)
    need = decode.cache_bytes(cfg.model, mesh, shape)
    assert (
        need == 2 * 3 * (2 // 2) * 32 * 1 * 8 * 4
    )  # k and v, 3 layers, 1 row, 32 positions, 1 kv slot, head_dim 8, float32

    assert decode.check_cache_fits(cfg.model, mesh, shape, FakeGPU(need)) == need
    with pytest.raises(
        decode.DecodeError, match=r"KV cache needs 0.00 GiB per device \(batch 2 x 32 positions\) but cuda:0 has"
    ) as e:
        decode.check_cache_fits(cfg.model, mesh, shape, FakeGPU(need - 1))
    one_line(e)


# ---------------------------------------------------------------------------------------------
# infer.py


def run_infer(argv, capsys):
    rc = infer.main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_prompts_files_read_lines_and_jsonl(tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text("def fib(\n{not json}\nnaïve\n", encoding="utf-8")
    assert infer_verb.read_prompts_file(lines) == ["def fib(", "{not json}", "naïve"]
    records = tmp_path / "prompts.jsonl"
    records.write_text('{"prompt": "a\\nb"}\n\n{"text": "c", "id": 2}\n')
    assert infer_verb.read_prompts_file(records) == ["a\nb", "c"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("p.txt", b"ok\n\xff\xfe\n", r"p.txt line 2: byte 0xff is not UTF-8; save the file as UTF-8"),
        ("p.txt", b"ok\n\nmore\n", r"line 2 is an empty prompt"),
        ("p.txt", b"", r"holds no prompts"),
        ("p.jsonl", b'{"prompt": "x"}\n{"name": 1}\n', r'line 2 has no string "prompt" or "text" field'),
        ("p.jsonl", b'{"prompt": "x"\n', r"line 1 is not JSON"),
        ("p.jsonl", b'{"prompt": ""}\n', r"line 1 is an empty prompt"),
    ],
)
def test_bad_prompts_files_are_refused_in_one_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(infer_verb.InputError, match=message) as e:
        infer_verb.read_prompts_file(tmp_path / name)
    one_line(e)


def test_a_prompts_file_that_is_a_directory_is_named_so(tmp_path):
    with pytest.raises(infer_verb.InputError, match="is a directory; give a text file"):
        infer_verb.read_prompts_file(tmp_path)


@pytest.fixture
def tiny_run(tmp_path):
    """A run directory with the tiny preset's config.yaml (no parameters: every check below
    fails before they would be read)."""
    run = tmp_path / "tiny-run"
    run.mkdir()
    checkpoint.save_config(run, load_config("tiny"))
    return run


def test_infer_refuses_bad_requests_in_one_line(tmp_path, tiny_run, capsys, devices):
    other = tmp_path / "other-run"
    other.mkdir()
    checkpoint.save_config(other, load_config("ladder-1b"))
    cases = [
        (["--checkpoint", str(tiny_run), "--prompt", ""], "error: --prompt is empty"),
        (["--checkpoint", str(tmp_path / "missing"), "--prompt", "x"], "missing is not a directory"),
        (
            ["--checkpoint", str(other), "--config", "tiny", "--prompt", "x"],
            "is a 'ladder-1b' run, not 'tiny'; drop --config or give a run of tiny",
        ),
        (
            ["--checkpoint", str(tiny_run), "--prompt", "x" * 500, "--max-new-tokens", "64"],
            "is 565, above model.max_seq_len=512",
        ),
        (["--runs-dir", str(tmp_path / "none"), "--prompt", "x"], "no trained 'tiny' run under"),
        (["--benchmark", "--batch-sizes", "1,x"], "--batch-sizes '1,x' is not a comma-separated list"),
    ]
    for argv, message in cases:
        rc, err = run_infer(argv, capsys)
        assert rc == 2 and message in err and "\n" not in err, (argv, err)


def test_text_streams_multibyte_characters_once_complete():
    text = "aé€😀"
    stream = infer_verb.TextStream(ByteTokenizer())
    pieces = [stream.push(b) for b in text.encode("utf-8")]
    assert pieces == ["a", "", "é", "", "", "€", "", "", "", "😀"]
    assert stream.push(ByteTokenizer.eos_id) == "" and stream.close() == ""


def test_complete_streams_the_prompt_and_its_greedy_continuation(devices):
    cfg, mesh, params = model_on("ladder", 2, 4)
    tokenizer = ByteTokenizer()
    prompt = [tokenizer.bos_id, *tokenizer.encode("Hello")]
    out, log = io.StringIO(), io.StringIO()
    completions = infer_verb.complete(cfg, mesh, params, tokenizer, ["Hello"], [prompt], NEW, out, log, source="test")
    tokens = decode.generate(cfg.model, mesh, params, [prompt], NEW, eos_id=tokenizer.eos_id).tokens[0]
    assert completions == [bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")]
    assert out.getvalue() == "Hello" + completions[0] + "\n"
    assert "KV cache" in log.getvalue() and "ms/token" in log.getvalue()


def test_infer_decodes_a_prompts_file_with_the_latest_complete_run(tmp_path, capsys, devices):
    import os

    cfg, mesh, params = model_on("standard", 1, 8)
    runs = tmp_path / "runs"
    # Oldest to newest: two complete runs, a run with no complete checkpoint yet, another preset's.
    for k, name in enumerate(["older", "latest", "incomplete", "other-preset"]):
        run = runs / name
        (run / "checkpoints").mkdir(parents=True)
        checkpoint.save_config(run, cfg if name != "other-preset" else replace(cfg, model={"name": "other"}))
        if name in ("older", "latest", "other-preset"):
            checkpoint.save_params(run, params, step=1)
        os.utime(run / "config.yaml", ns=(k * 10**9, k * 10**9))
    texts = ["Hello", "naïve"]
    (tmp_path / "prompts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    argv = ["--runs-dir", str(runs), "--prompts-file", str(tmp_path / "prompts.txt"), "--max-new-tokens", str(NEW)]
    assert infer.main(argv) == 0
    out, err = capsys.readouterr()
    assert err.startswith(f"{runs / 'latest'}: tiny plan 'standard'"), err
    # Two prompts of 6 and 7 tokens with BOS: the shapes the first test compiled on this mesh.
    tokens = decode.generate(cfg, mesh, params, [[256, *t.encode()] for t in texts], NEW, eos_id=257).tokens
    completions = [bytes(t for t in row if t < 256).decode("utf-8", errors="replace") for row in tokens]
    assert out == "".join(f"[{i}] {t}{c}\n" for i, (t, c) in enumerate(zip(texts, completions)))


def test_infer_over_two_processes_with_tensor_spanning_both_writes_what_one_process_decodes(tmp_path, devices):
    # 2 processes x 4 CPU devices over gloo, tensor 8 across both; process 0 writes, 1 stays quiet
    import subprocess
    import sys
    from pathlib import Path

    from .conftest import free_ports, save_run, start_two_processes

    cfg, mesh, params = model_on("standard", 1, 8)
    run = save_run(tmp_path / "run", cfg, params)
    texts = ["Hello", "naïve"]
    (tmp_path / "prompts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    (port,) = free_ports()
    cmd = [sys.executable, str(Path(infer.__file__).resolve()), "--checkpoint", str(run), "--prompts-file"]
    cmd += [str(tmp_path / "prompts.txt"), "--max-new-tokens", str(NEW), "mesh.tensor=8", "--cpu-devices", "4"]
    cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    procs = start_two_processes(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e.decode(errors="replace")[-2000:] for _, e in outs]
    # gloo prints its connections on stdout too, from several threads and in pieces, all while the
    # processes connect: before the first decoded line
    (out0, _), (out1, _) = outs
    tokens = decode.generate(cfg, mesh, params, [[256, *t.encode()] for t in texts], NEW, eos_id=257).tokens
    completions = [bytes(t for t in row if t < 256).decode("utf-8", errors="replace") for row in tokens]
    assert out0[out0.find(b"[0] ") :].decode() == "".join(
        f"[{i}] {t}{c}\n" for i, (t, c) in enumerate(zip(texts, completions))
    )
    assert not re.search(rb"^\[\d+\] ", out1, re.M) and b"tensor=8" in outs[0][1]


def test_benchmark_prints_a_table_and_writes_json(tmp_path, capsys, devices):
    # The test model on data=1 x tensor=8, two prompts of 8 tokens, 16 new: the shapes the first
    # test compiled, so this one only runs them.
    overrides = [*SMALL, "model.n_layers=3", "model.init_std=0.1", "mesh.tensor=8"]
    argv = ["--benchmark", *overrides, "--variants", "standard;ladder", "--batch-sizes", "2"]
    argv += [
        "--prompt-len",
        "8",
        "--gen-len",
        str(NEW),
        "--runs",
        "2",
        "--warmup",
        "0",
        "--json",
        str(tmp_path / "b.json"),
    ]
    assert infer.main(argv) == 0
    table = capsys.readouterr().out
    assert "| ladder   | 2     |" in table and "decode ms/token" in table
    results = json.loads((tmp_path / "b.json").read_text())
    assert results["mesh"] == {"data": 1, "tensor": 8} and results["gen_len"] == NEW
    assert [r["variant"] for r in results["results"]] == ["standard", "ladder"]
    for r in results["results"]:
        assert r["tokens_per_s"] == pytest.approx(2 * r["tokens_per_s_per_seq"]) and r["decode_ms_per_token"] > 0
    assert results["results"][0]["speedup_vs_standard"] == 1.0
