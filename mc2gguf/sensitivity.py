"""eps_{i,t}: the MoE layer's output error when only expert i (or some of its projections) is quantized
to type t with the real quantizer.

The exact quantity. Let ``R_i`` be the calibration tokens routed to expert ``i`` (a seeded sample of them),
``w_t`` their routing weights and ``E_i(x)`` the expert's output. Quantizing only (projections of) expert
``i`` changes the MoE layer's output on token ``t`` by ``w_t (E_i^q(x_t) - E_i(x_t))`` and nowhere else,
so the Frobenius norm of the layer's output change is ``||dY|| = sqrt(sum_t w_t^2 ||E_i^q(x_t) - E_i(x_t)||^2)``.
The objective multiplies by frequency ``phi_i`` and weight ``w_i`` already; to not count them twice,
``eps`` is that norm divided by ``sqrt(sum_t w_t^2)``: the routing-weighted RMS error of the layer output per
routed token, independent of how many tokens the expert gets and of their weights' scale.

The quantizer is the one that writes the file: GPTQ onto the GGUF type's real grid with the expert's
Hessian (``method="gptq"``, default), or the importance-weighted grid quantizer alone (``"rtn"``, faster).
Both use the type's true block layout and scales, never a nominal bit width.
"""

from __future__ import annotations

import numpy as np
import torch

from .archs import PROJECTIONS, ArchAdapter, ExpertWeights, LayerWeights
from .calibrate import LayerCalibration
from .gptq import GPTQ, rtn_quantize
from .qtypes import QuantType


def quantizer(method: str, damp: float = 0.01, act_order: bool = False):
    """``hessian -> ((weights, type) -> GPTQResult)``: the packed bytes and the values they hold. One Hessian's
    quantizer serves all of its matrices and types (GPTQ factors the Hessian once)."""
    if method == "gptq":
        return lambda h: GPTQ(h, damp, act_order).quantize
    if method == "rtn":
        return lambda h: lambda w, t: rtn_quantize(w, h, t)
    raise ValueError(f"unknown quantizer {method!r}")


def unit_projections(granularity: str, tie_gate_up: bool) -> list[tuple[str, ...]]:
    """How an expert's projections are grouped into allocation units (each unit gets one type)."""
    if granularity == "expert":
        return [PROJECTIONS]
    if granularity == "projection":
        return [("gate", "up"), ("down",)] if tie_gate_up else [(p,) for p in PROJECTIONS]
    raise ValueError(f"unknown granularity {granularity!r}")


def measure_eps(
    adapter: ArchAdapter,
    layer: LayerWeights,
    calibration: LayerCalibration,
    units: list[tuple[str, ...]],
    palette: list[QuantType],
    quantize,
    candidates: dict[str, dict[tuple[int, str], np.ndarray]] | None = None,
) -> dict[tuple[int, tuple[str, ...]], dict[str, float]]:
    """``{(expert, projections): {type name: eps}}`` for every expert and unit of one layer; ``quantize`` is a
    ``quantizer(...)``.

    ``candidates``, when given, receives the packed bytes of every quantization, ``{type name: {(expert,
    projection): bytes}}``: where they are what the writer would produce, quantization reuses them."""
    eps: dict[tuple[int, tuple[str, ...]], dict[str, float]] = {}
    for e, expert in enumerate(layer.experts):
        cal = calibration.experts[e]
        x, w = cal.sample_x, cal.sample_w
        reference = adapter.expert_activation(expert, x) @ expert.down.T
        norm = float(torch.sqrt((w**2).sum()).clamp_min(1e-30))
        quantize_expert = cal.quantizer(quantize)
        weights = {p: expert.get(p) for p in PROJECTIONS}
        for qtype in palette:
            if not all(qtype.fits(m.shape[1]) for m in weights.values()):
                continue
            results = quantize_expert(weights, dict.fromkeys(PROJECTIONS, qtype))
            quantized = {p: r.weights for p, r in results.items()}
            if candidates is not None:
                candidates.setdefault(qtype.name, {}).update({(e, p): r.data for p, r in results.items()})
            for projs in units:
                q = ExpertWeights(**{p: quantized[p] if p in projs else expert.get(p) for p in PROJECTIONS})
                y = adapter.expert_activation(q, x) @ q.down.T
                err = float(torch.linalg.norm((y - reference) * w[:, None])) / norm
                eps.setdefault((e, projs), {})[qtype.name] = err
    return eps
