"""GPTQ onto the GGUF types' own grids (``mc2gguf.quant.gptq``).

A small random layer with a realistic Hessian (correlated input features, a few channels of large variance):
GPTQ must beat round-to-nearest on the same grid in Hessian-weighted output error, with act_order on and off,
and the bytes it writes must be exactly the weights it optimised (gguf-py's dequantizer is the reference).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from mc2gguf.errors import Mc2ggufError
from mc2gguf.quant.gptq import GPTQResult, gptq_quantize, output_error, rtn_quantize
from mc2gguf.quant.types import QUANT_TYPES, Packer
from mc2gguf.quant.codec import dequantize

ROWS, COLS, TOKENS = 32, 512, 2048
GRID_TYPES = [n for n, t in QUANT_TYPES.items() if t.packer is Packer.GRID]
CODEBOOK_TYPES = ["IQ4_XS", "IQ3_S", "IQ2_XXS"]
# act_order on a representative subset (symmetric / affine legacy, K-quants, ternary, codebook), for time
ACT_ORDER_TYPES = ["Q8_0", "Q4_0", "Q5_1", "Q6_K", "Q4_K", "Q2_K", "TQ1_0", "IQ4_XS", "IQ2_XXS"]
MARGIN = 0.95  # GPTQ's error must be at most this fraction of RTN's (observed: 0.55 .. 0.81)
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _layer(seed: int = 0, rows: int = ROWS, cols: int = COLS) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``[rows, cols]`` and the mean Hessian ``X^T X / n`` of correlated activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    scale = torch.ones(cols)
    scale[torch.randperm(cols, generator=g)[:8]] = 10.0  # a few large-variance channels
    x = (torch.randn(TOKENS, cols, generator=g) @ mix + 0.3 * torch.randn(TOKENS, cols, generator=g)) * scale
    return torch.randn(rows, cols, generator=g) * 0.02, x.T @ x / TOKENS


@functools.cache
def _results(name: str) -> dict[str, tuple[GPTQResult, float]]:
    """RTN and GPTQ (act_order off and on) for ``name`` on the shared layer, with their output errors."""
    w, h = _layer()
    qtype = QUANT_TYPES[name]
    runs = {"rtn": lambda: rtn_quantize(w, h, qtype), "gptq": lambda: gptq_quantize(w, h, qtype)}
    if name in ACT_ORDER_TYPES:
        runs["gptq-act"] = lambda: gptq_quantize(w, h, qtype, act_order=True)
    return {key: (result, output_error(w, result.weights, h)) for key, run in runs.items() for result in [run()]}


@pytest.fixture(params=GRID_TYPES + CODEBOOK_TYPES)
def qtype_name(request):
    if QUANT_TYPES[request.param].packer is Packer.CODEBOOK:
        request.getfixturevalue("llama_build")  # ggml's quantizer
    return request.param


def _check_bytes(result: GPTQResult, rows: int = ROWS, cols: int = COLS) -> None:
    qtype = result.qtype
    assert result.data.dtype == np.uint8 and result.data.shape == (rows, qtype.row_bytes(cols))
    assert result.weights.dtype == torch.float32 and result.weights.shape == (rows, cols)
    assert torch.isfinite(result.weights).all()
    reference = torch.from_numpy(gguf_dequantize(result.data, qtype.ggml_type)).reshape(rows, cols)
    assert torch.equal(reference, result.weights)
    assert torch.equal(dequantize(result.data, qtype, cols), result.weights)


# --- GPTQ against RTN, every grid type and a few codebook types -----------------------------------------


@pytest.mark.parametrize("act_order", [False, True], ids=["sequential", "act-order"])
def test_gptq_beats_rtn(qtype_name, act_order):
    if act_order and qtype_name not in ACT_ORDER_TYPES:
        pytest.skip("act_order is tested on a subset of the types")
    res = _results(qtype_name)
    rtn_error = res["rtn"][1]
    error = res["gptq-act" if act_order else "gptq"][1]
    ratio = error / rtn_error
    print(f"{qtype_name} act_order={act_order}: GPTQ / RTN output error = {ratio:.3f}")
    assert rtn_error > 0 and ratio <= MARGIN


def test_written_bytes_are_the_optimised_weights(qtype_name):
    for result, _ in _results(qtype_name).values():
        _check_bytes(result)


# --- block sizes, dead columns, degenerate Hessians, float types -----------------------------------------


def test_block_size_not_a_multiple_of_the_ggml_block():
    w, h = _layer()
    qtype = QUANT_TYPES["Q4_K"]  # 256-weight blocks: batches of 100 columns become 256
    result = gptq_quantize(w, h, qtype, block_size=100)
    _check_bytes(result)
    assert output_error(w, result.weights, h) == pytest.approx(_results("Q4_K")["gptq"][1], rel=0.02)


@pytest.mark.parametrize("name", ["Q4_0", "IQ4_XS"])
def test_dead_columns(name, request):
    if QUANT_TYPES[name].packer is Packer.CODEBOOK:
        request.getfixturevalue("llama_build")
    w, h = _layer()
    dead = torch.zeros(COLS, dtype=torch.bool)
    dead[:32] = True  # a whole 32-block (for IQ4_XS: its first 256-block goes last in act order) ...
    dead[torch.arange(0, COLS, 7)] = True  # ... and columns scattered through the others
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    qtype = QUANT_TYPES[name]
    rtn = rtn_quantize(w, h, qtype)
    for act_order in (False, True):
        result = gptq_quantize(w, h, qtype, act_order=act_order)
        _check_bytes(result)
        assert output_error(w, result.weights, h) <= MARGIN * output_error(w, rtn.weights, h)
        # the dead columns keep their weights (rounded), not zeroed as the GPTQ reference does
        kept = result.weights[:, dead]
        assert torch.corrcoef(torch.stack([kept.flatten(), w[:, dead].flatten()]))[0, 1] > 0.9


@pytest.mark.parametrize("name", ["Q4_K", "IQ4_XS"])
def test_no_calibration_data_is_round_to_nearest(name, request):
    """An expert no calibration token reached (H == 0): GPTQ degenerates to RTN with uniform importance."""
    if QUANT_TYPES[name].packer is Packer.CODEBOOK:
        request.getfixturevalue("llama_build")
    w, _ = _layer()
    h = torch.zeros(COLS, COLS)
    result = gptq_quantize(w, h, QUANT_TYPES[name])
    _check_bytes(result)
    assert np.array_equal(result.data, rtn_quantize(w, h, QUANT_TYPES[name]).data)


def test_indefinite_hessian_raises_the_dampening():
    w, h = _layer()
    h = h - 2.0 * torch.linalg.eigvalsh(h.double())[-1].float() * torch.eye(COLS) / COLS  # negative eigenvalues
    with pytest.warns(UserWarning, match="not positive definite"):
        result = gptq_quantize(w, h, QUANT_TYPES["Q4_0"], damp=0.01)
    assert result.damp > 0.01
    _check_bytes(result)


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_float_types_convert(name):
    w, h = _layer(rows=4)
    result = gptq_quantize(w, h, QUANT_TYPES[name])
    assert torch.equal(result.weights, w.to(_FLOAT_DTYPES[name]).float())
    _check_bytes(result, rows=4)


def test_bad_shapes():
    w, h = _layer(rows=4)
    with pytest.raises(Mc2ggufError):
        gptq_quantize(w[:, :300], h[:300, :300], QUANT_TYPES["Q4_0"])
    with pytest.raises(ValueError):
        gptq_quantize(w, h[:256, :256], QUANT_TYPES["Q4_0"])


def test_output_error():
    w, h = _layer(rows=4)
    assert output_error(w, w, h) == 0.0
    e = torch.randn(4, COLS, generator=torch.Generator().manual_seed(3)).double() * 1e-3
    expected = float(torch.trace(e @ h.double() @ e.T))
    assert output_error(w, w.double() - e, h) == pytest.approx(expected, rel=1e-9)


def test_codebook_rows_are_their_blocks_concatenated(llama_build):
    """GPTQ quantizes a codebook type block by block: a row's bytes must be its blocks' bytes in order."""
    from mc2gguf.quant.ggml_lib import ggml_quantize

    w, h = _layer(rows=8)
    importance = h.diagonal().numpy()
    for name in CODEBOOK_TYPES:
        qtype = QUANT_TYPES[name]
        whole = ggml_quantize(w.numpy(), qtype, importance)
        blocks = [ggml_quantize(w[:, s : s + 256].numpy(), qtype, importance[s : s + 256]) for s in range(0, COLS, 256)]
        assert np.array_equal(whole, np.concatenate(blocks, axis=1)), name
