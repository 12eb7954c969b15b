"""The recipe of the package docstring, layer by layer, in the dense model's own (unpadded) space, and the
builder's forward of the MoE it builds. The forward pieces are the shared ones (``mc2gguf.archs.blocks``);
routing is the Mixtral adapter's (ODP's rule with ``mu = 0``)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..archs import blocks
from ..errors import Mc2ggufError
from ..odp import route
from ..text import sample_windows, token_stream
from .dense import DOC_SEPARATOR_ID, DenseConfig, DenseModel

PAD_MULTIPLE = 256  # the export pads widths to multiples of this; an expert's width must already be one


@dataclass(frozen=True)
class BuildParams:
    seed: int = 0
    n_tokens: int = 32768
    seq_len: int = 1024
    expert_width: int = 768
    n_experts: int = 8
    top_k: int = 2
    router_ratio: float = 0.6
    kmeans_iters: int = 25
    alphas: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    holdout: float = 0.1
    n_layers: int | None = None  # all of the dense model's
    dtype: str = "bfloat16"

    def check(self) -> None:
        if self.n_tokens < self.seq_len or self.n_tokens % self.seq_len:
            raise Mc2ggufError(f"--tokens must be a positive multiple of the sequence length {self.seq_len}")
        if self.top_k != 2:
            raise Mc2ggufError("the reference MoE routes to the top 2 experts")
        if self.expert_width % PAD_MULTIPLE:
            raise Mc2ggufError(f"the expert width must be a multiple of {PAD_MULTIPLE}")
        if self.dtype not in ("bfloat16", "float32"):
            raise Mc2ggufError("dtype must be bfloat16 or float32")
        if not 0.0 < self.holdout < 1.0:
            raise Mc2ggufError("the held-out fraction must lie in (0, 1)")


def calibration_tokens(tokenizer, calib_file: Path, n_tokens: int, seq_len: int, seed: int) -> torch.Tensor:
    """[n_tokens / seq_len, seq_len]: windows at seeded random starts in the stream of all the documents,
    tokenized and each followed by ``<|endoftext|>`` (windows may cross document boundaries; a file too short
    for ``n_tokens`` is an error, not overlapping windows)."""
    stream = token_stream(tokenizer, [Path(calib_file)], separator=DOC_SEPARATOR_ID)
    return sample_windows(stream, n_tokens // seq_len, seq_len, seed, f"the calibration file {calib_file}",
                          overlap=False)


# --------------------------------------------------------------------------------------------------
# The forward of the unpadded MoE (fp32)


def self_attention(c: DenseConfig, layer: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """``Attn(RMSNorm(h))`` of a dense layer (the residual not added), ``h`` [batch, seq, d]: every MoE layer
    keeps the dense attention unchanged."""
    x = blocks.rms_norm(h, layer["input_norm"], c.eps)
    return blocks.attention(x, blocks.QKV(layer["q"], layer["k"], layer["v"]), layer["o"],
                            blocks.Heads(c.n_heads, c.n_kv, c.head_dim, c.rope_theta))


def routing(x: torch.Tensor, router: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing of the normed ``x`` [tokens, d] -> (ids, weights) [tokens, top_k]: softmax over the
    experts, top-k, renormalised, computed by ODP's rule with ``mu = 0`` as the Mixtral adapter does, so the
    export routes in mc2gguf's own forward exactly as here."""
    ids, weights, _ = route(x @ router.T, top_k, 0.0)
    return ids, weights


@dataclass
class MoELayer:
    """One MoE FFN in the unpadded space."""

    router: torch.Tensor  # [experts, d]
    neurons: torch.Tensor  # [experts, width] int64: each expert's dense neurons, ascending
    down: torch.Tensor  # [experts, d, width]
    stats: dict = field(default_factory=dict)


