"""GPTQ that rounds onto exactly the grid of the chosen GGUF type, and writes ggml's bytes.

GPTQ (Frantar et al., 2022) quantizes a weight matrix ``W`` ``[rows, cols]`` column by column, minimising
the output error ``trace((W - Q) H (W - Q)^T)`` for the Hessian ``H = X^T X`` of the layer's inputs: each
column's rounding error is spread over the columns not yet quantized through the rows of the upper Cholesky
factor ``U`` of ``H^-1`` (``H^-1 = U^T U``). Updates are lazy: after every column to the rest of its batch of
``block_size`` columns, after every batch to the columns beyond it. The error feedback is kept inside the
batches at every bit width (the MC-MoE code turns it off below 4 bits).

What a GGUF type adds:

* Scalar-grid types (``Packer.GRID``): a ggml block (32 or 256 consecutive columns) shares its scales. When
  GPTQ reaches the first column of a block it chooses the block's scales on the current, error-updated
  weights (``GridFormat.choose_scales``, importance = the Hessian diagonal), then rounds the block column by
  column onto that grid (as ``round_to_grid`` rounds, from ``GridFormat.column_grid``). Batches are a
  multiple of the ggml block, so a block never straddles two batches. The codes and scales are packed with
  the format's own ``pack``: the bytes written are exactly the values optimised.
* ``act_order`` (columns in order of decreasing Hessian diagonal) would reach a block's columns scattered
  over the whole pass, so its scales cannot be chosen "when the block starts": every block's scales are
  chosen upfront on the original weights ("static groups", as in the GPTQ reference's ``static_groups``),
  then the columns are rounded in act order onto those fixed grids. On the tests' layer this helps the
  symmetric grids and hurts the affine ones (fixed biases), against the sequential order.
* Codebook (IQ) types (``Packer.CODEBOOK``): ggml's lattice search quantizes a whole 256-column block of a
  row at once, so GPTQ runs blockwise: each block of all rows goes through ggml's quantizer (importance =
  the Hessian diagonal of its columns), is dequantized, and its error ``E`` is spread over the later columns
  as the column-wise updates would: the scaled errors ``Err`` solve ``E = Err U_bb`` (the relation the
  column-wise errors satisfy), then ``W_later -= Err U_b,later``. ``act_order`` orders the blocks (not the
  columns) by decreasing Hessian diagonal sum.
* Float types (F32, F16, BF16) are converted, with no GPTQ.

Dead columns (``H_ii == 0``: the input never fired on the calibration tokens; an invalid ``H_ii < 0`` too)
are decoupled from the others (``H_ii`` is set to the mean live diagonal, the rest of its row and column of
``H`` is zero anyway), so their rounding error neither spreads nor counts. Unlike the reference, which
zeroes their weights, they keep their weights, rounded with a small importance: an expert that received few
calibration tokens (or none: ``H == 0``, which makes GPTQ round to nearest) must still see its weights on
other tokens.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import Mc2ggufError
from .types import Packer, QuantType
from .codec import dequantize, grid_format, quantize
from .grid import BlockScales

# Importance (relative to the mean live Hessian diagonal) of a dead column when choosing scales.
_DEAD_IMPORTANCE = 1e-3
_MAX_DAMP_TRIES = 8


@dataclass
class GPTQResult:
    data: np.ndarray  # ggml bytes [rows, row_bytes] (uint8)
    weights: torch.Tensor  # [rows, cols] float32: exactly the values ``data`` holds
    qtype: QuantType
    damp: float  # the relative dampening actually used (raised above the one asked for if H was not PD)

    def rows(self, start: int, stop: int) -> GPTQResult:
        """The result for rows ``start:stop`` of the matrix (quantization treats rows independently)."""
        return GPTQResult(self.data[start:stop], self.weights[start:stop], self.qtype, self.damp)


def output_error(weights: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """The Hessian-weighted output error ``trace((W - Q) H (W - Q)^T)``."""
    e = torch.as_tensor(weights).double() - torch.as_tensor(dequantized).double()
    return float(((e @ torch.as_tensor(hessian).double()) * e).sum())


def rtn_quantize(weights: torch.Tensor, hessian: torch.Tensor, qtype: QuantType) -> GPTQResult:
    """The baseline: round to nearest with ``mc2gguf.quant.codec.quantize``, importance = the Hessian diagonal."""
    w = torch.as_tensor(weights).detach().float()
    importance = None
    if qtype.packer is not Packer.FLOAT:
        importance, _ = _importance(torch.as_tensor(hessian).double().diagonal())
    data = quantize(w, qtype, importance)
    return GPTQResult(data, dequantize(data, qtype, w.shape[1]), qtype, 0.0)


def gptq_quantize(
    weights: torch.Tensor, hessian: torch.Tensor, qtype: QuantType, damp: float = 0.01, act_order: bool = False,
    block_size: int = 128, device: torch.device | str | None = None,
) -> GPTQResult:
    """GPTQ-quantize ``weights`` ``[rows, cols]`` for ``hessian`` ``[cols, cols]`` (``X^T X`` or its mean over the
    calibration tokens) into ``qtype``; see the module docstring.

    The arithmetic runs on ``device`` (default: the weights' device); ggml's quantizer and the packing on the
    CPU. ``GPTQResult.weights`` is returned on the CPU.
    """
    device = torch.device(device) if device is not None else torch.as_tensor(weights).device
    return GPTQ(hessian, damp, act_order, block_size, device).quantize(weights, qtype)


class GPTQ:
    """GPTQ for one Hessian, any number of weight matrices and types: the inverse Cholesky factor (the costly
    part of the preparation) is computed once per column order, and every type without ``act_order`` shares
    the natural one. ``gptq_quantize`` is this for a single call."""

    def __init__(self, hessian: torch.Tensor, damp: float = 0.01, act_order: bool = False, block_size: int = 128,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        h = torch.as_tensor(hessian).detach().to(self.device, torch.float64, copy=True)
        if h.ndim != 2 or h.shape[0] != h.shape[1]:
            raise ValueError(f"the Hessian must be square, got {list(h.shape)}")
        if not torch.isfinite(h).all():
            raise Mc2ggufError("GPTQ needs finite weights and a finite Hessian")
        self.importance, dead = _importance(h.diagonal())
        h.diagonal()[dead] = self.importance[~dead].double().mean() if (~dead).any() else 1.0
        self.hessian, self.damp, self.act_order, self.block_size = h, damp, act_order, block_size
        self._factors: dict[tuple, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def _factor(self, qtype: QuantType) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(column order, upper Cholesky factor of the inverse Hessian in that order, dampening used)."""
        cols, qb = self.hessian.shape[0], qtype.block_size
        key = (qtype.packer is Packer.GRID, qb) if self.act_order else ()
        if key not in self._factors:
            perm = torch.arange(cols, device=self.device)
            if self.act_order and qtype.packer is Packer.GRID:
                perm = torch.argsort(self.importance, descending=True, stable=True)
            elif self.act_order:  # whole blocks, in order of decreasing importance
                order = torch.argsort(self.importance.reshape(-1, qb).sum(1), descending=True, stable=True)
                perm = (order[:, None] * qb + torch.arange(qb, device=self.device)).reshape(-1)
            # in the natural order H is used as it is, not through a permuted copy
            h = self.hessian[perm][:, perm] if self.act_order else self.hessian
            self._factors[key] = (perm, *_inverse_cholesky(h, self.damp))
        return self._factors[key]

    def quantize(self, weights: torch.Tensor, qtype: QuantType) -> GPTQResult:
        w = torch.as_tensor(weights).detach().to(self.device, torch.float32, copy=True)
        rows, cols = w.shape
        if qtype.packer is Packer.FLOAT:
            data = quantize(w.cpu(), qtype)
            return GPTQResult(data, dequantize(data, qtype, cols), qtype, 0.0)
        if not qtype.fits(cols):
            raise Mc2ggufError(f"{qtype.name} needs rows that are a multiple of {qtype.block_size}, got {cols}")
        if self.hessian.shape != (cols, cols):
            raise ValueError(f"the Hessian must be [{cols}, {cols}], got {list(self.hessian.shape)}")
        if not torch.isfinite(w).all():
            raise Mc2ggufError("GPTQ needs finite weights and a finite Hessian")
        perm, u, damp = self._factor(qtype)
        run = _gptq_grid if qtype.packer is Packer.GRID else _gptq_codebook
        data, q = run(w, u, perm, self.importance, qtype, self.act_order, self.block_size)
        return GPTQResult(data, q, qtype, damp)


def _importance(diag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column importance for the scale searches (the Hessian diagonal; dead columns get a small share of
    the mean, all of it if every column is dead) and the dead-column mask."""
    dead = diag <= 0
    live = diag[~dead]
    floor = float(live.mean()) * _DEAD_IMPORTANCE if live.numel() else 1.0
    return torch.where(dead, torch.full_like(diag, floor), diag).float(), dead


def _inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) I)^-1`` (float64 inside, float32 out).

    With ``J`` the order reversal and ``J H J = L L^T``, ``U = J L^-1 J``: one Cholesky and one triangular
    inverse (the reference's ``cholesky_inverse`` then second Cholesky give the same ``U``, 15x slower on a CPU).
    A Hessian that is not positive definite even so gets ten times the dampening until it is, with a warning.

    Peak memory is three ``[cols, cols]`` float64 matrices (``H``, ``L`` and ``L^-1``): a layer's largest
    temporaries, as large as an expert's Hessian each.
    """
    mean = float(h.diagonal().mean())
    for _ in range(_MAX_DAMP_TRIES):
        damped = h.flip(0, 1)  # a copy (flip never returns a view), made again on each try
        damped.diagonal().add_(damp * mean)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info == 0:
            # Solved in place into a column-major identity, the layout the triangular solve works in (and
            # returns): the same values as solving into a new matrix, without the identity beside it.
            inverse = torch.eye(h.shape[0], dtype=h.dtype, device=h.device).mT
            torch.linalg.solve_triangular(lower, inverse, upper=False, out=inverse)
            del lower
            # U = J L^-1 J has L^-1's diagonal, reversed: checked in float64, as before the conversion.
            if torch.isfinite(inverse).all() and (inverse.diagonal() > 0).all():
                return inverse.float().flip(0, 1), damp
        new = damp * 10 if damp > 0 else 1e-4
        warnings.warn(f"GPTQ: the Hessian is not positive definite with dampening {damp:g}; trying {new:g}")
        damp = new
    raise Mc2ggufError(f"GPTQ: the Hessian is not positive definite even with dampening {damp / 10:g}")


def _gptq_grid(w, u, perm, importance, qtype, act_order, block_size):
    fmt = grid_format(qtype)
    rows, cols = w.shape
    qb = qtype.block_size

    def choose(block: torch.Tensor, start: int) -> BlockScales:  # contiguous inputs: the searches run 3x faster
        return fmt.choose_scales(block.contiguous(), importance[start : start + qb].expand(rows, -1).contiguous())

    scales = [None] * (cols // qb)
    if act_order:  # static groups: every block's scales from the original weights
        scales = [choose(w[:, s : s + qb], s) for s in range(0, cols, qb)]
    else:  # batches hold whole ggml blocks
        block_size = max(qb, -(-block_size // qb) * qb)
    grids = [None if s is None else fmt.column_grid(s) for s in scales]
    # Transposed, [cols, rows]: the loop below runs once per column, and a column is then contiguous.
    wt = w[:, perm].T.contiguous()
    codes = torch.zeros_like(wt)  # in the original column order
    q = torch.zeros_like(wt)  # in the processing order
    order = perm.tolist()
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, err1, u1 = wt[i1:i2].clone(), torch.zeros_like(wt[i1:i2]), u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            b, k = divmod(order[i1 + i], qb)
            if grids[b] is None:  # the block's first column, in the natural order
                scales[b] = choose(w1[i : i + qb].T, i1 + i)
                grids[b] = fmt.column_grid(scales[b])
            scale, bias, inverse = (g[k] for g in grids[b])
            c = torch.sub(w1[i], bias, out=codes[order[i1 + i]]).mul_(inverse).round_().clamp_(fmt.qmin, fmt.qmax)
            torch.mul(c, scale, out=q[i1 + i]).add_(bias)
            torch.sub(w1[i], q[i1 + i], out=err1[i]).div_(u1[i, i])
            w1[i + 1 :].addr_(u1[i, i + 1 :], err1[i], alpha=-1)
        wt[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1)
    codes = codes.T.cpu()
    data = torch.cat([fmt.pack(codes[:, s : s + qb], _cpu(scales[s // qb])) for s in range(0, cols, qb)], dim=1)
    return data.numpy(), q[torch.argsort(perm)].T.contiguous().cpu()


def _cpu(s: BlockScales) -> BlockScales:
    return BlockScales(s.scale.cpu(), s.bias.cpu(), {k: v.cpu() for k, v in s.fields.items()})


def _gptq_codebook(w, u, perm, importance, qtype, act_order, block_size):
    from .ggml_lib import ggml_dequantize, ggml_quantize

    rows, cols = w.shape
    qb = qtype.block_size
    w = w[:, perm]
    q = torch.zeros_like(w)
    blocks = {}
    for i1 in range(0, cols, qb):
        i2, start = i1 + qb, int(perm[i1])  # start: the block's first column in the original order
        data = ggml_quantize(w[:, i1:i2].cpu().numpy(), qtype, importance[start : start + qb].cpu().numpy())
        blocks[start] = data
        q[:, i1:i2] = torch.from_numpy(ggml_dequantize(data, qtype, qb)).to(w.device)
        err = torch.linalg.solve_triangular(u[i1:i2, i1:i2], w[:, i1:i2] - q[:, i1:i2], upper=True, left=False)
        w[:, i2:] -= err @ u[i1:i2, i2:]
    data = np.concatenate([blocks[s] for s in range(0, cols, qb)], axis=1)
    return data, q[:, torch.argsort(perm)].cpu()
