"""Byte-level helpers shared by the packers (torch tensors, little-endian like ggml)."""

from __future__ import annotations

import torch


def to_fp16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to fp16 precision (the precision ggml stores block scales in), as float32."""
    return x.to(torch.float16).to(torch.float32)


def to_fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """``[N]`` float -> ``[N, 2]`` uint8, the little-endian fp16 bytes."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def from_fp16_bytes(b: torch.Tensor) -> torch.Tensor:
    """``[N, 2]`` uint8 -> ``[N]`` float32."""
    return b.contiguous().view(torch.float16).reshape(-1).to(torch.float32)


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """``[N, 2k]`` values < 16 -> ``[N, k]`` bytes: the first half in low nibbles, the second half in high."""
    k = u.shape[-1] // 2
    u = u.to(torch.uint8)
    return u[..., :k] | (u[..., k:] << 4)


def unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_nibbles``."""
    return torch.cat([b & 0x0F, b >> 4], dim=-1)


def pack_bits(u: torch.Tensor, bits: int, groups: int) -> torch.Tensor:
    """Interleave ``groups`` equal slices of ``u`` ``[N, groups*k]`` into ``[N, k]`` bytes.

    Slice ``g`` takes bits ``g*bits .. (g+1)*bits`` of each byte, the layout of Q2_K's and TQ2_0's codes and
    of the high bits of Q3_K/Q5_K/Q6_K.
    """
    k = u.shape[-1] // groups
    u = u.to(torch.uint8).reshape(*u.shape[:-1], groups, k)
    out = torch.zeros(*u.shape[:-2], k, dtype=torch.uint8)
    for g in range(groups):
        out |= u[..., g, :] << (g * bits)
    return out


def unpack_bits(b: torch.Tensor, bits: int, groups: int) -> torch.Tensor:
    """Inverse of ``pack_bits``."""
    mask = (1 << bits) - 1
    return torch.cat([(b >> (g * bits)) & mask for g in range(groups)], dim=-1)
