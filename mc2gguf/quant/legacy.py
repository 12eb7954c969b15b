"""ggml's original 32-weight block types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

Each block stores an fp16 scale ``d`` (and for the ``_1`` types an fp16 offset ``m``) followed by the
codes: Q8_0 as int8; the 4/5-bit types as low nibbles (weight ``j`` in byte ``j``, weight ``j + 16`` in
the high nibble of byte ``j``), the 5th bits of the ``_5`` types as a little-endian uint32 (bit ``j`` for
weight ``j``) placed before the nibbles.
"""

from __future__ import annotations

import torch

from .types import QUANT_TYPES
from .bits import from_fp16_bytes, pack_nibbles, to_fp16, to_fp16_bytes, unpack_nibbles
from .grid import BlockScales, GridFormat, search_affine_scale, search_symmetric_scale


class LegacyFormat(GridFormat):
    sub_block = 32

    def __init__(self, name: str, bits: int, affine: bool):
        self.qtype = QUANT_TYPES[name]
        self.bits = bits
        self.affine = affine
        if affine:  # w = d q + m, q in [0, 2^bits)
            self.qmin, self.qmax, self.stored_offset = 0, 2**bits - 1, 0
        elif bits == 8:  # ggml's Q8_0 grid is symmetric: [-127, 127]
            self.qmin, self.qmax, self.stored_offset = -127, 127, 0
        else:  # w = d (u - 2^(bits-1)), u the stored unsigned code
            self.qmin, self.qmax, self.stored_offset = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, 2 ** (bits - 1)

    def choose_scales(self, block: torch.Tensor, importance: torch.Tensor) -> BlockScales:
        if self.affine:
            d, m = search_affine_scale(block, importance, self.qmax, nonpositive_bias=False)
            d, m = to_fp16(d), to_fp16(m)
        else:
            d, m = to_fp16(search_symmetric_scale(block, importance, self.qmin, self.qmax)), torch.zeros_like(block[:, 0])
        return BlockScales(scale=d[:, None], bias=m[:, None], fields={"d": d, "m": m})

    def pack(self, codes: torch.Tensor, scales: BlockScales) -> torch.Tensor:
        u = (codes.to(torch.int32) + self.stored_offset).to(torch.uint8)
        parts = [to_fp16_bytes(scales.fields["d"])]
        if self.affine:
            parts.append(to_fp16_bytes(scales.fields["m"]))
        if self.bits == 8:
            parts.append(u)
        else:
            if self.bits == 5:
                high = (u.to(torch.int64) >> 4) & 1
                qh = (high << torch.arange(32, dtype=torch.int64)).sum(-1)
                parts.append(torch.stack([(qh >> s) & 0xFF for s in (0, 8, 16, 24)], -1).to(torch.uint8))
            parts.append(pack_nibbles(u & 0x0F))
        return torch.cat(parts, dim=1)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, BlockScales]:
        d = from_fp16_bytes(data[:, 0:2])
        offset = 2
        m = torch.zeros_like(d)
        if self.affine:
            m = from_fp16_bytes(data[:, 2:4])
            offset = 4
        if self.bits == 8:
            codes = data[:, offset:].view(torch.int8).to(torch.float32)
        else:
            u = unpack_nibbles(data[:, -16:]).to(torch.int64)
            if self.bits == 5:
                qh = sum(data[:, offset + i].to(torch.int64) << (8 * i) for i in range(4))
                u = u | (((qh[:, None] >> torch.arange(32)) & 1) << 4)
            codes = (u - self.stored_offset).to(torch.float32)
        return codes, BlockScales(scale=d[:, None], bias=m[:, None], fields={"d": d, "m": m})


LEGACY_FORMATS = {
    f.qtype.name: f
    for f in (
        LegacyFormat("Q8_0", 8, affine=False),
        LegacyFormat("Q5_1", 5, affine=True),
        LegacyFormat("Q5_0", 5, affine=False),
        LegacyFormat("Q4_1", 4, affine=True),
        LegacyFormat("Q4_0", 4, affine=False),
    )
}
