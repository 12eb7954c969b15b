"""Architecture adapters: everything that depends on a model family (tensor names, layouts, routing).

``base`` says what an adapter provides, ``blocks`` holds the forward pieces families share, ``decoder`` the
table-driven Llama-style MoE decoder most families are, and each family is one module of tables (as llama.cpp
keeps one file per model in ``src/models/``): ``mixtral``, ``qwen3moe``, ``olmoe``, ``qwen2moe``, ``deepseek2``
(DeepSeek-V2 and V3). To add a family: a module with an
``ArchAdapter`` (usually ``MoEDecoderAdapter``) subclass naming its Hugging Face architectures, and one line
in ``_ADAPTERS``.
"""

from __future__ import annotations

import importlib

from ..checkpoint import Checkpoint
from ..errors import Mc2ggufError
from .base import PROJECTIONS, ArchAdapter, ExpertWeights, LayerWeights, MoEShape, Role, TensorSpec

#: Hugging Face architecture -> the module and class of its adapter (imported when first used).
_ADAPTERS = {
    "MixtralForCausalLM": ("mixtral", "MixtralAdapter"),
    "Qwen3MoeForCausalLM": ("qwen3moe", "Qwen3MoeAdapter"),
    "OlmoeForCausalLM": ("olmoe", "OlmoeAdapter"),
    "Qwen2MoeForCausalLM": ("qwen2moe", "Qwen2MoeAdapter"),
    "DeepseekV2ForCausalLM": ("deepseek2", "DeepseekV2Adapter"),
    "DeepseekV3ForCausalLM": ("deepseek2", "DeepseekV3Adapter"),
}

__all__ = ["PROJECTIONS", "ArchAdapter", "ExpertWeights", "LayerWeights", "MoEShape", "Role", "TensorSpec",
           "adapter_class", "adapter_for", "supported_architectures", "type_group_architectures"]


def supported_architectures() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_class(arch: str) -> type[ArchAdapter]:
    """The adapter class of a Hugging Face architecture (``KeyError`` for an unsupported one)."""
    module, cls = _ADAPTERS[arch]
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def type_group_architectures() -> list[str]:
    """The GGUF architectures whose graph in the patched llama.cpp reads per-expert type groups."""
    return sorted({c.gguf_architecture for c in map(adapter_class, _ADAPTERS) if c.type_groups_in_llama})


def adapter_for(checkpoint: Checkpoint) -> ArchAdapter:
    arch = checkpoint.architecture
    if arch not in _ADAPTERS:
        raise Mc2ggufError(
            f"unsupported architecture {arch!r} in {checkpoint.path / 'config.json'}; "
            f"supported: {', '.join(supported_architectures())}"
        )
    return adapter_class(arch)(checkpoint)
