"""ggml's ternary types TQ1_0 and TQ2_0: 256-weight blocks, ``w = d * q`` with ``q`` in {-1, 0, 1}.

Both store one fp16 ``d`` per block, after the codes, and store each code as the trit ``t = q + 1``.

* TQ2_0 (66 bytes): 2 bits a trit, ``pack_bits`` layout per 128 weights: byte ``m`` of the 32 holds
  weights ``m, m+32, m+64, m+96`` in bits 0-1, 2-3, 4-5, 6-7.
* TQ1_0 (54 bytes): 5 trits a byte, as a base-3 fixed-point fraction. Byte ``m`` of a group of ``width``
  bytes holds weights ``m + n*width`` (n = 0..4, most significant trit first) as
  ``ceil(256 * v / 243)``, ``v = sum t_n 3^(4-n)``; ggml reads trit ``n`` back as
  ``((uint8)(byte * 3^n) * 3) >> 8``. Weights 0-159 fill 32 bytes, 160-239 the next 16, and 240-255 the 4
  ``qh`` bytes with 4 trits each (the 5th, least significant trit is 0).

ggml's own quantizer ignores the importance weights and uses ``d = max |w|``, so only weights beyond
``max/2`` become non-zero. The grid is symmetric, so the best scale is found exactly: at the optimum the
non-zero codes are the ``k`` weights of largest magnitude (``q = round(w / d)`` for the least-squares
``d`` of that set), so trying every ``k`` with prefix sums over the magnitude-sorted block gives the
global minimum of ``sum imp (w - d q)^2``.
"""

from __future__ import annotations

import torch

from .types import QUANT_TYPES
from .bits import from_fp16_bytes, pack_bits, to_fp16, to_fp16_bytes, unpack_bits
from .grid import BlockScales, GridFormat

_FP16_MAX = 65504.0

# TQ1_0's groups of base-3 packed bytes: (first weight, bytes, trits per byte) in block order.
_TQ1_GROUPS = ((0, 32, 5), (160, 16, 5), (240, 4, 4))
_POW3 = (81, 27, 9, 3, 1)


def ternary_scale(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The scale ``d >= 0`` minimising ``sum w (x - d q)^2`` over ``q`` in {-1, 0, 1}, for ``[..., g]`` groups.

    For the set ``S`` of non-zero codes the best ``d`` is ``sum_S w|x| / sum_S w`` with error
    ``sum w x^2 - (sum_S w|x|)^2 / sum_S w``; the optimal ``S`` is a magnitude prefix, so every prefix is tried.
    """
    a = x.abs()
    order = a.argsort(dim=-1, descending=True)
    a_sorted, w_sorted = a.gather(-1, order), w.gather(-1, order)
    num = (w_sorted * a_sorted).cumsum(-1)  # sum_S w|x| for S = the k+1 largest magnitudes
    den = w_sorted.cumsum(-1)
    gain = torch.where(den > 0, num * num / den.clamp_min(1e-30), torch.zeros_like(num))
    best = gain.argmax(-1, keepdim=True)  # first (smallest) prefix on ties
    num_best, den_best = num.gather(-1, best).squeeze(-1), den.gather(-1, best).squeeze(-1)
    return torch.where(den_best > 0, num_best / den_best.clamp_min(1e-30), torch.zeros_like(num_best))


class TernaryFormat(GridFormat):
    sub_block = 256
    qmin, qmax = -1, 1

    def __init__(self, name: str):
        self.qtype = QUANT_TYPES[name]

    def choose_scales(self, block: torch.Tensor, importance: torch.Tensor) -> BlockScales:
        # ggml reads d as a plain fp16 multiplier, so a negative d would be valid, but the grid is symmetric
        # (d and -d give the same error): keep ggml's convention d >= 0, clamped to fp16's finite range.
        d = to_fp16(ternary_scale(block, importance).clamp_(0.0, _FP16_MAX))
        return BlockScales(scale=d[:, None], bias=torch.zeros_like(d)[:, None], fields={"d": d})

    def pack(self, codes: torch.Tensor, scales: BlockScales) -> torch.Tensor:
        trits = (codes.to(torch.int64) + 1).clamp_(0, 2)
        return torch.cat([self._pack_trits(trits), to_fp16_bytes(scales.fields["d"])], dim=1)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, BlockScales]:
        d = from_fp16_bytes(data[:, -2:])
        codes = (self._unpack_trits(data[:, :-2]) - 1).to(torch.float32)
        return codes, BlockScales(scale=d[:, None], bias=torch.zeros_like(d)[:, None], fields={"d": d})

    def _pack_trits(self, trits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _unpack_trits(self, qs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TQ2Format(TernaryFormat):
    def __init__(self):
        super().__init__("TQ2_0")

    def _pack_trits(self, trits: torch.Tensor) -> torch.Tensor:
        rows = trits.shape[0]
        return pack_bits(trits.reshape(rows, 2, 128), bits=2, groups=4).reshape(rows, 64)

    def _unpack_trits(self, qs: torch.Tensor) -> torch.Tensor:
        rows = qs.shape[0]
        return unpack_bits(qs.reshape(rows, 2, 32), bits=2, groups=4).reshape(rows, 256).to(torch.int64)


class TQ1Format(TernaryFormat):
    def __init__(self):
        super().__init__("TQ1_0")

    def _pack_trits(self, trits: torch.Tensor) -> torch.Tensor:
        rows = trits.shape[0]
        parts = []
        for start, width, n_trits in _TQ1_GROUPS:
            t = trits[:, start : start + n_trits * width].reshape(rows, n_trits, width)
            pow3 = torch.tensor(_POW3[:n_trits], dtype=torch.int64)
            v = (t * pow3[:, None]).sum(1)  # base-3 value, most significant trit first, < 243
            parts.append(((v * 256 + 242) // 243).to(torch.uint8))  # ceil(256 v / 243) <= 255
        return torch.cat(parts, dim=1)

    def _unpack_trits(self, qs: torch.Tensor) -> torch.Tensor:
        rows = qs.shape[0]
        parts, offset = [], 0
        for _, width, n_trits in _TQ1_GROUPS:
            b = qs[:, offset : offset + width].to(torch.int64)
            offset += width
            pow3 = torch.tensor(_POW3[::-1][:n_trits], dtype=torch.int64)  # 1, 3, 9, 27, 81 as ggml
            shifted = (b[:, None, :] * pow3[:, None]) & 0xFF  # ggml's uint8 product
            parts.append(((shifted * 3) >> 8).reshape(rows, n_trits * width))
        return torch.cat(parts, dim=1)


TERNARY_FORMATS = {f.qtype.name: f for f in (TQ2Format(), TQ1Format())}
