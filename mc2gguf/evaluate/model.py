"""The PyTorch model ``mc2gguf eval`` runs: the architecture adapter's forward with every layer in memory (and,
with ``--gguf``, every tensor read from the file and dequantized, type groups included, so it runs exactly
the weights llama.cpp would), its routing through ODP's rule (:func:`mc2gguf.odp.route`)."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import odp
from ..archs import LayerWeights, adapter_for
from ..checkpoint import Checkpoint
from ..errors import Mc2ggufError
from ..gguf.reader import checkpoint_state
from ..odp.params import OdpParams, finite_threshold
from ..text import load_calibration

PROTECTIONS = ("none", "attention", "norm", "both")
#: The default variant, chosen by measurement (docs/odp.md, "Choosing the protection variant").
DEFAULT_PROTECTION = "norm"
DEFAULT_PROTECT_RATIO = 0.02


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


class _CachedCheckpoint:
    """A checkpoint whose tensors are loaded once (and, with ``--gguf``, replaced by the file's)."""

    def __init__(self, checkpoint: Checkpoint, replaced: dict[str, torch.Tensor] | None = None):
        self._checkpoint = checkpoint
        self._cache: dict[str, torch.Tensor] = dict(replaced or {})

    def load(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            self._cache[name] = self._checkpoint.load(name)
        return self._cache[name]

    def has(self, name: str) -> bool:
        return name in self._cache or self._checkpoint.has(name)

    def __getattr__(self, name):  # config, path, shape, ...
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
    """Collects per layer the plain routing's slot weight ratios and the router inputs' L1 norms (calibration)."""

    def __init__(self, n_layers: int):
        self.ratios: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]  # none for a dense layer
        self.norms: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

    def add(self, layer: int, x: torch.Tensor, ratios: torch.Tensor) -> None:
        self.ratios[layer].append(ratios)
        self.norms[layer].append(odp.router_input_norm(x))


class EvalModel:
    """A model (through its architecture adapter) with all weights in memory, run one token window at a time."""

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
            q_k = a.queries_keys(layer, h) if odp_cfg is not None and odp_cfg.uses_attention else None
            h = a.attention_block(layer, h)
            x = a.moe_input(layer, h).reshape(-1, h.shape[-1])
            if not layer.is_moe:
                h = h + a.dense_ffn(layer, x).reshape(h.shape)
                continue
            logits = a.router_logits(layer, x)
            if collect is not None:
                collect.add(i, x, a.slot_ratios(layer, logits))
            if odp_cfg is None:
                ids, weights, n_pruned = a.route(layer, logits)
                n_prot = 0
            else:
                protect, importance, ratio = self.protection(odp_cfg, i, x, q_k)
                ids, weights, n_pruned = a.route(layer, logits, odp_cfg.mu(i), protect, importance, ratio)
                n_prot = int(odp.protect_mask(x.shape[0], protect, importance, ratio).sum()) \
                    if stats is not None else 0
            if stats is not None:
                stats.n_pruned[i] += int(n_pruned)
                stats.n_routed[i] += ids.numel()
                stats.n_protected[i] += n_prot
            h = h + a.moe_forward(layer, x, (ids, weights))[0].reshape(h.shape)
        if stats is not None:
            stats.n_tokens += tokens.numel()
        return a.head(h)[0] if with_head else None


@dataclass
class OdpCalibration:
    params: OdpParams
    ratios: list[torch.Tensor]  # per layer: every calibration token's w_s/w_0 of its slots s > 0
    norms: list[torch.Tensor]  # per layer: every calibration token's router-input L1 norm


def calibrate_odp(model: EvalModel, calib_files: Sequence[Path], protect_ratio: float = DEFAULT_PROTECT_RATIO,
                  nsamples: int = 16, seqlen: int = 512, seed: int = 0, progress: bool = False) -> OdpCalibration:
    """Per-layer ``mu`` (:func:`mc2gguf.odp.calibrate_mu`) and decode thresholds
    (:func:`mc2gguf.odp.calibrate_protect_norm`) from ``nsamples x seqlen`` calibration windows (seeded,
    :func:`mc2gguf.calib_data.load_calibration`), the model as loaded, ODP off."""
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
    ratios = [torch.cat(r) if r else torch.empty(0) for r in collector.ratios]
    norms = [torch.cat(n) if n else torch.empty(0) for n in collector.norms]
    params = OdpParams(  # a dense layer (no ratios) never prunes
        mu=[odp.calibrate_mu(r) if r.numel() else 0.0 for r in ratios],
        protect_norm=[finite_threshold(odp.calibrate_protect_norm(n, protect_ratio)) if n.numel() else 0.0
                      for n in norms],
        protect_ratio=float(protect_ratio),
        source=f"calibrated by mc2gguf eval on {cal.tokens.shape[0]} x {cal.tokens.shape[1]} tokens of "
               f"{cal.source} (seed {seed})",
    )
    return OdpCalibration(params, ratios, norms)
