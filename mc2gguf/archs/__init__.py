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
