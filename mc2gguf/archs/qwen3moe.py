"""Qwen3-MoE (``Qwen3MoeForCausalLM``): Mixtral's decoder with a per-head RMSNorm on the queries and keys before
RoPE, other checkpoint names, and no q/k row permutation.

llama.cpp runs it as architecture ``qwen3moe`` (``src/models/qwen3moe.cpp``): NEOX RoPE, which reads Hugging
Face's rotate-half rows as they are (the converter's ``Qwen3MoeModel`` permutes nothing), and ``attn_q_norm``/
``attn_k_norm`` over each head. Experts ``mlp.experts.N.{gate,up,down}_proj`` are stacked like Mixtral's, in the
converter's order down, gate, up. Routing: softmax over all experts, top-k and, with ``norm_topk_prob``, the k
weights renormalised: Mixtral's rule (ODP's with mu = 0), so everything but the tables and the attention's
q/k norm is ``MixtralAdapter``'s.
"""

from __future__ import annotations

import torch
from gguf import MODEL_TENSOR

from ..errors import Mc2ggufError
from ..gguf.keys import expert_tensor_name, tensor_name
from . import blocks
from .base import PROJECTIONS, ArchAdapter, ExpertWeights, LayerWeights, MoEShape, Role, TensorSpec
from .mixtral import MixtralAdapter

