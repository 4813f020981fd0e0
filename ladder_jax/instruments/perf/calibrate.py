"""Calibration of a hardware profile against the published Ladder Residual table: least squares on
log tokens/s over its eight points (70B, TP8, 8xH100 NVLink) for the constants in FIT_BOUNDS."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ...config import ModelConfig, load_config
from .cost import decode_structure, predict_one
from .hardware import Hardware, PerfModelError

# The published anchor (Ladder Residual, Zhang et al. 2025; docs/architecture.md, "Published anchors"): Llama-2-70B
# shape with vocab 32000, fp16 random weights, TP8 on 8xH100 NVLink, prompt 1024, 512 generated,
# total tokens/s over the whole generate call, prefill included.
ANCHOR_CONFIG = ("llama-2-70b", ("model.dtype=float16", "model.param_dtype=float16"))
ANCHOR_SHAPE = {"tensor": 8, "prompt": 1024, "gen": 512}
ANCHORS = [  # (variant, batch, tokens/s)
    ("standard", 1, 77.39),
    ("ladder", 1, 101.23),
    ("parallel", 1, 94.22),
    ("desync", 1, 110.59),
    ("standard", 4, 258.56),
    ("ladder", 4, 331.47),
    ("standard", 64, 1940.99),
    ("ladder", 64, 2241.84),
]
# The constants `calibrate` fits, and the physically plausible range it keeps each in.
FIT_BOUNDS = {
    "hbm_efficiency": (0.4, 0.95),
    "kernel_overhead_s": (0.5e-6, 8e-6),
    "allreduce_latency_s": (2e-6, 40e-6),
    "overlap_contention": (0.0, 0.6),
}


def anchor_model() -> ModelConfig:
    name, overrides = ANCHOR_CONFIG
    return load_config(name, list(overrides)).model


def fit_errors(hw: Hardware, m: ModelConfig, structures: dict) -> list[dict]:
    out = []
    for variant, batch, published in ANCHORS:
        r = predict_one(
            m,
            hw,
            ANCHOR_SHAPE["tensor"],
            variant,
            batch,
            ANCHOR_SHAPE["prompt"],
            ANCHOR_SHAPE["gen"],
            structures[variant],
        )
        out.append(
            {
                "variant": variant,
                "batch": batch,
                "published": published,
                "predicted": r["tokens_per_s"],
                "error_pct": 100 * (r["tokens_per_s"] / published - 1),
            }
        )
    return out


def _loss(hw: Hardware, m: ModelConfig, structures: dict) -> float:
    return sum(math.log(1 + e["error_pct"] / 100) ** 2 for e in fit_errors(hw, m, structures))


def calibrate(hw: Hardware, iterations: int = 40) -> tuple[Hardware, list[dict]]:
    """Least squares on log tokens/s over the anchor table for the constants in FIT_BOUNDS.

    Levenberg-Marquardt with a finite-difference Jacobian, in coordinates scaled to each
    constant's bounds (and clipped to them); eight residuals, four unknowns, numpy only.
    """
    m = anchor_model()
    structures = {v: decode_structure(m, ANCHOR_SHAPE["tensor"], v) for v in dict.fromkeys(a[0] for a in ANCHORS)}
    keys = list(FIT_BOUNDS)
    lo, hi = (np.array([FIT_BOUNDS[k][i] for k in keys]) for i in (0, 1))

    def at(u):
        return dataclasses.replace(hw, **{k: float(v) for k, v in zip(keys, lo + np.clip(u, 0, 1) * (hi - lo))})

    def residuals(u):
        return np.array([math.log(1 + e["error_pct"] / 100) for e in fit_errors(at(u), m, structures)])

    u = np.clip((np.array([getattr(hw, k) for k in keys]) - lo) / (hi - lo), 0, 1)
    r, damping = residuals(u), 1e-2
    for _ in range(iterations):
        jac = np.stack([(residuals(u + d) - r) / 1e-4 for d in np.eye(len(keys)) * 1e-4], axis=1)
        a, g = jac.T @ jac, jac.T @ r
        step = np.linalg.solve(a + damping * np.diag(np.diag(a) + 1e-12), -g)
        cand = np.clip(u + step, 0, 1)
        rc = residuals(cand)
        if rc @ rc < r @ r:
            converged = r @ r - rc @ rc < 1e-8  # the loss is ~1e-2: nothing visible left to gain
            u, r, damping = cand, rc, damping / 3
            if converged:
                break
        elif damping > 1e6:  # no step downhill however short: a minimum (or a bound)
            break
        else:
            damping *= 4
    best = at(u)
    return best, fit_errors(best, m, structures)


def published_speedups(m: ModelConfig, hw: Hardware, tensor: int, prompt: int, gen: int) -> dict:
    """{variant: [(batch, speed-up)]} of the anchor table when this is the anchor's setting."""
    if (m.name, hw.name, tensor, prompt, gen) != (ANCHOR_CONFIG[0], "h100-nvlink", *ANCHOR_SHAPE.values()):
        return {}
    base = {b: r for v, b, r in ANCHORS if v == "standard"}
    out: dict = {}
    for v, b, r in ANCHORS:
        out.setdefault(v, []).append((b, r / base[b]))
    return out


def format_fit(errors: list[dict]) -> str:
    lines = [f"{'variant':10s} {'batch':>5s} {'published':>10s} {'predicted':>10s} {'error':>8s}"]
    for e in errors:
        lines.append(
            f"{e['variant']:10s} {e['batch']:5d} {e['published']:10.2f} {e['predicted']:10.2f} {e['error_pct']:+7.1f}%"
        )
    rms = math.sqrt(sum(e["error_pct"] ** 2 for e in errors) / len(errors))
    lines.append(f"rms error {rms:.1f}%, max {max(abs(e['error_pct']) for e in errors):.1f}%")
    return "\n".join(lines)


def check_anchor_hardware(hw: Hardware, given: str) -> None:
    """Only the machine of the published table calibrates: h100-nvlink, or a YAML profile of it."""
    if hw.name != "h100-nvlink" and not given.endswith((".yaml", ".yml")):
        raise PerfModelError(
            f"the published table was measured on 8xH100 with NVLink; calibrate h100-nvlink (or a .yaml of that machine), "
            f"not '{hw.name}', whose software constants it inherits"
        )
