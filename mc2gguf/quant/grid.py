"""Scalar-grid GGUF types: the framework every grid format follows, and the scale searches they share.

A grid format quantizes a ggml block of ``block_size`` consecutive weights of a row. The block is split
into sub-blocks of ``sub_block`` weights that share one scale and one bias, and every weight is an integer
``q`` in ``[qmin, qmax]``: ``w ~= scale * q + bias``. Quantization is two steps, kept apart because GPTQ
needs them apart:

1. ``choose_scales(block, importance)`` picks (and already rounds to their stored precision) the scales
   of a block, for all rows at once;
2. ``round_to_grid(values, scales, column)`` rounds any column of that block onto the grid given those
   scales. GPTQ calls it column by column on error-corrected weights.

``pack`` writes the integer codes and scales in ggml's exact byte layout; ``unpack`` reads them back.
All tensors are ``[rows, ...]`` torch tensors; rows are independent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from ..qtypes import QuantType


@dataclass
class BlockScales:
    """The dequantization parameters of one ggml block, for every row.

    ``scale`` and ``bias`` are ``[rows, n_sub]``, the effective (already stored-precision) values.
    ``fields`` holds the integer/half-precision values exactly as the packer writes them.
    """

    scale: torch.Tensor
    bias: torch.Tensor
    fields: dict[str, torch.Tensor] = field(default_factory=dict)


class GridFormat(ABC):
    qtype: QuantType
    sub_block: int
    qmin: int
    qmax: int

    @property
    def block_size(self) -> int:
        return self.qtype.block_size

    @property
    def n_sub(self) -> int:
        return self.block_size // self.sub_block

    @abstractmethod
    def choose_scales(self, block: torch.Tensor, importance: torch.Tensor) -> BlockScales:
        """Scales for ``block`` ``[rows, block_size]`` minimising the ``importance``-weighted error."""

    @abstractmethod
    def pack(self, codes: torch.Tensor, scales: BlockScales) -> torch.Tensor:
        """ggml's bytes ``[rows, type_size]`` (uint8) for integer ``codes`` ``[rows, block_size]``."""

    @abstractmethod
    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, BlockScales]:
        """Inverse of ``pack``: integer codes and scales from ``[rows, type_size]`` bytes."""

    def round_to_grid(self, values: torch.Tensor, scales: BlockScales, column: int) -> torch.Tensor:
        """Integer codes for ``values`` ``[rows, n]`` at columns ``column .. column+n`` of the block."""
        n = values.shape[1]
        sub = torch.arange(column, column + n, device=values.device) // self.sub_block
        return round_codes(values, scales.scale[:, sub], scales.bias[:, sub], self.qmin, self.qmax)

    def dequantize_codes(self, codes: torch.Tensor, scales: BlockScales, column: int = 0) -> torch.Tensor:
        n = codes.shape[1]
        sub = torch.arange(column, column + n, device=codes.device) // self.sub_block
        return scales.scale[:, sub] * codes + scales.bias[:, sub]

    def sub_blocks(self, block: torch.Tensor) -> torch.Tensor:
        """``[rows, block_size]`` -> ``[rows, n_sub, sub_block]``."""
        return block.reshape(block.shape[0], self.n_sub, self.sub_block)


