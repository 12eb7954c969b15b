"""ggml's K-quant types Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: 256-weight super-blocks of 16- or 32-weight sub-blocks.

Sub-block ``j`` of a super-block has an integer scale ``sc_j`` and, for the affine types (Q2_K, Q4_K, Q5_K),
an integer min ``m_j``; the super-block has one fp16 ``d`` (and ``dmin``). Weights dequantize to
``(d * sc_j) * q`` (Q3_K, Q6_K: signed ``sc_j``, signed ``q``) or ``(d * sc_j) * q - dmin * m_j`` (``q >= 0``).

Choosing the scales. Each sub-block first gets its best float scale (and bias) from the shared searches,
which fixes a set of codes; the symmetric types keep the best codes of either sign. For fixed codes the
weighted error of a sub-block is an exact quadratic in its ``(scale, bias)`` (``_CodeSets``), so the stored
``d, dmin, sc, m`` are searched on that model, cheaply and for all blocks at once: candidate ``d`` / ``dmin``
scaled from the largest float sub-scale (or min), for each the best integers of every sub-block, and
least-squares refits of ``d`` / ``dmin`` given the integers. The codes are then re-rounded with the stored
scales and each sub-block tries its integers one step either way (moves whose gain comes from re-rounding,
which the fixed-code model cannot see). A second search, whose model holds the codes just produced (the
affine types' also the float codes), and a second pass of moves follow. None of these steps increases the
error: the model's error is an upper bound of the true one and exact for the current codes, which it holds,
and the moves are judged on the true error.

Byte layouts (ggml-common.h; gguf-py's ``dequantize_blocks``). Within each run of 128 weights stored as 2-bit
fields, weight ``32*g + l`` sits in bits ``2g, 2g+1`` of byte ``l`` (``pack_bits``); nibbles pair weight
``l`` with ``l + 32`` (Q4_K/Q5_K, per 64 weights) or ``l + 64`` (Q6_K, per 128); single high bits put weight
``32*g + l`` in bit ``g`` of byte ``l``.

* Q2_K (84 bytes): ``scales[16]`` (``sc | m << 4``), ``qs[64]`` (2-bit ``q``), ``d``, ``dmin``.
* Q3_K (110 bytes): ``hmask[32]`` (bit 2 of ``q + 4``), ``qs[64]`` (bits 0-1 of ``q + 4``), ``scales[12]``
  (6-bit ``sc + 32``: low nibbles of sub-blocks 0-7 / 8-15 in the low / high nibbles of bytes 0-7, the high
  2 bits of sub-block ``j`` in bits ``2*(j // 4)`` of byte ``8 + j % 4``), ``d``.
* Q4_K (144 bytes): ``d``, ``dmin``, ``scales[12]`` (6-bit ``sc`` and ``m``, ggml's ``get_scale_min_k4``),
  ``qs[128]`` (nibbles).
* Q5_K (176 bytes): ``d``, ``dmin``, ``scales[12]`` as Q4_K, ``qh[32]`` (bit 4 of ``q``), ``qs[128]``.
* Q6_K (210 bytes): ``ql[128]`` (low nibbles of ``q + 32``), ``qh[64]`` (its high 2 bits), ``scales[16]``
  (int8 ``sc``), ``d``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .types import QUANT_TYPES
from .bits import from_fp16_bytes, pack_bits, pack_nibbles, to_fp16, to_fp16_bytes, unpack_bits, unpack_nibbles
from .grid import (
    BlockScales, GridFormat, WeightedGroups, safe_inverse, search_affine_scale, search_symmetric_scale, strictly_less,
)

_FP16_MAX = 65504.0

# The super-scale search evaluates its candidates in batches of tensors ``[C, K, N, n_sub]`` of about this many
# elements: small enough to stay in cache, large enough that the per-call overhead stays small.
_BATCH_ELEMENTS = 1 << 18


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """A super-block scale as ggml stores it: fp16, kept finite (a huge scale saturates rather than overflows)."""
    return to_fp16(x.float().clamp(-_FP16_MAX, _FP16_MAX))


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, 0 where ``den`` is 0 (an all-zero block has d = 0 and rounds every sub-scale to 0)."""
    return num * safe_inverse(den)


