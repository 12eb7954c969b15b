"""The K-quant formats (Q2_K .. Q6_K): ggml's byte layout, bit-exact round trips, and quality against ggml.

gguf-py's dequantizer is the reference for what the bytes mean; ggml's own quantizer (from the pinned
llama.cpp build, skipped until it is built) is the reference our error must match or beat.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from mc2gguf.errors import Mc2ggufError
from mc2gguf.quant.types import QUANT_TYPES
from mc2gguf.quant.codec import GRID_FORMATS, dequantize, quantize
from mc2gguf.quant.kquants import KQUANT_FORMATS, KQuantFormat

NAMES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are small: on shared cores, torch's thread pool costs far more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ggml():
    from mc2gguf.llama.build import find_llama_build
    from mc2gguf.quant.ggml_lib import ggml_quantize

    try:
        find_llama_build()
    except Mc2ggufError as e:
        pytest.skip(f"ggml's quantizer needs the pinned llama.cpp build ({e})")
    return ggml_quantize


def _gguf(data: np.ndarray | torch.Tensor, name: str, rows: int) -> np.ndarray:
    return gguf_dequantize(np.asarray(data), QUANT_TYPES[name].ggml_type).reshape(rows, -1)


def _weights(dist: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if dist == "t3":  # Student-t, 3 degrees of freedom: heavy tails
        w = w / torch.sqrt((torch.randn(rows, cols, 3, generator=g) ** 2).sum(-1) / 3)
    elif dist == "outliers":  # 0.5% of the weights 20x larger
        w = torch.where(torch.rand(rows, cols, generator=g) < 0.005, 20 * w, w)
    return 0.02 * w


def _importance(kind: str, cols: int, seed: int) -> torch.Tensor:
    if kind == "uniform":
        return torch.ones(cols)
    return torch.exp(torch.randn(cols, generator=torch.Generator().manual_seed(seed)))


def test_registered():
    assert isinstance(GRID_FORMATS["Q4_K"], KQuantFormat)
    assert {n: GRID_FORMATS[n] for n in NAMES} == KQUANT_FORMATS


@pytest.mark.parametrize("name", NAMES)
def test_layout(name):
    """Random codes and every stored field value: gguf-py decodes the packed bytes to what we meant."""
    fmt = KQUANT_FORMATS[name]
    n = 512
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(fmt.qmin, fmt.qmax + 1, (n, 256), generator=g).to(torch.float32)
    d = (torch.randn(n, generator=g) * 0.01).to(torch.float16).to(torch.float32)
    sc = torch.randint(fmt.sc_min, fmt.sc_max + 1, (n, fmt.n_sub), generator=g)
    if fmt.affine:
        dmin = (torch.rand(n, generator=g) * 0.01).to(torch.float16).to(torch.float32)
        m = torch.randint(0, fmt.m_max + 1, (n, fmt.n_sub), generator=g)
        scales = fmt._from_fields(d, sc, dmin, m)
    else:
        scales = fmt._from_fields(d, sc)
    data = fmt.pack(codes, scales)
    assert data.dtype == torch.uint8 and data.shape == (n, fmt.qtype.type_size)
    expected = d[:, None, None] * sc[:, :, None] * codes.reshape(n, fmt.n_sub, -1)
    if fmt.affine:
        expected = expected - (dmin[:, None] * m)[:, :, None]
    np.testing.assert_allclose(_gguf(data, name, n), expected.reshape(n, 256).numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(_gguf(data, name, n), fmt.dequantize_codes(codes, scales).numpy())
    back, back_scales = fmt.unpack(data)
    assert torch.equal(back, codes)
    for key, value in scales.fields.items():
        assert torch.equal(back_scales.fields[key], value), key
    assert torch.equal(fmt.pack(back, back_scales), data)


def _edge_rows() -> torch.Tensor:
    rows = [torch.zeros(512)]  # all zero
    for index, value in ((17, 0.5), (300, -3.0)):  # a single non-zero weight
        r = torch.zeros(512)
        r[index] = value
        rows.append(r)
    rows += [torch.full((512,), 0.3), torch.full((512,), -0.3)]  # constant blocks
    r = _weights("gauss", 1, 512, 2)[0]
    r[100] = 5.0  # a 250-sigma outlier
    rows.append(r)
    return torch.stack(rows + list(_weights("t3", 10, 512, 3)))


@pytest.mark.parametrize("name", NAMES)
def test_round_trip(name):
    """The bytes mean to gguf-py exactly what the quantizer produced, also on degenerate blocks."""
    fmt, qtype = KQUANT_FORMATS[name], QUANT_TYPES[name]
    w, imp = _edge_rows(), _importance("random", 512, 4)
    rows = w.shape[0]
    data = quantize(w, qtype, imp)
    ref = _gguf(data, name, rows)
    assert np.isfinite(ref).all()
    np.testing.assert_array_equal(dequantize(data, qtype, 512).numpy(), ref)

    blocks = w.reshape(-1, 256)
    scales = fmt.choose_scales(blocks, imp.reshape(1, 2, 256).expand(rows, -1, -1).reshape(-1, 256))
    produced = fmt.dequantize_codes(fmt.round_to_grid(blocks, scales, 0), scales).reshape(rows, 512)
    np.testing.assert_array_equal(produced.numpy(), ref)

    assert not ref[0].any(), "an all-zero row must stay zero"
    err = ((torch.from_numpy(ref) - w) ** 2).sum(-1) / (w**2).sum(-1).clamp_min(1e-30)
    assert (err[1:5] < 1e-4).all(), f"single weights and constant blocks must be near exact: {err[1:5]}"


@pytest.mark.parametrize("imp_kind", ["uniform", "random"])
@pytest.mark.parametrize("dist", ["gauss", "t3", "outliers"])
@pytest.mark.parametrize("name", NAMES)
def test_error_not_worse_than_ggml(name, dist, imp_kind, ggml):
    """Our importance-weighted error is at most ggml's, with or without ggml using the importance."""
    qtype = QUANT_TYPES[name]
    rows, cols = 32, 1024
    w, imp = _weights(dist, rows, cols, 5), _importance(imp_kind, cols, 6)

    def error(deq) -> float:
        return float((imp.double() * (w.double() - torch.as_tensor(np.asarray(deq)).double()) ** 2).sum())

    ours = error(dequantize(quantize(w, qtype, imp), qtype, cols))
    theirs = min(error(_gguf(ggml(w.numpy(), qtype, i), name, rows)) for i in (imp.numpy(), None))
    assert ours <= theirs, f"{name} {dist} {imp_kind}: ours/ggml = {ours / theirs:.4f}"
