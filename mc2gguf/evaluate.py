"""``mc2gguf eval``: perplexity of a Mixtral in PyTorch, as llama-perplexity computes it, with or without ODP.

Perplexity (the definition of llama.cpp's ``tools/perplexity/perplexity.cpp``, default mode, pinned version):

- the text file is read whole and one trailing newline is dropped (``-f`` does that); it is tokenized in one
  piece, with BOS in front when the vocabulary adds one (``common_tokenize(..., add_special=true)``);
- at least ``2 * n_ctx`` tokens are required; ``n_chunk = min(--chunks, len(tokens) // n_ctx)``;
- chunk ``i`` is ``tokens[i*n_ctx : (i+1)*n_ctx]``, evaluated from an empty cache, its first token replaced by
  BOS when the vocabulary adds BOS;
- only the second half is scored: with ``first = n_ctx // 2`` the logits at positions ``first .. n_ctx-2``
  predict the (original) tokens ``first+1 .. n_ctx-1``: ``n_ctx - first - 1`` tokens per chunk;
- ``PPL = exp(mean NLL)``; its standard error ``PPL * sqrt((mean(NLL^2) - mean(NLL)^2) / (count - 1))``.

The model runs through the architecture adapter's own forward (``mc2gguf/archs``), one window at a time,
with every layer's weights held in memory as float32. With ``--gguf`` *every* tensor the adapter maps (token
embeddings, attention, norms, router, experts, output) is read from the GGUF file and dequantized, experts
stored as type groups (``docs/gguf-layout.md``) included, so the Python model runs exactly the weights that
llama.cpp would.

ODP: the router's decision goes through :func:`mc2gguf.odp.route` with the layer's ``mu`` (times
``--mu-scale``) and the protected tokens of the chosen variant (``--protection``):

- ``none``: nobody is protected;
- ``attention``: the paper's prefill importance ``||t_j||_1 x`` mean attention received
  (:func:`mc2gguf.odp.token_importance` on :func:`mc2gguf.odp.attention_received_from_qk` of the layer's
  own post-RoPE queries and keys), the top ``--protect`` fraction of the window protected;
- ``norm``: the decode proxy ``||t||_1 > tau`` with the layer's calibrated ``tau``;
- ``both``: the union.

``mu``/``tau`` come from the GGUF's ``mc2gguf.odp.*`` metadata, from a JSON file of the same form
(``--odp-params``), or are calibrated (``--calibrate-odp FILE``: the median top-2 weight ratio per layer and
the norm threshold that exactly ``--protect`` of the calibration tokens exceed, on the model as loaded with
ODP off). The skip ratio is the pruned slots (the op's ``n_pruned``) over the routed slots (tokens x top-k
x layers) of every evaluated window.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import odp
from .archs import LayerWeights, adapter_for
from .checkpoint import Checkpoint
from .errors import Mc2ggufError
from .gguf_in import checkpoint_state

PROTECTIONS = ("none", "attention", "norm", "both")
#: The default variant, chosen by measurement (docs/odp.md, "Choosing the protection variant").
DEFAULT_PROTECTION = "norm"
DEFAULT_PROTECT_RATIO = 0.02
_F32_MAX = float(torch.finfo(torch.float32).max)


# --------------------------------------------------------------------------------------------------------
# Text, tokens and llama-perplexity's windows


def read_eval_text(path: Path) -> str:
    """The file as llama-perplexity's ``-f`` reads it: raw bytes (UTF-8), one trailing newline dropped."""
    path = Path(path)
    if not path.is_file():
        raise Mc2ggufError(f"evaluation text {path} not found")
    text = path.read_bytes().decode("utf-8", errors="replace")
    return text[:-1] if text.endswith("\n") else text


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise Mc2ggufError(f"cannot load the tokenizer of {model_dir}: {e}") from None


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text (what ``add_bos_token`` means to llama.cpp)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(without) and with_special[0] == bos


