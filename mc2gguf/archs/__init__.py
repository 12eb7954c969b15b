"""Architecture adapters: everything that depends on a model family (tensor names, layouts, routing).

``base`` says what an adapter provides, ``blocks`` holds the forward pieces families share, and each family
is one module (as llama.cpp keeps one file per model in ``src/models/``). To add a family: a module with an
``ArchAdapter`` subclass naming its Hugging Face architectures, and one line in ``_ADAPTERS``.
"""

from __future__ import annotations

import importlib

from ..checkpoint import Checkpoint
from ..errors import Mc2ggufError
from .base import PROJECTIONS, ArchAdapter, ExpertWeights, LayerWeights, MoEShape, Role, TensorSpec

#: Hugging Face architecture -> the module and class of its adapter (imported when first used).
_ADAPTERS = {"MixtralForCausalLM": ("mixtral", "MixtralAdapter"), "Qwen3MoeForCausalLM": ("qwen3moe", "Qwen3MoeAdapter")}

__all__ = ["PROJECTIONS", "ArchAdapter", "ExpertWeights", "LayerWeights", "MoEShape", "Role", "TensorSpec",
           "adapter_for", "supported_architectures"]


def supported_architectures() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(checkpoint: Checkpoint) -> ArchAdapter:
    arch = checkpoint.architecture
    if arch not in _ADAPTERS:
        raise Mc2ggufError(
            f"unsupported architecture {arch!r} in {checkpoint.path / 'config.json'}; "
            f"supported: {', '.join(supported_architectures())}"
        )
    module, cls = _ADAPTERS[arch]
    return getattr(importlib.import_module(f".{module}", __name__), cls)(checkpoint)
