"""DeepSeek-V2 (``DeepseekV2ForCausalLM``) and DeepSeek-V3 (``DeepseekV3ForCausalLM``): multi-head latent attention
(MLA), leading dense layers (``first_k_dense_replace``), and MoE layers with ``n_shared_experts`` shared experts
(one FFN, no gate) beside the routed ones. Routing: V2 softmax over all experts, top-k, not renormalised; V3
sigmoid scores, a selection bias (``e_score_correction_bias``) and group-limited selection, the chosen scores
renormalised (``norm_topk_prob``); both scaled by ``routed_scaling_factor``.

llama.cpp runs both as architecture ``deepseek2`` (``src/models/deepseek2.cpp``, one converter class
``DeepseekV2Model``): ``kv_b_proj`` split per head into ``attn_k_b`` (transposed) and ``attn_v_b``, interleaved
("norm") RoPE on the weights as they are, the bias as ``exp_probs_b.bias``, routed experts stacked down, gate, up.
"""

from __future__ import annotations

import torch
from gguf import MODEL_TENSOR

from ..errors import Mc2ggufError
from ..gguf.keys import tensor_name
from . import blocks
from .base import LayerWeights, Role, TensorSpec
from .decoder import LLAMA_LAYER, LayerTensor, QwenStyleMoEAdapter

_ATTENTION = {
    "q": LayerTensor("self_attn.q_proj", MODEL_TENSOR.ATTN_Q, Role.ATTENTION),
    "q_a": LayerTensor("self_attn.q_a_proj", MODEL_TENSOR.ATTN_Q_A, Role.ATTENTION),
    "q_a_norm": LayerTensor("self_attn.q_a_layernorm", MODEL_TENSOR.ATTN_Q_A_NORM, Role.NORM),
    "q_b": LayerTensor("self_attn.q_b_proj", MODEL_TENSOR.ATTN_Q_B, Role.ATTENTION),
    "kv_a": LayerTensor("self_attn.kv_a_proj_with_mqa", MODEL_TENSOR.ATTN_KV_A_MQA, Role.ATTENTION),
    "kv_a_norm": LayerTensor("self_attn.kv_a_layernorm", MODEL_TENSOR.ATTN_KV_A_NORM, Role.NORM),
    # not in the checkpoint: the converter's two halves of self_attn.kv_b_proj (named as it names them)
    "k_b": LayerTensor("self_attn.k_b_proj", MODEL_TENSOR.ATTN_K_B, Role.ATTENTION),
    "v_b": LayerTensor("self_attn.v_b_proj", MODEL_TENSOR.ATTN_V_B, Role.ATTENTION),
}
_DENSE_FFN = {
    "dense_gate": LayerTensor("mlp.gate_proj", MODEL_TENSOR.FFN_GATE, Role.DENSE_FFN),
    "dense_up": LayerTensor("mlp.up_proj", MODEL_TENSOR.FFN_UP, Role.DENSE_FFN),
    "dense_down": LayerTensor("mlp.down_proj", MODEL_TENSOR.FFN_DOWN, Role.DENSE_FFN),
}
_MOE = {
    **QwenStyleMoEAdapter.router,
    "shared_gate": LayerTensor("mlp.shared_experts.gate_proj", MODEL_TENSOR.FFN_GATE_SHEXP, Role.SHARED_EXPERT),
    "shared_up": LayerTensor("mlp.shared_experts.up_proj", MODEL_TENSOR.FFN_UP_SHEXP, Role.SHARED_EXPERT),
    "shared_down": LayerTensor("mlp.shared_experts.down_proj", MODEL_TENSOR.FFN_DOWN_SHEXP, Role.SHARED_EXPERT),
}
_SELECTION_BIAS = {
    "selection_bias": LayerTensor("mlp.gate", MODEL_TENSOR.FFN_EXP_PROBS_B, Role.BIAS, "e_score_correction_bias",
                                  "bias"),
}
#: llama.cpp's deepseek2 reads attention.q_lora_rank unless the model has one of the "lite" layer counts
_LITE_LAYER_COUNTS = (26, 27)