def tokenize_text(tokenizer, text: str, add_bos: bool, bos_id: int | None) -> list[int]:
    """``text`` in one piece, BOS first when ``add_bos`` (never EOS: llama-perplexity refuses add_eos)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if add_bos:
        if bos_id is None:
            raise Mc2ggufError("the vocabulary adds BOS but has no BOS token id")
        ids.insert(0, int(bos_id))
    return ids


def llama_tokenize(gguf_path: Path, text: str) -> tuple[list[int], bool]:
    """``text`` tokenized by the pinned llama.cpp with ``gguf_path``'s vocabulary exactly as llama-perplexity
    does (``add_special`` true, ``parse_special`` false); returns the tokens and whether BOS was added."""
    from .llama_runtime import bindings

    llama_cpp = bindings()
    llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        tokens = [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)]
        add_bos = bool(tokens) and tokens[0] == int(llm.token_bos())
    finally:
        llm.close()
    return tokens, add_bos


@dataclass(frozen=True)
class Windows:
    """llama-perplexity's chunks: ``inputs`` ``[n_chunk, n_ctx]`` (first token BOS when ``add_bos``), the
    original tokens ``targets`` ``[n_chunk, n_ctx]``, and the first scored logit position ``first``."""

    inputs: torch.Tensor
    targets: torch.Tensor
    first: int

    @property
    def n_chunk(self) -> int:
        return self.inputs.shape[0]

    @property
    def n_ctx(self) -> int:
        return self.inputs.shape[1]

    @property
    def scored_per_chunk(self) -> int:
        return self.n_ctx - self.first - 1

    def score_positions(self) -> range:
        """Logit positions that are scored; position ``p`` predicts ``targets[:, p + 1]``."""
        return range(self.first, self.n_ctx - 1)


def perplexity_windows(tokens: Sequence[int] | torch.Tensor, n_ctx: int, n_chunks: int | None = None,
                       add_bos: bool = False, bos_id: int | None = None, what: str = "the text") -> Windows:
    """Split ``tokens`` as llama-perplexity does (see the module docstring)."""
    if n_ctx < 4:
        raise Mc2ggufError(f"--ctx must be at least 4, got {n_ctx}")
    tokens = torch.as_tensor(list(tokens) if not isinstance(tokens, torch.Tensor) else tokens, dtype=torch.int64)
    if tokens.numel() < 2 * n_ctx:
        raise Mc2ggufError(
            f"{what} tokenizes to only {tokens.numel()} tokens; a perplexity with --ctx {n_ctx} needs at least "
            f"2 x {n_ctx} = {2 * n_ctx} (as llama-perplexity): use a longer text or a smaller --ctx"
        )
    n_chunk_max = tokens.numel() // n_ctx
    if n_chunks is not None and n_chunks < 1:
        raise Mc2ggufError(f"--chunks must be at least 1, got {n_chunks}")
    n_chunk = n_chunk_max if n_chunks is None else min(n_chunks, n_chunk_max)
    targets = tokens[: n_chunk * n_ctx].view(n_chunk, n_ctx).clone()
    inputs = targets.clone()
    if add_bos:
        if bos_id is None:
            raise Mc2ggufError("add_bos needs a BOS token id")
        inputs[:, 0] = int(bos_id)
    return Windows(inputs, targets, n_ctx // 2)


@dataclass
class PerplexityAccumulator:
    """Running NLL sums, exactly llama-perplexity's ``nll``, ``nll2`` and ``count``."""

    nll: float = 0.0
    nll2: float = 0.0
    count: int = 0
    chunk_ppl: list[float] = field(default_factory=list)

    def add_chunk(self, logits: torch.Tensor, targets: torch.Tensor, first: int) -> None:
        """``logits`` ``[n_ctx, V]`` of one chunk, ``targets`` its original tokens ``[n_ctx]``."""
        n_ctx = targets.shape[0]
        lp = torch.log_softmax(logits[first : n_ctx - 1].double(), dim=-1)
        v = -lp.gather(1, targets[first + 1 : n_ctx, None].to(lp.device)).squeeze(1)
        self.nll += float(v.sum())
        self.nll2 += float((v * v).sum())
        self.count += n_ctx - first - 1
        self.chunk_ppl.append(self.ppl)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.count)

    @property
    def stderr(self) -> float:
        """llama-perplexity's "+/-": ``PPL * sqrt(var(NLL) / (count - 1))`` (NaN if not computable)."""
        if self.count < 2:
            return math.nan
        mean = self.nll / self.count
        var = self.nll2 / self.count - mean * mean
        return self.ppl * math.sqrt(var / (self.count - 1)) if var > 0 else math.nan


