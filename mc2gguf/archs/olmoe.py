"""OLMoE (``OlmoeForCausalLM``): a Llama decoder with an RMSNorm over the whole query and key projections (not per
head), 64 experts top-8 in the released model, and top-k weights that are *not* renormalised.

llama.cpp runs it as architecture ``olmoe`` (``src/models/olmoe.cpp``): NEOX RoPE on Hugging Face's rows as they
are, ``attn_q_norm``/``attn_k_norm`` of ``n_embd`` values, which is why it needs as many key/value heads as query
heads. The converter (``OlmoeModel``, copied from Qwen2-MoE's) stacks the experts as down, gate, up and always
writes an RMSNorm epsilon of 1e-5. Routing: softmax over all experts, top-k, the weights kept as they are.
"""

from __future__ import annotations

from .decoder import LLAMA_LAYER, QK_NORM, QwenStyleMoEAdapter


class OlmoeAdapter(QwenStyleMoEAdapter):
    hf_architectures = ("OlmoeForCausalLM",)
    gguf_architecture = "olmoe"
    family = "OLMoE"
    type_groups_in_llama = True  # patch 0015 wires models/olmoe.cpp
    layer_tensors = {**LLAMA_LAYER, **QK_NORM, **QwenStyleMoEAdapter.router}
    qk_norm_per_head = False
    renormalize = False
    norm_topk_prob_default = False

    def check_config(self, cfg: dict) -> None:
        self.refuse([
            (cfg.get("clip_qkv") is not None, f"clip_qkv {cfg.get('clip_qkv')} (llama.cpp's olmoe graph clips nothing)"),
            (bool(cfg.get("attention_bias")), "attention_bias"),
            (self.n_head_kv != self.n_head, f"{self.n_head_kv} key/value heads for {self.n_head} query heads "
                                            "(llama.cpp's olmoe reads a key norm of n_embd values)"),
            *self.default_rope(),
        ])
