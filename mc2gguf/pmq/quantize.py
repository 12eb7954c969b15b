"""PMQ's quantization: GPTQ of every expert projection onto its chosen type with the Hessian of the tokens
routed to it (or the eps stage's bytes of exactly that, where it kept them); the other matrices in their
plan's type. In sequential mode a layer is calibrated on the outputs of the already-quantized earlier layers."""

from __future__ import annotations

import sys

import numpy as np
import torch
from tqdm import tqdm

from ..quant import codec
from ..archs import PROJECTIONS, ArchAdapter
from ..quant.gptq import GPTQ
from ..quant.plan import TensorPlan, encode_tensor
from ..text import CalibrationSet
from .calibrate import calibrate_layer
from .measure import candidates_record
from .options import PMQOptions
from .traversal import WorkDir, layer_pass


def encoded_non_expert(plan: TensorPlan, measured: WorkDir) -> np.ndarray:
    """The bytes of a non-expert tensor (attention, embeddings, output). They depend on the checkpoint and the
    tensor's type alone, not on the budget or the layout, so they are kept beside the measurements: other budgets
    and layouts take them instead of quantizing again (45 s of a file's 86 s on the reference MoE)."""
    key = f"{plan.spec.name}.{plan.qtype.name}"
    if measured.has("tensors", key):
        return measured.load("tensors", key)
    data = encode_tensor(plan)
    measured.save("tensors", key, data)
    return data


def quantize_layers(adapter: ArchAdapter, cal: CalibrationSet, types: dict, non_expert, opts: PMQOptions,
                    measured: WorkDir, work: WorkDir) -> None:
    """GPTQ every expert projection onto its type (or take the eps stage's bytes of it). The bytes go to the work
    directory, one record ``{(expert, projection): bytes}`` per layer (the GGUF writer reads them back one layer
    at a time); the other matrices' bytes are ``encoded_non_expert``'s, in sequential mode too."""
    n = adapter.moe.n_layers
    records = {(i, t): candidates_record(i, t) for (i, _, _), t in types.items()}
    if not opts.sequential and all(measured.has("measure", r) for r in records.values()):
        for i in tqdm(range(n), unit="layer", desc="quantize (from the eps stage)", file=sys.stderr):
            if work.has("layers", f"layer-{i:03d}"):
                continue
            candidates = {t: measured.load("measure", r) for (layer, t), r in records.items() if layer == i}
            experts = {(e, p): candidates[types[i, e, p]][e, p]
                       for e in range(adapter.moe.n_experts if adapter.is_moe_layer(i) else 0) for p in PROJECTIONS}
            work.save("layers", f"layer-{i:03d}", experts)
            del candidates, experts
        return

    def step(i: int, h: torch.Tensor):
        layer = adapter.load_layer(i)
        experts = {}
        with torch.inference_mode():
            if opts.sequential:  # later computations see the quantized attention
                for plan in non_expert.get(i, []):
                    data = encoded_non_expert(plan, measured)
                    deq = codec.dequantize(data, plan.qtype, plan.spec.row_length).reshape(plan.spec.shape)
                    for name, value in plan.spec.to_checkpoint(deq).items():
                        layer.replace(name, value)
            h_full, calibration = calibrate_layer(adapter, layer, h, 0, opts.seed)
            for e, expert in enumerate(layer.experts):
                gptq = calibration.experts[e].quantizer(lambda h: GPTQ(h, opts.damp, opts.act_order).quantize)
                results = gptq({p: expert.get(p) for p in PROJECTIONS}, {p: types[i, e, p] for p in PROJECTIONS})
                for p, result in results.items():
                    experts[e, p] = result.data
                    if opts.sequential:
                        setattr(expert, p, result.weights)
            h = adapter.layer_forward(layer, h) if opts.sequential else h_full
        return h, experts

    layer_pass(adapter, cal.tokens, work, "layers", step, "quantize")