class DeepseekV2Adapter(QwenStyleMoEAdapter):
    hf_architectures = ("DeepseekV2ForCausalLM",)
    gguf_architecture = "deepseek2"
    family = "DeepSeek-V2"
    hf_config_class = "DeepseekV2Config"
    type_groups_in_llama = True  # patch 0017 wires models/deepseek2.cpp
    layer_tensors = {**LLAMA_LAYER, **_ATTENTION, **_DENSE_FFN, **_MOE, **_SELECTION_BIAS}
    n_experts_keys = ("n_routed_experts",)
    expert_size_key = "moe_intermediate_size"
    rms_eps_default = 1e-6
    renormalize = False
    sigmoid_scores = False

    def __init__(self, checkpoint):
        super().__init__(checkpoint)
        cfg = checkpoint.config
        try:
            self.n_dense = int(cfg.get("first_k_dense_replace") or 0)
            self.q_rank = cfg.get("q_lora_rank")
            self.kv_rank = int(cfg["kv_lora_rank"])
            self.nope_dim, self.rope_dim = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"])
            self.v_dim = int(cfg["v_head_dim"])
            self.scale = float(cfg.get("routed_scaling_factor") or 1.0)
            self.n_group, self.topk_group = int(cfg.get("n_group") or 1), int(cfg.get("topk_group") or 1)
        except (KeyError, TypeError, ValueError) as e:
            raise Mc2ggufError(f"{checkpoint.path / 'config.json'}: missing or bad {self.family} field {e}") from None
        self.inv_freq, self.rope_scale, self.softmax_scale = self._rope_parameters(cfg)

    def _rope_parameters(self, cfg: dict) -> tuple[torch.Tensor, float, float]:
        """RoPE's frequencies, the factor on its cos and sin, and the softmax scale: plain, or YaRN (what DeepSeek's
        checkpoints ship) computed by transformers' own functions from the config."""
        qk_scale = (self.nope_dim + self.rope_dim) ** -0.5
        if self.rope_type == "default":
            return blocks.rope_frequencies(self.rope_theta, self.rope_dim), 1.0, qk_scale
        import transformers
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, yarn_apply_mscale

        config = getattr(transformers, self.hf_config_class).from_dict(cfg)
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[self.rope_type](config, "cpu")
        return inv_freq.float(), float(attention_factor), float(yarn_apply_mscale(config.rope_parameters, qk_scale))

    def check_config(self, cfg: dict) -> None:
        self.refuse([
            (self.rope_type not in ("default", "yarn"), f"rope_type {self.rope_type!r}"),
            (int(cfg.get("moe_layer_freq", 1)) != 1, f"moe_layer_freq {cfg.get('moe_layer_freq')}"),
            (bool(cfg.get("attention_bias")), "attention_bias"),
            (bool(cfg.get("mlp_bias")), "mlp_bias"),
            (cfg.get("q_lora_rank") is None and cfg["num_hidden_layers"] not in _LITE_LAYER_COUNTS,
             f"no q_lora_rank and {cfg['num_hidden_layers']} layers (llama.cpp's deepseek2 reads q_lora_rank "
             f"unless the model has {' or '.join(map(str, _LITE_LAYER_COUNTS))} layers)"),
            *self.check_routing(cfg),
        ])

    def check_routing(self, cfg: dict) -> list[tuple[bool, str]]:
        method, n_group = cfg.get("topk_method", "greedy"), int(cfg.get("n_group") or 1)
        return [
            (method != "greedy", f"topk_method {method!r} (llama.cpp's deepseek2 graph picks groups by the sum of "
                                 "their two best scores, DeepSeek-V2 by the best one)"),
            (n_group > 1, f"n_group {n_group} with greedy routing (llama.cpp's graph would limit the groups)"),
            (cfg.get("scoring_func") not in (None, "softmax"), f"scoring_func {cfg.get('scoring_func')!r}"),
            (bool(cfg.get("norm_topk_prob")), "norm_topk_prob true (DeepSeek-V2 never renormalises; llama.cpp's "
                                              "graph would)"),
        ]

    def is_moe_layer(self, index: int) -> bool:
        return index >= self.n_dense

    @classmethod
    def _layer_keys(cls, low_rank_query: bool, moe: bool) -> list[str]:
        query = ["q_a", "q_a_norm", "q_b"] if low_rank_query else ["q"]
        attention = ["input_norm", *query, "kv_a", "kv_a_norm", "k_b", "v_b", "o", "post_norm"]
        if not moe:
            return attention + list(_DENSE_FFN)
        return attention + list(_MOE) + (list(_SELECTION_BIAS) if cls.sigmoid_scores else [])

    def layer_keys(self, index: int) -> list[str]:
        return self._layer_keys(self.q_rank is not None, self.is_moe_layer(index))

    @classmethod
    def checkpoint_layer_shapes(cls, cfg: dict, layer: int) -> dict[str, tuple[int, ...]]:
        hidden, n_head, n_experts = cfg["hidden_size"], cfg["num_attention_heads"], cfg["n_routed_experts"]
        q_rank, kv_rank, rope = cfg.get("q_lora_rank"), cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
        nope, v_dim, expert = cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg["moe_intermediate_size"]
        dense, shared = cfg["intermediate_size"], expert * cfg.get("n_shared_experts", 1)
        q_out = n_head * (nope + rope)
        shapes = {"input_norm": (hidden,), "q": (q_out, hidden), "q_a": (q_rank, hidden), "q_a_norm": (q_rank,),
                  "q_b": (q_out, q_rank), "kv_a": (kv_rank + rope, hidden), "kv_a_norm": (kv_rank,),
                  "o": (hidden, n_head * v_dim), "post_norm": (hidden,),
                  "dense_gate": (dense, hidden), "dense_up": (dense, hidden), "dense_down": (hidden, dense),
                  "router": (n_experts, hidden), "selection_bias": (n_experts,), "shared_gate": (shared, hidden),
                  "shared_up": (shared, hidden), "shared_down": (hidden, shared)}
        moe = layer >= (cfg.get("first_k_dense_replace") or 0)
        out = {cls.layer_tensor_name(layer, k): shapes[k] for k in cls._layer_keys(q_rank is not None, moe)
               if k not in ("k_b", "v_b")}
        out[f"model.layers.{layer}.self_attn.kv_b_proj.weight"] = (n_head * (nope + v_dim), kv_rank)
        per_expert = {"gate": (expert, hidden), "up": (expert, hidden), "down": (hidden, expert)}
        for e in range(n_experts if moe else 0):
            out.update({cls.expert_weight_name(layer, e, p): per_expert[p] for p in cls.expert_order})
        return out

    # --- the split of kv_b_proj into llama.cpp's attn_k_b and attn_v_b -------------------------------------

    def _kv_b_halves(self, layer: int) -> dict[str, torch.Tensor]:
        """``kv_b_proj`` ``[heads * (nope + v), kv_rank]`` as the converter splits it: ``k_b`` ``[heads, kv_rank,
        nope]`` (transposed) and ``v_b`` ``[heads, v, kv_rank]``."""
        kv_b = self.checkpoint.load(f"model.layers.{layer}.self_attn.kv_b_proj.weight")
        k_b, v_b = kv_b.view(self.n_head, self.nope_dim + self.v_dim, self.kv_rank).split(
            [self.nope_dim, self.v_dim], dim=1)
        return {"k_b": k_b.transpose(1, 2).contiguous(), "v_b": v_b.contiguous()}

    def _load_layer_tensor(self, layer: int, key: str) -> torch.Tensor:
        name = self.layer_tensor_name(layer, key)
        if key in ("k_b", "v_b") and not self.checkpoint.has(name):  # has it: a GGUF file's, in EvalModel
            return self._kv_b_halves(layer)[key]
        return self.checkpoint.load(name)

    def _layer_spec(self, layer: int, key: str) -> TensorSpec:
        if key not in ("k_b", "v_b"):
            return super()._layer_spec(layer, key)
        name = self.layer_tensor_name(layer, key)
        shape = (self.n_head, self.kv_rank, self.nope_dim) if key == "k_b" else (self.n_head, self.v_dim, self.kv_rank)
        return TensorSpec(tensor_name(self.layer_tensors[key].tensor, layer), shape, Role.ATTENTION, layer,
                          (f"model.layers.{layer}.self_attn.kv_b_proj.weight",),
                          lambda: self._kv_b_halves(layer)[key], lambda t: {name: t})

    # --- forward ----------------------------------------------------------------------------------------

    def _mla(self, layer: LayerWeights) -> blocks.MLA:
        t = layer.tensors
        return blocks.MLA(t["kv_a"], t["kv_a_norm"], t["k_b"], t["v_b"], self.inv_freq, self.rope_scale,
                          self.softmax_scale, self.rms_eps, t.get("q"), t.get("q_a"), t.get("q_a_norm"), t.get("q_b"))

    def attention_block(self, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        x = blocks.rms_norm(h, layer.tensors["input_norm"], self.rms_eps)
        return h + blocks.mla_attention(x, self._mla(layer), layer.tensors["o"])

    def queries_keys(self, layer: LayerWeights, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = blocks.rms_norm(h, layer.tensors["input_norm"], self.rms_eps)
        q, k, _ = blocks.mla_queries_keys_values(x, self._mla(layer))
        return q[0], k[0]

    def dense_ffn(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        t = layer.tensors
        return blocks.swiglu(x, t["dense_gate"], t["dense_up"]) @ t["dense_down"].T

    def route(self, layer: LayerWeights, logits: torch.Tensor, mu: float = 0.0, protect: torch.Tensor | None = None,
              importance: torch.Tensor | None = None, protect_ratio: float = 0.0
              ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The family's gating through ODP's rule, then ``routed_scaling_factor`` (llama.cpp scales last too)."""
        from ..odp import SigmoidGating, route, route_sigmoid

        k = self.moe.top_k
        if self.sigmoid_scores:
            gating = SigmoidGating(layer.tensors.get("selection_bias"), self.n_group, self.topk_group)
            ids, weights, n = route_sigmoid(logits, k, mu, gating, protect, importance, protect_ratio, self.renormalize)
        else:
            ids, weights, n = route(logits, k, mu, protect, importance, protect_ratio, self.renormalize)
        return ids, (weights * self.scale if self.scale != 1.0 else weights), n

    def slot_ratios(self, layer: LayerWeights, logits: torch.Tensor) -> torch.Tensor:
        if not self.sigmoid_scores:
            return super().slot_ratios(layer, logits)
        _, weights, _ = self.route(layer, logits)  # the ratio of the chosen scores, whatever their scale
        # a later slot may score above slot 0 (the bias ordered them): never pruned at mu <= 1, counted as 1
        return (weights[:, 1:] / weights[:, :1]).clamp(max=1.0).reshape(-1)


class DeepseekV3Adapter(DeepseekV2Adapter):
    hf_architectures = ("DeepseekV3ForCausalLM",)
    family = "DeepSeek-V3"
    hf_config_class = "DeepseekV3Config"
    sigmoid_scores = True

    def __init__(self, checkpoint):
        super().__init__(checkpoint)
        self.renormalize = bool(checkpoint.config.get("norm_topk_prob", True))

    def check_routing(self, cfg: dict) -> list[tuple[bool, str]]:
        n_experts, n_group, topk_group = cfg["n_routed_experts"], int(cfg.get("n_group") or 1), \
            int(cfg.get("topk_group") or 1)
        return [
            # llama.cpp's converter writes the gating function from scoring_func; without it the file would
            # run with softmax scores (DeepSeek-V3's own config.json says "sigmoid")
            (cfg.get("scoring_func") != "sigmoid", f"scoring_func {cfg.get('scoring_func')!r} (llama.cpp's "
                                                   "converter needs \"sigmoid\" to write DeepSeek-V3's gating)"),
            # llama.cpp asserts at load that fewer groups are chosen than there are, and groups of two or more
            (n_experts % n_group != 0 or n_experts // n_group < 2 or topk_group < 1
             or (n_group > 1 and topk_group >= n_group),
             f"{n_experts} experts in n_group {n_group} with topk_group {topk_group}"),
            (cfg["num_experts_per_tok"] > topk_group * (n_experts // n_group),
             f"num_experts_per_tok {cfg['num_experts_per_tok']} above the experts of topk_group groups"),
        ]
