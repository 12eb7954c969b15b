"""Qwen3-MoE (``Qwen3MoeForCausalLM``): Mixtral's decoder with a per-head RMSNorm on the queries and keys before
RoPE, other checkpoint names, and no q/k row permutation.

llama.cpp runs it as architecture ``qwen3moe`` (``src/models/qwen3moe.cpp``): NEOX RoPE, which reads Hugging
Face's rotate-half rows as they are (the converter's ``Qwen3MoeModel`` permutes nothing), and ``attn_q_norm``/
``attn_k_norm`` over each head. Experts ``mlp.experts.N.{gate,up,down}_proj`` (transformers 5 saves them one by
one) are stacked in the converter's order down, gate, up. Routing: softmax over all experts, top-k and, with
``norm_topk_prob`` (which llama.cpp's graph assumes), the k weights renormalised: Mixtral's rule.
"""

from __future__ import annotations

from .decoder import LLAMA_LAYER, QK_NORM, QwenStyleMoEAdapter


class Qwen3MoeAdapter(QwenStyleMoEAdapter):
    hf_architectures = ("Qwen3MoeForCausalLM",)
    gguf_architecture = "qwen3moe"
    family = "Qwen3-MoE"
    type_groups_in_llama = True  # patch 0014 wires models/qwen3moe.cpp
    layer_tensors = {**LLAMA_LAYER, **QK_NORM, **QwenStyleMoEAdapter.router}
    expert_size_key = "moe_intermediate_size"
    rms_eps_default = 1e-6
    norm_topk_prob_default = False  # transformers' default; llama.cpp's graph always renormalises

    def check_config(self, cfg: dict) -> None:
        self.refuse([*self.every_layer_moe_default_rope(cfg), (bool(cfg.get("attention_bias")), "attention_bias")])
