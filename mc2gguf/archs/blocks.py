"""The forward pieces that model families share, written once: every adapter, the evaluation model and the
reference-MoE builder compose these (as llama.cpp's ``src/models/`` compose ``llm_graph_context``'s blocks).

Routing rules are not here: they are ODP's rule with its threshold off (``mc2gguf.odp``), so that plain
routing and pruning with ``mu = 0`` are the same arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_frequencies(theta: float, dim: int) -> torch.Tensor:
    """The inverse frequencies of plain RoPE over ``dim`` rotary dimensions."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding in Hugging Face's rotate-half layout; ``x`` is ``[B, heads, S, head_dim]``."""
    seq, dim = x.shape[-2], x.shape[-1]
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), rope_frequencies(theta, dim))
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotated = torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], -1)
    return x * cos + rotated * sin


def rope_interleaved(x: torch.Tensor, inv_freq: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Rotary embedding on interleaved pairs ``(x0, x1), (x2, x3), ...`` (DeepSeek's layout, llama.cpp's "norm"
    RoPE) at frequencies ``inv_freq``, cos and sin multiplied by ``scale`` (YaRN's attention factor); ``x`` is
    ``[B, heads, S, rope_dim]``."""
    angles = torch.outer(torch.arange(x.shape[-2], dtype=torch.float32), inv_freq)
    cos, sin = angles.cos() * scale, angles.sin() * scale
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)


def undo_rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face stores q/k rows in rotate-half order; llama.cpp expects interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def redo_rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of ``undo_rope_permute``: llama.cpp's q/k rows back to Hugging Face's."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class Heads:
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_theta: float


@dataclass(frozen=True)
class QKV:
    """An attention's input projections ``[out, H]``, their optional biases, and the optional RMSNorm of the
    queries and keys before RoPE: over each head's vector (``per_head``, Qwen3's ``[head_dim]`` weights) or over
    the whole projection (OLMoE's ``[heads * head_dim]``); llama.cpp's ``attn_q_norm``/``attn_k_norm``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    per_head: bool = True
    norm_eps: float = 1e-6


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x @ w.T if bias is None else x @ w.T + bias


def _project(x: torch.Tensor, w: torch.Tensor, bias, norm, per_head: bool, eps: float, n: int,
             head_dim: int) -> torch.Tensor:
    b, s, _ = x.shape
    y = _linear(x, w, bias)
    if norm is not None and not per_head:
        y = rms_norm(y, norm, eps)
    y = y.view(b, s, n, head_dim)
    if norm is not None and per_head:
        y = rms_norm(y, norm, eps)
    return y


def queries_keys(x: torch.Tensor, p: QKV, heads: Heads) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE queries ``[B, heads, S, D]`` and keys ``[B, kv_heads, S, D]`` of the normed ``x`` ``[B, S, H]``."""
    q = _project(x, p.q, p.q_bias, p.q_norm, p.per_head, p.norm_eps, heads.n_head, heads.head_dim)
    k = _project(x, p.k, p.k_bias, p.k_norm, p.per_head, p.norm_eps, heads.n_head_kv, heads.head_dim)
    return rope(q.transpose(1, 2), heads.rope_theta), rope(k.transpose(1, 2), heads.rope_theta)


def attention(x: torch.Tensor, p: QKV, wo: torch.Tensor, heads: Heads) -> torch.Tensor:
    """Causal grouped-query self-attention of the normed ``x`` ``[B, S, H]`` (the residual not added)."""
    b, s, _ = x.shape
    q, k = queries_keys(x, p, heads)
    v = _linear(x, p.v, p.v_bias).view(b, s, heads.n_head_kv, heads.head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return out.transpose(1, 2).reshape(b, s, -1) @ wo.T


@dataclass(frozen=True)
class MLA:
    """DeepSeek's multi-head latent attention in llama.cpp's form: the queries from ``q`` ``[heads * (nope +
    rope), H]`` or through a low-rank ``q_a`` ``[q_rank, H]``, its RMSNorm ``q_a_norm`` and ``q_b``; one latent
    ``kv_a`` ``[kv_rank + rope, H]`` (RMSNorm ``kv_a_norm`` over its first ``kv_rank``; the rest is a RoPE key
    shared by every head), expanded per head into the keys by ``k_b`` ``[heads, kv_rank, nope]`` and the values
    by ``v_b`` ``[heads, v_dim, kv_rank]`` (the converter's split of ``kv_b_proj``)."""

    kv_a: torch.Tensor
    kv_a_norm: torch.Tensor
    k_b: torch.Tensor
    v_b: torch.Tensor
    inv_freq: torch.Tensor  # [rope_dim / 2]
    rope_scale: float  # on cos and sin (YaRN's attention factor; 1 without YaRN)
    softmax_scale: float  # on q k^T: (nope + rope)^-1/2, times YaRN's mscale^2
    norm_eps: float
    q: torch.Tensor | None = None
    q_a: torch.Tensor | None = None
    q_a_norm: torch.Tensor | None = None
    q_b: torch.Tensor | None = None


def mla_queries_keys_values(x: torch.Tensor, p: MLA) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Post-RoPE queries and keys ``[B, heads, S, nope + rope]`` and values ``[B, heads, S, v_dim]`` of the
    normed ``x`` ``[B, S, H]``."""
    b, s, _ = x.shape
    n_head, kv_rank, nope = p.k_b.shape
    rope_dim = 2 * p.inv_freq.numel()
    q = x @ p.q.T if p.q is not None else rms_norm(x @ p.q_a.T, p.q_a_norm, p.norm_eps) @ p.q_b.T
    q = q.view(b, s, n_head, nope + rope_dim).transpose(1, 2)
    q_nope, q_pe = q.split([nope, rope_dim], dim=-1)
    latent, k_pe = (x @ p.kv_a.T).split([kv_rank, rope_dim], dim=-1)
    latent = rms_norm(latent, p.kv_a_norm, p.norm_eps)[:, None]  # [B, 1, S, kv_rank]
    k_pe = rope_interleaved(k_pe[:, None], p.inv_freq, p.rope_scale).expand(b, n_head, s, rope_dim)
    q = torch.cat([q_nope, rope_interleaved(q_pe, p.inv_freq, p.rope_scale)], -1)
    k = torch.cat([latent @ p.k_b, k_pe], -1)
    return q, k, latent @ p.v_b.transpose(1, 2)


def mla_attention(x: torch.Tensor, p: MLA, wo: torch.Tensor) -> torch.Tensor:
    """Causal multi-head latent attention of the normed ``x`` ``[B, S, H]`` (the residual not added)."""
    b, s, _ = x.shape
    q, k, v = mla_queries_keys_values(x, p)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=p.softmax_scale)
    return out.transpose(1, 2).reshape(b, s, -1) @ wo.T


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """A SwiGLU FFN's hidden activation (the input of its down projection)."""
    return F.silu(x @ gate.T) * (x @ up.T)


def dispatch_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, n_experts: int,
                     activation: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
                     down: Callable[[int], torch.Tensor], visit=None) -> torch.Tensor:
    """The MoE output for a routing: ``sum_s weights[t, s] * E_{ids[t, s]}(x_t)``, slot ``-1`` skipped.

    ``activation(e, x_routed, token_index)`` is expert ``e``'s hidden activation on its routed tokens and
    ``down(e)`` its down projection ``[H, I]``; ``visit(e, token_index, weight, activation)`` sees every expert
    that some token selects (calibration collects its Hessians there).
    """
    out = torch.zeros_like(x)
    for e in range(n_experts):
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        if token.numel():
            w = weights[token, slot]
            a = activation(e, x[token], token)
            out.index_add_(0, token, (a @ down(e).T) * w[:, None])
            if visit:
                visit(e, token, w, a)
    return out
