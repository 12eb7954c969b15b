"""ggml's own quantizer, called through its C API from the pinned llama.cpp build.

Used to pack the codebook (IQ) types, whose lattice searches mc2gguf does not re-implement, and by the
tests as the reference our scalar-grid quantizers must match or beat.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from ..errors import Mc2ggufError
from ..qtypes import QuantType


@functools.cache
def _library() -> ctypes.CDLL:
    from ..llama_build import find_llama_build

    lib = ctypes.CDLL(str(find_llama_build().ggml_library))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def ggml_quantize(weights: np.ndarray, qtype: QuantType, importance: np.ndarray | None = None) -> np.ndarray:
    """Quantize ``weights`` ``[rows, n]`` with ggml's quantizer; ``importance`` is ``[n]`` (an imatrix row).

    Returns ``[rows, row_bytes]`` uint8.
    """
    lib = _library()
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    rows, n = weights.shape
    if not qtype.fits(n):
        raise Mc2ggufError(f"{qtype.name} needs rows that are a multiple of {qtype.block_size}, got {n}")
    if importance is None and lib.ggml_quantize_requires_imatrix(qtype.ggml_type.value):
        raise Mc2ggufError(f"ggml cannot quantize {qtype.name} without importance weights")
    imatrix = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    if imatrix is not None and imatrix.shape != (n,):
        raise ValueError(f"importance must have shape ({n},), got {imatrix.shape}")
    out = np.empty((rows, qtype.row_bytes(n)), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(
        qtype.ggml_type.value, weights.ctypes.data, out.ctypes.data, 0, rows, n,
        None if imatrix is None else imatrix.ctypes.data,
    )
    if written != out.nbytes:
        raise Mc2ggufError(f"ggml wrote {written} bytes for {qtype.name}, expected {out.nbytes}")
    return out
