"""`convert from-hf`, `convert to-hf`: Hugging Face Llama directories in and out."""

from __future__ import annotations

from ..interop import hf
from ..mesh import init_runtime
from ._common import cpu_devices, verb_group


def add(sub) -> None:
    _, verbs = verb_group(sub, "convert", "Hugging Face Llama checkpoints in and out", hf.__doc__)
    a = verbs.add_parser("from-hf", help="HF Llama directory -> run directory")
    a.add_argument("hf_dir", help="a Hugging Face Llama model directory (config.json, *.safetensors, tokenizer files)")
    a.add_argument("out_run", help="the run directory to write; must not exist or be empty")
    a.add_argument(
        "--plan", default="standard", help="layer plan of the run, e.g. standard,ladder@-16: (default standard)"
    )
    a.add_argument(
        "--dtype", choices=list(hf.NUMPY_DTYPES), help="parameter and compute dtype (default: the checkpoint's)"
    )
    a.add_argument(
        "--tensor",
        type=int,
        default=1,
        help="the run's mesh.tensor; the parameters are split over this many devices while converting (default 1)",
    )
    cpu_devices(a)
    a.set_defaults(handler=from_hf)
    b = verbs.add_parser("to-hf", help="standard-plan run -> HF Llama directory")
    b.add_argument("run", help="run directory with a standard-plan checkpoint; its latest step is exported")
    b.add_argument(
        "out_dir", help="the directory to write (model.safetensors, config.json, tokenizer); must not exist or be empty"
    )
    b.add_argument(
        "--dtype", choices=list(hf.NUMPY_DTYPES), help="dtype of the written tensors (default: the run's param_dtype)"
    )
    b.add_argument(
        "--max-shard-mb",
        type=float,
        default=5000,
        help="largest safetensors file before splitting into shards (default 5000)",
    )
    cpu_devices(b)
    b.set_defaults(handler=to_hf)


def from_hf(args) -> int:
    init_runtime(args.cpu_devices)
    cfg = hf.from_hf(args.hf_dir, args.out_run, args.plan, args.dtype, args.tensor)
    print(f"wrote {args.out_run}: {cfg.model.n_layers} layers, plan '{cfg.model.plan}', {cfg.model.param_dtype}")
    print(f"fine-tune: python train.py --init-from {args.out_run} --config {args.out_run}/config.yaml train.data=...")
    return 0


def to_hf(args) -> int:
    init_runtime(args.cpu_devices)
    hf.to_hf_dir(args.run, args.out_dir, args.dtype, int(args.max_shard_mb * 10**6))
    print(f"wrote {args.out_dir}: LlamaForCausalLM.from_pretrained('{args.out_dir}') loads it")
    return 0
