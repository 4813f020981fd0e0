"""`python -m ladder_jax VERB ...` (installed as `ladder-jax VERB ...` too): every command.

    train        train (or resume) a run; `python train.py` is this verb
    infer        decode with a run, or benchmark the variants' decode speed; `python infer.py` is this verb
    describe     a preset's size and plan, nothing allocated
    convert      Hugging Face Llama directories in (from-hf) and out (to-hf)
    spd          Sync-Point Drop: sensitivity per block, apply a budget to a new run
    lp           Layer Parallelism: sweep the number of paired layers; effective depth; transform layer ranges
    eval         lm-evaluation-harness tasks and rolling-window perplexity of text, on any run and plan
    analysis     where the all-reduces are: sync (CPU), schedule and memory (deviceless GPU/TPU)
    perfmodel    latency model of TP decoding: predict (the default), calibrate
    plot         loss curves of runs
    data         prepare: tokenize a corpus once into ArrayRecord shards for train.data=DIR
    serve        an OpenAI-compatible HTTP server over a run (continuous batching)

Each verb is a module of this package: `add(sub)` declares its arguments and gives each sub-verb
its handler, which parses, calls the library and prints. Input that cannot work
(ladder_jax.errors.LadderError) prints one line, `error: <message>`, on stderr, and every command
exits with status 2 for it (as argparse does for a command line it cannot parse). `train`
stopped by SIGTERM or SIGINT saves the step in flight, prints one line and exits with status 75;
`--run-dir` resumes it.
"""

from __future__ import annotations

import argparse

from . import analysis, convert, data, describe, infer, lp, perfmodel, plot, serve, spd, train
from . import eval as evaluate
from ._common import Parser, VerbParser, run

VERBS = (train, infer, describe, convert, spd, lp, evaluate, analysis, perfmodel, plot, data, serve)


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m ladder_jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="VERB", parser_class=VerbParser)
    for verb in VERBS:
        verb.add(sub)
    return ap


def main(argv=None) -> int:
    return run(parser().parse_args(argv))
