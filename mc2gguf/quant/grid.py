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
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .types import QuantType


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

    def _columns(self, scales: BlockScales, column: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and bias ``[rows, n]`` of columns ``column .. column+n`` of the block."""
        sub = torch.arange(column, column + n, device=scales.scale.device) // self.sub_block
        return scales.scale.index_select(1, sub), scales.bias.index_select(1, sub)

    def round_to_grid(self, values: torch.Tensor, scales: BlockScales, column: int) -> torch.Tensor:
        """Integer codes for ``values`` ``[rows, n]`` at columns ``column .. column+n`` of the block."""
        scale, bias = self._columns(scales, column, values.shape[1])
        return round_codes(values, scale, bias, self.qmin, self.qmax)

    def column_grid(self, scales: BlockScales) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each column's scale, bias and ``safe_inverse`` of the scale, ``[block_size, rows]`` each: what
        ``round_to_grid`` and ``dequantize_codes`` use, gathered once for GPTQ, which rounds a column at a time
        (``round_codes`` of column ``k`` is ``clamp(round((x - bias[k]) * inverse[k]))``)."""
        scale, bias = (t.T.contiguous() for t in self._columns(scales, 0, self.block_size))
        return scale, bias, safe_inverse(scale)

    def dequantize_codes(self, codes: torch.Tensor, scales: BlockScales, column: int = 0) -> torch.Tensor:
        scale, bias = self._columns(scales, column, codes.shape[1])
        return scale * codes + bias

    def sub_blocks(self, block: torch.Tensor) -> torch.Tensor:
        """``[rows, block_size]`` -> ``[rows, n_sub, sub_block]``."""
        return block.reshape(block.shape[0], self.n_sub, self.sub_block)


def round_codes(
    x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, qmin: int, qmax: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``clamp(round((x - bias) / scale), qmin, qmax)`` (broadcasting), exactly as ``round_to_grid`` rounds;
    a zero scale gives code 0 (clamped into the grid). Written into ``out`` if given."""
    inv = safe_inverse(scale)
    return torch.sub(x, bias, out=out).mul_(inv).round_().clamp_(qmin, qmax)


def safe_inverse(s: torch.Tensor) -> torch.Tensor:
    """``1 / s``, 0 where ``s`` is 0 (or so small that ``1 / s`` overflows)."""
    return torch.reciprocal(s).nan_to_num_(posinf=0.0, neginf=0.0)


def strictly_less(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1.0 where ``a < b``, else 0.0: a float mask for ``lerp`` (exact at 0 and 1), as boolean masks cost
    several times a multiply on CPU."""
    return (b - a).sign_().clamp_min_(0.0)


# Candidate fits are batched into per-group tensors ``[n, M]`` of at most about this many elements.
_SCAN_ELEMENTS = 1 << 20


class WeightedGroups:
    """Groups of values ``x`` with importances ``w`` (``[..., g]``, kept as ``[M, g]``), their constant weighted
    sums, and scratch space for the codes of one candidate grid. Per-group tensors are ``[M]`` (or anything of
    ``M`` elements as arguments); ``per_group`` gives them the groups' leading shape.

    The scale searches try many candidate grids per group. A candidate is summarised by three weighted sums
    of its codes, from which the least-squares fit and its error follow in closed form; the codes and products
    go to reused buffers, as fresh full-size temporaries cost several times the arithmetic on them.
    """

    def __init__(self, x: torch.Tensor, w: torch.Tensor):
        self.shape = x.shape[:-1]
        g = x.shape[-1]
        self.x = x.reshape(-1, g).to(torch.float32)
        self.w = w.reshape(-1, g).to(torch.float32)
        self.wx = self.w * self.x
        self.sw, self.sx = self.w.sum(-1), self.wx.sum(-1)
        self.q = torch.empty_like(self.x)
        self._t = torch.empty_like(self.x)
        self._ones = torch.ones(g, device=self.x.device)

    def _sum(self, t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``t.sum(-1)`` of a ``[M, g]`` tensor, as a matrix-vector product: faster for short groups."""
        return torch.mv(t, self._ones, out=out)

    def per_group(self, t: torch.Tensor) -> torch.Tensor:
        """``[..., M]`` -> ``[..., *leading shape]``."""
        return t.reshape(*t.shape[:-1], *self.shape)

    @staticmethod
    def column(t: torch.Tensor) -> torch.Tensor:
        """A per-group tensor as ``[M, 1]``, to broadcast against the groups' ``[M, g]`` values."""
        return t.reshape(-1, 1)

    def amax(self) -> torch.Tensor:
        """The value of largest magnitude of every group, with its sign."""
        return self.x.gather(-1, self.x.abs().argmax(-1, keepdim=True)).squeeze(-1)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest and the largest value of every group."""
        return self.x.aminmax(dim=-1)

    def codes(self, scale: torch.Tensor, bias: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        """``round_codes`` of every group for per-group ``scale`` and ``bias``, in the code buffer ``q``."""
        return round_codes(self.x, self.column(scale), self.column(bias), qmin, qmax, out=self.q)

    def error(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``sum w (x - scale q - bias)^2`` of every group, computed directly (no cancellation)."""
        r = torch.mul(q, self.column(scale), out=self._t)
        return self._sum(r.add_(self.column(bias)).sub_(self.x).square_().mul_(self.w))

    def sums(self, q: torch.Tensor, out: torch.Tensor | None = None, with_sq: bool = True) -> torch.Tensor:
        """``[3, M]``: ``sum w q`` (left as in ``out``, zeros by default, unless ``with_sq``), ``sum w q^2``,
        ``sum w x q`` of every group."""
        out = torch.zeros(3, q.shape[0], device=q.device) if out is None else out
        t = torch.mul(q, self.w, out=self._t)
        if with_sq:
            self._sum(t, out[0])
        self._sum(t.mul_(q), out[1])
        self._sum(torch.mul(q, self.wx, out=self._t), out[2])
        return out

    def scan(self, inverses: list[torch.Tensor], qmin: int, qmax: int, offset: torch.Tensor | None = None,
             with_sq: bool = True) -> Iterator[torch.Tensor]:
        """``sums`` ``[3, n, M]`` of the codes ``clamp(round((x - offset) * inv), qmin, qmax)`` for per-group
        inverse scales ``inverses``, in batches of ``n`` (all but for very many groups): the candidates of a batch
        are then fitted together, in few calls on larger tensors."""
        shifted = self.x if offset is None else self.x - self.column(offset)
        size = max(1, _SCAN_ELEMENTS // self.x.shape[0])
        for start in range(0, len(inverses), size):
            batch = inverses[start : start + size]
            out = torch.zeros(3, len(batch), self.x.shape[0], device=self.x.device)
            for i, inv in enumerate(batch):
                q = torch.mul(shifted, self.column(inv), out=self.q).round_().clamp_(qmin, qmax)
                self.sums(q, out[:, i], with_sq)
            yield out


# --- scale searches shared by the formats ----------------------------------------------------------------
#
# Both searches follow ggml's idea (try many candidate inverse scales, round, refit the scale by weighted
# least squares, keep the best) over a superset of ggml's candidates, then alternate re-round and refit
# steps, neither of which can increase the weighted error. ``x`` and ``w`` are ``[..., g]``; the results
# are ``[...]``. A candidate's fit and score (its error less the constant ``sum w x^2``) come from its
# codes' sums.

_TINY = torch.finfo(torch.float32).tiny


class _Best:
    """Per-group best candidate so far: the smallest score and its (scale, bias); on a tie the earlier stays.

    With ``ties_to_finest``, a candidate must beat the best by more than the rounding noise of the scores (a
    small difference of sums of the size of ``sum w x^2``) to replace it. Mathematical ties are common in a
    group dominated by one value that every candidate grid fits exactly; the candidates come from the finest
    scale, so the finest then stays, which leaves a K-quant's super-block scale finest too.
    """

    def __init__(self, groups: WeightedGroups, ties_to_finest: bool):
        self.tolerance = (groups.wx * groups.x).sum(-1).mul_(2.0**-21) if ties_to_finest else 0.0
        self.score = self.scale = self.bias = None

    def offer(self, score: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> None:
        """Candidates ``[n, M]``, each in turn."""
        if self.score is None:
            self.score, self.scale, self.bias = score[0], scale[0], bias[0]
            score, scale, bias = score[1:], scale[1:], bias[1:]
        threshold = score + self.tolerance
        for candidate in zip(score, threshold, scale, bias):
            self._offer(*candidate)

    def _offer(self, score, threshold, scale, bias) -> None:
        better = strictly_less(threshold, self.score)
        self.score = torch.lerp(self.score, score, better)
        self.scale = self.scale.lerp(scale, better)
        self.bias = self.bias.lerp(bias, better)


def _symmetric_fit(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score, least-squares scale and (zero) bias of codes with ``sums`` (the score is ``-sqx^2 / sqq``)."""
    _, sqq, sqx = sums
    scale = sqx / sqq.clamp_min(_TINY)  # codes all 0: sqx = 0 too, and the scale 0
    return -scale * sqx, scale, torch.zeros_like(scale)


def search_symmetric_scale(
    x: torch.Tensor, w: torch.Tensor, qmin: int, qmax: int, n_candidates: int = 21, refine_steps: int = 4,
    ends: tuple[int, ...] | None = None, ties_to_finest: bool = False,
) -> torch.Tensor:
    """Scale ``s`` (either sign) minimising ``sum w (x - s q)^2``, ``q = clamp(round(x / s), qmin, qmax)``.

    The value of largest magnitude is mapped near either end of the grid (or only near the given ``ends``); a
    negative scale puts a positive maximum on the longer negative side of an asymmetric grid such as Q4_0's
    [-8, 7], as ggml does. ``ties_to_finest``: see ``_Best``.
    """
    groups = WeightedGroups(x, w)
    inv_max = safe_inverse(groups.amax())
    best = _Best(groups, ties_to_finest)
    for end in sorted(set(ends or (qmax, qmin)) - {0}, reverse=True):
        # From the finest scale, which wins ties (see _Best).
        steps = torch.linspace(1.0, -1.0, n_candidates).tolist()
        inverses = [inv_max * (end + step if end > 0 else end - step) for step in steps]
        for sums in groups.scan(inverses, qmin, qmax, with_sq=False):
            best.offer(*_symmetric_fit(sums))
    for _ in range(refine_steps):
        q = groups.codes(best.scale, best.bias, qmin, qmax)
        best.offer(*_symmetric_fit(groups.sums(q, with_sq=False)[:, None]))
    return groups.per_group(best.scale)


def _affine_fit(
    groups: WeightedGroups, sums: torch.Tensor, nonpositive_bias: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score and weighted least-squares ``(scale >= 0, bias)`` for ``x ~= scale q + bias`` (``bias <= 0`` if
    asked) of codes (with ``sums``) that grow with ``x``.

    Such codes correlate with ``x``, so the unconstrained fit has ``scale >= 0`` (up to rounding); when its
    bias is positive the constrained optimum lies on the boundary ``bias = 0``.
    """
    sq, sqq, sqx = sums
    sw, sx = groups.sw, groups.sx
    sw_sqq = sw * sqq
    # det = sw sqq - sq^2 >= 0 vanishes (up to rounding) when the codes are all equal: then any line through
    # their weighted mean fits, and the floor only keeps the scale finite.
    det = torch.addcmul(sw_sqq, sq, sq, value=-1.0).maximum(sw_sqq.mul_(1e-6)).clamp_min_(_TINY)
    scale = torch.addcmul(sw * sqx, sq, sx, value=-1.0).div_(det).clamp_min_(0.0)
    bias = torch.addcmul(sx, scale, sq, value=-1.0).div_(sw.clamp_min(_TINY))
    if nonpositive_bias:
        positive = bias.sign().clamp_min_(0.0)
        scale = scale.lerp(sqx / sqq.clamp_min(_TINY), positive).clamp_min_(0.0)
        bias.clamp_max_(0.0)
    # error - sum w x^2 = s (s sqq + 2 b sq - 2 sqx) + b (b sw - 2 sx)
    score = torch.addcmul(scale * sqq, bias, sq, value=2.0).sub_(sqx, alpha=2.0).mul_(scale)
    score += (bias * sw).sub_(sx, alpha=2.0).mul_(bias)
    return score, scale, bias


def search_affine_scale(
    x: torch.Tensor, w: torch.Tensor, qmax: int, nonpositive_bias: bool, n_candidates: int = 41, refine_steps: int = 4,
    clips: tuple[float, ...] = (), clip_candidates: int = 7, ties_to_finest: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale >= 0, bias)`` minimising ``sum w (x - scale q - bias)^2``, ``q`` in ``[0, qmax]``.

    ``nonpositive_bias`` is the K-quant constraint: they store ``-bias`` as an unsigned minimum. The candidate
    grids span the values' range; each fraction in ``clips`` adds grids that leave that fraction of the span
    out at the low end, the high end and both (``clip_candidates`` each): a grid offset by a fraction of a step,
    or one that gives up an unimportant extreme value, often fits better, and the refits alone rarely get there.
    ``ties_to_finest``: see ``_Best``.
    """
    groups = WeightedGroups(x, w)
    lo, hi = groups.range()
    if nonpositive_bias:
        lo = lo.clamp(max=0.0)
    span = hi - lo
    best = _Best(groups, ties_to_finest)
    ranges = [(0.0, 0.0, n_candidates)]  # (fraction left out at the low end, at the high end, candidates)
    for c in clips:
        ranges += [(c, 0.0, clip_candidates), (0.0, c, clip_candidates), (c, c, clip_candidates)]
    for low, high, n in ranges:  # each from the finest scale, as in search_symmetric_scale
        inv_width = safe_inverse(span * (1.0 - low - high))
        inverses = [inv_width * (qmax + step) for step in torch.linspace(1.0, -1.0, n).tolist()]
        for sums in groups.scan(inverses, 0, qmax, offset=lo + low * span):
            best.offer(*_affine_fit(groups, sums, nonpositive_bias))
    for _ in range(refine_steps):
        q = groups.codes(best.scale, best.bias, 0, qmax)
        best.offer(*_affine_fit(groups, groups.sums(q)[:, None], nonpositive_bias))
    return groups.per_group(best.scale), groups.per_group(best.bias)
