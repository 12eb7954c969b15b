"""Mixtral (``MixtralForCausalLM``): a Llama decoder whose FFN is a top-k routed mixture of SwiGLU experts.

llama.cpp runs it as architecture ``llama`` with ``expert_count`` set; each layer's experts are stacked
into 3D tensors ``blk.N.ffn_{gate,up,down}_exps`` (checkpoint ``w1``, ``w3``, ``w2``).
"""

from __future__ import annotations

import torch

from ..errors import Mc2ggufError
from . import ArchAdapter, MoEShape, Role, TensorSpec

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
        specs = [self._plain("token_embd.weight", "model.embed_tokens.weight", Role.EMBEDDING, None)]
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
        if self.checkpoint.has("lm_head.weight"):  # absent when the embeddings are tied, as upstream
            specs.append(self._plain("output.weight", "lm_head.weight", Role.OUTPUT, None))
        return specs
