"""ODP's routing rule (docs/odp.md): top-k selection, the pruning of unprotected slots whose weight is small
next to the top one's, and the survivors' weights (renormalised where the family renormalises its top-k).
Plain top-k routing is this rule with ``mu = 0``, so pruning off and plain routing are the same arithmetic.

Two gating kinds: softmax (Mixtral, Qwen, OLMoE, DeepSeek-V2), decided in the logit domain, and sigmoid scores
with a selection bias and group-limited selection (DeepSeek-V3, :class:`SigmoidGating`), decided on the scores."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import extension

#: Slack in ``n_protect``: a product ``ratio * T`` that is an integer up to rounding does not round up.
PROTECT_EPS = 1e-6


def n_protect(ratio: float, n_tokens: int) -> int:
    """How many tokens ``protect_ratio`` protects: ``ceil(ratio * T - 1e-6)`` clamped to ``[0, T]``."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"protect_ratio must be in [0, 1], got {ratio}")
    n = math.ceil(float(ratio) * float(n_tokens) - PROTECT_EPS)
    return max(0, min(int(n_tokens), n))


def _check_mu(mu: float) -> float:
    mu = float(mu)
    if not mu >= 0.0:  # also rejects NaN
        raise ValueError(f"mu must be >= 0 (and not NaN), got {mu}")
    return mu


def _threshold(mu: float) -> torch.Tensor:
    """fl32(ln(mu)) as a 0-dim fp32 tensor (the same double->float rounding the C++ op does)."""
    mu = _check_mu(mu)
    return torch.tensor(-math.inf if mu == 0.0 else math.log(mu), dtype=torch.float32)


def _check(logits: torch.Tensor, top_k: int, protect, importance, protect_ratio: float) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    T, E = logits.shape
    if E < 1:
        raise ValueError("need at least one expert")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, E={E}], got {top_k}")
    if not 0.0 <= protect_ratio <= 1.0:
        raise ValueError(f"protect_ratio must be in [0, 1], got {protect_ratio}")
    if protect is not None:
        if protect.dim() != 1 or protect.shape[0] != T:
            raise ValueError(f"protect must be [T={T}], got shape {tuple(protect.shape)}")
        if protect.device != logits.device:
            raise ValueError(f"protect is on {protect.device}, logits on {logits.device}")
    if protect_ratio > 0.0 and importance is None:
        raise ValueError("protect_ratio > 0 needs importance")
    if importance is not None:
        if importance.dim() != 1 or importance.shape[0] != T:
            raise ValueError(f"importance must be [T={T}], got shape {tuple(importance.shape)}")
        if not importance.is_floating_point():
            raise TypeError(f"importance must be floating point, got {importance.dtype}")
        if importance.device != logits.device:
            raise ValueError(f"importance is on {importance.device}, logits on {logits.device}")


