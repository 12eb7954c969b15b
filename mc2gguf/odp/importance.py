"""Which tokens ODP protects: the paper's prefill importance (L1 norm of the router input x mean attention
received) and the decode-time proxy (the router input's L1 norm above a calibrated threshold)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

#: Rows of an attention map handled at once by :func:`attention_received` (bounds its temporaries).
_CHUNK_ELEMENTS = 1 << 24


def router_input_norm(router_input: torch.Tensor) -> torch.Tensor:
    """L1 norm of each token's router input ``[T, H]`` -> ``[T]`` float32 (accumulated in fp32)."""
    return router_input.float().abs().sum(dim=-1)


def _row_blocks(attn, chunk_rows: int | None) -> tuple[Iterable[torch.Tensor], int | None]:
    """Normalise the accepted attention forms to an iterable of ``[heads, rows, T]`` row blocks."""
    if isinstance(attn, torch.Tensor):
        if attn.dim() == 2:
            attn = attn.unsqueeze(0)
        if attn.dim() != 3 or attn.shape[1] != attn.shape[2]:
            raise ValueError(f"attention probabilities must be [heads, T, T] or [T, T], got {tuple(attn.shape)}")
        T = attn.shape[-1]
        rows = chunk_rows or max(1, _CHUNK_ELEMENTS // max(1, attn.shape[0] * T))
        return (attn[:, r:r + rows] for r in range(0, T, rows)), T
    if callable(attn):
        raise TypeError("pass a callable as attention_received(..., n_tokens=T)")
    return attn, None


def attention_received(
    attn: torch.Tensor | Iterable[torch.Tensor] | Callable[[int, int], torch.Tensor],
    *,
    n_tokens: int | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean causal attention each token receives, averaged over heads: ``[T]`` float32.

    ``a_j = 1 / (heads * (T - j)) * sum_h sum_{i >= j} A[h, i, j]`` with rows ``i`` the queries: the
    column sums of the causal attention map over the ``T - j`` tokens that may attend to token ``j`` (it
    and every later token). Entries above the diagonal (``i < j``) are ignored even if non-zero.

    ``attn`` is the layer's attention probabilities in one of three forms:

    - a tensor ``[heads, T, T]`` (or ``[T, T]`` for one head), processed in row chunks of about 16M
      elements (``chunk_rows`` overrides) so temporaries stay small;
    - an iterable of consecutive row blocks ``[heads, rows, T]`` (or ``[rows, T]``), starting at row 0 and
      covering all ``T`` rows: the map need never exist whole;
    - a callable ``f(start, stop) -> [heads, stop - start, T]`` with ``n_tokens=T``, called for row chunks.
    """
    if callable(attn) and not isinstance(attn, torch.Tensor):
        if n_tokens is None:
            raise ValueError("a callable attention source needs n_tokens")
        fn = attn
        T = int(n_tokens)
        rows = chunk_rows or 256
        blocks: Iterable[torch.Tensor] = (fn(r, min(T, r + rows)) for r in range(0, T, rows))
    else:
        blocks, T = _row_blocks(attn, chunk_rows)
    colsum: torch.Tensor | None = None
    heads = None
    row = 0
    for block in blocks:
        if block.dim() == 2:
            block = block.unsqueeze(0)
        if block.dim() != 3:
            raise ValueError(f"attention row blocks must be [heads, rows, T], got {tuple(block.shape)}")
        if T is None:
            T = block.shape[-1]
        if block.shape[-1] != T or (heads is not None and block.shape[0] != heads):
            raise ValueError(f"attention row block of shape {tuple(block.shape)} does not fit [heads={heads}, *, T={T}]")
        heads = block.shape[0]
        r = block.shape[1]
        if row + r > T:
            raise ValueError(f"attention row blocks cover more than T={T} rows")
        summed = block.float().sum(dim=0)  # [r, T]: over heads
        summed = torch.tril(summed, diagonal=row)  # keep j <= i for rows i = row .. row + r - 1
        part = summed.sum(dim=0)
        colsum = part if colsum is None else colsum + part
        row += r
    if T is None:
        raise ValueError("empty attention source: pass n_tokens or at least one block")
    if row != T:
        raise ValueError(f"attention row blocks covered {row} of T={T} rows")
    if colsum is None:  # T == 0
        return torch.zeros(0, dtype=torch.float32)
    count = torch.arange(T, 0, -1, device=colsum.device, dtype=torch.float32) * heads  # heads * (T - j)
    return colsum / count


def attention_received_from_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    chunk_rows: int = 256,
) -> torch.Tensor:
    """:func:`attention_received` from the layer's (post-RoPE) queries and keys, for models whose attention
    kernel (SDPA, flash) never materialises the probabilities.

    ``q`` ``[heads, T, D]``, ``k`` ``[kv_heads, T, D]`` (grouped-query attention: ``heads`` a multiple of
    ``kv_heads``, query head ``h`` reading kv head ``h // (heads // kv_heads)``), ``scale`` default
    ``D ** -0.5``. Plain causal softmax, computed in fp32 ``chunk_rows`` query rows at a time: the full
    ``[heads, T, T]`` map is never held.
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[1:] != k.shape[1:] or q.shape[0] % k.shape[0]:
        raise ValueError(f"q [heads, T, D] and k [kv_heads, T, D] do not fit: {tuple(q.shape)}, {tuple(k.shape)}")
    heads, T, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    kf = k.float().repeat_interleave(heads // k.shape[0], dim=0)  # [heads, T, D]
    cols = torch.arange(T, device=q.device)

    def rows(start: int, stop: int) -> torch.Tensor:
        s = torch.matmul(q[:, start:stop].float(), kf.transpose(1, 2)) * scale  # [heads, r, T]
        future = cols[None, :] > torch.arange(start, stop, device=q.device)[:, None]
        return torch.softmax(s.masked_fill(future, -math.inf), dim=-1)

    return attention_received(rows, n_tokens=T, chunk_rows=chunk_rows)


def token_importance(hidden: torch.Tensor, attn) -> torch.Tensor:
    """Per-token importance ``I_j = ||t_j||_1 * a_j`` ``[T]`` float32 (docs/odp.md).

    ``hidden`` ``[T, H]``: the layer's router input (the MoE block's input, after the post-attention norm),
    the same vector the decode proxy takes the norm of. ``attn``: anything :func:`attention_received`
    accepts, or its ``[T]`` result already computed (e.g. by :func:`attention_received_from_qk`).
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got {tuple(hidden.shape)}")
    if isinstance(attn, torch.Tensor) and attn.dim() == 1:
        received = attn.float()
    else:
        received = attention_received(attn, n_tokens=hidden.shape[0])
    if received.shape[0] != hidden.shape[0]:
        raise ValueError(f"attention covers {received.shape[0]} tokens, hidden {hidden.shape[0]}")
    return router_input_norm(hidden) * received.to(hidden.device)


def decode_protect(router_input: torch.Tensor, threshold: float) -> torch.Tensor:
    """Decode-time protection proxy: ``||x_t||_1 > threshold`` for router inputs ``[T, H]`` -> ``[T]`` bool."""
    return router_input_norm(router_input) > float(threshold)
