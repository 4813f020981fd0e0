"""Train a ladder_jax model. `python train.py` (or `python -m ladder_jax train`) trains the tiny
preset on the Python standard library's sources on whatever devices exist (8 fake CPU devices
without an accelerator)."""

from __future__ import annotations

import argparse

import jax

from .. import decode
from ..checkpoint import load_run_config
from ..config import Config, load_config
from ..mesh import init_runtime
from ..storage import path
from ..tokenizer import get_tokenizer
from ..training import train
from ._common import cpu_devices, multihost, script_main, script_verb


def add(sub) -> None:
    script_verb(sub, "train", "train (or resume) a run", __doc__, arguments)


def main(argv=None) -> int:
    """`python train.py ...`: this verb as a script of its own."""
    return script_main(__doc__, arguments, argv)


def arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--config",
        help="preset name (see configs/) or a YAML path; default: tiny, or for an existing --run-dir its config.yaml",
    )
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.plan=ladder train.steps=100")
    ap.add_argument(
        "--run-dir",
        help="run directory (default: train.out_dir/<preset>-<time>); an existing one resumes with its own config.yaml "
        "and these overrides",
    )
    ap.add_argument("--init-from", help="start a new run from another run's (or a converted model's) parameters")
    cpu_devices(ap)
    multihost(ap)
    ap.add_argument(
        "--sample-tokens",
        type=int,
        default=200,
        help="length of the sample (temperature 0.8, top-p 0.95) printed at the end (0: none)",
    )
    ap.add_argument("--no-progress", action="store_true")
    ap.set_defaults(handler=train_run)


def train_config(args) -> Config:
    """A new run's config: --config (default tiny) with the overrides. An existing run resumes with
    its own config.yaml and the overrides, or with --config's (`training.train` refuses what would
    change the model or its batches)."""
    if args.config is None and args.run_dir is not None and (path(args.run_dir) / "config.yaml").exists():
        return load_run_config(args.run_dir, args.overrides)
    return load_config(args.config or "tiny", args.overrides)


def train_run(args) -> int:
    cfg = train_config(args)  # a bad config fails here, before JAX starts its backends
    init_runtime(args.cpu_devices, args.coordinator, args.num_processes, args.process_id)
    result = train(cfg, run_dir=args.run_dir, init_from=args.init_from, progress=not args.no_progress)
    if jax.process_index() != 0:
        return 0
    if "loss" not in result:  # resumed at train.steps: no step ran
        print(
            f"step {result['step']}: {result['run_dir']} has already trained train.steps={cfg.train.steps}; "
            f"nothing to do (raise train.steps to continue it)"
        )
    else:
        val = f", val_loss {result['val_loss']:.4f}, val_ppl {result['val_ppl']:.2f}" if "val_loss" in result else ""
        print(f"step {result['step']}: loss {result['loss']:.4f}{val}")
    if args.sample_tokens:
        print_sample(cfg, result, args.sample_tokens)
    print(f"saved to {result['run_dir']}  (decode: python infer.py --checkpoint {result['run_dir']} --prompt 'def ')")
    return 0


def print_sample(cfg, result, n_tokens: int) -> None:
    tok = get_tokenizer(cfg, result["run_dir"])
    prompt = "def "
    out = decode.generate(
        cfg,
        result["mesh"],
        result["params"],
        [tok.encode_prompt(prompt)],
        max_new_tokens=n_tokens,
        eos_id=tok.stop_ids,
        # Greedy decoding of a small model loops; a sample shows what it learned.
        sampling=decode.Sampling(temperature=0.8, top_p=0.95, seed=cfg.train.seed),
    )
    print("sample:", prompt + tok.decode(out[0]))
