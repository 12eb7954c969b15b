"""Generic tests of the packers, over every type of ``mc2gguf.quant.types.QUANT_TYPES``.

The reference is gguf-py's dequantizer (what the written bytes mean to llama.cpp) and ggml's own quantizer
from the pinned llama.cpp build (what our scalar-grid quantizers must match or beat).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from mc2gguf.quant.types import QUANT_TYPES, Packer, QuantType, fallback_type
from mc2gguf.quant.codec import GRID_FORMATS, dequantize, quantize
from mc2gguf.quant.grid import BlockScales, GridFormat, search_symmetric_scale

ROWS, COLS = 32, 512
ALL_TYPES = list(QUANT_TYPES)
GRID_TYPES = [n for n, t in QUANT_TYPES.items() if t.packer is Packer.GRID]
CODEBOOK_TYPES = [n for n, t in QUANT_TYPES.items() if t.packer is Packer.CODEBOOK]


# --- fixtures and helpers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ggml(llama_build):
    """ggml's quantizer from the pinned llama.cpp build."""
    from mc2gguf.quant.ggml_lib import ggml_quantize

    return ggml_quantize


def _grid_format(name: str) -> GridFormat:
    if name not in GRID_FORMATS:
        pytest.skip(f"{name}'s quantizer is not registered in GRID_FORMATS yet")
    return GRID_FORMATS[name]


def _weights(dist: str, seed: int = 0, rows: int = ROWS, cols: int = COLS) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dist == "gauss":
        return torch.randn(rows, cols, generator=g)
    if dist == "t3":  # Student-t with 3 degrees of freedom: heavy tails, like real weight outliers
        z = torch.randn(rows, cols, generator=g)
        chi2 = (torch.randn(rows, cols, 3, generator=g) ** 2).sum(-1)
        return z / torch.sqrt(chi2 / 3)
    raise ValueError(dist)


def _round_trip_weights() -> torch.Tensor:
    w = _weights("gauss", seed=1) * 0.02
    w[3] = 0.0  # an all-zero row
    w[7, 100] = 5.0  # a row with one huge outlier (250 sigma, still far inside fp16)
    return w


def _importance(kind: str, cols: int = COLS, seed: int = 2) -> torch.Tensor:
    if kind == "uniform":
        return torch.ones(cols)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(cols, generator=g) * 4 + 0.05


def _deq_gguf(data: np.ndarray, qtype: QuantType, rows: int) -> np.ndarray:
    return gguf_dequantize(data, qtype.ggml_type).reshape(rows, -1)


def _weighted_error(w: torch.Tensor, deq, imp: torch.Tensor) -> float:
    deq = torch.as_tensor(np.asarray(deq), dtype=torch.float64)
    return float((imp.double() * (w.double() - deq) ** 2).sum())


def _quantizer_values(fmt: GridFormat, w: torch.Tensor, imp: torch.Tensor) -> torch.Tensor:
    """What the quantizer itself produced, before packing: the scales and codes dequantized in torch."""
    rows, cols = w.shape
    blocks = w.reshape(-1, fmt.block_size)
    imp_blocks = imp.reshape(1, -1, fmt.block_size).expand(rows, -1, -1).reshape(-1, fmt.block_size)
    scales = fmt.choose_scales(blocks, imp_blocks)
    return fmt.dequantize_codes(fmt.round_to_grid(blocks, scales, 0), scales).reshape(rows, cols)


# --- round trip: the bytes mean to llama.cpp exactly what the quantizer produced ---------------------------


@pytest.mark.parametrize("name", ALL_TYPES)
def test_round_trip(name, request):
    qtype = QUANT_TYPES[name]
    if qtype.packer is Packer.GRID:
        fmt = _grid_format(name)
    elif qtype.packer is Packer.CODEBOOK:
        request.getfixturevalue("ggml")
    w, imp = _round_trip_weights(), _importance("random")

    data = quantize(w, qtype, imp)
    assert data.dtype == np.uint8 and data.shape == (ROWS, qtype.row_bytes(COLS))
    ref = _deq_gguf(data, qtype, ROWS)
    ours = dequantize(data, qtype, COLS)
    assert ours.dtype == torch.float32 and np.isfinite(ref).all()
    np.testing.assert_array_equal(ours.numpy(), ref)
    if qtype.packer is Packer.GRID:
        np.testing.assert_array_equal(_quantizer_values(fmt, w, imp).numpy(), ref)
        blocks = torch.from_numpy(data).reshape(-1, qtype.type_size)
        assert torch.equal(fmt.pack(*fmt.unpack(blocks)), blocks), "pack is not the inverse of unpack"
        assert not ref[3].any(), "an all-zero row must stay zero"
    elif qtype.packer is Packer.FLOAT:
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[name]
        np.testing.assert_array_equal(ref, w.to(dtype).float().numpy())


# --- our scalar-grid quantizers are never worse than ggml's ----------------------------------------------


@pytest.mark.parametrize("imp_kind", ["uniform", "random"])
@pytest.mark.parametrize("dist", ["gauss", "t3"])
@pytest.mark.parametrize("name", GRID_TYPES)
def test_grid_error_not_worse_than_ggml(name, dist, imp_kind, ggml):
    qtype, fmt = QUANT_TYPES[name], _grid_format(name)
    w, imp = _weights(dist, seed=3), _importance(imp_kind)
    ours = _weighted_error(w, dequantize(quantize(w, qtype, imp), qtype, COLS), imp)
    # ggml's best effort: its reference quantizer (no importance) or its importance-aware one, if different.
    theirs = min(_weighted_error(w, _deq_gguf(ggml(w.numpy(), qtype, imp_np), qtype, ROWS), imp)
                 for imp_np in (None, imp.numpy()))
    assert ours <= theirs, f"{name} {dist} {imp_kind}: ours/ggml = {ours / theirs:.4f}"


