"""Mixtral (``MixtralForCausalLM``): a Llama decoder whose FFN is a top-k routed mixture of SwiGLU experts.

llama.cpp runs it as architecture ``llama`` with ``expert_count`` set; each layer's experts are stacked
into 3D tensors ``blk.N.ffn_{gate,up,down}_exps`` (checkpoint ``w1``, ``w3``, ``w2``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import Mc2ggufError
from . import ArchAdapter, ExpertWeights, LayerWeights, MoEShape, Role, TensorSpec

# GGUF projection name -> checkpoint expert weight name
EXPERT_PROJECTIONS = {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}


def undo_rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face stores q/k rows in rotate-half order; llama.cpp expects interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def redo_rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of ``undo_rope_permute``."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class MixtralAdapter(ArchAdapter):
    hf_architectures = ("MixtralForCausalLM",)
    gguf_architecture = "llama"

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
                          lambda: undo_rope_permute(ckpt.load(hf_name), n_head),
                          lambda t: {hf_name: redo_rope_permute(t, n_head)})

    def _experts(self, layer: int, gguf_proj: str) -> TensorSpec:
        ckpt = self.checkpoint
        names = [
            f"model.layers.{layer}.block_sparse_moe.experts.{e}.{EXPERT_PROJECTIONS[gguf_proj]}.weight"
            for e in range(self.moe.n_experts)
        ]
        shape = ckpt.shape(names[0])
        for name in names[1:]:
            if ckpt.shape(name) != shape:
                raise Mc2ggufError(f"{name} has shape {ckpt.shape(name)}, expected {shape} like expert 0")
        return TensorSpec(
            f"blk.{layer}.{gguf_proj}.weight", (len(names), *shape), Role.EXPERTS, layer, tuple(names),
            lambda: torch.stack([ckpt.load(n) for n in names]),
            lambda t: dict(zip(names, t.unbind(0))),
        )

    def tensors(self) -> list[TensorSpec]:
        tied = not self.checkpoint.has("lm_head.weight")  # then upstream writes no output.weight
        # Tied, the embedding matrix is the output projection too and takes the output's type, as in llama.cpp
        # (Q6_K at least): the logits see its error directly.
        specs = [self._plain("token_embd.weight", "model.embed_tokens.weight", Role.OUTPUT if tied else Role.EMBEDDING,
                             None)]
        for i in range(self.moe.n_layers):
            hf = f"model.layers.{i}"
            specs += [
                self._plain(f"blk.{i}.attn_norm.weight", f"{hf}.input_layernorm.weight", Role.NORM, i),
                self._rope_permuted(f"blk.{i}.attn_q.weight", f"{hf}.self_attn.q_proj.weight", i, self.n_head),
                self._rope_permuted(f"blk.{i}.attn_k.weight", f"{hf}.self_attn.k_proj.weight", i, self.n_head_kv),
                self._plain(f"blk.{i}.attn_v.weight", f"{hf}.self_attn.v_proj.weight", Role.ATTENTION, i),
                self._plain(f"blk.{i}.attn_output.weight", f"{hf}.self_attn.o_proj.weight", Role.ATTENTION, i),
                self._plain(f"blk.{i}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight", Role.NORM, i),
                self._plain(f"blk.{i}.ffn_gate_inp.weight", f"{hf}.block_sparse_moe.gate.weight", Role.ROUTER, i),
                *(self._experts(i, proj) for proj in EXPERT_PROJECTIONS),
            ]
        specs.append(self._plain("output_norm.weight", "model.norm.weight", Role.NORM, None))
        if not tied:
            specs.append(self._plain("output.weight", "lm_head.weight", Role.OUTPUT, None))
        return specs

    # --- forward ----------------------------------------------------------------------------------------

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.rms_eps) * weight

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        """Rotary embedding in Hugging Face's rotate-half layout; ``x`` is ``[B, heads, S, head_dim]``."""
        seq, dim = x.shape[-2], x.shape[-1]
        inv_freq = 1.0 / self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        rotated = torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], -1)
        return x * cos + rotated * sin

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.checkpoint.load("model.embed_tokens.weight"))

    def load_layer(self, index: int) -> LayerWeights:
        hf = f"model.layers.{index}"
        names = {
            "input_norm": f"{hf}.input_layernorm.weight",
            "q": f"{hf}.self_attn.q_proj.weight",
            "k": f"{hf}.self_attn.k_proj.weight",
            "v": f"{hf}.self_attn.v_proj.weight",
            "o": f"{hf}.self_attn.o_proj.weight",
            "post_norm": f"{hf}.post_attention_layernorm.weight",
            "router": f"{hf}.block_sparse_moe.gate.weight",
        }
        tensors = {key: self.checkpoint.load(name) for key, name in names.items()}
        experts = [
            ExpertWeights(*(self.checkpoint.load(f"{hf}.block_sparse_moe.experts.{e}.{w}.weight") for w in ("w1", "w3", "w2")))
            for e in range(self.moe.n_experts)
        ]
        return LayerWeights(index, tensors, experts, {name: key for key, name in names.items()})

    def attention_block(self, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        t = layer.tensors
        b, s, _ = h.shape
        x = self._rms_norm(h, t["input_norm"])
        q = (x @ t["q"].T).view(b, s, self.n_head, self.head_dim).transpose(1, 2)
        k = (x @ t["k"].T).view(b, s, self.n_head_kv, self.head_dim).transpose(1, 2)
        v = (x @ t["v"].T).view(b, s, self.n_head_kv, self.head_dim).transpose(1, 2)
        attn = F.scaled_dot_product_attention(self._rope(q), self._rope(k), v, is_causal=True, enable_gqa=True)
        return h + attn.transpose(1, 2).reshape(b, s, -1) @ t["o"].T

    def moe_input(self, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        return self._rms_norm(h, layer.tensors["post_norm"])

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
        return F.silu(x @ expert.gate.T) * (x @ expert.up.T)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        h = self._rms_norm(h, self.checkpoint.load("model.norm.weight"))
        name = "lm_head.weight" if self.checkpoint.has("lm_head.weight") else "model.embed_tokens.weight"
        return h @ self.checkpoint.load(name).T
