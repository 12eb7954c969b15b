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

import shutil
import sys

import numpy as np
import torch

from ..archs import PROJECTIONS, ArchAdapter, ExpertWeights, LayerWeights
from ..text import CalibrationSet
from .calibrate import LayerCalibration, calibrate_layer
from .options import PMQOptions
from .traversal import WorkDir, layer_pass
from ..quant.gptq import GPTQ, rtn_quantize
from ..quant.types import QuantType, quant_type


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


def keeps_candidates(adapter: ArchAdapter, opts: PMQOptions, palette: list[QuantType], work: WorkDir) -> bool:
    """Whether the eps stage keeps its packed bytes for quantization: only where they are what it would write
    (the writer's GPTQ on the same Hessians: not in sequential mode, which calibrates on quantized layers), and
    only where they fit in half the free disk (every palette type of every expert: 1.3 GB on disk for the
    reference MoE, well over 100 GB for a Mixtral 8x7B)."""
    if opts.eps_method != "gptq" or opts.sequential:
        return False
    shapes = adapter.expert_shapes().values()
    per_expert = sum(rows * t.row_bytes(cols) for t in palette if all(t.fits(c) for _, c in shapes) for rows, cols in shapes)
    return per_expert * adapter.moe.n_experts * adapter.moe.n_layers < shutil.disk_usage(work.path).free // 2


def candidates_record(layer: int, qtype: QuantType) -> str:
    return f"candidates-{layer:03d}-{qtype.name}"


def measure_layers(adapter: ArchAdapter, cal: CalibrationSet, opts: PMQOptions, work: WorkDir) -> list[dict]:
    """Every layer's record: its calibration's significance (phi, w, ODP statistics) and ``eps`` per unit and type."""
    palette = [quant_type(t) for t in opts.palette]
    units = unit_projections(opts.granularity, opts.tie_gate_up)
    quantize = quantizer(opts.eps_method, opts.damp, opts.act_order)
    keep = keeps_candidates(adapter, opts, palette, work)

    def step(i: int, h: torch.Tensor):
        layer = adapter.load_layer(i)
        candidates = {} if keep else None
        with torch.inference_mode():
            h, calibration = calibrate_layer(adapter, layer, h, opts.eps_tokens, opts.seed)
            eps = measure_eps(adapter, layer, calibration, units, palette, quantize, candidates)
        if keep:  # before the layer's record, which marks the layer done
            for t in palette:  # one record per type: a file reads back only the types it chose
                work.save("measure", candidates_record(i, t), candidates.get(t.name, {}))
        if calibration.unused_experts:
            print(f"note: layer {i}: no calibration token selects expert(s) {calibration.unused_experts}; "
                  "they are measured on all of the layer's tokens", file=sys.stderr)
        return h, {**calibration.significance(), "eps": eps}

    layer_pass(adapter, cal.tokens, work, "measure", step, "measure")
    return [work.load("measure", f"layer-{i:03d}") for i in range(adapter.moe.n_layers)]