def round_codes(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round((x - bias) / scale), qmin, qmax)`` (broadcasting), exactly as ``round_to_grid`` rounds;
    a zero scale gives code 0 (clamped into the grid)."""
    inv = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    return torch.round((x - bias) * inv).clamp_(qmin, qmax)


# --- scale searches shared by the formats ----------------------------------------------------------------
#
# Both searches follow ggml's idea (try many candidate inverse scales, round, refit the scale by weighted
# least squares, keep the best) over a superset of ggml's candidates, then alternate re-round and refit
# steps, neither of which can increase the weighted error. ``x`` and ``w`` are ``[..., g]``; the results
# are ``[...]``.


class _Best:
    """Per-group best candidate so far: the smallest weighted error and its (scale, bias)."""

    def __init__(self, like: torch.Tensor):
        self.err = torch.full_like(like, float("inf"))
        self.scale = torch.zeros_like(like)
        self.bias = torch.zeros_like(like)

    def offer(self, x, w, q, scale, bias) -> None:
        err = (w * (x - scale.unsqueeze(-1) * q - bias.unsqueeze(-1)) ** 2).sum(-1)
        better = err < self.err
        self.err = torch.where(better, err, self.err)
        self.scale = torch.where(better, scale, self.scale)
        self.bias = torch.where(better, bias, self.bias)


def _safe_inverse(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s != 0, 1.0 / torch.where(s != 0, s, torch.ones_like(s)), torch.zeros_like(s))


def _lstsq_scale(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    num = (w * x * q).sum(-1)
    den = (w * q * q).sum(-1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))


def search_symmetric_scale(
    x: torch.Tensor, w: torch.Tensor, qmin: int, qmax: int, n_candidates: int = 21, refine_steps: int = 4,
    ends: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Scale ``s`` (either sign) minimising ``sum w (x - s q)^2``, ``q = clamp(round(x / s), qmin, qmax)``.

    The value of largest magnitude is mapped near either end of the grid (or only near the given ``ends``); a
    negative scale puts a positive maximum on the longer negative side of an asymmetric grid such as Q4_0's
    [-8, 7], as ggml does.
    """
    signed_max = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
    zero = torch.zeros_like(signed_max)
    best = _Best(signed_max)
    for end in set(ends or (qmax, qmin)) - {0}:
        # From the finest scale: on a tie (a group whose error is flat over a range of scales, such as one
        # value far above the rest) the finest wins, which leaves a K-quant's super-block scale finest too.
        for step in torch.linspace(1.0, -1.0, n_candidates).tolist():
            inv = _safe_inverse(signed_max / (end + step if end > 0 else end - step))
            q = torch.round(x * inv.unsqueeze(-1)).clamp_(qmin, qmax)
            best.offer(x, w, q, _lstsq_scale(x, w, q), zero)
    for _ in range(refine_steps):
        q = torch.round(x * _safe_inverse(best.scale).unsqueeze(-1)).clamp_(qmin, qmax)
        best.offer(x, w, q, _lstsq_scale(x, w, q), zero)
    return best.scale


def _lstsq_affine(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor, nonpositive_bias: bool):
    """Weighted least-squares ``(scale, bias)`` for ``x ~= scale q + bias`` (``bias <= 0`` if asked)."""
    wq = w * q
    sw = w.sum(-1)
    sq = wq.sum(-1)
    sqq = (wq * q).sum(-1)
    sx = (w * x).sum(-1)
    sqx = (wq * x).sum(-1)
    det = sw * sqq - sq * sq
    ok = det > 1e-12 * (sw * sqq).clamp_min(1e-30)
    scale = torch.where(ok, (sw * sqx - sq * sx) / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(det))
    bias = torch.where(sw > 0, (sx - scale * sq) / sw.clamp_min(1e-30), torch.zeros_like(sw))
    if nonpositive_bias:
        clipped = bias > 0
        bias = torch.where(clipped, torch.zeros_like(bias), bias)
        scale = torch.where(clipped, torch.where(sqq > 0, sqx / sqq.clamp_min(1e-30), torch.zeros_like(sqq)), scale)
    return scale.clamp_min(0.0), bias


def search_affine_scale(
    x: torch.Tensor, w: torch.Tensor, qmax: int, nonpositive_bias: bool, n_candidates: int = 41, refine_steps: int = 4,
    clips: tuple[float, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale >= 0, bias)`` minimising ``sum w (x - scale q - bias)^2``, ``q`` in ``[0, qmax]``.

    ``nonpositive_bias`` is the K-quant constraint: they store ``-bias`` as an unsigned minimum. The candidate
    grids span the values' range; each fraction in ``clips`` adds grids that leave that fraction of the span
    out at the low end, the high end and both (7 candidates each): a grid offset by a fraction of a step, or
    one that gives up an unimportant extreme value, often fits better, and the refits alone rarely get there.
    """
    lo = x.min(-1).values
    if nonpositive_bias:
        lo = lo.clamp(max=0.0)
    span = x.max(-1).values - lo
    best = _Best(lo)
    best.bias = lo.clone()
    ranges = [(0.0, 0.0, n_candidates)]  # (fraction left out at the low end, at the high end, candidates)
    for c in clips:
        ranges += [(c, 0.0, 7), (0.0, c, 7), (c, c, 7)]
    for low, high, n in ranges:  # each from the finest scale, as in search_symmetric_scale
        start, width = lo + low * span, span * (1.0 - low - high)
        for step in torch.linspace(1.0, -1.0, n).tolist():
            inv = _safe_inverse(width / (qmax + step))
            q = torch.round((x - start.unsqueeze(-1)) * inv.unsqueeze(-1)).clamp_(0, qmax)
            best.offer(x, w, q, *_lstsq_affine(x, w, q, nonpositive_bias))
    for _ in range(refine_steps):
        inv = _safe_inverse(best.scale).unsqueeze(-1)
        q = torch.round((x - best.bias.unsqueeze(-1)) * inv).clamp_(0, qmax)
        best.offer(x, w, q, *_lstsq_affine(x, w, q, nonpositive_bias))
    return best.scale, best.bias
