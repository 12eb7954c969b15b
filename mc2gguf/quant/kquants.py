"""ggml's K-quant types Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: 256-weight super-blocks of 16- or 32-weight sub-blocks.

Sub-block ``j`` of a super-block has an integer scale ``sc_j`` and, for the affine types (Q2_K, Q4_K, Q5_K),
an integer min ``m_j``; the super-block has one fp16 ``d`` (and ``dmin``). Weights dequantize to
``(d * sc_j) * q`` (Q3_K, Q6_K: signed ``sc_j``, signed ``q``) or ``(d * sc_j) * q - dmin * m_j`` (``q >= 0``).

Choosing the scales. Each sub-block first gets its best float ``(scale, bias)`` from the shared searches,
which fixes its codes. For fixed codes the weighted error of a sub-block is an exact quadratic in its
``(scale, bias)`` (``_CodeStats``), so the stored parameters ``d, dmin, sc, m`` are searched on that quadratic,
cheaply, over all blocks at once: many candidate ``d`` / ``dmin``, for each the best integer sub-scales and
mins, and least-squares refits of ``d`` and ``dmin`` given the integers. The codes are then re-rounded with
the stored scales and every sub-block tries its integers one step either way with re-rounded codes (moves the
fixed-code quadratic cannot see). Repeating the two steps from the new codes never increases the error: the
current parameters are always one of the candidates, and re-rounding to the nearest code is optimal for
fixed scales.

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

from dataclasses import dataclass

import torch

from ..qtypes import QUANT_TYPES
from .bits import from_fp16_bytes, pack_bits, pack_nibbles, to_fp16, to_fp16_bytes, unpack_bits, unpack_nibbles
from .grid import BlockScales, GridFormat, round_codes, search_affine_scale, search_symmetric_scale

_FP16_MAX = 65504.0


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """A super-block scale as ggml stores it: fp16, kept finite (a huge scale saturates rather than overflows)."""
    return to_fp16(x.float().clamp(-_FP16_MAX, _FP16_MAX))


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, 0 where ``den`` is 0 (an all-zero block has d = 0 and rounds every sub-scale to 0)."""
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(num))


@dataclass
class _Fit:
    """Stored parameters of every super-block: fp16 ``d`` (and ``dmin``) ``[N]``, integer ``sc`` (and ``m``)
    ``[N, n_sub]`` as float tensors. ``dmin`` and ``m`` are ``None`` for the symmetric types."""

    d: torch.Tensor
    sc: torch.Tensor
    dmin: torch.Tensor | None = None
    m: torch.Tensor | None = None

    @property
    def scale(self) -> torch.Tensor:
        return self.d[:, None] * self.sc  # float32, the product ggml's dequantizer computes

    @property
    def bias(self) -> torch.Tensor:
        return torch.zeros_like(self.sc) if self.m is None else -(self.dmin[:, None] * self.m)

    def where(self, better: torch.Tensor, other: _Fit) -> _Fit:
        """``self`` where ``better`` (``[N]`` per block, or ``[N, n_sub]`` for the integers only), else ``other``."""
        per_block = better.dim() == 1
        sub = better[:, None] if per_block else better

        def pick(a, b, mask):
            return None if a is None else torch.where(mask, a, b)

        return _Fit(
            d=pick(self.d, other.d, better) if per_block else self.d,
            sc=pick(self.sc, other.sc, sub),
            dmin=pick(self.dmin, other.dmin, better) if per_block else self.dmin,
            m=pick(self.m, other.m, sub),
        )


