"""Mixtral (``MixtralForCausalLM``): a Llama decoder whose FFN is a top-k routed mixture of SwiGLU experts.

llama.cpp runs it as architecture ``llama`` with ``expert_count`` set; each layer's experts are stacked
into 3D tensors ``blk.N.ffn_{gate,up,down}_exps`` (checkpoint ``w1``, ``w3``, ``w2``). Routing: softmax over
all experts, top-k, the k weights renormalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import MODEL_TENSOR

from ..errors import Mc2ggufError
from ..gguf.keys import expert_tensor_name, tensor_name
from . import blocks
from .base import PROJECTIONS, ArchAdapter, ExpertWeights, LayerWeights, MoEShape, Role, TensorSpec

#: An expert projection -> its weight's name in a Mixtral checkpoint.
CHECKPOINT_PROJECTIONS = {"gate": "w1", "up": "w3", "down": "w2"}
# Per layer: key in LayerWeights.tensors -> (checkpoint name under model.layers.N, llama.cpp tensor, role)
_LAYER_TENSORS = {
    "input_norm": ("input_layernorm", MODEL_TENSOR.ATTN_NORM, Role.NORM),
    "q": ("self_attn.q_proj", MODEL_TENSOR.ATTN_Q, Role.ATTENTION),
    "k": ("self_attn.k_proj", MODEL_TENSOR.ATTN_K, Role.ATTENTION),
    "v": ("self_attn.v_proj", MODEL_TENSOR.ATTN_V, Role.ATTENTION),
    "o": ("self_attn.o_proj", MODEL_TENSOR.ATTN_OUT, Role.ATTENTION),
    "post_norm": ("post_attention_layernorm", MODEL_TENSOR.FFN_NORM, Role.NORM),
    "router": ("block_sparse_moe.gate", MODEL_TENSOR.FFN_GATE_INP, Role.ROUTER),
}


def layer_tensor_name(layer: int, key: str) -> str:
    """The checkpoint name of a layer's non-expert tensor (``key`` as in ``LayerWeights.tensors``)."""
    return f"model.layers.{layer}.{_LAYER_TENSORS[key][0]}.weight"