def moe_forward(x: torch.Tensor, layer: dict[str, torch.Tensor], moe: MoELayer, top_k: int,
                acts: torch.Tensor | None = None) -> torch.Tensor:
    """The MoE FFN of the normed ``x`` [tokens, d]; ``acts`` (the dense neuron activations of ``x``), when
    given, saves recomputing the experts' gate/up products (they are the dense rows)."""
    ids, weights = routing(x, moe.router, top_k)
    if acts is None:
        def activation(e: int, x_routed: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
            cols = moe.neurons[e]
            return blocks.swiglu(x_routed, layer["gate"][cols], layer["up"][cols])
    else:
        def activation(e: int, x_routed: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
            return acts[token][:, moe.neurons[e]]
    return blocks.dispatch_experts(x, ids, weights, moe.router.shape[0], activation, lambda e: moe.down[e])


def moe_logits(dense: DenseModel, moes: list[MoELayer], tokens: torch.Tensor, top_k: int = 2) -> torch.Tensor:
    """The builder's own forward of the unpadded MoE (one MoE layer per dense layer; the dense FFNs are not
    used): logits [batch, seq, vocab]."""
    c = dense.config
    h = dense.embed[tokens]
    for layer, moe in zip(dense.layers, moes, strict=True):
        h = h + self_attention(c, layer, h)
        x = blocks.rms_norm(h, layer["post_norm"], c.eps)
        h = h + moe_forward(x.reshape(-1, c.d), layer, moe, top_k).view_as(h)
    return blocks.rms_norm(h, dense.norm, c.eps) @ dense.embed.T


# --------------------------------------------------------------------------------------------------
# The building blocks of one MoE layer


def _generator(seed: int, layer: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + layer) * 16 + salt)


def spherical_kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Unit centroids [k, d] of cosine k-means on the rows of ``x``, seeded; an emptied cluster keeps its
    centroid."""
    xn = F.normalize(x, dim=1)
    centroids = xn[torch.randperm(xn.shape[0], generator=generator)[:k]].clone()
    for _ in range(iters):
        assign = (xn @ centroids.T).argmax(dim=1)
        onehot = F.one_hot(assign, k).to(xn.dtype)
        sums = onehot.T @ xn
        filled = onehot.sum(dim=0) > 0
        centroids = torch.where(filled[:, None], F.normalize(sums, dim=1), centroids)
    return centroids


def fit_router(x: torch.Tensor, n_experts: int, ratio: float, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Router weight [experts, d]: k-means centroids scaled so that the median top-2/top-1 routing weight
    ratio over ``x`` is ``ratio`` (the ratio is ``exp(-scale * gap)``, monotone in the logit gap)."""
    if not 0.0 < ratio < 1.0:
        raise Mc2ggufError(f"the router's median weight ratio must lie in (0, 1), not {ratio}")
    centroids = spherical_kmeans(x, n_experts, iters, generator)
    top2 = (x @ centroids.T).topk(2, dim=1).values
    gap = float((top2[:, 0] - top2[:, 1]).median())
    if gap <= 0.0:
        raise Mc2ggufError("degenerate router: the median top-1/top-2 logit gap is zero")
    return centroids * (-math.log(ratio) / gap)


def select_neurons(acts: torch.Tensor, down: torch.Tensor, indices: torch.Tensor, n_experts: int,
                   width: int) -> torch.Tensor:
    """[experts, width]: per expert, the neurons of largest energy over the tokens routed to it."""
    if width > acts.shape[1]:
        raise Mc2ggufError(f"expert width {width} exceeds the dense FFN width {acts.shape[1]}")
    chosen = torch.zeros(acts.shape[0], n_experts, dtype=acts.dtype)
    chosen.scatter_(1, indices, 1.0)
    energy = (chosen.T @ acts.pow(2)) * down.pow(2).sum(dim=0)  # [experts, ffn]
    # stable descending sort: ties (e.g. a never-chosen expert) resolve by neuron index, deterministically
    order = torch.sort(energy, dim=1, descending=True, stable=True).indices[:, :width]
    return order.sort(dim=1).values


def _routed_pairs(indices: torch.Tensor, weights: torch.Tensor, n_experts: int):
    """Yield (j, k, tokens, w_j, w_k) for each unordered expert pair j < k chosen together (top-2)."""
    lo, hi = indices.min(dim=1).values, indices.max(dim=1).values
    swap = indices[:, 0] > indices[:, 1]
    w_lo = torch.where(swap, weights[:, 1], weights[:, 0])
    w_hi = torch.where(swap, weights[:, 0], weights[:, 1])
    for j in range(n_experts):
        for k in range(j + 1, n_experts):
            tokens = torch.nonzero((lo == j) & (hi == k)).squeeze(1)
            if tokens.numel():
                yield j, k, tokens, w_lo[tokens], w_hi[tokens]


def ridge_refit(acts: torch.Tensor, target: torch.Tensor, neurons: torch.Tensor, indices: torch.Tensor,
                weights: torch.Tensor, alphas: tuple[float, ...], holdout: torch.Tensor):
    """Joint ridge refit of all experts' down projections -> (down [experts, d, width], stats).

    Features per token: expert k's block is ``w_tk * acts_t[neurons_k]`` (zero when k is not selected), so
    the Gram matrix is accumulated pair by pair of selected experts (each token has 2 non-zero blocks of
    ``experts * width``). The ridge term is ``alpha`` times the mean Gram diagonal; ``alpha`` is chosen by
    the residual on the ``holdout`` tokens of a fit on the others (fp32 solves), then the fit is redone on
    all tokens (fp64)."""
    if indices.shape[1] != 2:
        raise Mc2ggufError("the ridge refit is written for top-2 routing")
    n_experts, width = neurons.shape
    nf, d = n_experts * width, target.shape[1]
    gram = {False: torch.zeros(nf, nf, dtype=torch.float64), True: torch.zeros(nf, nf, dtype=torch.float64)}
    cross = {False: torch.zeros(nf, d, dtype=torch.float64), True: torch.zeros(nf, d, dtype=torch.float64)}
    held = []  # (block rows, features, target) of the held-out tokens, pair by pair
    for j, k, tokens, w_j, w_k in _routed_pairs(indices, weights, n_experts):
        rows = torch.cat((torch.arange(j * width, (j + 1) * width), torch.arange(k * width, (k + 1) * width)))
        sj, sk = slice(j * width, (j + 1) * width), slice(k * width, (k + 1) * width)
        for split in (False, True):
            mask = holdout[tokens] if split else ~holdout[tokens]
            t = tokens[mask]
            if t.numel() == 0:
                continue
            a = acts[t]
            x = torch.cat((a[:, neurons[j]] * w_j[mask, None], a[:, neurons[k]] * w_k[mask, None]), dim=1)
            y = target[t]
            g, c = (x.T @ x).double(), (x.T @ y).double()
            gram[split][sj, sj] += g[:width, :width]
            gram[split][sj, sk] += g[:width, width:]
            gram[split][sk, sj] += g[width:, :width]
            gram[split][sk, sk] += g[width:, width:]
            cross[split][sj] += c[:width]
            cross[split][sk] += c[width:]
            if split:
                held.append((rows, x, y))
    yy_hold = sum(float(y.double().pow(2).sum()) for _, _, y in held)

    def solve(g: torch.Tensor, c: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
        m = g.to(dtype)
        reg = float(g.diagonal().mean()) * alpha
        m.diagonal().add_(reg if reg > 0 else 1.0)
        return torch.cholesky_solve(c.to(dtype), torch.linalg.cholesky(m))

    errors = {}
    for alpha in alphas:
        b = solve(gram[False], cross[False], alpha, torch.float32)
        err = sum(float((x @ b[rows] - y).double().pow(2).sum()) for rows, x, y in held)
        errors[alpha] = err / yy_hold if yy_hold > 0 else 0.0
    best = min(alphas, key=lambda a: (errors[a], a))
    del held
    gram_all = gram.pop(False).add_(gram.pop(True))
    cross_all = cross.pop(False).add_(cross.pop(True))
    b = solve(gram_all, cross_all, best, torch.float64).float()  # [experts * width, d]
    down = b.view(n_experts, width, d).transpose(1, 2).contiguous()
    return down, {"alpha": best, "heldout_rel_err": errors[best],
                  "heldout_rel_err_by_alpha": {f"{a:g}": errors[a] for a in alphas}}


def build_moe_layers(dense: DenseModel, calib: torch.Tensor, params: BuildParams, progress: bool = False,
                     done: list[MoELayer] = ()):
    """Yield the MoE layers one by one, each built on the hidden states of the MoE layers before it.

    ``done``: layers already built (by an interrupted run with the same parameters): they are replayed,
    with the same arithmetic as when they were built, instead of being refit."""
    c = dense.config
    h = dense.embed[calib]  # [sequences, seq_len, d]
    n = calib.numel()
    batch = max(1, 8192 // calib.shape[1])
    layers = range(c.n_layers)
    if progress:
        from tqdm import tqdm

        layers = tqdm(layers, desc="building MoE layers", unit="layer", file=sys.stderr)
    for i in layers:
        layer = dense.layers[i]
        with torch.no_grad():
            for s in range(0, h.shape[0], batch):
                hb = h[s : s + batch]
                hb += self_attention(c, layer, hb)
            x = blocks.rms_norm(h, layer["post_norm"], c.eps).reshape(n, c.d)
            acts = blocks.swiglu(x, layer["gate"], layer["up"])
            if i < len(done):
                moe = done[i]
                h += moe_forward(x, layer, moe, params.top_k, acts=acts).view_as(h)
                del x, acts
                yield moe
                continue
            target = acts @ layer["down"].T
            router = fit_router(x, params.n_experts, params.router_ratio, params.kmeans_iters,
                                _generator(params.seed, i, 1))
            indices, weights = routing(x, router, params.top_k)
            neurons = select_neurons(acts, layer["down"], indices, params.n_experts, params.expert_width)
            holdout = torch.rand(n, generator=_generator(params.seed, i, 2)) < params.holdout
            down, stats = ridge_refit(acts, target, neurons, indices, weights, params.alphas, holdout)
            moe = MoELayer(router, neurons, down)
            out = moe_forward(x, layer, moe, params.top_k, acts=acts)
            counts = torch.bincount(indices.reshape(-1), minlength=params.n_experts)
            stats["usage"] = [round(float(u), 5) for u in counts / counts.sum()]
            stats["rel_err"] = float((out - target).pow(2).sum() / target.pow(2).sum())
            ratio = weights[:, 1] / weights[:, 0]
            stats["median_weight_ratio"] = float(ratio.median())
            moe.stats = stats
            h += out.view_as(h)
            del x, acts, target, out
        if progress:
            layers.set_postfix(alpha=f"{stats['alpha']:g}", err=f"{stats['rel_err']:.3f}")
        yield moe
