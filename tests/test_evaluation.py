"""lm-evaluation-harness on our model, checked against lm-eval's own Hugging Face model: a tiny
random Llama made by transformers, its conversion, and three local tasks (multiple choice,
generation, rolling perplexity) whose datasets the test writes. No hub, no network."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ladder_jax import evaluation as E
from ladder_jax import model as M
from ladder_jax.cli import main
from ladder_jax.interop import hf as convert
from tests.test_convert import TIED, byte_level_tokenizer

HF_CONFIG = dict(TIED, max_position_embeddings=64)
WORDS = "the quick brown fox jumps over lazy dog def fib return import print".split()
TASKS = ["tiny_mc", "tiny_gen", "tiny_text"]
LADDER = "model.plan=standard,ladder@-1:"

MC = """task: tiny_mc
dataset_path: json
dataset_kwargs: {data_files: {test: DIR/mc.jsonl}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list: [{metric: acc}, {metric: acc_norm}]
"""
GEN = """task: tiny_gen
dataset_path: json
dataset_kwargs: {data_files: {test: DIR/mc.jsonl}}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices[0]}}"
generation_kwargs: {until: ["\\n", "fox"], max_gen_toks: 10, do_sample: false}
metric_list: [{metric: exact_match}]
"""
TEXT = """task: tiny_text
dataset_path: json
dataset_kwargs: {data_files: {test: DIR/text.jsonl}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{page}}"
metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]
"""
# A task whose answers are Greek: a tokenizer that knows only Latin letters gives them no tokens.
GREEK = MC.replace("tiny_mc", "tiny_greek").replace("mc.jsonl", "greek.jsonl")
HUB = "task: hub_only\ndataset_path: ladder-jax-tests/no-such-dataset\ntest_split: test\noutput_type: multiple_choice\n"


def write_tasks(d: Path) -> None:
    rng = np.random.RandomState(0)
    words = lambda n: " ".join(rng.choice(WORDS, n))
    with open(d / "mc.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"question": words(5), "choices": [words(k) for k in (1, 2, 3)], "label": i % 3}) + "\n")
    with open(d / "text.jsonl", "w") as f:
        for n in (25, 40):
            f.write(json.dumps({"page": words(n)}) + "\n")
    (d / "greek.jsonl").write_text(json.dumps({"question": "fox", "choices": ["αβγ", "δεζ"], "label": 0}) + "\n")
    tasks, bad = d / "tasks", d / "bad"
    tasks.mkdir(), bad.mkdir()
    for name, text in (("tiny_mc", MC), ("tiny_gen", GEN), ("tiny_text", TEXT)):
        (tasks / f"{name}.yaml").write_text(text.replace("DIR", str(d)))
    (bad / "tiny_greek.yaml").write_text(GREEK.replace("DIR", str(d)))
    (bad / "hub_only.yaml").write_text(HUB)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama (transformers) with its tokenizer, its conversion, the tasks, and lm-eval's
    own HF model's results on them."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    d = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(LlamaConfig(**HF_CONFIG, initializer_range=0.3)).eval()
    hf_dir = d / "hf"
    hf_model.save_pretrained(hf_dir)
    byte_level_tokenizer(d / "tokenizer.json")
    special = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), **special).save_pretrained(hf_dir)
    convert.from_hf(hf_dir, d / "run")
    write_tasks(d)
    tm = E.task_manager(TASKS, d / "tasks", builtin=False)
    hf = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=4, dtype="float32")
    reference = simple_evaluate(hf, tasks=E.load_tasks(tm, TASKS), task_manager=tm, limit=2, bootstrap_iters=0)
    ours = E.harness(E.LadderLM(d / "run", ["mesh.tensor=2"], 4), TASKS, limit=2, tm=tm, bootstrap_iters=0)
    return {"dir": d, "run": d / "run", "hf": hf_model, "tm": tm, "reference": reference, "ours": ours}


def responses(results, task):
    return [s["resps"] for s in results["samples"][task]]


def test_harness_equals_lm_evals_hf_model(tiny):
    ref, ours = tiny["reference"], tiny["ours"]
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][metric] == ref["results"]["tiny_mc"][metric]
    # Every choice's log-likelihood (and greedy flag) of every document, to float32 tolerance.
    got = np.array([[r[0][0] for r in doc] for doc in responses(ours, "tiny_mc")])
    want = np.array([[r[0][0] for r in doc] for doc in responses(ref, "tiny_mc")])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert [[r[0][1] for r in d] for d in responses(ours, "tiny_mc")] == [
        [r[0][1] for r in d] for d in responses(ref, "tiny_mc")
    ]
    assert np.abs(want).max() > 5  # real sums of several tokens, so the tolerance means something
    # Greedy generation cut at the stop strings: the same text.
    assert responses(ours, "tiny_gen") == responses(ref, "tiny_gen")
    assert any(r[0][0] for r in responses(ref, "tiny_gen"))
    # Rolling windows over the model's 64-token context: the same document log-likelihoods and perplexities.
    np.testing.assert_allclose(np.ravel(responses(ours, "tiny_text")), np.ravel(responses(ref, "tiny_text")), rtol=1e-5)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["tiny_text"][metric] == pytest.approx(ref["results"]["tiny_text"][metric], rel=1e-4)


def test_hybrid_ladder_plan_through_the_harness_cli(tiny, tmp_path, capsys):
    """The CLI with a plan override; the API's log-likelihoods of the same plan against a numpy
    log-softmax of the model's full logits."""
    out = tmp_path / "results.json"
    argv = ["eval", "harness", "--checkpoint", str(tiny["run"]), "--tasks", "tiny_mc", "--limit", "2"]
    argv += ["--include-path", str(tiny["dir"] / "tasks"), "--no-builtin-tasks", "--bootstrap-iters", "0"]
    assert main([*argv, "--batch-size", "4", "--out", str(out), LADDER, "mesh.tensor=2"]) == 0
    assert "tiny_mc" in capsys.readouterr().out
    written = json.loads(out.read_text())
    lm = E.LadderLM(tiny["run"], [LADDER, "mesh.tensor=2"], 4)
    api = E.harness(lm, ["tiny_mc"], limit=2, tm=tiny["tm"], bootstrap_iters=0)
    assert written["results"]["tiny_mc"]["acc,none"] == api["results"]["tiny_mc"]["acc,none"]
    assert lm.run.cfg.model.layer_schedules == ("standard", "ladder")
    # One forward over every (context, choice) pair, right-padded into one batch.
    pairs = [
        (lm._encode_pair(*a), ll)
        for s in api["samples"]["tiny_mc"]
        for a, ((ll, _),) in zip(s["arguments"], s["resps"])
    ]
    tokens = np.zeros((8, 64), np.int32)
    for r, ((ctx, cont), _) in enumerate(pairs):
        tokens[r, : len(ctx + cont)] = ctx + cont
    logits = np.asarray(M.logits(lm.run.cfg.model, lm.run.mesh, lm.run.params, tokens), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    for r, ((ctx, cont), ll) in enumerate(pairs):
        assert ll == pytest.approx(sum(logp[r, len(ctx) - 1 + k, t] for k, t in enumerate(cont)), rel=1e-5, abs=1e-4)
    standard = [r[0][0] for d in responses(tiny["ours"], "tiny_mc") for r in d]
    assert [r[0][0] for d in responses(api, "tiny_mc") for r in d] != pytest.approx(standard, rel=1e-3)


def test_perplexity_cli_equals_hf(tiny, tmp_path):
    """Document 1 (two windows of 64 tokens): lm-eval's HF log-likelihood; with --stride 8,
    transformers' model on the same strided windows."""
    from lm_eval.utils import get_rolling_token_windows

    page = json.loads((tiny["dir"] / "text.jsonl").read_text().splitlines()[1])["page"]
    (tmp_path / "doc.txt").write_text(page)
    base = ["eval", "perplexity", "--checkpoint", str(tiny["run"]), "--file", str(tmp_path / "doc.txt")]
    assert main([*base, "--out", str(tmp_path / "ppl.json"), "mesh.tensor=2"]) == 0
    r = json.loads((tmp_path / "ppl.json").read_text())
    ref_ll = responses(tiny["reference"], "tiny_text")[1][0][0]
    assert r["windows"] == 2 and r["loglikelihood"] == pytest.approx(ref_ll, rel=1e-5)
    assert r["word_perplexity"] == pytest.approx(np.exp(-ref_ll / len(page.split())), rel=1e-4)
    assert r["byte_perplexity"] == pytest.approx(np.exp(-ref_ll / len(page.encode())), rel=1e-4)
    assert main([*base, "--stride", "8", "--out", str(tmp_path / "strided.json"), "mesh.tensor=2"]) == 0
    strided = json.loads((tmp_path / "strided.json").read_text())
    tokens = E.LadderLM(tiny["run"]).tok_encode(page)
    want = 0.0
    for inp, pred in get_rolling_token_windows(tokens, 1, 64, 64 - 8 + 1):
        with torch.no_grad():
            logp = torch.log_softmax(tiny["hf"](torch.tensor([inp])).logits[0].double(), -1).numpy()
        want += sum(logp[len(inp) - len(pred) + k, t] for k, t in enumerate(pred))
    assert strided["windows"] > 2 and strided["loglikelihood"] == pytest.approx(want, rel=1e-5)
    # Both score every token once: the first window all 64, each next one 8 more (64 before it in context).
    n = len(tokens)
    assert r["tokens"] == strided["tokens"] == n and strided["windows"] == 1 + -(-(n - 64) // 8)
    for scored in (r, strided):
        assert scored["token_perplexity"] == pytest.approx(np.exp(-scored["loglikelihood"] / n), rel=1e-6)
    # The same document from a prepared directory's split scores the same.
    prepared = tmp_path / "prepared"
    prep = ["data", "prepare", str(tmp_path / "doc.txt"), "--out", str(prepared), "--tokenizer", str(tiny["run"])]
    assert main([*prep, "--val-fraction", "0", "--workers", "1", "--no-progress"]) == 0
    from_data = [*base[:-2], "--data", str(prepared), "--split", "train", "--out", str(tmp_path / "data.json")]
    assert main([*from_data, "mesh.tensor=2"]) == 0
    assert json.loads((tmp_path / "data.json").read_text())["loglikelihood"] == pytest.approx(ref_ll, rel=1e-5)


def test_bad_input_one_line(tiny, tmp_path, capsys, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # refuse at once instead of retrying the network
    # A run whose tokenizer knows Latin letters only: Greek answers encode to nothing.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    latin = tmp_path / "latin-run"
    shutil.copytree(tiny["run"], latin)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(WORDS * 5, trainers.BpeTrainer(vocab_size=60, special_tokens=["<pad>", "<s>", "</s>"]))
    tok.save(str(latin / "tokenizer.json"))
    bad = str(tiny["dir"] / "bad")
    harness = ["eval", "harness", "--include-path", bad, "--no-builtin-tasks", "--tasks"]
    cases = {
        "unknown task 'nope'": [*harness, "nope", "--checkpoint", str(tiny["run"])],
        "task 'hub_only': its dataset could not be loaded": [*harness, "hub_only", "--checkpoint", str(tiny["run"])],
        "αβγ' encodes to no tokens": [*harness, "tiny_greek", "--checkpoint", str(latin)],
        "--no-builtin-tasks needs --include-path": ["eval", "harness", "--tasks", "x", "--no-builtin-tasks"]
        + ["--checkpoint", str(tiny["run"])],
        "--stride 0 must be between 1": ["eval", "perplexity", "--checkpoint", str(tiny["run"]), "--stride", "0"]
        + ["--file", str(tiny["dir"] / "text.jsonl")],
    }
    for expected, argv in cases.items():
        capsys.readouterr()
        assert main(argv) == 2, expected
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and expected in err[-1], (expected, err)
    with pytest.raises(SystemExit):  # argparse's refusal, one line too
        main([*harness, "x", "--limit", "-1", "--checkpoint", "x"])
    assert "--limit: -1; give a number of documents (1, 2, ...) or a fraction" in capsys.readouterr().err


def test_spd_sensitivity_scored_by_a_task(tiny, tmp_path, capsys):
    """`spd sensitivity --metric task:NAME`: the standard model's score is lm-eval's HF model's
    accuracy on the same documents; each block's delta is the accuracy its drop costs."""
    tasks = ["--include-path", str(tiny["dir"] / "tasks"), "--no-builtin-tasks", "--limit", "2"]
    argv = ["spd", "sensitivity", "--checkpoint", str(tiny["run"]), "--tensor", "2", "--out", str(tmp_path)]
    assert main([*argv, "--metric", "task:tiny_mc", *tasks]) == 0
    report = json.loads((tmp_path / "spd_sensitivity_t2.json").read_text())
    assert report["metric"] == "tiny_mc acc" and "calibration" not in report
    assert report["base_score"] == tiny["reference"]["results"]["tiny_mc"]["acc,none"]
    for b in report["blocks"]:
        assert b["delta"] == pytest.approx(b["score_without"] - b["score_with"]) and b["class"]
    capsys.readouterr()
    lp = ["lp", "sweep", "--checkpoint", str(tiny["run"]), "--metric", "task:nope", *tasks]
    assert main(lp) == 2 and "unknown task 'nope'" in capsys.readouterr().err
