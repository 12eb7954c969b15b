"""Checking llama.cpp's ODP decisions against ``mc2gguf.odp.route``, for any family's routing: the tensors to
capture, the protection thresholds llama.cpp derives, and the per-layer comparison (test_llama_moe.py on the
Mixtral file, test_families.py on every other family's PMQ files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader

CAPTURE = ("ffn_moe_logits", "ffn_moe_topk", "ffn_moe_odp_protect", "ffn_moe_odp_prune", "ffn_moe_odp_ids",
           "ffn_moe_odp_pruned", "ffn_moe_weights_odp", "ffn_norm")


def stacked(run: dict, name: str) -> np.ndarray:
    return np.concatenate(run["tensors"][name])


def llama_tau(quantiles: np.ndarray, ratio: float) -> float:
    """The protection threshold llama.cpp derives for ``--moe-protect ratio`` (llama_model::moe_odp_protect_norms):
    the norm quantile at level 1 - ratio, linear between the stored levels, from the float32 ratio."""
    pos = (1.0 - float(np.float32(ratio))) * 100
    i0 = min(int(np.floor(pos)), 99)
    t = pos - i0
    return float(np.float32((1.0 - t) * float(quantiles[i0]) + t * float(quantiles[i0 + 1])))


def fused_protect(router_input: np.ndarray, tau: float) -> np.ndarray:
    """The protect mask of ggml_moe_prune: ||x||_1 summed in double in order, rounded to float, > tau."""
    norm = np.cumsum(np.abs(router_input).astype(np.float64), axis=-1)[..., -1].astype(np.float32)
    return norm > np.float32(tau)


def odp_meta(path: Path) -> tuple[list[float], list[float], np.ndarray | None]:
    """The file's per-layer ``mu`` and ``protect_norm``, and its router-norm quantiles ``[layers, 101]``."""
    fields = GGUFReader(path).fields
    mu = [float(v) for v in fields["mc2gguf.odp.mu"].contents()]
    norm = [float(v) for v in fields["mc2gguf.odp.protect_norm"].contents()]
    q = np.array(fields["mc2gguf.odp.router_norm_quantiles"].contents(), dtype=np.float32).reshape(len(mu), 101) \
        if "mc2gguf.odp.router_norm_quantiles" in fields else None
    return mu, norm, q


def check_decisions(run: dict, mu: list[float], tau: list[float], top_k: int = 2, renormalize: bool = True,
                    route_fn=None) -> int:
    """Every layer's ids/weights equal mc2gguf.odp.route (or ``route_fn(layer, logits, mu, protect)``, a family's
    own routing) on the same logits and protect mask; returns the reference's number of pruned slots. The fused
    graph (ggml_moe_prune, ``ffn_moe_odp_pruned``: the ids with -1 and the count running over the layers but
    the last) decides protection inside the op, which is recomputed here exactly; the graph of ordinary ops
    exposes its protect and pruning masks. Layers without a router (dense) must have mu = 0."""
    from mc2gguf.odp import route

    softmax_reference = route_fn is None
    if softmax_reference:
        def route_fn(_layer, logits, mu, protect):
            return route(logits, top_k, mu, protect=protect, renormalize=renormalize)

    n_layer = len(mu)
    n_pruned = 0
    count_before = 0
    for il in range(n_layer):
        if f"ffn_moe_logits-{il}" not in run["tensors"]:
            assert mu[il] == 0.0, il
            continue
        logits = torch.from_numpy(stacked(run, f"ffn_moe_logits-{il}"))  # [T, E]
        if f"ffn_moe_odp_pruned-{il}" in run["tensors"]:
            pruned = stacked(run, f"ffn_moe_odp_pruned-{il}")  # [T, k + 1]
            ids = pruned[:, :top_k].copy()
            prot = torch.from_numpy(fused_protect(stacked(run, f"ffn_norm-{il}"), tau[il]))
            count = pruned[:, top_k].astype(np.int64)
            if il == n_layer - 1:
                count_before = 0  # the model's last layer starts a count of its own (patch 0012)
            assert np.array_equal(count - count_before, (ids == -1).sum(-1))  # the running count
            count_before = count
        else:
            prot = torch.from_numpy(stacked(run, f"ffn_moe_odp_protect-{il}")).reshape(-1)
            assert set(np.unique(prot.numpy())) <= {0.0, 1.0}
            # the ids after pruning: the selected experts with -1 where the graph's pruning mask is 1 (the
            # graph's own tensor of these ids exists only where a projection is one stock tensor: grouped
            # projections look their ids up from the selected experts and the mask)
            prune = stacked(run, f"ffn_moe_odp_prune-{il}").reshape(-1, top_k)
            assert set(np.unique(prune)) <= {0.0, 1.0}
            ids = stacked(run, f"ffn_moe_topk-{il}").copy()  # [T, k]
            ids[prune == 1.0] = -1
            if f"ffn_moe_odp_ids-{il}" in run["tensors"]:
                assert np.array_equal(stacked(run, f"ffn_moe_odp_ids-{il}"), ids)
        weights = np.concatenate([w.reshape(-1, top_k) for w in run["tensors"][f"ffn_moe_weights_odp-{il}"]])
        ref_ids, ref_w, n = route_fn(il, logits, mu[il], prot > 0)
        assert np.array_equal(ids, ref_ids.numpy().astype(np.int32)), il
        np.testing.assert_allclose(weights, ref_w.numpy(), rtol=0, atol=2e-6)
        assert (weights[ids == -1] == 0.0).all()
        if renormalize and softmax_reference:  # a lone survivor gets weight exactly 1
            alone = (ids[:, 1:] == -1).all(-1)
            assert (weights[alone, 0] == 1.0).all()
        n_pruned += n
        # the protect mask is ||router input||_1 > tau (away from rounding at the boundary)
        norm = np.abs(stacked(run, f"ffn_norm-{il}")).astype(np.float64).sum(-1)
        clear = np.abs(norm - tau[il]) > 1e-5 * max(abs(tau[il]), 1.0)
        assert np.array_equal((prot.numpy() > 0)[clear], (norm > tau[il])[clear])
    return n_pruned