@dataclass
class _Fit:
    """Stored parameters of every super-block: fp16 ``d`` (and ``dmin``) ``[..., N]``, integer ``sc`` (and
    ``m``) ``[..., N, n_sub]`` as float tensors, with optional leading candidate dimensions. ``dmin`` and ``m``
    are ``None`` for the symmetric types."""

    d: torch.Tensor
    sc: torch.Tensor
    dmin: torch.Tensor | None = None
    m: torch.Tensor | None = None

    @property
    def scale(self) -> torch.Tensor:
        return self.d[..., None] * self.sc  # float32, the product ggml's dequantizer computes

    @property
    def bias(self) -> torch.Tensor:
        return torch.zeros_like(self.sc) if self.m is None else -(self.dmin[..., None] * self.m)

    def select(self, better: torch.Tensor, other: _Fit) -> _Fit:
        """``self`` where ``better`` is 1, else ``other`` (0/1 floats, ``[N]`` per block or ``[N, n_sub]`` for
        the integers only)."""
        per_block = better.dim() == self.d.dim()
        sub = better[..., None] if per_block else better

        def pick(new, old, mask):
            return None if new is None else old.lerp(new, mask)

        return _Fit(
            d=pick(self.d, other.d, better) if per_block else self.d,
            sc=pick(self.sc, other.sc, sub),
            dmin=pick(self.dmin, other.dmin, better) if per_block else self.dmin,
            m=pick(self.m, other.m, sub),
        )

    def take(self, index: torch.Tensor) -> _Fit:
        """Per block, candidate ``index`` (``[N]`` int64) of the leading candidate dimension."""

        def pick(t):
            if t is None:
                return None
            i = index.view(1, -1, *([1] * (t.dim() - 2))).expand(1, *t.shape[1:])
            return t.gather(0, i)[0]

        return _Fit(pick(self.d), pick(self.sc), pick(self.dmin), pick(self.m))