# --------------------------------------------------------------------------------------------------------
# ODP parameters


@dataclass
class OdpParams:
    """Per-layer ``mu`` and decode-proxy ``protect_norm``, and the protected fraction: the converter's form
    (GGUF keys ``mc2gguf.odp.mu``, ``mc2gguf.odp.protect_norm``, ``mc2gguf.odp.protect_ratio``)."""

    mu: list[float]
    protect_norm: list[float]
    protect_ratio: float
    source: str = ""

    def check(self, n_layers: int) -> None:
        if len(self.mu) != n_layers or len(self.protect_norm) != n_layers:
            raise Mc2ggufError(f"ODP parameters ({self.source}) have {len(self.mu)} mu and {len(self.protect_norm)} "
                               f"protect_norm values for a model of {n_layers} layers")
        bad = [m for m in self.mu if not (math.isfinite(m) and m >= 0.0)]
        if bad or not 0.0 <= self.protect_ratio <= 1.0:
            raise Mc2ggufError(f"ODP parameters ({self.source}): mu must be finite and >= 0, protect_ratio in [0, 1]")

    def to_json(self) -> dict:
        return {"mu": [float(m) for m in self.mu], "protect_norm": [float(t) for t in self.protect_norm],
                "protect_ratio": float(self.protect_ratio), "source": self.source}

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> OdpParams:
        path = Path(path)
        if not path.is_file():
            raise Mc2ggufError(f"ODP parameter file {path} not found")
        try:
            d = json.loads(path.read_text())
            return cls([float(m) for m in d["mu"]], [float(t) for t in d["protect_norm"]],
                       float(d["protect_ratio"]), str(d.get("source") or path))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise Mc2ggufError(f"{path}: not an ODP parameter file (JSON with mu, protect_norm, protect_ratio): {e}") \
                from None

    @classmethod
    def from_gguf(cls, reader, path: Path) -> OdpParams | None:
        fields = reader.fields
        keys = ("mc2gguf.odp.mu", "mc2gguf.odp.protect_norm", "mc2gguf.odp.protect_ratio")
        if not all(k in fields for k in keys):
            return None
        return cls([float(v) for v in fields[keys[0]].contents()], [float(v) for v in fields[keys[1]].contents()],
                   float(fields[keys[2]].contents()), f"GGUF metadata of {Path(path).name}")


def _finite_threshold(tau: float) -> float:
    """GGUF wants finite thresholds >= 0: "+inf" (protect nobody) becomes the fp32 maximum, "-inf" 0."""
    return _F32_MAX if tau == math.inf else (0.0 if tau == -math.inf else tau)


@dataclass(frozen=True)
class OdpConfig:
    """ODP as one evaluation runs it."""

    params: OdpParams
    protection: str = DEFAULT_PROTECTION
    mu_scale: float = 1.0

    def __post_init__(self):
        if self.protection not in PROTECTIONS:
            raise Mc2ggufError(f"--protection must be one of {', '.join(PROTECTIONS)}, got {self.protection!r}")
        if not (math.isfinite(self.mu_scale) and self.mu_scale >= 0):
            raise Mc2ggufError(f"--mu-scale must be finite and >= 0, got {self.mu_scale}")

    def mu(self, layer: int) -> float:
        return self.params.mu[layer] * self.mu_scale

    @property
    def uses_attention(self) -> bool:
        return self.protection in ("attention", "both")

    @property
    def uses_norm(self) -> bool:
        return self.protection in ("norm", "both")


# --------------------------------------------------------------------------------------------------------
# The model