def protect_mask(
    n_tokens: int,
    protect: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
    protect_ratio: float = 0.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The protected tokens, ``[T]`` bool: ``protect`` OR the ``n_protect(protect_ratio, T)`` most important.

    Importance is ranked in its own dtype, NaN as -inf, ties to the lower token index.
    """
    if protect is not None:
        device = protect.device
    elif importance is not None:
        device = importance.device
    mask = torch.zeros(n_tokens, dtype=torch.bool, device=device) if protect is None else protect.to(torch.bool)
    n = n_protect(protect_ratio, n_tokens)
    if importance is not None and n > 0:
        key = importance.masked_fill(importance.isnan(), -math.inf)
        order = torch.sort(key, dim=0, descending=True, stable=True).indices[:n]
        mask = mask.clone()
        mask[order] = True
    return mask


#: llama.cpp's floor under the sum of renormalised weights (the smallest normal fp16), for sigmoid scores
WEIGHT_SUM_MIN = 6.103515625e-5


@dataclass(frozen=True)
class SigmoidGating:
    """DeepSeek-V3's routing (``noaux_tc``): scores ``sigmoid(l)``; experts chosen by ``score + bias`` among the
    ``topk_group`` of ``n_group`` groups whose two best biased scores sum highest; weights the unbiased scores
    of the chosen experts. llama.cpp's ``build_moe_ffn`` with ``LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID``."""

    bias: torch.Tensor | None = None  # [E] the selection bias (e_score_correction_bias), or none
    n_group: int = 1
    topk_group: int = 1


def _select_sigmoid(scores: torch.Tensor, top_k: int, gating: SigmoidGating) -> torch.Tensor:
    """The chosen experts ``[T, k]``, by biased score, descending, the lower id first among equals."""
    choice = scores if gating.bias is None else scores + gating.bias.to(scores.device, torch.float32)
    if gating.n_group > 1:
        T, E = choice.shape
        grouped = choice.view(T, gating.n_group, E // gating.n_group)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        chosen = torch.sort(group_scores, dim=1, descending=True, stable=True).indices[:, : gating.topk_group]
        in_group = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
        choice = choice.masked_fill(~in_group.repeat_interleave(E // gating.n_group, 1), -math.inf)
    return torch.sort(choice, dim=1, descending=True, stable=True).indices[:, :top_k]


def route_sigmoid(
    logits: torch.Tensor,
    top_k: int,
    mu: float,
    gating: SigmoidGating,
    protect: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
    protect_ratio: float = 0.0,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """ODP routing of sigmoid-scored logits (docs/odp.md, "Sigmoid scores"); outputs as :func:`route_reference`.

    Slot ``s > 0`` of an unprotected token is pruned iff ``w_s < fl32(w_0 * mu)``, ``w`` the chosen experts'
    scores and slot 0 the first by biased score (the scores are the weights here, not a logit gap). The
    survivors are renormalised (sum in slot order, floored at :data:`WEIGHT_SUM_MIN` as llama.cpp does) where
    the family renormalises. Runs the compiled op ``torch.ops.mc2gguf_odp.route_scores`` on the scores where the
    backend supports the device (:func:`route_sigmoid_reference` otherwise, and under autograd): the scores are
    computed here, by torch, so that both read the same values."""

    if extension.supports(logits, top_k) and (logits.device.type == "cpu"
                                               or logits.shape[1] <= extension.SCORES_MAX_EXPERTS_CUDA):
        bias = None if gating.bias is None else gating.bias.to(logits.device)
        ids, weights, n = torch.ops.mc2gguf_odp.route_scores(
            torch.sigmoid(logits.float()), int(top_k), float(mu), bias, int(gating.n_group), int(gating.topk_group),
            protect, importance, float(protect_ratio), bool(renormalize))
        return ids, weights, int(n)
    return route_sigmoid_reference(logits, top_k, mu, gating, protect, importance, protect_ratio, renormalize)


def route_sigmoid_reference(
    logits: torch.Tensor,
    top_k: int,
    mu: float,
    gating: SigmoidGating,
    protect: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
    protect_ratio: float = 0.0,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pure-torch :func:`route_sigmoid`: the compiled op's specification, and its fallback."""
    top_k = int(top_k)
    _check(logits, top_k, protect, importance, float(protect_ratio))
    mu_f32 = float(torch.tensor(_check_mu(mu), dtype=torch.float32))
    scores = torch.sigmoid(logits.float())
    ids = _select_sigmoid(scores, top_k, gating)
    w = scores.gather(1, ids)
    prot = protect_mask(logits.shape[0], protect, importance, float(protect_ratio), device=logits.device)
    keep = ~(w < w[:, :1] * mu_f32) | prot[:, None]
    keep[:, 0] = True
    w = torch.where(keep, w, torch.zeros((), dtype=torch.float32, device=logits.device))
    if renormalize:
        total = w[:, 0]
        for s in range(1, top_k):
            total = total + w[:, s]
        w = w / total.clamp(min=WEIGHT_SUM_MIN)[:, None]
    ids = torch.where(keep, ids, torch.full((), -1, dtype=ids.dtype, device=ids.device))
    return ids, w, int((~keep).sum())


def route_reference(
    logits: torch.Tensor,
    top_k: int,
    mu: float,
    protect: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
    protect_ratio: float = 0.0,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pure-torch ODP routing (docs/odp.md); the compiled op's specification, and its fallback.

    Returns ``ids`` ``[T, k]`` int64 (``-1`` in pruned slots), ``weights`` ``[T, k]`` float32 (``0`` in pruned
    slots) and ``n_pruned``, the number of ``-1`` slots. Slots are ordered by logit, descending, lower expert id
    first among equal logits. ``renormalize``: the survivors' weights sum to 1 (Mixtral, Qwen3-MoE); otherwise
    every survivor keeps its softmax weight over all experts (OLMoE, Qwen2-MoE). Differentiable through the
    surviving weights.
    """
    top_k = int(top_k)
    _check(logits, top_k, protect, importance, float(protect_ratio))
    thr = _threshold(mu).to(logits.device)
    T = logits.shape[0]
    x = logits.float()
    # A stable descending sort keeps equal logits in expert-id order: the lower id wins ties.
    vals, ids = torch.sort(x, dim=1, descending=True, stable=True)
    vals, ids = vals[:, :top_k], ids[:, :top_k]
    d = vals - vals[:, :1]
    prot = protect_mask(T, protect, importance, float(protect_ratio), device=logits.device)
    keep = ~(d < thr) | prot[:, None]
    keep[:, 0] = True
    e = torch.where(keep, torch.exp(d), torch.zeros((), dtype=torch.float32, device=logits.device))
    # summed in slot order (survivors) or expert order (all experts), as the C++/CUDA kernels do
    terms = e if renormalize else torch.exp(x - vals[:, :1])
    total = terms[:, 0]
    for s in range(1, terms.shape[1]):
        total = total + terms[:, s]
    weights = e / total[:, None]
    ids = torch.where(keep, ids, torch.full((), -1, dtype=ids.dtype, device=ids.device))
    return ids, weights, int((~keep).sum())


def route(
    logits: torch.Tensor,
    top_k: int,
    mu: float,
    protect: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
    protect_ratio: float = 0.0,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """ODP routing of ``logits`` ``[T, E]`` (fp32/bf16/fp16/fp64, computed in fp32); see :func:`route_reference`.

    ``mu``: the layer's threshold (0 never prunes). ``protect``: ``[T]`` bool mask of protected tokens;
    ``importance`` ``[T]`` with ``protect_ratio``: also protect the ``n_protect(protect_ratio, T)`` most
    important tokens. ``renormalize``: the family's top-k weights are renormalised. Runs the compiled op when
    :data:`mc2gguf.odp.BACKEND` supports the tensor's device, the torch reference otherwise (and whenever
    gradients are wanted: the op is inference-only). For ``torch.compile`` call ``torch.ops.mc2gguf_odp.route``
    directly: it returns ``n_pruned`` as a 0-dim tensor, where this wrapper's ``int`` would break the graph.
    """
    if extension.supports(logits, top_k):
        ids, weights, n = torch.ops.mc2gguf_odp.route(
            logits, int(top_k), float(mu), protect, importance, float(protect_ratio), bool(renormalize)
        )
        return ids, weights, int(n)
    return route_reference(logits, top_k, mu, protect, importance, protect_ratio, renormalize)