@pytest.mark.parametrize("name", GRID_TYPES)
def test_grid_repacks_ggml_bytes(name, ggml):
    """``unpack`` reads ggml's own bytes, and ``pack`` writes them back identically."""
    qtype, fmt = QUANT_TYPES[name], _grid_format(name)
    w, imp = _weights("t3", seed=4), _importance("random")
    blocks = torch.from_numpy(ggml(w.numpy(), qtype, imp.numpy())).reshape(-1, qtype.type_size)
    codes, scales = fmt.unpack(blocks)
    np.testing.assert_array_equal(fmt.dequantize_codes(codes, scales).reshape(ROWS, COLS).numpy(),
                                  _deq_gguf(blocks.numpy(), qtype, ROWS))
    assert torch.equal(fmt.pack(codes, scales), blocks)


# --- codebook types go through ggml ----------------------------------------------------------------------


@pytest.mark.parametrize("name", CODEBOOK_TYPES)
def test_codebook_quantizes(name, ggml):
    qtype = QUANT_TYPES[name]
    w, imp = _weights("gauss", seed=5), _importance("random")
    data = quantize(w, qtype, imp)
    assert data.dtype == np.uint8 and data.shape == (ROWS, qtype.row_bytes(COLS))
    deq = dequantize(data, qtype, COLS)
    rel = _weighted_error(w, deq, imp) / _weighted_error(w, torch.zeros_like(w), imp)
    assert np.isfinite(rel) and rel < 0.5, f"{name}: relative weighted error {rel:.3f}"


@pytest.mark.parametrize("name", CODEBOOK_TYPES + ["Q4_K", "Q8_0"])
def test_ggml_threads_and_dequantizer(name, ggml):
    """ggml's quantizer writes the same bytes in row chunks on any number of threads (more threads than rows
    too), and ggml's C dequantizer reads them as gguf-py does."""
    from mc2gguf.quant.ggml_lib import ggml_dequantize

    qtype = QUANT_TYPES[name]
    w, imp = _weights("t3", seed=6).numpy() * 0.02, _importance("random").numpy()
    one = ggml(w, qtype, imp, threads=1)
    for threads in (2, 3, ROWS + 5):
        np.testing.assert_array_equal(ggml(w, qtype, imp, threads=threads), one)
    for threads in (1, 3):
        np.testing.assert_array_equal(ggml_dequantize(one, qtype, COLS, threads=threads), _deq_gguf(one, qtype, ROWS))
    with pytest.raises(ValueError, match="bytes"):
        ggml_dequantize(one[:, :-1], qtype, COLS)


# --- ternary types ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["TQ1_0", "TQ2_0"])
def test_ternary_layout(name):
    """Every code pattern (all 243 five-trit bytes of TQ1_0 included) decodes in gguf-py as packed."""
    fmt = _grid_format(name)
    g = torch.Generator().manual_seed(6)
    codes = torch.randint(-1, 2, (512, 256), generator=g).to(torch.float32)
    d = (torch.rand(512, generator=g) - 0.5).to(torch.float16).abs().to(torch.float32)
    scales = BlockScales(scale=d[:, None], bias=torch.zeros(512, 1), fields={"d": d})
    data = fmt.pack(codes, scales)
    if name == "TQ1_0":
        assert len(torch.unique(data[:, :48])) == 243, "not every five-trit byte was exercised"
    np.testing.assert_array_equal(gguf_dequantize(data.numpy(), fmt.qtype.ggml_type).reshape(512, 256),
                                  (d[:, None] * codes).numpy())
    back, back_scales = fmt.unpack(data)
    assert torch.equal(back, codes) and torch.equal(back_scales.scale, scales.scale)


def test_ternary_scale_is_optimal():
    """The exact search beats the generic symmetric search and any scale of a dense scan, block by block."""
    from mc2gguf.quant.ternary import ternary_scale

    x = _weights("t3", seed=7, rows=64, cols=256)
    imp = torch.rand(64, 256, generator=torch.Generator().manual_seed(8)) + 0.01

    def err(s):
        q = torch.round(x / s[:, None]).nan_to_num(0.0).clamp(-1, 1)
        return (imp * (x - s[:, None] * q) ** 2).sum(-1)

    best = err(ternary_scale(x, imp))
    assert (best <= err(search_symmetric_scale(x, imp, -1, 1).abs()) * (1 + 1e-5)).all()
    amax = x.abs().max(-1).values
    for frac in torch.linspace(0.01, 1.0, 200).tolist():
        assert (best <= err(amax * frac) * (1 + 1e-5)).all()


# --- fallback types --------------------------------------------------------------------------------------


def test_fallback_type():
    q = QUANT_TYPES
    assert fallback_type(q["Q4_K"], 4096) is q["Q4_K"]  # fits: kept
    # 2880 = 90 * 32, not a multiple of 256: the cheapest 32-block type with at least as many bits
    assert fallback_type(q["Q4_K"], 2880) is q["Q4_0"]
    assert fallback_type(q["Q2_K"], 2880) is q["Q4_0"]
    assert fallback_type(q["IQ1_S"], 2880) is q["Q4_0"]
    assert fallback_type(q["Q6_K"], 2880) is q["Q8_0"]
    # no block type fits 100: F16
    assert fallback_type(q["Q4_K"], 100) is q["F16"]
