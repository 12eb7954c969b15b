"""Architecture adapters: everything that depends on a model family (tensor names, layouts, routing).

The rest of the pipeline sees only ``TensorSpec``s; one module per architecture, as llama.cpp keeps one
file per model in ``src/models/``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

from ..checkpoint import Checkpoint
from ..errors import Mc2ggufError


class Role(Enum):
    EMBEDDING = "embedding"
    OUTPUT = "output"
    NORM = "norm"
    ATTENTION = "attention"
    ROUTER = "router"
    EXPERTS = "experts"


@dataclass(frozen=True)
class TensorSpec:
    """One GGUF tensor: its name, shape (numpy order; experts ``[E, rows, cols]``) and how to load it.

    ``hf_names`` are the checkpoint tensors it is made of (one per expert for stacked experts);
    ``to_checkpoint`` maps the GGUF tensor back to them, so a GGUF file can be run in PyTorch.
    """

    name: str
    shape: tuple[int, ...]
    role: Role
    layer: int | None
    hf_names: tuple[str, ...]
    load: Callable[[], torch.Tensor]
    to_checkpoint: Callable[[torch.Tensor], dict[str, torch.Tensor]]

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
    experts: list[ExpertWeights]
    keys: dict[str, str]  # checkpoint name -> key in ``tensors``

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

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint

    @property
    def moe(self) -> MoEShape:
        raise NotImplementedError

    def tensors(self) -> list[TensorSpec]:
        """Every tensor of the GGUF file, in the order it is written (layer by layer)."""
        raise NotImplementedError

    # --- the forward pass, one layer at a time (calibration runs the model through these) -------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` token ids -> hidden states ``[B, S, H]``."""
        raise NotImplementedError

    def load_layer(self, index: int) -> LayerWeights:
        raise NotImplementedError

    def attention_block(self, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        """The layer's hidden state after its attention sub-block (residual included)."""
        raise NotImplementedError

    def moe_input(self, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        """What the router and the experts read (the normalised hidden state)."""
        raise NotImplementedError

    def router_logits(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits ``[T, E]`` -> selected expert ids ``[T, k]`` and their weights ``[T, k]``."""
        raise NotImplementedError

    def expert_activation(self, expert: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
        """An expert's hidden activation (the input of its down projection)."""
        raise NotImplementedError

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states -> logits (needs the output norm and projection)."""
        raise NotImplementedError

    def moe_forward(self, layer: LayerWeights, x: torch.Tensor, visit=None):
        """The MoE block on ``x`` ``[T, H]``: returns its output, the selected ids and their weights.

        ``visit(e, token_index, weight, activation)`` is called for every expert that some token selects.
        """
        ids, weights = self.route(self.router_logits(layer, x))
        out = torch.zeros_like(x)
        for e, expert in enumerate(layer.experts):
            token, slot = torch.nonzero(ids == e, as_tuple=True)
            if token.numel():
                w = weights[token, slot]
                a = self.expert_activation(expert, x[token])
                out.index_add_(0, token, (a @ expert.down.T) * w[:, None])
                if visit:
                    visit(e, token, w, a)
        return out, ids, weights

    def layer_forward(self, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        """One whole decoder layer, ``[B, S, H] -> [B, S, H]``."""
        h = self.attention_block(layer, h)
        out, _, _ = self.moe_forward(layer, self.moe_input(layer, h).reshape(-1, h.shape[-1]))
        return h + out.reshape(h.shape)


def _registry() -> dict[str, type[ArchAdapter]]:
    from .mixtral import MixtralAdapter

    return {arch: cls for cls in (MixtralAdapter,) for arch in cls.hf_architectures}


def adapter_for(checkpoint: Checkpoint) -> ArchAdapter:
    registry = _registry()
    arch = checkpoint.architecture
    if arch not in registry:
        raise Mc2ggufError(
            f"unsupported architecture {arch!r} in {checkpoint.path / 'config.json'}; "
            f"supported: {', '.join(sorted(registry))}"
        )
    return registry[arch](checkpoint)