class _CachedCheckpoint:
    """A checkpoint whose tensors are loaded once (and, with ``--gguf``, replaced by the file's)."""

    def __init__(self, checkpoint: Checkpoint, replaced: dict[str, torch.Tensor] | None = None):
        self._checkpoint = checkpoint
        self._cache: dict[str, torch.Tensor] = dict(replaced or {})

    def load(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            self._cache[name] = self._checkpoint.load(name)
        return self._cache[name]

    def __getattr__(self, name):  # config, path, has, shape, ...
        return getattr(self._checkpoint, name)


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


@dataclass
class RunStats:
    """What ODP did in the evaluated windows."""

    n_layers: int
    n_pruned: list[int] = field(default_factory=list)
    n_routed: list[int] = field(default_factory=list)
    n_protected: list[int] = field(default_factory=list)
    n_tokens: int = 0

    def __post_init__(self):
        self.n_pruned = self.n_pruned or [0] * self.n_layers
        self.n_routed = self.n_routed or [0] * self.n_layers
        self.n_protected = self.n_protected or [0] * self.n_layers

    @property
    def skip_ratio(self) -> float:
        routed = sum(self.n_routed)
        return sum(self.n_pruned) / routed if routed else 0.0


class LayerCollector:
    """Collects per layer the plain routing's top-2 ratios and the router inputs' L1 norms (calibration)."""

    def __init__(self, n_layers: int):
        self.ratios: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.norms: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

    def add(self, layer: int, x: torch.Tensor, logits: torch.Tensor) -> None:
        self.ratios[layer].append(odp.top2_ratios(logits))
        self.norms[layer].append(odp.router_input_norm(x))


class EvalModel:
    """A Mixtral (through its adapter) with all weights in memory, run one token window at a time."""

    def __init__(self, model_dir: Path, gguf: Path | None = None):
        self.model_dir = Path(model_dir)
        checkpoint = Checkpoint(self.model_dir)
        self.adapter = adapter_for(checkpoint)
        self.gguf = Path(gguf) if gguf else None
        self.gguf_types: dict[str, list[str]] = {}
        self.gguf_odp: OdpParams | None = None
        self.gguf_add_bos: bool | None = None
        self.gguf_bos_id: int | None = None
        replaced = None
        if self.gguf is not None:
            from gguf import GGUFReader

            if not self.gguf.is_file():
                raise Mc2ggufError(f"GGUF file {self.gguf} not found")
            try:
                reader = GGUFReader(self.gguf)
            except (ValueError, OSError) as e:
                raise Mc2ggufError(f"{self.gguf} is not a readable GGUF file: {e}") from None
            self.gguf_odp = OdpParams.from_gguf(reader, self.gguf)
            add_bos = _field(reader, "tokenizer.ggml.add_bos_token")
            vocab = _field(reader, "tokenizer.ggml.model")
            if add_bos is not None:
                self.gguf_add_bos = bool(add_bos)
            elif vocab is not None:  # llama.cpp's defaults: SPM adds BOS, BPE does not
                self.gguf_add_bos = {"llama": True, "gpt2": False}.get(str(vocab))
            bos = _field(reader, "tokenizer.ggml.bos_token_id")
            self.gguf_bos_id = None if bos is None else int(bos)
            del reader
            replaced, self.gguf_types = checkpoint_state(self.gguf, self.adapter)
        self.adapter.checkpoint = _CachedCheckpoint(checkpoint, replaced)
        moe = self.adapter.moe
        self.n_layers, self.top_k, self.hidden = moe.n_layers, moe.top_k, moe.hidden_size
        self.layers: list[LayerWeights] = [self.adapter.load_layer(i) for i in range(self.n_layers)]

    # --- pieces -------------------------------------------------------------------------------------

    def queries_keys(self, layer: LayerWeights, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The post-RoPE queries ``[heads, S, D]`` and keys ``[kv_heads, S, D]`` the layer's attention uses
        (one sequence), for the attention-importance protection."""
        a = self.adapter
        needed = ("_rms_norm", "_rope", "n_head", "n_head_kv", "head_dim")
        if not all(hasattr(a, n) for n in needed):
            raise Mc2ggufError(f"--protection attention is not implemented for {type(a).__name__}")
        t = layer.tensors
        b, s, _ = h.shape
        x = a._rms_norm(h, t["input_norm"])
        q = a._rope((x @ t["q"].T).view(b, s, a.n_head, a.head_dim).transpose(1, 2))
        k = a._rope((x @ t["k"].T).view(b, s, a.n_head_kv, a.head_dim).transpose(1, 2))
        return q[0], k[0]

    def experts(self, layer: LayerWeights, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The MoE output for given routing, slot ``-1`` skipped (the same operations as
        ``ArchAdapter.moe_forward``, so unpruned routing gives bit-identical results)."""
        out = torch.zeros_like(x)
        for e, expert in enumerate(layer.experts):
            token, slot = torch.nonzero(ids == e, as_tuple=True)
            if token.numel():
                w = weights[token, slot]
                act = self.adapter.expert_activation(expert, x[token])
                out.index_add_(0, token, (act @ expert.down.T) * w[:, None])
        return out

    def protection(self, cfg: OdpConfig, layer: int, x: torch.Tensor, q_k) -> tuple[torch.Tensor | None,
                                                                                   torch.Tensor | None, float]:
        """``(protect, importance, protect_ratio)`` for :func:`mc2gguf.odp.route`."""
        protect = importance = None
        ratio = 0.0
        if cfg.uses_norm:
            protect = odp.decode_protect(x, cfg.params.protect_norm[layer])
        if cfg.uses_attention:
            received = odp.attention_received_from_qk(*q_k)
            importance = odp.token_importance(x, received)
            ratio = cfg.params.protect_ratio
        return protect, importance, ratio

    # --- forward --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, odp_cfg: OdpConfig | None = None, stats: RunStats | None = None,
                collect: LayerCollector | None = None, with_head: bool = True) -> torch.Tensor | None:
        """Logits ``[S, V]`` of one sequence ``tokens`` ``[S]``."""
        a = self.adapter
        h = a.embed(tokens.view(1, -1))
        for i, layer in enumerate(self.layers):
            q_k = self.queries_keys(layer, h) if odp_cfg is not None and odp_cfg.uses_attention else None
            h = a.attention_block(layer, h)
            x = a.moe_input(layer, h).reshape(-1, h.shape[-1])
            logits = a.router_logits(layer, x)
            if collect is not None:
                collect.add(i, x, logits)
            if odp_cfg is None:
                ids, weights = a.route(logits)
                n_pruned, n_prot = 0, 0
            else:
                protect, importance, ratio = self.protection(odp_cfg, i, x, q_k)
                ids, weights, n_pruned = odp.route(logits, self.top_k, odp_cfg.mu(i), protect, importance, ratio)
                n_prot = int(odp.protect_mask(x.shape[0], protect, importance, ratio).sum()) \
                    if stats is not None else 0
            if stats is not None:
                stats.n_pruned[i] += int(n_pruned)
                stats.n_routed[i] += ids.numel()
                stats.n_protected[i] += n_prot
            h = h + self.experts(layer, x, ids, weights).reshape(h.shape)
        if stats is not None:
            stats.n_tokens += tokens.numel()
        return a.head(h)[0] if with_head else None


# --------------------------------------------------------------------------------------------------------
# Calibration and evaluation


@dataclass
class OdpCalibration:
    params: OdpParams
    ratios: list[torch.Tensor]  # per layer: every calibration token's w1/w0
    norms: list[torch.Tensor]  # per layer: every calibration token's router-input L1 norm


def calibrate_odp(model: EvalModel, calib_files: Sequence[Path], protect_ratio: float = DEFAULT_PROTECT_RATIO,
                  nsamples: int = 16, seqlen: int = 512, seed: int = 0, progress: bool = False) -> OdpCalibration:
    """Per-layer ``mu`` (:func:`mc2gguf.odp.calibrate_mu`) and decode thresholds
    (:func:`mc2gguf.odp.calibrate_protect_norm`) from ``nsamples x seqlen`` calibration windows (seeded,
    :func:`mc2gguf.calib_data.load_calibration`), the model as loaded, ODP off."""
    from .calib_data import load_calibration

    if not 0.0 <= protect_ratio <= 1.0:
        raise Mc2ggufError(f"--protect must be in [0, 1], got {protect_ratio}")
    cal = load_calibration(model.model_dir, [Path(f) for f in calib_files], nsamples, seqlen, seed)
    collector = LayerCollector(model.n_layers)
    rows = range(cal.tokens.shape[0])
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, desc="ODP calibration", unit="window", file=sys.stderr)
    for r in rows:
        model.forward(cal.tokens[r], collect=collector, with_head=False)
    ratios = [torch.cat(r) for r in collector.ratios]
    norms = [torch.cat(n) for n in collector.norms]
    params = OdpParams(
        mu=[odp.calibrate_mu(r) for r in ratios],
        protect_norm=[_finite_threshold(odp.calibrate_protect_norm(n, protect_ratio)) for n in norms],
        protect_ratio=float(protect_ratio),
        source=f"calibrated by mc2gguf eval on {cal.tokens.shape[0]} x {cal.tokens.shape[1]} tokens of "
               f"{cal.source} (seed {seed})",
    )
    return OdpCalibration(params, ratios, norms)


