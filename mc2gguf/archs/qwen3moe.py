"""Qwen3-MoE (``Qwen3MoeForCausalLM``): Mixtral's decoder with a per-head RMSNorm on the queries and keys before
RoPE, other checkpoint names, and no q/k row permutation.

llama.cpp runs it as architecture ``qwen3moe`` (``src/models/qwen3moe.cpp``): NEOX RoPE, which reads Hugging
Face's rotate-half rows as they are (the converter's ``Qwen3MoeModel`` permutes nothing), and ``attn_q_norm``/
``attn_k_norm`` over each head. Experts ``mlp.experts.N.{gate,up,down}_proj`` (transformers 5 saves them one by
one) are stacked in the converter's order down, gate, up. Routing: softmax over all experts, top-k and, with
``norm_topk_prob``, the k weights renormalised: Mixtral's rule (ODP's with mu = 0).
"""

from __future__ import annotations

from gguf import MODEL_TENSOR

from ..errors import Mc2ggufError
from .base import Role
from .decoder import MoEDecoderAdapter


class Qwen3MoeAdapter(MoEDecoderAdapter):
    hf_architectures = ("Qwen3MoeForCausalLM",)
    gguf_architecture = "qwen3moe"
    family = "Qwen3-MoE"
    type_groups_in_llama = False  # patch 0004 wires models/llama.cpp only
    layer_tensors = {
        "input_norm": ("input_layernorm", MODEL_TENSOR.ATTN_NORM, Role.NORM),
        "q": ("self_attn.q_proj", MODEL_TENSOR.ATTN_Q, Role.ATTENTION),
        "q_norm": ("self_attn.q_norm", MODEL_TENSOR.ATTN_Q_NORM, Role.NORM),
        "k": ("self_attn.k_proj", MODEL_TENSOR.ATTN_K, Role.ATTENTION),
        "k_norm": ("self_attn.k_norm", MODEL_TENSOR.ATTN_K_NORM, Role.NORM),
        "v": ("self_attn.v_proj", MODEL_TENSOR.ATTN_V, Role.ATTENTION),
        "o": ("self_attn.o_proj", MODEL_TENSOR.ATTN_OUT, Role.ATTENTION),
        "post_norm": ("post_attention_layernorm", MODEL_TENSOR.FFN_NORM, Role.NORM),
        "router": ("mlp.gate", MODEL_TENSOR.FFN_GATE_INP, Role.ROUTER),
    }
    expert_name = "mlp.experts.{expert}.{name}"
    projection_names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    expert_order = ("down", "gate", "up")  # llama.cpp's converter (Qwen2MoeModel.modify_tensors)
    # real checkpoints say num_experts; transformers 5 writes num_local_experts
    n_experts_keys = ("num_experts", "num_local_experts")
    expert_size_key = "moe_intermediate_size"
    rms_eps_default = 1e-6

    def check_config(self, cfg: dict) -> None:
        step, dense = int(cfg.get("decoder_sparse_step", 1)), list(cfg.get("mlp_only_layers") or [])
        unsupported = [
            (not cfg.get("norm_topk_prob", False), "norm_topk_prob false (top-k weights not renormalised: the "
                                                   "routing rule needs generalising)"),
            (bool(dense) or step != 1, f"dense MLP layers (mlp_only_layers {dense}, decoder_sparse_step {step})"),
            (bool(cfg.get("attention_bias")), "attention_bias"),
            (self.rope.get("rope_type", "default") != "default", f"rope_type {self.rope.get('rope_type')!r}"),
        ]
        for bad, what in unsupported:
            if bad:
                raise Mc2ggufError(f"{self.checkpoint.path / 'config.json'}: Qwen3-MoE with {what} is not supported yet")
