"""EleutherAI's lm-evaluation-harness on our sharded model, and rolling-window perplexity of text.

    python -m ladder_jax eval harness --checkpoint RUN --tasks arc_easy,piqa [--num-fewshot K] [--limit N] [key=value ...]
    python -m ladder_jax eval perplexity --checkpoint RUN --file wiki.txt [--context L] [--stride S]

`LadderLM` is an lm-eval model (registered as `ladder_jax`) over any run directory, trained,
converted, SPD or LP, with `key=value` overrides (plan, mesh). Log-likelihoods come from one
compiled shard_map that returns, per position, the target's log-probability and whether it is the
greedy token, both computed vocab-parallel (the logits are never gathered); requests are sorted
longest first, as lm-eval's own models do, and padded to power-of-two lengths and a fixed number
of rows, so a task compiles once per length bucket. `loglikelihood_rolling` uses lm-eval's rolling
windows over the model's context; `generate_until` is our greedy decoder, cut at the stop strings.
The parameters load on the first model call, so input the tokenizer cannot handle is refused first.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from lm_eval import utils as lm_utils
from lm_eval.api.metrics import bits_per_byte, weighted_perplexity
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator

from . import checkpoint as ckpt
from . import model as M
from .config import ModelConfig
from .data import open_prepared
from .decode import bucket_length, generate, vocab_parallel_argmax
from .errors import LadderError
from .mesh import BATCH, batch_shards
from .storage import Path, path
from .tokenizer import HFTokenizer, get_tokenizer

# Scored sequences are padded to a power of two of at least this many tokens: few compiles, and
# multiple-choice prompts are rarely much shorter.
MIN_BUCKET = 64


class EvalError(LadderError):
    """A task, dataset or tokenizer the evaluation cannot use; the message says what to do."""


@functools.lru_cache(maxsize=16)
def token_scores_fn(cfg: ModelConfig, mesh: Mesh):
    """jit(params, inputs (B, S), targets (B, S)) -> (log p(target) (B, S), target is the argmax (B, S))."""

    def body(model, inputs, targets):
        logits, _ = model(inputs, M.default_positions(inputs))
        return -M.vocab_parallel_nll(logits, targets), vocab_parallel_argmax(logits) == targets

    rows = P(BATCH, None)
    return jax.jit(M.sharded(cfg, mesh, body, (rows, rows), (rows, rows)))


@register_model("ladder_jax")
class LadderLM(TemplateLM):
    """lm-eval's model API over a run directory. `overrides`: key=value strings (a list, or one
    string separated by ';', as lm-eval's --model_args cannot hold commas)."""

    def __init__(
        self,
        checkpoint: str | Path,
        overrides=(),
        batch_size: int = 8,
        max_gen_toks: int = 256,
        context: int | None = None,
        run: ckpt.Run | None = None,
        **_,
    ):
        """`run`: an already opened run of this checkpoint (its config and parameters are used)."""
        super().__init__()
        if isinstance(overrides, str):
            overrides = [o for o in overrides.split(";") if o]
        self.run_dir, self.overrides = path(checkpoint), list(overrides)
        self.cfg = run.cfg if run is not None else ckpt.load_run_config(self.run_dir, self.overrides)
        if run is not None:
            self.__dict__["run"] = run  # the cached property, already known
        self.plan: str | None = None  # evaluate the parameters under another plan (SPD, LP searches)
        m = self.cfg.model
        try:
            self.tokenizer = get_tokenizer(self.cfg, self.run_dir)
        except ValueError as e:
            raise EvalError(str(e)) from None
        if self.tokenizer.vocab_size > m.vocab_size:
            raise EvalError(
                f"{self.run_dir}'s tokenizer has {self.tokenizer.vocab_size} tokens but the model only {m.vocab_size}; "
                f"it is not this model's tokenizer: put the model's tokenizer.json in the run directory"
            )
        if context is not None and not 2 <= int(context) <= m.max_seq_len:
            raise EvalError(f"--context {context} must be between 2 and model.max_seq_len={m.max_seq_len}")
        self.context = int(context) if context else None
        self.batch_size = int(batch_size or 8)
        self.max_gen_toks = int(max_gen_toks)
        self.stride: int | None = None  # rolling windows: tokens scored per window after the first (None: the context)

    @functools.cached_property
    def run(self) -> ckpt.Run:
        return ckpt.load_run(self.run_dir, self.overrides)

    @property
    def model_cfg(self) -> ModelConfig:
        m = self.run.cfg.model
        return dataclasses.replace(m, plan=self.plan) if self.plan else m

    @property
    def rows(self) -> int:
        """Rows of every compiled call: the batch size rounded up to the mesh's batch shards."""
        shards = batch_shards(self.run.mesh)
        return -(-self.batch_size // shards) * shards

    @property
    def eot_token_id(self) -> int:
        return self.cfg.model.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.cfg.model.bos_id

    @property
    def max_length(self) -> int:
        """The context a request sees (the model's, unless a shorter one was asked for)."""
        return self.context or self.cfg.model.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return str(self.run_dir)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As lm-eval's HF model encodes: the tokenizer's own special tokens (its post-processor)
        unless told otherwise or the text already starts with BOS. Bytes have none."""
        if not isinstance(self.tokenizer, HFTokenizer):
            return self.tokenizer.encode(string)
        tok = self.tokenizer.tok
        if add_special_tokens is None:
            bos = tok.id_to_token(self.prefix_token_id)
            add_special_tokens = not (bos and string.startswith(bos))
        return tok.encode(string, add_special_tokens=add_special_tokens).ids

    # -- log-likelihoods ------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        for text, _, cont in requests:
            if not cont:
                raise EvalError(
                    f"the continuation {text[1]!r} encodes to no tokens with {self.run_dir}'s tokenizer (its vocabulary "
                    f"does not cover the task's text); evaluate a run whose tokenizer covers it (byte-level BPE, bytes)"
                )
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        out = []
        for chunk in order.get_batched(n=self.rows):
            for (text, _, cont), (logp, greedy) in zip(chunk, self.score_windows([r[1] + r[2] for r in chunk])):
                answer = (float(logp[-len(cont) :].sum()), bool(greedy[-len(cont) :].all()))
                if text is not None:
                    self.cache_hook.add_partial("loglikelihood", text, answer)
                out.append(answer)
        return order.get_original(out)

    def score_windows(self, sequences: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each token sequence (at most max_length + 1 tokens kept, from the right): log p and
        greedy flags of its tokens after the first. One call of `rows` rows, padded to a length bucket."""
        sequences = [s[-(self.max_length + 1) :] for s in sequences]
        longest = max(len(s) for s in sequences) - 1
        length = min(max(MIN_BUCKET, bucket_length(longest, self.max_length)), self.cfg.model.max_seq_len)
        inputs = np.full((self.rows, length), self.cfg.model.pad_id, np.int32)
        targets = np.zeros_like(inputs)
        for r, s in enumerate(sequences):
            inputs[r, : len(s) - 1], targets[r, : len(s) - 1] = s[:-1], s[1:]
        run = self.run
        put = lambda x: jax.device_put(x, NamedSharding(run.mesh, P(BATCH, None)))
        logp, greedy = token_scores_fn(self.model_cfg, run.mesh)(run.params, put(inputs), put(targets))
        logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
        return [(logp[r, : len(s) - 1], greedy[r, : len(s) - 1]) for r, s in enumerate(sequences)]

    def rolling_windows(self, string: str) -> list[tuple[None, list[int], list[int]]]:
        """lm-eval's disjoint rolling windows over the text's tokens; with a stride S each window
        after the first scores S new tokens with max_length - S tokens of context before them."""
        stride = self.stride or self.max_length
        windows = lm_utils.get_rolling_token_windows(
            self.tok_encode(string), self.prefix_token_id, self.max_length, self.max_length - stride + 1
        )
        return [(None, *lm_utils.make_disjoint_window(w)) for w in windows]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        per_doc = [self.rolling_windows(req.args[0]) for req in requests]
        scores = iter(self._loglikelihood_tokens([w for doc in per_doc for w in doc]))
        out = []
        for req, windows in zip(requests, per_doc):
            out.append(sum(next(scores)[0] for _ in windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), out[-1])
        return out

    # -- generation -----------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            if kwargs.get("do_sample") or (kwargs.get("temperature") or 0) > 0:
                raise EvalError(
                    f"task {requests[members[0]].task_name} asks for sampling ({kwargs}); ladder_jax decodes greedily: "
                    f"pass --gen-kwargs do_sample=false,temperature=0 or choose a greedy task"
                )
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = max(1, min(int(kwargs.get("max_gen_toks", self.max_gen_toks)), self.max_length - 1))
            prompts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - new) :] for i in members}
            order = sorted(members, key=lambda i: -len(prompts[i]))
            for k in range(0, len(order), self.rows):
                chunk = order[k : k + self.rows]
                batch = [prompts[i] or [self.prefix_token_id] for i in chunk]
                batch += [batch[0]] * (self.rows - len(batch))  # a full batch: one compile per prompt bucket
                run = self.run
                tokens = generate(self.model_cfg, run.mesh, run.params, batch, new, eos_id=self.eot_token_id)
                for i, toks in zip(chunk, tokens):
                    text = self.tokenizer.decode(toks)
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