class _CodeStats:
    """Per-sub-block sums giving the weighted error of any ``(scale, bias)`` for fixed codes ``q``.

    ``error(s, b) = sum w (x - s q - b)^2 - sum w x^2``, exact, in float64 so that candidates differing in the
    7th digit of the error still rank correctly.
    """

    def __init__(self, x: torch.Tensor, w: torch.Tensor, q: torch.Tensor):
        x, w, q = x.double(), w.double(), q.double()
        wq = w * q
        self.sw, self.sq, self.sqq = w.sum(-1), wq.sum(-1), (wq * q).sum(-1)
        self.sx, self.sqx = (w * x).sum(-1), (wq * x).sum(-1)

    def error(self, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        s, b = scale.double(), bias.double()
        return s * (s * self.sqq - 2 * self.sqx) + b * (b * self.sw - 2 * self.sx) + 2 * s * b * self.sq


class _BestFit:
    """The per-block best ``_Fit`` offered so far, ranked by the fixed-code error summed over the block."""

    def __init__(self, stats: _CodeStats):
        self.stats = stats
        self.fit: _Fit | None = None
        self.err: torch.Tensor | None = None

    def offer(self, fit: _Fit) -> None:
        err = self.stats.error(fit.scale, fit.bias).sum(-1)
        if self.fit is None:
            self.fit, self.err = fit, err
        else:
            better = err < self.err
            self.fit, self.err = fit.where(better, self.fit), torch.where(better, err, self.err)


class KQuantFormat(GridFormat):
    """A K-quant: ``sc`` in ``[sc_min, sc_max]``; affine types also have ``m`` in ``[0, m_max]``."""

    def __init__(self, name: str, sub_block: int, qmin: int, qmax: int, sc_min: int, sc_max: int, m_max: int = 0):
        self.qtype = QUANT_TYPES[name]
        self.sub_block, self.qmin, self.qmax = sub_block, qmin, qmax
        self.sc_min, self.sc_max, self.m_max = sc_min, sc_max, m_max

    # Candidate super-scales put the largest sub-scale (or min) at ``t`` integer steps, ``t`` from 3/4 of the
    # integer range to just past its end (that rounds the largest down to the end, which can pay off when
    # it is an outlier); a least-squares refit follows each candidate. Alternating rounds of the
    # fixed-code search and the re-rounded sub-block moves: the error hardly changes after the third.
    n_candidates = 16
    rounds = 3

    @property
    def affine(self) -> bool:
        return self.m_max > 0

    def _ends(self, top: int) -> list[float]:
        return torch.linspace(0.75 * top, top + 0.5, self.n_candidates).tolist()

    # --- choosing the scales -----------------------------------------------------------------------------

    def choose_scales(self, block: torch.Tensor, importance: torch.Tensor) -> BlockScales:
        x, w = self.sub_blocks(block), self.sub_blocks(importance)
        if self.affine:
            scale, bias = search_affine_scale(x, w, self.qmax, nonpositive_bias=True)
        else:
            scale = search_symmetric_scale(x, w, self.qmin, self.qmax)
            bias = torch.zeros_like(scale)
        fit = None
        for _ in range(self.rounds):
            stats = _CodeStats(x, w, self._codes(x, scale, bias))
            fit = self._fit_affine(stats, scale, bias, fit) if self.affine else self._fit_symmetric(stats, scale, fit)
            fit = self._step_sub_scales(x, w, fit)
            scale, bias = fit.scale, fit.bias
        return self._block_scales(fit)

    def _codes(self, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return round_codes(x, scale[..., None], bias[..., None], self.qmin, self.qmax)

    def _fit_symmetric(self, st: _CodeStats, scale: torch.Tensor, current: _Fit | None) -> _Fit:
        """Best ``d`` and ``sc`` for the fixed codes: ``min sum_j sqq_j (d sc_j - target_j)^2``."""
        target = torch.where(st.sqq > 0, st.sqx / st.sqq.clamp_min(1e-300), scale.double()).float()
        ref = target.gather(-1, target.abs().argmax(-1, keepdim=True)).squeeze(-1)
        best = _BestFit(st)
        if current is not None:
            best.offer(current)
        # Either sign of d: the integer range is one longer on the negative side, as the codes' grid is.
        for t in self._ends(self.sc_max) + [-t for t in self._ends(-self.sc_min)]:
            d = _fp16(ref / t)
            for _ in range(2):  # round the sub-scales, refit d to them, round again
                sc = torch.round(_ratio(target, d[:, None])).clamp_(self.sc_min, self.sc_max)
                best.offer(_Fit(d, sc))
                d = _fp16(_ratio((sc * st.sqx).sum(-1), (sc * sc * st.sqq).sum(-1)))
        return best.fit

    def _fit_affine(self, st: _CodeStats, scale: torch.Tensor, bias: torch.Tensor, current: _Fit | None) -> _Fit:
        """Best ``d, dmin, sc, m`` for the fixed codes, by coordinate search over ``d`` and ``dmin``."""
        # The unconstrained least-squares (scale, bias) of each sub-block for its codes; where the codes do
        # not determine both (all equal), the current ones.
        det = st.sw * st.sqq - st.sq * st.sq
        ok = det > 1e-9 * st.sw * st.sqq
        s_target = torch.where(ok, (st.sw * st.sqx - st.sq * st.sx) / torch.where(ok, det, 1.0), scale.double())
        b_target = torch.where(ok, (st.sx - s_target * st.sq) / torch.where(ok, st.sw, 1.0), bias.double())
        s_ref = s_target.float().clamp_min(0).max(-1).values
        m_ref = (-b_target).float().clamp_min(0).max(-1).values

        best = _BestFit(st)
        if current is None:
            d, dmin = _fp16(s_ref / self.sc_max), _fp16(m_ref / self.m_max)
        else:
            best.offer(current)
            d, dmin = current.d, current.dmin
        for _ in range(2):
            for t in self._ends(self.sc_max):
                best.offer(self._sub_scales_affine(st, s_target, _fp16(s_ref / t), dmin))
            d = best.fit.d
            for t in self._ends(self.m_max):
                best.offer(self._sub_scales_affine(st, s_target, d, _fp16(m_ref / t)))
            d, dmin = self._refit_affine(st, best.fit)
            best.offer(self._sub_scales_affine(st, s_target, d, dmin))
            d, dmin = best.fit.d, best.fit.dmin
        return best.fit

    def _sub_scales_affine(self, st: _CodeStats, s_target: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor) -> _Fit:
        """For given ``d, dmin``, the best ``sc`` (the nearest to the target, or one step off) and, for each,
        the best ``m`` (the nearest to the least-squares bias given the scale) of every sub-block."""
        sc0 = torch.round(_ratio(s_target.float(), d[:, None]))
        best_err, best = None, None
        for step in (-1, 0, 1):
            sc = (sc0 + step).clamp_(0, self.sc_max)
            s = d[:, None] * sc
            b = torch.where(st.sw > 0, (st.sx - s.double() * st.sq) / st.sw.clamp_min(1e-300), 0.0).float()
            m = torch.round(_ratio(-b, dmin[:, None])).clamp_(0, self.m_max)
            fit = _Fit(d, sc, dmin, m)
            err = st.error(fit.scale, fit.bias)
            if best is None:
                best_err, best = err, fit
            else:
                better = err < best_err
                best_err, best = torch.where(better, err, best_err), fit.where(better, best)
        return best

    def _refit_affine(self, st: _CodeStats, fit: _Fit) -> tuple[torch.Tensor, torch.Tensor]:
        """Least-squares ``(d, dmin >= 0)`` for the block's integers ``sc, m`` and fixed codes, rounded to fp16."""
        sc, m = fit.sc.double(), fit.m.double()
        a = (sc * sc * st.sqq).sum(-1)
        b = (m * m * st.sw).sum(-1)
        c = (sc * m * st.sq).sum(-1)
        r1, r2 = (sc * st.sqx).sum(-1), (m * st.sx).sum(-1)
        det = a * b - c * c
        ok = det > 1e-9 * a * b
        d = torch.where(ok, (r1 * b - c * r2) / torch.where(ok, det, 1.0), fit.d.double())
        dmin = torch.where(ok, (c * r1 - a * r2) / torch.where(ok, det, 1.0), fit.dmin.double())
        # A negative dmin would turn every min into a positive offset: drop the mins' term and refit d alone.
        d = torch.where(dmin < 0, _ratio(r1, a), d)
        return _fp16(d), _fp16(dmin.clamp_min(0))

    def _step_sub_scales(self, x: torch.Tensor, w: torch.Tensor, fit: _Fit) -> _Fit:
        """Each sub-block's integers one step either way (scale, min, both), codes re-rounded; keep the best."""
        steps = [(-1, 0), (1, 0)]
        if self.affine:
            steps += [(0, -1), (0, 1), (-1, -1), (1, 1), (-1, 1), (1, -1)]
        best, best_err = fit, self._sub_error(x, w, fit)
        for dsc, dm in steps:
            sc = (fit.sc + dsc).clamp_(self.sc_min, self.sc_max)
            m = None if fit.m is None else (fit.m + dm).clamp_(0, self.m_max)
            cand = _Fit(fit.d, sc, fit.dmin, m)
            err = self._sub_error(x, w, cand)
            better = err < best_err
            best, best_err = cand.where(better, best), torch.where(better, err, best_err)
        return best

    def _sub_error(self, x: torch.Tensor, w: torch.Tensor, fit: _Fit) -> torch.Tensor:
        """The weighted error of every sub-block with the codes ``round_to_grid`` would write."""
        scale, bias = fit.scale[..., None], fit.bias[..., None]
        q = round_codes(x, scale, bias, self.qmin, self.qmax)
        return (w * (x - (scale * q + bias)) ** 2).sum(-1)

    def _block_scales(self, fit: _Fit) -> BlockScales:
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
        super().__init__("Q2_K", sub_block=16, qmin=0, qmax=3, sc_min=0, sc_max=15, m_max=15)

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

    def __init__(self, name: str, bits: int):
        super().__init__(name, sub_block=32, qmin=0, qmax=2**bits - 1, sc_min=0, sc_max=63, m_max=63)
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
    for f in (Q6KFormat(), Q45KFormat("Q5_K", 5), Q45KFormat("Q4_K", 4), Q3KFormat(), Q2KFormat())
}