def expert_weight_name(layer: int, expert: int, projection: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{CHECKPOINT_PROJECTIONS[projection]}.weight"


def checkpoint_layer_shapes(layer: int, hidden: int, expert_size: int, n_head: int, n_head_kv: int, head_dim: int,
                            n_experts: int) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor of one decoder layer and its shape (what a Mixtral checkpoint holds)."""
    shapes = {
        "input_norm": (hidden,), "q": (n_head * head_dim, hidden), "k": (n_head_kv * head_dim, hidden),
        "v": (n_head_kv * head_dim, hidden), "o": (hidden, n_head * head_dim), "post_norm": (hidden,),
        "router": (n_experts, hidden),
    }
    out = {layer_tensor_name(layer, key): shape for key, shape in shapes.items()}
    expert = {"gate": (expert_size, hidden), "up": (expert_size, hidden), "down": (hidden, expert_size)}
    for e in range(n_experts):
        out.update({expert_weight_name(layer, e, p): expert[p] for p in ("gate", "down", "up")})
    return out


class MixtralAdapter(ArchAdapter):
    hf_architectures = ("MixtralForCausalLM",)
    gguf_architecture = "llama"
    type_groups_in_llama = True  # patch 0004 wires the type groups into models/llama.cpp

    def __init__(self, checkpoint):
        super().__init__(checkpoint)
        cfg = checkpoint.config
        try:
            self._moe = MoEShape(
                n_layers=int(cfg["num_hidden_layers"]),
                n_experts=int(cfg["num_local_experts"]),
                top_k=int(cfg["num_experts_per_tok"]),
                hidden_size=int(cfg["hidden_size"]),
                expert_size=int(cfg["intermediate_size"]),
            )
            self.n_head = int(cfg["num_attention_heads"])
            self.n_head_kv = int(cfg.get("num_key_value_heads", self.n_head))
            self.head_dim = int(cfg.get("head_dim") or self._moe.hidden_size // self.n_head)
            self.rms_eps = float(cfg.get("rms_norm_eps", 1e-5))
            # transformers >= 5 nests it in rope_parameters; older checkpoints keep it at the top level
            self.rope_theta = float((cfg.get("rope_parameters") or {}).get("rope_theta") or cfg.get("rope_theta", 1e6))
        except (KeyError, TypeError, ValueError) as e:
            raise Mc2ggufError(f"{checkpoint.path / 'config.json'}: missing or bad Mixtral field {e}") from None

    @property
    def moe(self) -> MoEShape:
        return self._moe

    def _plain(self, gguf_name: str, hf_name: str, role: Role, layer: int | None) -> TensorSpec:
        ckpt = self.checkpoint
        return TensorSpec(gguf_name, ckpt.shape(hf_name), role, layer, (hf_name,),
                          lambda: ckpt.load(hf_name), lambda t: {hf_name: t})

    def _rope_permuted(self, gguf_name: str, hf_name: str, layer: int, n_head: int) -> TensorSpec:
        ckpt = self.checkpoint
        return TensorSpec(gguf_name, ckpt.shape(hf_name), Role.ATTENTION, layer, (hf_name,),
                          lambda: blocks.undo_rope_permute(ckpt.load(hf_name), n_head),
                          lambda t: {hf_name: blocks.redo_rope_permute(t, n_head)})

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
        tied = not self.checkpoint.has("lm_head.weight")  # then upstream writes no output.weight
        # Tied, the embedding matrix is the output projection too and takes the output's type, as in llama.cpp
        # (Q6_K at least): the logits see its error directly.
        specs = [self._plain(tensor_name(MODEL_TENSOR.TOKEN_EMBD), "model.embed_tokens.weight",
                             Role.OUTPUT if tied else Role.EMBEDDING, None)]
        n_heads = {"q": self.n_head, "k": self.n_head_kv}
        for i in range(self.moe.n_layers):
            for key, (_, tensor, role) in _LAYER_TENSORS.items():
                gguf_name, hf_name = tensor_name(tensor, i), layer_tensor_name(i, key)
                specs.append(self._rope_permuted(gguf_name, hf_name, i, n_heads[key]) if key in n_heads
                             else self._plain(gguf_name, hf_name, role, i))
            # llama.cpp's converter order: gate, down, up
            specs += [self._experts(i, p) for p in ("gate", "down", "up")]
        specs.append(self._plain(tensor_name(MODEL_TENSOR.OUTPUT_NORM), "model.norm.weight", Role.NORM, None))
        if not tied:
            specs.append(self._plain(tensor_name(MODEL_TENSOR.OUTPUT), "lm_head.weight", Role.OUTPUT, None))
        return specs

    # --- forward ----------------------------------------------------------------------------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.checkpoint.load("model.embed_tokens.weight"))

    def load_layer(self, index: int) -> LayerWeights:
        names = {key: layer_tensor_name(index, key) for key in _LAYER_TENSORS}
        tensors = {key: self.checkpoint.load(name) for key, name in names.items()}
        experts = [ExpertWeights(*(self.checkpoint.load(expert_weight_name(index, e, p)) for p in PROJECTIONS))
                   for e in range(self.moe.n_experts)]
        return LayerWeights(index, tensors, experts, {name: key for key, name in names.items()})

    def attention_block(self, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        t = layer.tensors
        x = blocks.rms_norm(h, t["input_norm"], self.rms_eps)
        return h + blocks.attention(x, t["q"], t["k"], t["v"], t["o"], self.n_head, self.n_head_kv, self.head_dim,
                                    self.rope_theta)

    def queries_keys(self, layer: LayerWeights, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = layer.tensors
        x = blocks.rms_norm(h, t["input_norm"], self.rms_eps)
        q, k = blocks.queries_keys(x, t["q"], t["k"], self.n_head, self.n_head_kv, self.head_dim, self.rope_theta)
        return q[0], k[0]

    def moe_input(self, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        return blocks.rms_norm(h, layer.tensors["post_norm"], self.rms_eps)

    def router_logits(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        return x @ layer.tensors["router"].T

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixtral: softmax over all experts, top-k, renormalise the k weights.

        Computed as ODP's rule with mu = 0 (docs/odp.md: the softmax denominator cancels), so that pruning
        with mu = 0 is bit-identical to plain routing rather than equal up to rounding.
        """
        from ..odp import route

        ids, weights, _ = route(logits, self.moe.top_k, 0.0)
        return ids, weights

    def expert_activation(self, expert: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
        return blocks.swiglu(x, expert.gate, expert.up)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        h = blocks.rms_norm(h, self.checkpoint.load("model.norm.weight"), self.rms_eps)
        name = "lm_head.weight" if self.checkpoint.has("lm_head.weight") else "model.embed_tokens.weight"
        return h @ self.checkpoint.load(name).T