@dataclass
class EvalResult:
    odp: bool
    protection: str | None
    mu_scale: float | None
    ppl: float
    ppl_stderr: float
    nll: float
    scored_tokens: int
    chunk_ppl: list[float]
    skip_ratio: float
    n_pruned: int
    n_routed: int
    per_layer_skip: list[float]
    protected_fraction: float
    seconds: float

    @property
    def label(self) -> str:
        return "odp off" if not self.odp else f"{self.protection}, mu x {self.mu_scale:g}"


def evaluate_windows(model: EvalModel, windows: Windows, odp_cfg: OdpConfig | None = None,
                     on_chunk: Callable[[int, PerplexityAccumulator], None] | None = None) -> EvalResult:
    """Perplexity of ``model`` over ``windows`` (llama-perplexity's definition) and ODP's statistics."""
    acc = PerplexityAccumulator()
    stats = RunStats(model.n_layers)
    t0 = time.perf_counter()
    for c in range(windows.n_chunk):
        logits = model.forward(windows.inputs[c], odp_cfg, stats)
        acc.add_chunk(logits, windows.targets[c], windows.first)
        if on_chunk is not None:
            on_chunk(c, acc)
    return EvalResult(
        odp=odp_cfg is not None,
        protection=None if odp_cfg is None else odp_cfg.protection,
        mu_scale=None if odp_cfg is None else odp_cfg.mu_scale,
        ppl=acc.ppl, ppl_stderr=acc.stderr, nll=acc.nll / acc.count, scored_tokens=acc.count,
        chunk_ppl=list(acc.chunk_ppl), skip_ratio=stats.skip_ratio, n_pruned=sum(stats.n_pruned),
        n_routed=sum(stats.n_routed),
        per_layer_skip=[p / r if r else 0.0 for p, r in zip(stats.n_pruned, stats.n_routed)],
        protected_fraction=sum(stats.n_protected) / max(1, stats.n_tokens * model.n_layers),
        seconds=time.perf_counter() - t0,
    )


