"""PMQ's calibration: the model run layer by layer on calibration tokens, measuring what PMQ and ODP need.

Per MoE layer (holding one layer's weights at a time):
- ``phi_i``: expert i's share of the top-k selections;
- ``w_i``: its mean (renormalised) routing weight over the tokens that select it, so frequency and weight
  are separate factors of the allocation objective;
- ODP's statistics: ``mu`` (:func:`mc2gguf.odp.calibrate_mu` of every token's top-2 weight ratio) and the
  router inputs' L1 norms, from which the decode-time protection threshold is taken
  (:func:`mc2gguf.odp.calibrate_protect_norm`, for the protected fraction the file is written with) and a
  101-point quantile table that lets llama.cpp protect another fraction at run time;
- per expert, Hessians of the inputs of its projections from the tokens routed to it, each token weighted
  by its routing weight squared: the expert's contribution to the layer output is ``w * E(x)``, so this is
  the Hessian of the MoE output error (GPTQ's objective), not of the expert's unweighted output;
- a seeded sample of each expert's routed inputs and weights, on which ``eps`` is measured.

The per-expert part is made one expert at a time when the eps and quantize stages ask for it
(:class:`ExpertCalibrations`): a layer's peak memory does not grow with its number of experts.

An expert that no calibration token selects is reported; it falls back to every token of the layer with
weight 1 for its Hessian and error sample, and to half a selection for ``phi``, so it gets a sane type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import odp
from ..archs import ArchAdapter, LayerWeights
from ..text import CalibrationSet, load_calibration, self_sampled_calibration
from .options import PMQOptions
from .traversal import WorkDir

NORM_QUANTILES = torch.linspace(0.0, 1.0, 101)


@dataclass
class ExpertCalibration:
    n_routed: int
    hessians: dict[str, torch.Tensor]  # float32 input Hessian of each projection (gate and up share theirs)
    sample_x: torch.Tensor  # [n, H] routed inputs, a seeded subset
    sample_w: torch.Tensor  # [n] their routing weights

    def quantizer(self, make):
        """``(weights, types) -> {projection: result}`` for ``{projection: matrix}`` and ``{projection: type}``,
        with one ``make(hessian)`` (a ``(matrix, type) -> GPTQResult``) per distinct Hessian. Projections that
        share their Hessian (gate and up) and their type are quantized as one matrix, their rows stacked: GPTQ
        treats rows independently, and a quantizer's cost is mostly per column, not per row."""
        made = {}
        for h in self.hessians.values():
            if id(h) not in made:
                made[id(h)] = make(h)

        def quantize(weights: dict[str, torch.Tensor], types: dict) -> dict:
            stacks: dict[tuple, list[str]] = {}
            for p, h in self.hessians.items():
                stacks.setdefault((id(h), types[p].name), []).append(p)
            results = {}
            for (key, _), projections in stacks.items():
                stacked = made[key](torch.cat([weights[p] for p in projections]), types[projections[0]])
                start = 0
                for p in projections:
                    results[p] = stacked.rows(start, start + weights[p].shape[0])
                    start += weights[p].shape[0]
            return results

        return quantize


@dataclass
class LayerCalibration:
    index: int
    n_tokens: int
    phi: list[float]
    mean_weight: list[float]
    mu: float
    router_norms: torch.Tensor  # [n_tokens] the router inputs' L1 norms, sorted
    unused_experts: list[int]
    experts: Sequence[ExpertCalibration]  # ExpertCalibrations: made one at a time

    def significance(self) -> dict:
        """What the report and the GGUF metadata keep (everything but the Hessians and samples)."""
        return {
            "layer": self.index, "n_tokens": self.n_tokens, "phi": self.phi, "mean_weight": self.mean_weight,
            "mu": self.mu, "router_norms": self.router_norms, "unused_experts": self.unused_experts,
        }


def router_norm_quantiles(router_norms: torch.Tensor) -> list[float]:
    """The router-input norms at ``NORM_QUANTILES`` (the table that lets llama.cpp protect another fraction)."""
    return torch.quantile(router_norms, NORM_QUANTILES).tolist()