# ---------------------------------------------------------------------------------------------
# Tasks


def task_manager(names: list[str], include_path=None, builtin: bool = True):
    """lm-eval's TaskManager that knows every name. The built-in index (about 14,700 task YAMLs,
    ten seconds and more) is read only when `include_path` does not hold every name."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not path(include_path).is_dir():
        raise EvalError(f"--include-path {include_path} is not a directory of task YAMLs")
    tm = TaskManager(include_path=str(include_path), include_defaults=False) if include_path else None
    if tm is None or (builtin and not all(n in tm.task_index for n in names)):
        tm = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [n for n in names if n not in tm.task_index]
    if unknown:
        where = "lm-eval's built-in tasks" if builtin else ""
        if include_path:
            where = f"{where} or {include_path}" if builtin else str(include_path)
        raise EvalError(
            f"unknown task '{unknown[0]}' (not among {where}); check the name (lm-eval's list: `lm_eval ls tasks`) "
            f"or give --include-path DIR holding its YAML"
        )
    return tm


def load_tasks(tm, names: list[str]) -> list:
    """The Task and Group objects for `names`, datasets loaded; a dataset that cannot be loaded
    (not cached and no network, a missing file) is refused in one line naming the task."""
    objects = []
    for name in names:
        try:
            loaded = tm.load(name)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise EvalError(
                f"task '{name}': its dataset could not be loaded ({type(e).__name__}: {first[:300]}); lm-eval "
                f"fetches datasets from the Hugging Face hub: run once with network access to cache them, or point the "
                f"task's YAML at local files (dataset_path: json, dataset_kwargs.data_files)"
            ) from None
        objects += [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())
    return objects


def harness(
    lm: LadderLM,
    names: list[str],
    num_fewshot: int | None = None,
    limit: float | None = None,
    include_path=None,
    builtin: bool = True,
    tm=None,
    bootstrap_iters: int = 100000,
    gen_kwargs: str | None = None,
) -> dict:
    """lm-eval's simple_evaluate of `lm` on the named tasks: its results dict (samples included).
    `tm`: a task_manager(...) already made for these names."""
    import lm_eval

    tm = tm or task_manager(names, include_path, builtin)
    return lm_eval.simple_evaluate(
        lm,
        tasks=load_tasks(tm, names),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=tm,
        bootstrap_iters=bootstrap_iters,
        gen_kwargs=gen_kwargs,
    )


def task_measure(run: ckpt.Run, spec: str, tm, limit: float | None = None, batch_size: int = 8, log=print):
    """For `--metric task:NAME[:METRIC]` (METRIC default acc): (label, plan -> the task's score of
    the run's parameters under that plan). Higher is better."""
    name, _, metric = spec.removeprefix("task:").partition(":")
    metric = metric or "acc"
    lm = LadderLM(run.dir, batch_size=batch_size, run=run)
    tasks = load_tasks(tm, [name])

    def measure(plan: str) -> float:
        import lm_eval

        lm.plan = plan
        results = lm_eval.simple_evaluate(lm, tasks=tasks, limit=limit, task_manager=tm, bootstrap_iters=0)["results"]
        scores = {k.split(",")[0]: v for k, v in results.get(name, {}).items() if isinstance(v, float)}
        if metric not in scores:
            raise EvalError(
                f"task '{name}' reports no metric '{metric}' (it has {sorted(scores)}); use task:{name}:METRIC"
            )
        return scores[metric]

    return f"{name} {metric}", measure


def parse_metric(spec: str, include_path=None, builtin: bool = True):
    """`perplexity` -> None; `task:NAME[:METRIC]` -> the task manager that knows NAME (checked
    before any run loads)."""
    if spec == "perplexity":
        return None
    name = spec.removeprefix("task:").partition(":")[0]
    if not spec.startswith("task:") or not name:
        raise EvalError(
            f"--metric {spec!r}: give perplexity or task:NAME[:METRIC], e.g. task:arc_easy or task:piqa:acc_norm"
        )
    return task_manager([name], include_path, builtin)


def results_json(results: dict) -> str:
    """The results as lm-eval's own writer stores them (without the per-sample log)."""
    return json.dumps(
        {k: v for k, v in results.items() if k != "samples"}, indent=2, default=lm_utils.handle_non_serializable
    )


def results_table(results: dict) -> str:
    table = lm_utils.make_table(results)
    return table + ("\n" + lm_utils.make_table(results, "groups") if results.get("groups") else "")


# ---------------------------------------------------------------------------------------------
# Perplexity of text


def prepared_documents(lm: LadderLM, directory: str | Path, split: str, limit: int | None = None) -> list[str]:
    """The documents of a prepared directory's split (`data prepare`), decoded back to text, so
    they are scored as text files are (word and byte counts need the text). The directory must
    have been prepared with this run's tokenizer."""
    windows = open_prepared(directory, split, lm.tokenizer, lm.max_length)
    n = len(windows.documents) if limit is None else min(limit, len(windows.documents))
    special = {lm.tokenizer.bos_id, lm.tokenizer.eos_id}
    return [lm.tokenizer.decode([t for t in windows.documents[k] if t not in special]) for k in range(n)]


def read_documents(files: list[Path]) -> list[str]:
    """UTF-8 text files, each one document."""
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise EvalError(f"--file {missing[0]} is not a file; give UTF-8 text files")
    try:
        return [f.read_text(encoding="utf-8") for f in files]
    except UnicodeDecodeError as e:
        raise EvalError(f"a --file is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None


def perplexity(lm: LadderLM, documents: list[str], stride: int | None = None) -> dict:
    """Token, word and byte perplexity of documents scored separately with rolling windows, summed
    as lm-eval's WikiText task sums them (words: whitespace-separated pieces; bytes: UTF-8)."""
    if stride is not None and not 1 <= stride <= lm.max_length:
        raise EvalError(f"--stride {stride} must be between 1 and the context, {lm.max_length} tokens")
    empty = [i for i, d in enumerate(documents) if not d]
    if empty:
        raise EvalError(f"document {empty[0]} is empty; give text to score")
    lm.stride = stride
    per_doc = [lm.rolling_windows(d) for d in documents]
    scores = iter(lm._loglikelihood_tokens([w for doc in per_doc for w in doc]))
    lls = [sum(next(scores)[0] for _ in windows) for windows in per_doc]
    tokens = [sum(len(w[2]) for w in windows) for windows in per_doc]
    words = [len(re.split(r"\s+", d)) for d in documents]
    nbytes = [len(d.encode("utf-8")) for d in documents]
    return {
        "documents": len(documents),
        "tokens": sum(tokens),
        "words": sum(words),
        "bytes": sum(nbytes),
        "loglikelihood": sum(lls),
        "windows": sum(len(w) for w in per_doc),
        "context": lm.max_length,
        "stride": stride or lm.max_length,
        "token_perplexity": weighted_perplexity(list(zip(lls, tokens))),
        "word_perplexity": weighted_perplexity(list(zip(lls, words))),
        "byte_perplexity": weighted_perplexity(list(zip(lls, nbytes))),
        "bits_per_byte": bits_per_byte(list(zip(lls, nbytes))),
        "nll_per_token": -sum(lls) / max(sum(tokens), 1),
    }