class _CodeSets:
    """The weighted error of every sub-block as a function of its ``(scale, bias)``, for ``K`` alternative sets
    of fixed codes (tensors ``[K, N, n_sub]``).

    For fixed codes the error is an exact quadratic, ``c + sqq ds^2 + 2 sq ds db + sw db^2`` with ``ds, db``
    the offsets from the codes' least-squares ``(s0, b0)`` (``b0 = 0`` for the symmetric types) and ``c`` the
    error there. Re-rounding the codes can only do better, so the smallest error over the code sets is an
    upper bound of the true error that stays close to it around the scales the sets were rounded with.
    ``c`` is measured directly at ``(s0, b0)`` (from the sums it would be a small difference of large ones).

    For the affine types the quadratic is kept as ``c + curv ds^2 + sw (db + slope ds)^2``: the best bias for
    a scale is ``b0 - slope ds``, and a bias off it adds ``sw`` times the squared miss.
    """

    _FIELDS = ("s0", "b0", "c", "sqq", "sq", "sw")

    def __init__(self, s0, b0, c, sqq, sq, sw):
        self.s0, self.b0, self.c, self.sqq, self.sq, self.sw = s0, b0, c, sqq, sq, sw

    @functools.cached_property
    def slope(self) -> torch.Tensor:
        return _ratio(self.sq, self.sw)

    @functools.cached_property
    def curv(self) -> torch.Tensor:
        return self.sqq - self.sq * self.slope

    @staticmethod
    def of_codes(groups: WeightedGroups, fmt: KQuantFormat, fits: list[tuple[torch.Tensor, torch.Tensor]]) -> _CodeSets:
        """The model of the codes ``round_to_grid`` gives for each ``(scale, bias)`` of ``fits``."""
        parts = []
        for scale, bias in fits:
            q = groups.codes(scale, bias, fmt.qmin, fmt.qmax)
            sq, sqq, sqx = groups.per_group(groups.sums(q))
            # The least-squares fit in float64 from the float32 sums (exact to a few ulps).
            sw, sx = (groups.per_group(t).double() for t in (groups.sw, groups.sx))
            sq64, sqq64, sqx64 = sq.double(), sqq.double(), sqx.double()
            if fmt.affine:
                det = sw * sqq64 - sq64 * sq64
                ok = det > 1e-6 * sw * sqq64
                # Codes all equal fit any point of the line s q + b = mean: take the one with b = 0 (the K-quants
                # store b <= 0, and a constant block then scales from it), or s = 0 if the codes are 0.
                s0 = torch.where(ok, (sw * sqx64 - sq64 * sx) / torch.where(ok, det, 1.0), _ratio(sx, sq64))
                b0 = _ratio(sx - s0 * sq64, sw).float()
            else:
                s0, b0 = _ratio(sqx64, sqq64), torch.zeros_like(sqx)
            s0 = s0.float()
            parts.append((s0, b0, groups.per_group(groups.error(q, s0, b0)), sqq, sq, groups.per_group(groups.sw)))
        return _CodeSets(*(torch.stack(t) for t in zip(*parts)))

    @staticmethod
    def concat(*parts: _CodeSets) -> _CodeSets:
        return _CodeSets(*(torch.cat([getattr(p, name) for p in parts]) for name in _CodeSets._FIELDS))

    def error(self, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The modelled error of every code set for ``scale`` (and ``bias``), broadcast against ``[K, N, n_sub]``."""
        ds = scale - self.s0
        if bias is None:  # symmetric: the bias stays 0
            return ds.square_().mul_(self.sqq).add_(self.c)
        return self._affine_error(ds, (bias - self.b0).addcmul_(ds, self.slope))

    def _affine_error(self, ds: torch.Tensor, miss: torch.Tensor) -> torch.Tensor:
        """The error at a scale ``ds`` off the least-squares one, and a bias ``miss`` off the best for that
        scale (both overwritten)."""
        return miss.square_().mul_(self.sw).add_(ds.square_().mul_(self.curv)).add_(self.c)

    def fit_min(self, d: torch.Tensor, sc: torch.Tensor, dmin: torch.Tensor, m_max: int):
        """For scales ``d sc``, the nearest mins ``m`` in ``[0, m_max]`` to the best bias (``-dmin m``), and the
        error: ``(m, error)`` broadcast against ``[K, N, n_sub]``."""
        ds = (d * sc).sub_(self.s0)
        best_min = (self.slope * ds).sub_(self.b0)  # minus the best bias for the scale
        m = (best_min * safe_inverse(dmin)).round_().clamp_(0, m_max)
        return m, self._affine_error(ds, best_min.addcmul_(dmin, m, value=-1.0))


def _best_set(err: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The smallest error over the code sets (dimension -3 of ``[..., K, N, n_sub]``) and each of ``values``
    (broadcast against ``err``) at that set, ``[..., N, n_sub]`` each. The first set wins a tie.

    A loop over the few sets with arithmetic masks: torch's ``min`` with indices over a short dimension, and
    boolean masks, are very slow on CPU.
    """
    values = [v.expand_as(err) for v in values]
    best = err.select(-3, 0)
    chosen = [v.select(-3, 0) for v in values]
    for i in range(1, err.shape[-3]):
        e = err.select(-3, i)
        better = strictly_less(e, best)
        best = torch.minimum(best, e)
        chosen = [c.lerp(v.select(-3, i), better) for c, v in zip(chosen, values)]
    return (best, *chosen)


class _BestFit:
    """The per-block best ``_Fit`` offered so far and its error ``[N]``; the first offered wins a tie."""

    def __init__(self):
        self.fit: _Fit | None = None
        self.err: torch.Tensor | None = None

    def offer(self, fit: _Fit, err: torch.Tensor) -> None:
        """One fit (``err`` ``[N]``) or a batch of candidates along a leading dimension (``err`` ``[C, N]``)."""
        if err.dim() > 1:  # the first best candidate of every block (argmin is slow on CPU)
            best, index = err[0], torch.zeros_like(err[0])
            for i in range(1, err.shape[0]):
                better = strictly_less(err[i], best)
                best, index = torch.minimum(best, err[i]), torch.maximum(index, better.mul_(i))
            fit, err = fit.take(index.long()), best
        if self.fit is None:
            self.fit, self.err = fit, err
        else:
            better = strictly_less(err, self.err)
            self.fit, self.err = fit.select(better, self.fit), torch.minimum(err, self.err)


class KQuantFormat(GridFormat):
    """A K-quant: ``sc`` in ``[sc_min, sc_max]``; affine types also have ``m`` in ``[0, m_max]``."""

    def __init__(
        self, name: str, sub_block: int, qmin: int, qmax: int, sc_min: int, sc_max: int, m_max: int = 0,
        float_candidates: int = 7, clips: tuple[float, ...] = (), clip_candidates: int = 7,
    ):
        self.qtype = QUANT_TYPES[name]
        self.sub_block, self.qmin, self.qmax = sub_block, qmin, qmax
        self.sc_min, self.sc_max, self.m_max = sc_min, sc_max, m_max
        # Candidates of the float search over the whole range (per end for the symmetric types): fewer than
        # the shared searches' default do as well here, as the super-scale search re-chooses every scale.
        self.float_candidates = float_candidates
        # The affine float search also tries ranges clipped by these fractions (``search_affine_scale``),
        # ``clip_candidates`` grids each: about half a grid step (the grid's offset matters) and more (an
        # unimportant extreme value). These gained 1-3% of error over Gaussian and Student-t weights.
        self.clips, self.clip_candidates = clips, clip_candidates

    # Candidate super-scales put the largest sub-scale (or min) of a float fit at ``t`` integer steps, ``t``
    # from 3/4 of the integer range to just past its end (that rounds the largest down to the end, which can
    # pay off when it is an outlier), each followed by a least-squares refit. One more round, after the
    # re-rounded sub-block moves, gains a few tenths of a percent; a second round much less.
    n_candidates = 12
    rounds = 1

    @property
    def affine(self) -> bool:
        return self.m_max > 0

    def _ends(self, top: int) -> torch.Tensor:
        return torch.linspace(0.75 * top, top + 0.5, self.n_candidates)

    # --- choosing the scales -----------------------------------------------------------------------------

    def choose_scales(self, block: torch.Tensor, importance: torch.Tensor) -> BlockScales:
        x, w = self.sub_blocks(block), self.sub_blocks(importance)
        if self.affine:
            float_fits = [search_affine_scale(
                x, w, self.qmax, nonpositive_bias=True, n_candidates=self.float_candidates, clips=self.clips,
                clip_candidates=self.clip_candidates, ties_to_finest=True,
            )]
        else:
            # A sub-block's best sign depends on the super-block: the grid and the integer scales are one
            # longer on the negative side, so the block's largest values fit finest with both negative. Keep
            # the best codes of either sign and let the super-scale search choose per sub-block.
            zero = torch.zeros_like(x[..., 0])
            float_fits = [
                (search_symmetric_scale(
                    x, w, self.qmin, self.qmax, self.float_candidates, ends=(end,), ties_to_finest=True
                ), zero)
                for end in (self.qmin, self.qmax)
            ]
        groups = WeightedGroups(x, w)
        float_sets = _CodeSets.of_codes(groups, self, float_fits)
        fit = self._search(float_sets, float_sets, None)
        for _ in range(self.rounds):
            fit = self._step_sub_scales(groups, fit)
            current = _CodeSets.of_codes(groups, self, [(fit.scale, fit.bias)])
            # The symmetric types' current codes already hold each sub-block's better sign: their float codes
            # would triple the second search's cost for no measurable gain.
            if self.affine:
                current = _CodeSets.concat(current, float_sets)
            fit = self._search(current, float_sets, fit)
        return self._block_scales(self._step_sub_scales(groups, fit))

    def _search(self, sets: _CodeSets, float_sets: _CodeSets, current: _Fit | None) -> _Fit:
        """The stored parameters of least modelled error; the candidates scale the float fits' largest
        sub-block scales (and mins), ``current`` (if any) is one of them. Candidates are evaluated in batches
        along a leading dimension (tensors ``[C, K, N, n_sub]``)."""
        best = _BestFit()
        if current is not None:
            best.offer(current, _best_set(sets.error(current.scale, current.bias))[0].sum(-1))
        if self.affine:
            self._search_affine(sets, float_sets, best)
        else:
            self._search_symmetric(sets, float_sets, best)
        return best.fit

    @staticmethod
    def _candidates(refs: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Super-scales ``ref / t`` for every reference ``[R, N]`` and end ``t``: ``[R * T, N]``, fp16."""
        return _fp16(refs[:, None, :] / ends.to(refs.device)[:, None]).flatten(0, 1)

    @staticmethod
    def _batches(candidates: torch.Tensor, sets: _CodeSets) -> tuple[torch.Tensor, ...]:
        """``candidates`` ``[C, N]`` in batches whose evaluation tensors ``[C', K, N, n_sub]`` stay in cache."""
        return candidates.split(max(1, _BATCH_ELEMENTS // sets.s0.numel()))

    def _search_symmetric(self, sets: _CodeSets, float_sets: _CodeSets, best: _BestFit) -> None:
        """``d`` and ``sc`` minimising ``sum_j min_k c_kj + sqq_kj (d sc_j - s0_kj)^2``."""
        # Either sign of d: each sub-block then takes the code set (so the sign) that suits d best.
        ends = torch.cat([self._ends(self.sc_max), -self._ends(-self.sc_min)])
        for d in self._batches(self._candidates(float_sets.s0.abs().amax(-1), ends), sets):
            for _ in range(2):  # round the sub-scales, refit d to them, round again
                d = self._offer_symmetric(sets, d, best)

    def _offer_symmetric(self, sets: _CodeSets, d: torch.Tensor, best: _BestFit) -> torch.Tensor:
        """Offers candidates ``d`` ``[C, N]`` with their best ``sc``; returns their least-squares refits."""
        dd = d[:, None, :, None]
        sc = (sets.s0 * safe_inverse(dd)).round_().clamp_(self.sc_min, self.sc_max)
        err, sc, sqq, s0 = _best_set(sets.error(dd * sc), sc, sets.sqq, sets.s0)
        best.offer(_Fit(d, sc), err.sum(-1))
        sc_sqq = sc * sqq
        return _fp16(_ratio((sc_sqq * s0).sum(-1), sc_sqq.mul_(sc).sum(-1)))

    def _search_affine(self, sets: _CodeSets, float_sets: _CodeSets, best: _BestFit) -> None:
        """``d, dmin, sc, m`` by coordinate search: ``d`` for the current (or a first) ``dmin``, then ``dmin``
        for the best ``d``, then both refit by least squares."""
        m_refs = (-float_sets.b0).clamp_min(0).amax(-1)
        dmin = _fp16(m_refs.amax(0) / self.m_max) if best.fit is None else best.fit.dmin
        for d in self._batches(self._candidates(float_sets.s0.clamp_min(0).amax(-1), self._ends(self.sc_max)), sets):
            best.offer(*self._sub_scales_affine(sets, d, dmin.expand_as(d))[:2])
        d = best.fit.d
        for dmin in self._batches(self._candidates(m_refs, self._ends(self.m_max)), sets):
            best.offer(*self._sub_scales_affine(sets, d.expand_as(dmin), dmin)[:2])
        fit, _, chosen = self._sub_scales_affine(sets, best.fit.d[None], best.fit.dmin[None], chosen=True)
        best.offer(*self._sub_scales_affine(sets, *self._refit_affine(fit, chosen))[:2])

    def _sub_scales_affine(
        self, sets: _CodeSets, d: torch.Tensor, dmin: torch.Tensor, chosen: bool = False
    ) -> tuple[_Fit, torch.Tensor, _CodeSets | None]:
        """For candidate ``d, dmin`` ``[C, N]``: the best ``sc`` (near the code set's scale) and for each the
        best ``m`` (the nearest to the best bias for that scale) of every sub-block, over the code sets; their
        error per block ``[C, N]``, and if asked the model of the code set each sub-block took (fields
        ``[C, 1, N, n_sub]``)."""
        dd, dm = d[:, None, :, None], dmin[:, None, :, None]
        # The sub-scales either side of the code set's scale (with the best bias for each scale the error is a
        # convex quadratic in the scale, least between the two), then the one below: the min is rounded too,
        # and a smaller scale sometimes rounds it better.
        floor = (sets.s0 * safe_inverse(dd)).floor_()
        err = sc = m = None
        for offset in (0, 1, -1):
            sc_o = (floor + offset).clamp_(0, self.sc_max)
            m_o, err_o = sets.fit_min(dd, sc_o, dm, self.m_max)
            if err is None:
                err, sc, m = err_o, sc_o, m_o
            else:
                better = strictly_less(err_o, err)
                err, sc, m = torch.minimum(err, err_o), sc.lerp_(sc_o, better), m.lerp_(m_o, better)
        fields = [getattr(sets, n) for n in _CodeSets._FIELDS] if chosen else []
        err, sc, m, *fields = _best_set(err, sc, m, *fields)
        return _Fit(d, sc, dmin, m), err.sum(-1), _CodeSets(*(t[:, None] for t in fields)) if chosen else None

    def _refit_affine(self, fit: _Fit, chosen: _CodeSets) -> tuple[torch.Tensor, torch.Tensor]:
        """Least-squares ``(d, dmin >= 0)`` for the block's integers ``sc, m`` in the sub-blocks' chosen code
        set models, rounded to fp16: the scale is ``d sc`` and the bias ``-dmin m``."""
        sc, m = fit.sc, fit.m
        sqq, sq, sw, s0, b0 = (getattr(chosen, n)[:, 0] for n in ("sqq", "sq", "sw", "s0", "b0"))
        # Normal equations of the model's error in (d, dmin): [[a11, a12], [a12, a22]] (d, dmin) = (r1, r2).
        a11 = (sc * sc * sqq).sum(-1)
        a22 = (m * m * sw).sum(-1)
        a12 = -(sc * m * sq).sum(-1)
        r1 = (sc * (sqq * s0 + sq * b0)).sum(-1)
        r2 = -(m * (sq * s0 + sw * b0)).sum(-1)
        det = a11 * a22 - a12 * a12
        ok = det > 1e-6 * a11 * a22
        d = torch.where(ok, _ratio(r1 * a22 - a12 * r2, det), fit.d)
        dmin = torch.where(ok, _ratio(a11 * r2 - a12 * r1, det), fit.dmin)
        # A negative dmin would turn every min into a positive offset: drop the mins and refit d alone.
        d = torch.where(dmin < 0, _ratio(r1, a11), d)
        return _fp16(d), _fp16(dmin.clamp_min(0))

    def _step_sub_scales(self, groups: WeightedGroups, fit: _Fit) -> _Fit:
        """Each sub-block's integers one step either way (scale, min, both), codes re-rounded; keep the best."""
        steps = [(-1, 0), (1, 0)]
        if self.affine:
            steps += [(0, -1), (0, 1), (-1, -1), (1, 1), (-1, 1), (1, -1)]
        best, best_err = fit, self._sub_error(groups, fit)
        for dsc, dm in steps:
            sc = (fit.sc + dsc).clamp_(self.sc_min, self.sc_max)
            m = None if fit.m is None else (fit.m + dm).clamp_(0, self.m_max)
            cand = _Fit(fit.d, sc, fit.dmin, m)
            err = self._sub_error(groups, cand)
            better = strictly_less(err, best_err)
            best, best_err = cand.select(better, best), torch.minimum(err, best_err)
        return best

    def _sub_error(self, groups: WeightedGroups, fit: _Fit) -> torch.Tensor:
        """The weighted error of every sub-block with the codes ``round_to_grid`` would write."""
        scale, bias = fit.scale, fit.bias
        return groups.per_group(groups.error(groups.codes(scale, bias, self.qmin, self.qmax), scale, bias))

    def _block_scales(self, fit: _Fit) -> BlockScales:
        """``fields``: ``d``, ``scales`` (the integer ``sc``, signed for Q3_K/Q6_K: Q3_K's packer adds the
        stored +32) and, for the affine types, ``dmin`` and ``mins``."""
        fields = {"d": fit.d, "scales": fit.sc.to(torch.int64)}
        if self.affine:
            fields.update(dmin=fit.dmin, mins=fit.m.to(torch.int64))
        return BlockScales(scale=fit.scale, bias=fit.bias, fields=fields)

    def _from_fields(self, d: torch.Tensor, sc: torch.Tensor, dmin=None, m=None) -> BlockScales:
        return self._block_scales(_Fit(d, sc.float(), dmin, None if m is None else m.float()))


# --- packing ---------------------------------------------------------------------------------------------


def _pack_2bit(u: torch.Tensor) -> torch.Tensor:
    """``[N, 256]`` values < 4 -> ``[N, 64]``, per 128 weights."""
    return pack_bits(u.reshape(-1, 2, 128), bits=2, groups=4).reshape(-1, 64)


def _unpack_2bit(b: torch.Tensor) -> torch.Tensor:
    return unpack_bits(b.reshape(-1, 2, 32), bits=2, groups=4).reshape(-1, 256)


def _pack_k4_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K's 12 bytes for 8 six-bit scales and mins: sub-blocks 0-3 in the low 6 bits of bytes 0-3 /
    4-7, sub-blocks 4-7 in the nibbles of bytes 8-11 with their top 2 bits in bits 6-7 of bytes 0-3 / 4-7."""
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    lo_sc, hi_sc, lo_m, hi_m = sc[:, :4], sc[:, 4:], m[:, :4], m[:, 4:]
    return torch.cat([lo_sc | (hi_sc >> 4) << 6, lo_m | (hi_m >> 4) << 6, (hi_sc & 0xF) | (hi_m & 0xF) << 4], dim=1)


def _unpack_k4_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b_sc, b_m, b_both = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([b_sc & 0x3F, (b_both & 0xF) | (b_sc >> 6) << 4], dim=1)
    m = torch.cat([b_m & 0x3F, (b_both >> 4) | (b_m >> 6) << 4], dim=1)
    return sc.to(torch.int64), m.to(torch.int64)


class Q2KFormat(KQuantFormat):
    def __init__(self):
        super().__init__(
            "Q2_K", sub_block=16, qmin=0, qmax=3, sc_min=0, sc_max=15, m_max=15,
            float_candidates=11, clips=(0.1, 0.2), clip_candidates=5,
        )

    def pack(self, codes: torch.Tensor, scales: BlockScales) -> torch.Tensor:
        f = scales.fields
        sc_m = (f["scales"] | f["mins"] << 4).to(torch.uint8)
        return torch.cat([sc_m, _pack_2bit(codes.to(torch.uint8)), to_fp16_bytes(f["d"]), to_fp16_bytes(f["dmin"])], 1)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, BlockScales]:
        sc_m = data[:, :16].to(torch.int64)
        codes = _unpack_2bit(data[:, 16:80]).to(torch.float32)
        d, dmin = from_fp16_bytes(data[:, 80:82]), from_fp16_bytes(data[:, 82:84])
        return codes, self._from_fields(d, sc_m & 0xF, dmin, sc_m >> 4)


class Q3KFormat(KQuantFormat):
    def __init__(self):
        super().__init__("Q3_K", sub_block=16, qmin=-4, qmax=3, sc_min=-32, sc_max=31)

    def pack(self, codes: torch.Tensor, scales: BlockScales) -> torch.Tensor:
        u = (codes.to(torch.int64) + 4).to(torch.uint8)
        s = (scales.fields["scales"] + 32).to(torch.uint8)
        hmask = pack_bits(u >> 2, bits=1, groups=8)
        s_bytes = torch.cat([pack_nibbles(s & 0xF), pack_bits(s >> 4, bits=2, groups=4)], dim=1)
        return torch.cat([hmask, _pack_2bit(u & 3), s_bytes, to_fp16_bytes(scales.fields["d"])], dim=1)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, BlockScales]:
        high = unpack_bits(data[:, :32], bits=1, groups=8)
        u = _unpack_2bit(data[:, 32:96]) | high << 2
        s = unpack_nibbles(data[:, 96:104]) | unpack_bits(data[:, 104:108], bits=2, groups=4) << 4
        codes = (u.to(torch.int64) - 4).to(torch.float32)
        return codes, self._from_fields(from_fp16_bytes(data[:, 108:110]), s.to(torch.int64) - 32)


class Q45KFormat(KQuantFormat):
    """Q4_K and Q5_K: the same scales; Q5_K adds the codes' 5th bits before the nibbles."""

    def __init__(self, name: str, bits: int, clips: tuple[float, ...]):
        super().__init__(
            name, sub_block=32, qmin=0, qmax=2**bits - 1, sc_min=0, sc_max=63, m_max=63,
            float_candidates=11, clips=clips,
        )
        self.bits = bits

    def pack(self, codes: torch.Tensor, scales: BlockScales) -> torch.Tensor:
        f = scales.fields
        u = codes.to(torch.uint8)
        parts = [to_fp16_bytes(f["d"]), to_fp16_bytes(f["dmin"]), _pack_k4_scales(f["scales"], f["mins"])]
        if self.bits == 5:
            parts.append(pack_bits(u >> 4, bits=1, groups=8))
        parts.append(pack_nibbles((u & 0xF).reshape(-1, 4, 64)).reshape(-1, 128))
        return torch.cat(parts, dim=1)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, BlockScales]:
        d, dmin = from_fp16_bytes(data[:, 0:2]), from_fp16_bytes(data[:, 2:4])
        sc, m = _unpack_k4_scales(data[:, 4:16])
        u = unpack_nibbles(data[:, -128:].reshape(-1, 4, 32)).reshape(-1, 256)
        if self.bits == 5:
            u = u | unpack_bits(data[:, 16:48], bits=1, groups=8) << 4
        return u.to(torch.float32), self._from_fields(d, sc, dmin, m)


class Q6KFormat(KQuantFormat):
    def __init__(self):
        super().__init__("Q6_K", sub_block=16, qmin=-32, qmax=31, sc_min=-128, sc_max=127)

    def pack(self, codes: torch.Tensor, scales: BlockScales) -> torch.Tensor:
        u = (codes.to(torch.int64) + 32).to(torch.uint8).reshape(-1, 2, 128)
        ql = pack_nibbles(u & 0xF).reshape(-1, 128)
        qh = pack_bits(u >> 4, bits=2, groups=4).reshape(-1, 64)
        sc = scales.fields["scales"].to(torch.int8).view(torch.uint8)
        return torch.cat([ql, qh, sc, to_fp16_bytes(scales.fields["d"])], dim=1)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, BlockScales]:
        low = unpack_nibbles(data[:, :128].reshape(-1, 2, 64))
        high = unpack_bits(data[:, 128:192].reshape(-1, 2, 32), bits=2, groups=4)
        codes = ((low | high << 4).reshape(-1, 256).to(torch.int64) - 32).to(torch.float32)
        sc = data[:, 192:208].contiguous().view(torch.int8).to(torch.int64)
        return codes, self._from_fields(from_fp16_bytes(data[:, 208:210]), sc)


KQUANT_FORMATS = {
    f.qtype.name: f
    for f in (
        Q6KFormat(),
        Q45KFormat("Q5_K", 5, clips=(0.015, 0.03, 0.1)),
        Q45KFormat("Q4_K", 4, clips=(0.03, 0.1, 0.2)),
        Q3KFormat(),
        Q2KFormat(),
    )
}