def _weighted_hessian(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # Kept in float32, the precision of the product: a float64 copy would hold the same values in twice the
    # memory (a layer's Hessians are most of its working set). GPTQ converts to float64 itself.
    xw = x * w[:, None]
    return xw.T @ xw


class ExpertCalibrations(Sequence):
    """A MoE layer's per-expert calibrations, each made when asked for and not kept: one expert's Hessians and
    routed inputs are in memory at a time, whatever the number of experts (at DeepSeek-V3's size all of a
    layer's Hessians would take 54 GB). The down projection's input, the expert's hidden activation, is
    computed again from its routed inputs (as the layer's forward computed it: the same values)."""

    def __init__(self, adapter: ArchAdapter, layer: LayerWeights, x: torch.Tensor, ids: torch.Tensor,
                 weights: torch.Tensor, eps_tokens: int, seed: int):
        self.adapter, self.layer, self.x, self.ids, self.weights = adapter, layer, x, ids, weights
        self.eps_tokens, self.seed = eps_tokens, seed

    def __len__(self) -> int:
        return len(self.layer.experts)

    def routed(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens routed to expert ``e`` (in token order, as the forward dispatches them) and their weights."""
        token, slot = torch.nonzero(self.ids == e, as_tuple=True)
        return token, self.weights[token, slot]

    def __getitem__(self, e: int) -> ExpertCalibration:
        if not 0 <= e < len(self):
            raise IndexError(e)
        token, w = self.routed(e)
        n_routed = token.numel()
        xe = self.x[token] if n_routed else self.x
        if not n_routed:
            w = torch.ones(self.x.shape[0])
        a = self.adapter.expert_activation(self.layer.experts[e], xe)
        h_in = _weighted_hessian(xe, w)
        hessians = {"gate": h_in, "up": h_in, "down": _weighted_hessian(a, w)}
        # seeded per expert, so that any order of access gives the same samples
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.layer.index) * 65_537 + e)
        pick = torch.randperm(xe.shape[0], generator=generator)[: self.eps_tokens]
        return ExpertCalibration(n_routed, hessians, xe[pick].clone(), w[pick].clone())


def calibrate_layer(
    adapter: ArchAdapter, layer: LayerWeights, h: torch.Tensor, eps_tokens: int, seed: int
) -> tuple[torch.Tensor, LayerCalibration]:
    """Run one layer on ``h`` ``[B, S, H]``; return its output and the layer's calibration."""
    h_attn = adapter.attention_block(layer, h)
    x = adapter.moe_input(layer, h_attn).reshape(-1, h.shape[-1])
    norms = odp.router_input_norm(x)
    if not layer.is_moe:  # a dense layer: nothing to allocate, never pruned
        out = adapter.dense_ffn(layer, x)
        return h_attn + out.reshape(h.shape), LayerCalibration(
            layer.index, x.shape[0], [], [], 0.0, torch.sort(norms).values, [], [])
    logits = adapter.router_logits(layer, x)
    out, ids, weights = adapter.moe_forward(layer, x, adapter.route(layer, logits)[:2])
    n_tokens, top_k = ids.shape
    experts = ExpertCalibrations(adapter, layer, x, ids, weights, eps_tokens, seed)
    phi, mean_weight, unused = [], [], []
    for e in range(len(experts)):
        token, w = experts.routed(e)
        if token.numel():
            phi.append(token.numel() / (n_tokens * top_k))
            mean_weight.append(float(w.mean()))
        else:
            unused.append(e)
            phi.append(0.5 / (n_tokens * top_k))
            mean_weight.append(1.0 / top_k)
    calibration = LayerCalibration(
        index=layer.index,
        n_tokens=n_tokens,
        phi=phi,
        mean_weight=mean_weight,
        mu=odp.calibrate_mu(adapter.slot_ratios(layer, logits)) if top_k > 1 else 0.0,
        router_norms=torch.sort(norms).values,
        unused_experts=unused,
        experts=experts,
    )
    return h_attn + out.reshape(h.shape), calibration


def calibration_set(src: Path, opts: PMQOptions, work: WorkDir) -> CalibrationSet:
    """The calibration windows (``--calib`` text, or text the model samples), kept in the work directory."""
    if work.has("calib", "tokens"):
        return work.load("calib", "tokens")
    if opts.calib:
        cal = load_calibration(src, list(opts.calib), opts.nsamples, opts.seqlen, opts.seed)
    else:
        cal = self_sampled_calibration(src, opts.nsamples, opts.seqlen, opts.seed)
    work.save("calib", "tokens", cal)
    return cal
