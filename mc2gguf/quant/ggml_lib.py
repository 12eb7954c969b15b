"""ggml's own quantizer and dequantizer, called through its C API from the pinned llama.cpp build.

Used to pack the codebook (IQ) types, whose lattice searches mc2gguf does not re-implement, and by the
tests as the reference our scalar-grid quantizers must match or beat. GPTQ dequantizes every codebook block it
writes: ggml's C dequantizer does that about a hundred times faster than gguf-py's numpy one (which stays the
tests' oracle).

ggml's quantizers are single-threaded and rows are independent, so a matrix is quantized in row chunks on
``torch.get_num_threads()`` threads, as llama-quantize does (ctypes releases the GIL during the call).
"""

from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..errors import Mc2ggufError
from .types import QuantType


@functools.cache
def _library() -> ctypes.CDLL:
    from ..llama.build import find_llama_build

    lib = ctypes.CDLL(str(find_llama_build().ggml_library))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


_ToFloat = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    """``struct ggml_type_traits`` of ggml.h (pinned version)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", _ToFloat),
        ("from_float_ref", ctypes.c_void_p),
    ]


def _row_chunks(rows: int, threads: int | None) -> list[tuple[int, int]]:
    n = max(1, min(rows, threads or torch.get_num_threads()))
    bounds = [rows * k // n for k in range(n + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _parallel(chunks: list[tuple[int, int]], work) -> list:
    if len(chunks) == 1:
        return [work(*chunks[0])]
    with ThreadPoolExecutor(len(chunks)) as pool:
        return list(pool.map(lambda c: work(*c), chunks))


def ggml_quantize(weights: np.ndarray, qtype: QuantType, importance: np.ndarray | None = None,
                  threads: int | None = None) -> np.ndarray:
    """Quantize ``weights`` ``[rows, n]`` with ggml's quantizer; ``importance`` is ``[n]`` (an imatrix row).

    Returns ``[rows, row_bytes]`` uint8, the same bytes for any number of ``threads``.
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

    def rows_chunk(first: int, end: int) -> int:
        return lib.ggml_quantize_chunk(
            qtype.ggml_type.value, weights[first:end].ctypes.data, out[first:end].ctypes.data, 0, end - first, n,
            None if imatrix is None else imatrix.ctypes.data,
        )

    written = sum(_parallel(_row_chunks(rows, threads), rows_chunk))
    if written != out.nbytes:
        raise Mc2ggufError(f"ggml wrote {written} bytes for {qtype.name}, expected {out.nbytes}")
    return out


def ggml_dequantize(data: np.ndarray, qtype: QuantType, n: int, threads: int | None = None) -> np.ndarray:
    """ggml bytes ``[rows, row_bytes]`` of rows of ``n`` values -> float32 ``[rows, n]``, by ggml's own
    dequantizer (``to_float`` of the type's traits)."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    rows = data.shape[0]
    if data.shape != (rows, qtype.row_bytes(n)):
        raise ValueError(f"{qtype.name} rows of {n} values take {qtype.row_bytes(n)} bytes, got {data.shape}")
    to_float = _library().ggml_get_type_traits(qtype.ggml_type.value).contents.to_float
    if not to_float:
        raise Mc2ggufError(f"ggml has no dequantizer for {qtype.name}")
    out = np.empty((rows, n), dtype=np.float32)

    def rows_chunk(first: int, end: int) -> None:
        to_float(data[first:end].ctypes.data, out[first:end].ctypes.data, (end - first) * n)

    _parallel(_row_chunks(rows, threads), rows_chunk)
    return out
