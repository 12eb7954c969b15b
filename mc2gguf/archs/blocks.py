"""The forward pieces that model families share, written once: every adapter, the evaluation model and the
reference-MoE builder compose these (as llama.cpp's ``src/models/`` compose ``llm_graph_context``'s blocks).

Routing rules are not here: they are ODP's rule with its threshold off (``mc2gguf.odp``), so that plain
routing and pruning with ``mu = 0`` are the same arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding in Hugging Face's rotate-half layout; ``x`` is ``[B, heads, S, head_dim]``."""
    seq, dim = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotated = torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], -1)
    return x * cos + rotated * sin


def undo_rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face stores q/k rows in rotate-half order; llama.cpp expects interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def redo_rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of ``undo_rope_permute``: llama.cpp's q/k rows back to Hugging Face's."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def queries_keys(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, n_head: int, n_head_kv: int, head_dim: int,
                 theta: float, q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                 norm_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE queries ``[B, heads, S, D]`` and keys ``[B, kv_heads, S, D]`` of the normed ``x`` ``[B, S, H]``.

    ``q_norm``/``k_norm`` ``[D]``: an RMSNorm over each head's vector before RoPE (Qwen3's ``q_norm``/``k_norm``,
    llama.cpp's ``attn_q_norm``/``attn_k_norm``); without them nothing is normed.
    """
    b, s, _ = x.shape
    q = (x @ wq.T).view(b, s, n_head, head_dim)
    k = (x @ wk.T).view(b, s, n_head_kv, head_dim)
    if q_norm is not None:
        q = rms_norm(q, q_norm, norm_eps)
    if k_norm is not None:
        k = rms_norm(k, k_norm, norm_eps)
    return rope(q.transpose(1, 2), theta), rope(k.transpose(1, 2), theta)


def attention(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor, n_head: int,
              n_head_kv: int, head_dim: int, theta: float, **qk_norm) -> torch.Tensor:
    """Causal grouped-query self-attention of the normed ``x`` ``[B, S, H]`` (the residual not added);
    ``qk_norm``: :func:`queries_keys`' optional per-head norms (``q_norm``, ``k_norm``, ``norm_eps``)."""
    b, s, _ = x.shape
    q, k = queries_keys(x, wq, wk, n_head, n_head_kv, head_dim, theta, **qk_norm)
    v = (x @ wv.T).view(b, s, n_head_kv, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
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
