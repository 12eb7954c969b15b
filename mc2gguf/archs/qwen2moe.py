"""Qwen2-MoE (``Qwen2MoeForCausalLM``): a Llama decoder with q/k/v biases whose FFN is a routed mixture of SwiGLU
experts beside one shared expert that every token takes, scaled by ``sigmoid(x @ shared_expert_gate)``; the
routed top-k weights are *not* renormalised.

llama.cpp runs it as architecture ``qwen2moe`` (``src/models/qwen2moe.cpp``): NEOX RoPE on Hugging Face's rows as
they are, the shared expert as ``ffn_{gate,up,down}_shexp`` with its gate ``ffn_gate_inp_shexp``. The converter
(``Qwen2MoeModel``) stacks the routed experts as down, gate, up.
"""

from __future__ import annotations

from gguf import MODEL_TENSOR

from .base import Role
from .decoder import LLAMA_LAYER, LayerTensor, QwenStyleMoEAdapter


class Qwen2MoeAdapter(QwenStyleMoEAdapter):
    hf_architectures = ("Qwen2MoeForCausalLM",)
    gguf_architecture = "qwen2moe"
    family = "Qwen2-MoE"
    type_groups_in_llama = True  # patch 0015 wires models/qwen2moe.cpp
    layer_tensors = {
        **LLAMA_LAYER,
        "q_bias": LayerTensor("self_attn.q_proj", MODEL_TENSOR.ATTN_Q, Role.BIAS, "bias"),
        "k_bias": LayerTensor("self_attn.k_proj", MODEL_TENSOR.ATTN_K, Role.BIAS, "bias"),
        "v_bias": LayerTensor("self_attn.v_proj", MODEL_TENSOR.ATTN_V, Role.BIAS, "bias"),
        **QwenStyleMoEAdapter.router,
        "shared_router": LayerTensor("mlp.shared_expert_gate", MODEL_TENSOR.FFN_GATE_INP_SHEXP, Role.ROUTER),
        "shared_gate": LayerTensor("mlp.shared_expert.gate_proj", MODEL_TENSOR.FFN_GATE_SHEXP, Role.SHARED_EXPERT),
        "shared_up": LayerTensor("mlp.shared_expert.up_proj", MODEL_TENSOR.FFN_UP_SHEXP, Role.SHARED_EXPERT),
        "shared_down": LayerTensor("mlp.shared_expert.down_proj", MODEL_TENSOR.FFN_DOWN_SHEXP, Role.SHARED_EXPERT),
    }
    expert_size_key = "moe_intermediate_size"
    shared_expert_size_key = "shared_expert_intermediate_size"
    rms_eps_default = 1e-6
    renormalize = False
    norm_topk_prob_default = False

    def check_config(self, cfg: dict) -> None:
        self.refuse([
            *self.every_layer_moe_default_rope(cfg),
            (not cfg.get("qkv_bias", True), "qkv_bias false (llama.cpp's qwen2moe reads the biases)"),
            (bool(cfg.get("use_sliding_window")), "use_sliding_window"),
        ])
