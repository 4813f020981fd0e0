"""What the verbs share: running a handler, the parser class, common arguments."""

from __future__ import annotations

import argparse
import sys

import jax

from ..config import ConfigError
from ..errors import LadderError
from ..storage import Path
from ..training import Preempted

REFUSED = 2  # the exit status of input that cannot work (argparse's usage errors exit 2 too)
# training stopped by SIGTERM/SIGINT after saving the step in flight: rerun to resume (sysexits'
# EX_TEMPFAIL, "try again later", which a scheduler's requeue rule can match)
PREEMPTED = 75


def run(args: argparse.Namespace) -> int:
    """Call the parsed verb's handler; refused input is one line on stderr and status 2, a
    preempted training run one line and status 75."""
    try:
        return args.handler(args)
    except LadderError as e:
        print(f"error: {e}", file=sys.stderr)
        return REFUSED
    except Preempted as e:
        if jax.process_index() == 0:
            print(f"stopped: {e}", file=sys.stderr)
        return PREEMPTED


class Parser(argparse.ArgumentParser):
    """A command line argparse cannot parse is refused as any other bad input: one line on stderr,
    exit status 2 (argparse's own status), the usage left to --help."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


class VerbParser(Parser):
    """A verb's parser. With `intermixed` set (train, infer), key=value overrides may come before,
    between or after its options, as `parse_intermixed_args` allows; argparse cannot do that
    for a sub-command by itself."""

    intermixed = False
    _parsing = False

    def parse_known_args(self, args=None, namespace=None):
        if not self.intermixed or self._parsing:
            return super().parse_known_args(args, namespace)
        self._parsing = True  # parse_known_intermixed_args calls parse_known_args twice itself
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


def script_verb(sub, name: str, help: str, description: str, arguments) -> None:
    """A verb that is also a script of its own (train.py, infer.py): key=value overrides may come
    before, between or after its options."""
    p = sub.add_parser(name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.intermixed = True
    arguments(p)


def script_main(description: str, arguments, argv=None) -> int:
    """Such a verb run as its script: the same arguments, the same handler."""
    p = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments(p)
    return run(p.parse_intermixed_args(argv))


def verb_group(sub, name: str, help: str, description: str | None, required: bool = True):
    """A verb with sub-verbs of its own (`spd sensitivity`, `spd apply`); returns it and its sub-verbs."""
    p = sub.add_parser(name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    return p, p.add_subparsers(dest="verb", required=required)


def overrides(p: argparse.ArgumentParser, example: str = "model.n_layers=4") -> None:
    p.add_argument("overrides", nargs="*", help=f"key=value, e.g. {example}")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}; give at least 1")
    return value


def task_limit(text: str) -> float:
    """An argparse type for lm-eval's limit: N documents (a whole number) or a fraction in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0 < value < 1 or (value >= 1 and value.is_integer())):
        raise argparse.ArgumentTypeError(f"{text}; give a number of documents (1, 2, ...) or a fraction in (0, 1)")
    return value


def cpu_devices(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cpu-devices",
        type=positive_int,
        default=8,
        help="fake CPU devices when no accelerator is present (default 8)",
    )


def multihost(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--coordinator", help="multi-host: coordinator host:port (TPU pods and SLURM are detected without it)"
    )
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)


def decoding_overrides(overrides: list[str]) -> list[str]:
    """mesh.data=1 unless an override sets it: one batch of requests on one host gains nothing
    from being split over data, and padding it up to the data size would multiply the work."""
    return overrides if any(o.startswith("mesh.data=") for o in overrides) else ["mesh.data=1", *overrides]


def checkpoint(p: argparse.ArgumentParser, help: str = "a run directory (trained or converted)") -> None:
    p.add_argument("--checkpoint", required=True, type=Path, help=help)


def evaluation():
    """ladder_jax.evaluation, imported on first use: it needs lm-eval (the `eval` extra), which
    takes a second to import."""
    try:
        from .. import evaluation
    except ImportError as e:
        raise ConfigError(f"this command needs lm-eval ({e}); pip install 'ladder_jax[eval]'") from None
    return evaluation


def metric_option(p: argparse.ArgumentParser, thresholds: str) -> None:
    p.add_argument(
        "--metric",
        default="perplexity",
        help="perplexity (default) or task:NAME[:METRIC], an lm-eval task's score (METRIC default acc); "
        f"with a task, {thresholds} are absolute score drops (0.01 = one point)",
    )
    p.add_argument("--limit", type=task_limit, help="--metric task: at most N documents of the task (or a fraction)")
    p.add_argument("--include-path", type=Path, help="--metric task: a directory of extra task YAMLs")
    p.add_argument(
        "--no-builtin-tasks", action="store_true", help="--metric task: look the task up in --include-path only"
    )


def metric_tasks(args):
    """The task manager for --metric task:NAME (None for perplexity), checked before anything loads."""
    if args.metric == "perplexity":
        return None
    if args.no_builtin_tasks and args.include_path is None:
        raise ConfigError("--no-builtin-tasks needs --include-path DIR")
    return evaluation().parse_metric(args.metric, args.include_path, not args.no_builtin_tasks)


def task_measure(run, args, tasks):
    """(label, plan -> score) of --metric task:NAME on `run`, or None for perplexity."""
    return evaluation().task_measure(run, args.metric, tasks, args.limit) if tasks else None