def interpolate_at(points: Iterable[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear ``y(x)`` through ``(x, y)`` points (sorted by x); ``None`` outside their range."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if len(pts) == 1 and pts[0][0] == x:
        return pts[0][1]
    return None


def compare_at_equal_skip(results: Sequence[EvalResult]) -> tuple[float, dict[str, float | None]] | None:
    """Per protection variant, the PPL interpolated (over its ``--mu-scale`` points) at one common skip ratio:
    the lowest skip ratio the variants reach at ``mu x 1``."""
    by_variant: dict[str, list[EvalResult]] = {}
    for r in results:
        if r.odp:
            by_variant.setdefault(r.protection, []).append(r)
    at_one = [r.skip_ratio for rs in by_variant.values() for r in rs if r.mu_scale == 1.0]
    if len(by_variant) < 2 or not at_one:
        return None
    target = min(at_one)
    return target, {v: interpolate_at([(r.skip_ratio, r.ppl) for r in rs], target) for v, rs in by_variant.items()}


# --------------------------------------------------------------------------------------------------------
# The command


@dataclass
class EvalOptions:
    model: Path
    text: Path
    gguf: Path | None = None
    odp: str | None = None  # "on", "off", None = on when ODP parameters are available
    protections: tuple[str, ...] = (DEFAULT_PROTECTION,)
    protect: float | None = None
    mu_scales: tuple[float, ...] = (1.0,)
    ctx: int = 512
    chunks: int | None = None
    calibrate_odp: tuple[Path, ...] = ()
    calib_samples: int = 16
    calib_seqlen: int | None = None
    seed: int = 0
    odp_params: Path | None = None
    save_odp: Path | None = None
    json_out: Path | None = None
    threads: int | None = None
    tokenizer: str = "auto"  # "llama" (llama.cpp's, needs --gguf), "hf", "auto" = llama with --gguf


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_eval(opts: EvalOptions, out=None) -> dict:
    """``mc2gguf eval``: returns what ``--json`` writes; prints llama-perplexity-like lines to ``out`` (stdout)."""
    out = sys.stdout if out is None else out
    if opts.threads:
        torch.set_num_threads(opts.threads)
    for p in opts.protections:
        if p not in PROTECTIONS:
            raise Mc2ggufError(f"--protection must be among {', '.join(PROTECTIONS)}, got {p!r}")
    if opts.odp not in (None, "on", "off"):
        raise Mc2ggufError(f"--odp must be on or off, got {opts.odp!r}")
    if opts.calibrate_odp and opts.odp_params:
        raise Mc2ggufError("give either --calibrate-odp or --odp-params, not both")
    text = read_eval_text(opts.text)  # fail on a missing file before loading the model
    for f in opts.calibrate_odp:
        if not Path(f).is_file():
            raise Mc2ggufError(f"calibration file {f} not found")
    tokenizer = load_tokenizer(opts.model)
    t0 = time.perf_counter()
    model = EvalModel(opts.model, opts.gguf)
    _log(f"loaded {opts.model}" + (f" with the weights of {opts.gguf}" if opts.gguf else "") +
         f" ({model.n_layers} layers) in {time.perf_counter() - t0:.1f} s")

    add_bos = model.gguf_add_bos if model.gguf_add_bos is not None else tokenizer_adds_bos(tokenizer)
    bos_id = model.gguf_bos_id if model.gguf_bos_id is not None else tokenizer.bos_token_id
    use_llama = opts.tokenizer == "llama"
    if opts.tokenizer == "auto" and opts.gguf is not None:
        from .llama_build import find_llama_build

        try:
            find_llama_build()
            use_llama = True
        except Mc2ggufError:
            _log("note: the pinned llama.cpp is not built: tokenizing with the Hugging Face tokenizer, which can "
                 "differ from llama.cpp's (e.g. on a leading space); `mc2gguf build-llama` fixes that")
    if use_llama:
        if opts.gguf is None:
            raise Mc2ggufError("--tokenizer llama needs --gguf (the vocabulary llama.cpp reads)")
        tokens, add_bos = llama_tokenize(opts.gguf, text)
    elif opts.tokenizer not in ("auto", "hf"):
        raise Mc2ggufError(f"--tokenizer must be auto, llama or hf, got {opts.tokenizer!r}")
    else:
        tokens = tokenize_text(tokenizer, text, add_bos, bos_id)
    windows = perplexity_windows(tokens, opts.ctx, opts.chunks, add_bos, bos_id, what=str(opts.text))

    params: OdpParams | None = None
    calibration = None
    if opts.calibrate_odp:
        ratio = DEFAULT_PROTECT_RATIO if opts.protect is None else opts.protect
        calibration = calibrate_odp(model, opts.calibrate_odp, ratio, opts.calib_samples,
                                    opts.calib_seqlen or opts.ctx, opts.seed, progress=True)
        params = calibration.params
    elif opts.odp_params:
        params = OdpParams.load(opts.odp_params)
    elif model.gguf_odp is not None:
        params = model.gguf_odp
    if params is not None:
        params.check(model.n_layers)
        if opts.protect is not None and opts.protect != params.protect_ratio:
            if any(p in ("norm", "both") for p in opts.protections):
                raise Mc2ggufError(f"--protect {opts.protect} differs from the {params.protect_ratio} that the norm "
                                   f"thresholds of {params.source} were calibrated for: recalibrate with "
                                   "--calibrate-odp FILE")
            params = OdpParams(params.mu, params.protect_norm, float(opts.protect), params.source)
        if opts.save_odp:
            params.save(opts.save_odp)
            _log(f"wrote ODP parameters to {opts.save_odp}")
    use_odp = opts.odp == "on" or (opts.odp is None and params is not None)
    if use_odp and params is None:
        raise Mc2ggufError("--odp on needs mu per layer: a --gguf file with mc2gguf.odp metadata, --odp-params "
                           "JSON or --calibrate-odp FILE")

    runs: list[OdpConfig | None] = []
    grid = len(opts.protections) > 1 or len(opts.mu_scales) > 1
    if not use_odp or grid:
        runs.append(None)
    if use_odp:
        runs += [OdpConfig(params, p, s) for p in opts.protections for s in opts.mu_scales]

    print(f"perplexity: {opts.text}: {len(tokens)} tokens ({'llama.cpp' if use_llama else 'Hugging Face'} tokenizer, "
          f"BOS {'added' if add_bos else 'not added'}), "
          f"{windows.n_chunk} chunks of {windows.n_ctx}, scoring the last {windows.scored_per_chunk} tokens of "
          f"each ({windows.n_chunk * windows.scored_per_chunk} in all)", file=out)
    if params is not None and use_odp:
        print(f"ODP: mu per layer {', '.join(f'{m:.3f}' for m in params.mu)} ({params.source}); "
              f"protect_ratio {params.protect_ratio:g}", file=out)
    results = []
    for cfg in runs:
        label = "odp off" if cfg is None else f"odp on, protection {cfg.protection}, mu x {cfg.mu_scale:g}"
        print(f"[{label}]", file=out)

        def on_chunk(c, acc, _out=out):
            print(f"[{c + 1}]{acc.chunk_ppl[-1]:.4f},", end="", file=_out, flush=True)

        r = evaluate_windows(model, windows, cfg, on_chunk)
        print(file=out)
        print(f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_stderr:.5f}" +
              (f"   skip ratio {r.skip_ratio:.4f} ({r.n_pruned} of {r.n_routed} routed slots), protected "
               f"{r.protected_fraction:.4f} of tokens" if r.odp else "") + f"   ({r.seconds:.1f} s)", file=out)
        results.append(r)
    comparison = compare_at_equal_skip(results)
    if grid:
        print("\n| run | skip ratio | PPL | +/- |\n|---|---|---|---|", file=out)
        for r in results:
            print(f"| {r.label} | {r.skip_ratio:.4f} | {r.ppl:.4f} | {r.ppl_stderr:.4f} |", file=out)
        if comparison is not None:
            target, ppl_at = comparison
            print(f"\nPPL at equal skip ratio {target:.4f} (interpolated over --mu-scale): " +
                  ", ".join(f"{v} {'n/a' if p is None else f'{p:.4f}'}" for v, p in ppl_at.items()), file=out)
    report = {
        "model": str(opts.model), "gguf": None if opts.gguf is None else str(opts.gguf),
        "gguf_types": model.gguf_types or None, "text": str(opts.text), "tokens": len(tokens), "add_bos": add_bos,
        "n_ctx": windows.n_ctx, "chunks": windows.n_chunk, "scored_tokens": windows.n_chunk * windows.scored_per_chunk,
        "tokenizer": "llama.cpp" if use_llama else "hf",
        "odp_params": None if params is None else params.to_json(),
        "runs": [asdict(r) for r in results],
        "equal_skip": None if comparison is None else {"skip_ratio": comparison[0], "ppl": comparison[1]},
    }
    if opts.json_out:
        Path(opts.json_out).write_text(json.dumps(report, indent=1, default=str) + "\n")
        _log(f"wrote {opts.json_out}")
    return report
