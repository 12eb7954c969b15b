"""What an architecture adapter is: the tensors of the GGUF file (``TensorSpec``) and the forward pass,
one layer at a time, that calibration and evaluation run. The rest of the pipeline sees only these."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

from ..checkpoint import Checkpoint
from . import blocks


class Role(Enum):
    EMBEDDING = "embedding"
    OUTPUT = "output"
    NORM = "norm"
    BIAS = "bias"
    ATTENTION = "attention"
    ROUTER = "router"
    EXPERTS = "experts"  # the routed experts, stacked per projection
    SHARED_EXPERT = "shared_expert"  # an expert every token takes (a plain FFN: typed like attention)
    DENSE_FFN = "dense_ffn"  # the FFN of a layer without experts (DeepSeek's leading layers): typed like attention


@dataclass(frozen=True)
class TensorSpec:
    """One GGUF tensor: its name, shape (numpy order; experts ``[E, rows, cols]``) and how to load it.

    ``hf_names`` are the checkpoint tensors it is made of (one per expert for stacked experts);
    ``to_checkpoint`` maps the GGUF tensor back to them, so a GGUF file can be run in PyTorch;
    ``projection`` names an expert tensor's projection (one of ``PROJECTIONS``).
    """

    name: str
    shape: tuple[int, ...]
    role: Role
    layer: int | None
    hf_names: tuple[str, ...]
    load: Callable[[], torch.Tensor]
    to_checkpoint: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    projection: str | None = None

    @property
    def row_length(self) -> int:
        return self.shape[-1]


PROJECTIONS = ("gate", "up", "down")  # an expert's matrices; GGUF names them ffn_{proj}_exps


@dataclass
class ExpertWeights:
    """One SwiGLU expert in checkpoint orientation ``[out, in]``: gate/up ``[I, H]``, down ``[H, I]``."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    def get(self, proj: str) -> torch.Tensor:
        return getattr(self, proj)


@dataclass
class LayerWeights:
    """A decoder layer's weights, as the adapter's forward functions use them."""

    index: int
    tensors: dict[str, torch.Tensor]  # attention, norms, router: adapter-specific keys
    experts: list[ExpertWeights]  # none in a dense layer (its FFN is in ``tensors``)
    keys: dict[str, str]  # checkpoint name -> key in ``tensors``

    @property
    def is_moe(self) -> bool:
        return bool(self.experts)

    def replace(self, checkpoint_name: str, value: torch.Tensor) -> None:
        """Swap in another version (e.g. the dequantized one) of a non-expert tensor."""
        self.tensors[self.keys[checkpoint_name]] = value


@dataclass(frozen=True)
class MoEShape:
    n_layers: int
    n_experts: int
    top_k: int
    hidden_size: int
    expert_size: int


class ArchAdapter:
    """Base of the per-architecture adapters."""

    hf_architectures: tuple[str, ...] = ()
    gguf_architecture: str = ""
    type_groups_in_llama: bool = False  # the patched llama.cpp reads per-expert type groups for this arch

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint

    @property
    def moe(self) -> MoEShape:
        raise NotImplementedError

    def tensors(self) -> list[TensorSpec]:
        """Every tensor of the GGUF file, in the order it is written (layer by layer)."""
        raise NotImplementedError

    def is_moe_layer(self, index: int) -> bool:
        """Whether decoder layer ``index`` routes to experts (DeepSeek's leading layers are dense FFNs)."""
        return True

    def expert_shapes(self) -> dict[str, tuple[int, int]]:
        """``{projection: (rows, cols)}`` of one routed expert."""
        experts = [s for s in self.tensors() if s.role is Role.EXPERTS]
        first = min(s.layer for s in experts)
        return {s.projection: tuple(s.shape[1:]) for s in experts if s.layer == first}

    # --- the forward pass, one layer at a time (calibration runs the model through these) -------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` token ids -> hidden states ``[B, S, H]``."""
        raise NotImplementedError

    def load_layer(self, index: int) -> LayerWeights:
        raise NotImplementedError

    def attention_block(self, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        """The layer's hidden state after its attention sub-block (residual included)."""
        raise NotImplementedError

    def queries_keys(self, layer: LayerWeights, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The post-RoPE queries ``[heads, S, D]`` and keys ``[kv_heads, S, D]`` of one sequence ``h``
        ``[1, S, H]`` (ODP's attention-importance protection reads them)."""
        raise NotImplementedError

    def moe_input(self, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        """What the router and the experts read (the normalised hidden state)."""
        raise NotImplementedError

    def router_logits(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def route(self, layer: LayerWeights, logits: torch.Tensor, mu: float = 0.0, protect: torch.Tensor | None = None,
              importance: torch.Tensor | None = None, protect_ratio: float = 0.0
              ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Router logits ``[T, E]`` of ``layer`` -> selected expert ids ``[T, k]``, their weights ``[T, k]`` and the
        number of pruned slots: the family's routing through ODP's rule (:func:`mc2gguf.odp.route`; ``mu = 0`` is
        plain routing, bit for bit)."""
        raise NotImplementedError

    def slot_ratios(self, layer: LayerWeights, logits: torch.Tensor) -> torch.Tensor:
        """``w_s / w_0`` of every token's slots ``s > 0`` under plain routing (what ODP's ``mu`` is calibrated
        on): the logit gap's ``exp`` for softmax routing (:func:`mc2gguf.odp.slot_ratios`)."""
        from ..odp import slot_ratios

        return slot_ratios(logits, self.moe.top_k)

    def expert_activation(self, expert: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
        """An expert's hidden activation (the input of its down projection)."""
        raise NotImplementedError

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states -> logits (needs the output norm and projection)."""
        raise NotImplementedError

    def dense_ffn(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        """The FFN of a layer without experts, on ``x`` ``[T, H]``."""
        raise NotImplementedError

    def moe_forward(self, layer: LayerWeights, x: torch.Tensor, routing=None, visit=None):
        """The MoE block on ``x`` ``[T, H]``: returns its output, the selected ids and their weights.

        ``routing`` ``(ids, weights)`` replaces the layer's own (ODP's, with ``-1`` in skipped slots);
        ``visit`` is :func:`blocks.dispatch_experts`'.
        """
        ids, weights = routing if routing is not None else self.route(layer, self.router_logits(layer, x))[:2]
        experts = layer.experts
        out = blocks.dispatch_experts(x, ids, weights, len(experts), lambda e, xe, _: self.expert_activation(experts[e], xe),
                                      lambda e: experts[e].down, visit)
        return out, ids, weights

    def layer_forward(self, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        """One whole decoder layer, ``[B, S, H] -> [B, S, H]``."""
        h = self.attention_block(layer, h)
        x = self.moe_input(layer, h).reshape(-1, h.shape[-1])
        out = self.moe_forward(layer, x)[0] if layer.is_moe else self.dense_ffn(layer, x)
        return h + out.reshape(h.shape)
