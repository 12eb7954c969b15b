"""One GGUF type for every tensor of a model, and its bytes (``mc2gguf convert --type T``, and PMQ's non-expert
tensors).

``uniform_plan`` gives every weight matrix the requested type, with llama.cpp's usual exceptions (norms, biases and
the routers stay F32, the output projection gets at least Q6_K, as llama-quantize does); a type whose
blocks do not divide a tensor's rows falls back to the nearest type that fits, with a warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..archs import Role, TensorSpec
from .types import Packer, QuantType, fallback_type, quant_type


@dataclass(frozen=True)
class TensorPlan:
    spec: TensorSpec
    qtype: QuantType

    @property
    def nbytes(self) -> int:
        return math.prod(self.spec.shape[:-1]) * self.qtype.row_bytes(self.spec.row_length)


@dataclass(frozen=True)
class Plan:
    tensors: list[TensorPlan]
    warnings: list[str]


def _wanted_type(spec: TensorSpec, requested: QuantType) -> QuantType:
    if spec.role in (Role.NORM, Role.BIAS, Role.ROUTER) or len(spec.shape) == 1:
        return quant_type("F32")
    if spec.role is Role.OUTPUT and requested.packer is not Packer.FLOAT:
        q6 = quant_type("Q6_K")
        return requested if requested.bits_per_weight >= q6.bits_per_weight else q6
    if spec.role is Role.EMBEDDING and requested.packer is Packer.CODEBOOK:
        return quant_type("Q4_K")  # no importance data for the embedding rows; llama-quantize does the same
    return requested


def uniform_plan(specs: list[TensorSpec], requested: QuantType) -> Plan:
    tensors, warnings = [], []
    for spec in specs:
        wanted = _wanted_type(spec, requested)
        chosen = fallback_type(wanted, spec.row_length)
        if chosen is not wanted:
            warnings.append(
                f"{spec.name}: row length {spec.row_length} is not a multiple of {wanted.name}'s block size "
                f"{wanted.block_size}; using {chosen.name}"
            )
        tensors.append(TensorPlan(spec, chosen))
    return Plan(tensors, warnings)


def encode_tensor(plan: TensorPlan) -> np.ndarray:
    """Load one tensor and quantize it: ``[..., row_bytes]`` uint8 (experts one at a time)."""
    from .codec import quantize

    weights = plan.spec.load()
    if weights.ndim == 1:
        return quantize(weights[None, :], plan.qtype)[0]
    if weights.ndim == 2:
        return quantize(weights, plan.qtype)
    return np.stack([quantize(w, plan.qtype) for w in weights])
