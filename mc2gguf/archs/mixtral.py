"""Mixtral (``MixtralForCausalLM``): a Llama decoder whose FFN is a top-k routed mixture of SwiGLU experts.

llama.cpp runs it as architecture ``llama`` with ``expert_count`` set, q/k rows interleaved for its RoPE; each
layer's experts are stacked into 3D tensors ``blk.N.ffn_{gate,up,down}_exps`` (checkpoint ``w1``, ``w3``,
``w2``). Routing: softmax over all experts, top-k, the k weights renormalised.
"""

from __future__ import annotations

from gguf import MODEL_TENSOR

from .base import Role
from .decoder import LLAMA_LAYER, LayerTensor, MoEDecoderAdapter


class MixtralAdapter(MoEDecoderAdapter):
    hf_architectures = ("MixtralForCausalLM",)
    gguf_architecture = "llama"
    family = "Mixtral"
    type_groups_in_llama = True  # patch 0004 wires the type groups into models/llama.cpp
    layer_tensors = {**LLAMA_LAYER,
                     "router": LayerTensor("block_sparse_moe.gate", MODEL_TENSOR.FFN_GATE_INP, Role.ROUTER)}
    expert_name = "block_sparse_moe.experts.{expert}.{name}"
    projection_names = {"gate": "w1", "up": "w3", "down": "w2"}
    expert_order = ("gate", "down", "up")  # llama.cpp's converter order
    permute_qk = True