#: An expert projection -> its weight's name in a Qwen3-MoE checkpoint.
CHECKPOINT_PROJECTIONS = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
# Per layer: key in LayerWeights.tensors -> (checkpoint name under model.layers.N, llama.cpp tensor, role)
_LAYER_TENSORS = {
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
EXPERT_ORDER = ("down", "gate", "up")  # llama.cpp's converter (Qwen2MoeModel.modify_tensors)


def layer_tensor_name(layer: int, key: str) -> str:
    return f"model.layers.{layer}.{_LAYER_TENSORS[key][0]}.weight"


def expert_weight_name(layer: int, expert: int, projection: str) -> str:
    """transformers 5's ``save_pretrained`` writes the experts one by one under these names."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{CHECKPOINT_PROJECTIONS[projection]}.weight"


def checkpoint_layer_shapes(layer: int, hidden: int, expert_size: int, n_head: int, n_head_kv: int, head_dim: int,
                            n_experts: int) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor of one decoder layer and its shape (what a Qwen3-MoE checkpoint holds)."""
    shapes = {
        "input_norm": (hidden,), "q": (n_head * head_dim, hidden), "q_norm": (head_dim,),
        "k": (n_head_kv * head_dim, hidden), "k_norm": (head_dim,), "v": (n_head_kv * head_dim, hidden),
        "o": (hidden, n_head * head_dim), "post_norm": (hidden,), "router": (n_experts, hidden),
    }
    out = {layer_tensor_name(layer, key): shape for key, shape in shapes.items()}
    expert = {"gate": (expert_size, hidden), "up": (expert_size, hidden), "down": (hidden, expert_size)}
    for e in range(n_experts):
        out.update({expert_weight_name(layer, e, p): expert[p] for p in EXPERT_ORDER})
    return out


class Qwen3MoeAdapter(MixtralAdapter):
    hf_architectures = ("Qwen3MoeForCausalLM",)
    gguf_architecture = "qwen3moe"
    type_groups_in_llama = False  # patch 0004 wires models/llama.cpp only

    def __init__(self, checkpoint):
        ArchAdapter.__init__(self, checkpoint)
        cfg, where = checkpoint.config, checkpoint.path / "config.json"
        try:
            n_layers = int(cfg["num_hidden_layers"])
            self._moe = MoEShape(
                n_layers=n_layers,
                # real checkpoints say num_experts; transformers 5 writes num_local_experts
                n_experts=int(cfg.get("num_experts") or cfg["num_local_experts"]),
                top_k=int(cfg["num_experts_per_tok"]),
                hidden_size=int(cfg["hidden_size"]),
                expert_size=int(cfg["moe_intermediate_size"]),
            )
            self.n_head = int(cfg["num_attention_heads"])
            self.n_head_kv = int(cfg.get("num_key_value_heads", self.n_head))
            self.head_dim = int(cfg.get("head_dim") or self._moe.hidden_size // self.n_head)
            self.rms_eps = float(cfg.get("rms_norm_eps", 1e-6))
            rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
            self.rope_theta = float(rope.get("rope_theta") or cfg.get("rope_theta", 1e6))
            step, dense = int(cfg.get("decoder_sparse_step", 1)), list(cfg.get("mlp_only_layers") or [])
        except (KeyError, TypeError, ValueError) as e:
            raise Mc2ggufError(f"{where}: missing or bad Qwen3-MoE field {e}") from None
        unsupported = [
            (not cfg.get("norm_topk_prob", False), "norm_topk_prob false (top-k weights not renormalised: the "
                                                   "routing rule needs generalising)"),
            (bool(dense) or step != 1 or self._moe.n_experts < 1,
             f"dense MLP layers (mlp_only_layers {dense}, decoder_sparse_step {step})"),
            (bool(cfg.get("attention_bias")), "attention_bias"),
            (rope.get("rope_type", "default") != "default", f"rope_type {rope.get('rope_type')!r}"),
        ]
        for bad, what in unsupported:
            if bad:
                raise Mc2ggufError(f"{where}: Qwen3-MoE with {what} is not supported yet")

    def _experts(self, layer: int, projection: str) -> TensorSpec:
        ckpt = self.checkpoint
        names = [expert_weight_name(layer, e, projection) for e in range(self.moe.n_experts)]
        shape = ckpt.shape(names[0])
        for name in names[1:]:
            if ckpt.shape(name) != shape:
                raise Mc2ggufError(f"{name} has shape {ckpt.shape(name)}, expected {shape} like expert 0")
        return TensorSpec(
            expert_tensor_name(layer, projection), (len(names), *shape), Role.EXPERTS, layer, tuple(names),
            lambda: torch.stack([ckpt.load(n) for n in names]),
            lambda t: dict(zip(names, t.unbind(0))), projection,
        )

    def tensors(self) -> list[TensorSpec]:
        out = self.checkpoint.has("lm_head.weight")
        specs = [self._plain(tensor_name(MODEL_TENSOR.TOKEN_EMBD), "model.embed_tokens.weight",
                             Role.EMBEDDING if out else Role.OUTPUT, None)]
        for i in range(self.moe.n_layers):
            specs += [self._plain(tensor_name(tensor, i), layer_tensor_name(i, key), role, i)
                      for key, (_, tensor, role) in _LAYER_TENSORS.items()]
            specs += [self._experts(i, p) for p in EXPERT_ORDER]
        specs.append(self._plain(tensor_name(MODEL_TENSOR.OUTPUT_NORM), "model.norm.weight", Role.NORM, None))
        if out:
            specs.append(self._plain(tensor_name(MODEL_TENSOR.OUTPUT), "lm_head.weight", Role.OUTPUT, None))
        return specs

    # --- forward: Mixtral's, with the per-head q/k norm ---------------------------------------------------

    def load_layer(self, index: int) -> LayerWeights:
        names = {key: layer_tensor_name(index, key) for key in _LAYER_TENSORS}
        tensors = {key: self.checkpoint.load(name) for key, name in names.items()}
        experts = [ExpertWeights(*(self.checkpoint.load(expert_weight_name(index, e, p)) for p in PROJECTIONS))
                   for e in range(self.moe.n_experts)]
        return LayerWeights(index, tensors, experts, {name: key for key, name in names.items()})

    def _qk_norm(self, layer: LayerWeights) -> dict:
        return {"q_norm": layer.tensors["q_norm"], "k_norm": layer.tensors["k_norm"], "norm_eps": self.rms_eps}

    def attention_block(self, layer: LayerWeights, h):
        t = layer.tensors
        x = blocks.rms_norm(h, t["input_norm"], self.rms_eps)
        return h + blocks.attention(x, t["q"], t["k"], t["v"], t["o"], self.n_head, self.n_head_kv, self.head_dim,
                                    self.rope_theta, **self._qk_norm(layer))

    def queries_keys(self, layer: LayerWeights, h):
        t = layer.tensors
        x = blocks.rms_norm(h, t["input_norm"], self.rms_eps)
        q, k = blocks.queries_keys(x, t["q"], t["k"], self.n_head, self.n_head_kv, self.head_dim, self.rope_theta,
                                   **self._qk_norm(layer))
        return q[0], k[0]
