"""ODP's per-layer thresholds from calibration, defined once: ``mu`` (the median ratio of a non-top slot's weight
to the top one's) and the decode proxy's norm threshold (exceeded by exactly the protected fraction of
calibration tokens). ``mc2gguf convert`` (PMQ), ``mc2gguf eval --calibrate-odp`` and the bench all compute them
here."""

from __future__ import annotations

import math

import torch

from .rule import n_protect


def slot_ratios(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """``w_s / w_0`` of every token's slots ``s = 1 .. k-1``, ``exp(l_s - l_0)`` in fp32 (the ratio ODP compares
    with ``mu``, the same for renormalised and plain softmax weights): what :func:`calibrate_mu` takes the
    median of, so that ``mu`` prunes about half of the non-top slots of unprotected tokens (with top-2, the
    paper's median of ``w_1 / w_0``). ``logits`` ``[T, E]``, ``2 <= top_k <= E``."""
    if logits.dim() != 2 or not 2 <= top_k <= logits.shape[1]:
        raise ValueError(f"logits must be [T, E >= top_k >= 2], got {tuple(logits.shape)} with top_k {top_k}")
    vals = torch.topk(logits.float(), top_k, dim=1).values
    return torch.exp(vals[:, 1:] - vals[:, :1]).reshape(-1)


def _as_1d_float64(values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        t = values.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    else:
        parts = [v.detach().reshape(-1).cpu().double() if isinstance(v, torch.Tensor) else None for v in values]
        if parts and all(p is not None for p in parts):
            t = torch.cat(parts)
        else:
            t = torch.as_tensor(list(values), dtype=torch.float64).reshape(-1)
    if t.numel() == 0:
        raise ValueError("no calibration values")
    if t.isnan().any():
        raise ValueError("calibration values contain NaN")
    return t


def calibrate_mu(ratios) -> float:
    """A layer's ``mu``: the median of its calibration ``w_s / w_0`` ratios (:func:`slot_ratios`) (mean of the two middle values for
    an even count). ``ratios``: a tensor, a list of tensors (e.g. one per batch) or numbers."""
    t = torch.sort(_as_1d_float64(ratios)).values
    n = t.numel()
    mid = n // 2
    return float(t[mid]) if n % 2 else float((t[mid - 1] + t[mid]) / 2)


def calibrate_protect_norm(norms, ratio: float) -> float:
    """A layer's decode-proxy threshold: the largest norm among the calibration tokens that are *not* in the
    top ``n = n_protect(ratio, N)``, so that exactly ``n`` of them have ``norm > threshold`` (fewer only
    where norms tie at the boundary). ``+inf`` when ``n == 0``, ``-inf`` when ``n == N``."""
    t = torch.sort(_as_1d_float64(norms)).values
    N = t.numel()
    n = n_protect(ratio, N)
    if n == 0:
        return math.inf
    if n == N:
        return -math.inf
    return float(t[N - n - 1])
