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


def round_codes(
    x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, qmin: int, qmax: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``clamp(round((x - bias) / scale), qmin, qmax)`` (broadcasting), exactly as ``round_to_grid`` rounds;
    a zero scale gives code 0 (clamped into the grid). Written into ``out`` if given."""
    inv = _safe_inverse(scale)
    return torch.sub(x, bias, out=out).mul_(inv).round_().clamp_(qmin, qmax)


def _safe_inverse(s: torch.Tensor) -> torch.Tensor:
    """``1 / s``, 0 where ``s`` is 0."""
    return torch.where(s != 0, 1.0 / torch.where(s != 0, s, torch.ones_like(s)), torch.zeros_like(s))


class WeightedGroups:
    """Groups of values ``x`` with importances ``w`` (``[..., g]``), their constant weighted sums, and scratch
    space for the codes of one candidate grid. Per-group tensors (arguments and results) have the groups'
    leading shape ``[...]``.

    The scale searches try many candidate grids per group. Each candidate is evaluated by three weighted
    sums of its codes, from which the least-squares fit and its error follow in closed form; the codes and
    products go to reused buffers, as fresh full-size temporaries cost several times the arithmetic on them.
    """

    def __init__(self, x: torch.Tensor, w: torch.Tensor):
        self.shape = x.shape[:-1]
        g = x.shape[-1]
        self.x = x.reshape(-1, g).to(torch.float32)
        self.w = w.reshape(-1, g).to(torch.float32)
        self.wx = self.w * self.x
        self.sw, self.sx = self._per_group(self.w.sum(-1)), self._per_group(self.wx.sum(-1))
        self.q = torch.empty_like(self.x)
        self._t = torch.empty_like(self.x)

    def _per_group(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.shape)

    def amax(self) -> torch.Tensor:
        """The value of largest magnitude of every group, with its sign."""
        return self._per_group(self.x.gather(-1, self.x.abs().argmax(-1, keepdim=True)))

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest and the largest value of every group."""
        lo, hi = self.x.aminmax(dim=-1)
        return self._per_group(lo), self._per_group(hi)

    @staticmethod
    def column(t: torch.Tensor) -> torch.Tensor:
        """A per-group tensor as ``[M, 1]``, to broadcast against the groups' ``[M, g]`` values."""
        return t.reshape(-1, 1)

    def codes(self, scale: torch.Tensor, bias: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        """``round_codes`` of every group for per-group ``scale`` and ``bias``, in the code buffer ``q``."""
        return round_codes(self.x, self.column(scale), self.column(bias), qmin, qmax, out=self.q)

    def error(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``sum w (x - scale q - bias)^2`` of every group, computed directly (no cancellation)."""
        r = torch.mul(q, self.column(scale), out=self._t)
        return self._per_group(r.add_(self.column(bias)).sub_(self.x).square_().mul_(self.w).sum(-1))

    def sums(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``sum w q``, ``sum w q^2``, ``sum w x q`` of every group."""
        t = torch.mul(q, self.w, out=self._t)
        sq = self._per_group(t.sum(-1))
        sqq = self._per_group(t.mul_(q).sum(-1))
        sqx = self._per_group(torch.mul(q, self.wx, out=self._t).sum(-1))
        return sq, sqq, sqx


# --- scale searches shared by the formats ----------------------------------------------------------------
#
# Both searches follow ggml's idea (try many candidate inverse scales, round, refit the scale by weighted
# least squares, keep the best) over a superset of ggml's candidates, then alternate re-round and refit
# steps, neither of which can increase the weighted error. ``x`` and ``w`` are ``[..., g]``; the results
# are ``[...]``. Candidates are compared by their error less the constant ``sum w x^2``, from the sums.


class _Best:
    """Per-group best candidate so far: the smallest score (weighted error + constant) and its (scale, bias).
    On a tie the earlier candidate stays."""

    def __init__(self, like: torch.Tensor):
        self.score = torch.full_like(like, float("inf"))
        self.scale = torch.zeros_like(like)
        self.bias = torch.zeros_like(like)

    def offer(self, score: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> None:
        better = score < self.score
        self.score = torch.where(better, score, self.score)
        self.scale = torch.where(better, scale, self.scale)
        self.bias = torch.where(better, bias, self.bias)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, 0 where ``den`` is 0."""
    return num / torch.where(den != 0, den, torch.full_like(den, float("inf")))


def _symmetric_fit(sqq: torch.Tensor, sqx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares scale of fixed codes and its score ``-sqx^2 / sqq`` (the error less ``sum w x^2``)."""
    scale = _ratio(sqx, sqq)
    return scale, -scale * sqx


def search_symmetric_scale(
    x: torch.Tensor, w: torch.Tensor, qmin: int, qmax: int, n_candidates: int = 21, refine_steps: int = 4,
    ends: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Scale ``s`` (either sign) minimising ``sum w (x - s q)^2``, ``q = clamp(round(x / s), qmin, qmax)``.

    The value of largest magnitude is mapped near either end of the grid (or only near the given ``ends``); a
    negative scale puts a positive maximum on the longer negative side of an asymmetric grid such as Q4_0's
    [-8, 7], as ggml does.
    """
    groups = WeightedGroups(x, w)
    inv_max = _safe_inverse(groups.amax())
    best = _Best(inv_max)
    for end in set(ends or (qmax, qmin)) - {0}:
        # From the finest scale: on a tie (a group whose error is flat over a range of scales, such as one
        # value far above the rest) the finest wins, which leaves a K-quant's super-block scale finest too.
        for step in torch.linspace(1.0, -1.0, n_candidates).tolist():
            inv = groups.column(inv_max * (end + step if end > 0 else end - step))
            q = torch.mul(groups.x, inv, out=groups.q).round_().clamp_(qmin, qmax)
            scale, score = _symmetric_fit(*groups.sums(q)[1:])
            best.offer(score, scale, best.bias)
    for _ in range(refine_steps):
        scale, score = _symmetric_fit(*groups.sums(groups.codes(best.scale, best.bias, qmin, qmax))[1:])
        best.offer(score, scale, best.bias)
    return best.scale


def _affine_fit(groups: WeightedGroups, sums, nonpositive_bias: bool) -> tuple[torch.Tensor, ...]:
    """Weighted least-squares ``(scale >= 0, bias)`` for ``x ~= scale q + bias`` (``bias <= 0`` if asked) from
    the codes' ``sums``, and its score (the error less ``sum w x^2``).

    The error is a convex quadratic in ``(scale, bias)``, so the constrained optimum is the unconstrained one
    if feasible, else the better of the optima on the boundaries ``scale = 0`` and ``bias = 0``: the best of
    these three (each clamped into the feasible region) is the constrained optimum.
    """
    sq, sqq, sqx = sums
    sw, sx = groups.sw, groups.sx
    det = sw * sqq - sq * sq
    # Codes all equal (det ~ 0) fit no line: the boundary scale = 0 then holds the optimum.
    det = torch.where(det > 1e-12 * sw * sqq, det, torch.full_like(det, float("inf")))
    cands = [((sw * sqx - sq * sx) / det).clamp_min_(0.0), torch.zeros_like(sqx)]
    if nonpositive_bias:
        cands.append(_ratio(sqx, sqq).clamp_min_(0.0))
    best_score = best_scale = best_bias = None
    for i, scale in enumerate(cands):
        if i == 2:  # the boundary bias = 0
            bias = torch.zeros_like(scale)
        else:  # the best bias for this scale
            bias = _ratio(sx - scale * sq, sw)
            if nonpositive_bias:
                bias = bias.clamp_max_(0.0)
        # error - sum w x^2 = s^2 sqq + 2 s b sq + b^2 sw - 2 s sqx - 2 b sx
        score = scale * (scale * sqq + 2 * (bias * sq - sqx)) + bias * (bias * sw - 2 * sx)
        if best_score is None:
            best_score, best_scale, best_bias = score, scale, bias
        else:
            better = score < best_score
            best_score = torch.where(better, score, best_score)
            best_scale, best_bias = torch.where(better, scale, best_scale), torch.where(better, bias, best_bias)
    return best_score, best_scale, best_bias


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
    groups = WeightedGroups(x, w)
    lo, hi = groups.range()
    if nonpositive_bias:
        lo = lo.clamp(max=0.0)
    span = hi - lo
    best = _Best(lo)
    best.bias = lo.clone()
    ranges = [(0.0, 0.0, n_candidates)]  # (fraction left out at the low end, at the high end, candidates)
    for c in clips:
        ranges += [(c, 0.0, 7), (0.0, c, 7), (c, c, 7)]
    for low, high, n in ranges:  # each from the finest scale, as in search_symmetric_scale
        shifted = groups.x - groups.column(lo + low * span)
        inv_width = _safe_inverse(span * (1.0 - low - high))
        for step in torch.linspace(1.0, -1.0, n).tolist():
            inv = groups.column(inv_width * (qmax + step))
            q = torch.mul(shifted, inv, out=groups.q).round_().clamp_(0, qmax)
            best.offer(*_affine_fit(groups, groups.sums(q), nonpositive_bias))
    for _ in range(refine_steps):
        q = groups.codes(best.scale, best.bias, 0, qmax)
        best.offer(*_affine_fit(groups, groups.sums(q), nonpositive_bias))
    return best.scale, best.bias
