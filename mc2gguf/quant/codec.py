"""Quantize and dequantize whole 2D tensors into any type of the table in ``types.py``.

``quantize`` returns the exact bytes ggml reads (``[rows, row_bytes]`` uint8); ``dequantize`` is its
inverse. Scalar-grid types go through mc2gguf's own torch quantizers (``GRID_FORMATS``), codebook types
through ggml's C quantizer, plain float types are converted.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import Mc2ggufError
from .types import Packer, QuantType
from .ggml_lib import ggml_quantize
from .grid import GridFormat
from .kquants import KQUANT_FORMATS
from .legacy import LEGACY_FORMATS
from .ternary import TERNARY_FORMATS

GRID_FORMATS: dict[str, GridFormat] = {**LEGACY_FORMATS, **TERNARY_FORMATS, **KQUANT_FORMATS}

# Weights quantized per step. The scale searches pass over chunk-sized temporaries many times: 1 MB ones stay
# in cache (several times faster than larger ones) yet amortise the per-call overhead of torch's operations.
_WEIGHTS_PER_CHUNK = 1 << 18

_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def grid_format(qtype: QuantType) -> GridFormat:
    try:
        return GRID_FORMATS[qtype.name]
    except KeyError:
        raise Mc2ggufError(f"{qtype.name} is not a scalar-grid type") from None


def _importance_blocks(importance: torch.Tensor | None, rows: int, cols: int, block: int) -> torch.Tensor:
    if importance is None:
        return torch.ones(rows * cols // block, block)
    return importance.to(torch.float32).reshape(1, cols // block, block).expand(rows, -1, -1).reshape(-1, block)


def quantize(weights: torch.Tensor, qtype: QuantType, importance: torch.Tensor | None = None) -> np.ndarray:
    """``weights`` ``[rows, cols]`` -> ggml bytes ``[rows, row_bytes]``.

    ``importance`` ``[cols]`` weights each column's squared error (an imatrix row or a Hessian diagonal).
    """
    weights = weights.detach().to(torch.float32)
    rows, cols = weights.shape
    if qtype.packer is Packer.FLOAT:
        return weights.to(_FLOAT_DTYPES[qtype.name]).contiguous().view(torch.uint8).numpy()
    if not qtype.fits(cols):
        raise Mc2ggufError(f"{qtype.name} needs rows that are a multiple of {qtype.block_size}, got {cols}")
    if qtype.packer is Packer.CODEBOOK:
        imp = None if importance is None else importance.to(torch.float32).numpy()
        if imp is None and qtype.needs_importance:
            imp = np.ones(cols, dtype=np.float32)
        return ggml_quantize(weights.numpy(), qtype, imp)
    fmt = grid_format(qtype)
    blocks = weights.reshape(-1, qtype.block_size)
    imp = _importance_blocks(importance, rows, cols, qtype.block_size)
    out = torch.empty(blocks.shape[0], qtype.type_size, dtype=torch.uint8)
    blocks_per_chunk = max(1, _WEIGHTS_PER_CHUNK // qtype.block_size)
    for start in range(0, blocks.shape[0], blocks_per_chunk):
        chunk = slice(start, start + blocks_per_chunk)
        scales = fmt.choose_scales(blocks[chunk], imp[chunk])
        out[chunk] = fmt.pack(fmt.round_to_grid(blocks[chunk], scales, 0), scales)
    return out.reshape(rows, -1).numpy()


def dequantize(data: np.ndarray, qtype: QuantType, cols: int) -> torch.Tensor:
    """ggml bytes ``[rows, row_bytes]`` -> float32 ``[rows, cols]``."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    rows = data.shape[0]
    if qtype.packer is Packer.FLOAT:
        return torch.from_numpy(data.copy()).view(_FLOAT_DTYPES[qtype.name]).reshape(rows, cols).to(torch.float32)
    if qtype.packer is Packer.CODEBOOK:
        from gguf.quants import dequantize as gguf_dequantize

        return torch.from_numpy(gguf_dequantize(data, qtype.ggml_type)).reshape(rows, cols)
    fmt = grid_format(qtype)
    codes, scales = fmt.unpack(torch.from_numpy(data.copy()).reshape(-1, qtype.type_size))
    return fmt.dequantize_codes(codes, scales).reshape(rows, cols)
