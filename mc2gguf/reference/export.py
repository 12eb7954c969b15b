"""The export: the unpadded model padded function-preservingly to 256-multiples, under Mixtral's checkpoint
names (``mc2gguf.archs.mixtral``), with its config; and the dense model as a transformers Llama, for the
perplexity baseline and for testing the padding."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..archs.mixtral import MixtralAdapter
from ..errors import Mc2ggufError
from .build import PAD_MULTIPLE, BuildParams, MoELayer
from .dense import ATTENTION_KEYS, DenseConfig, DenseModel


def padded_size(d: int) -> int:
    return -(-d // PAD_MULTIPLE) * PAD_MULTIPLE


def _pad(w: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    out = torch.zeros(shape, dtype=w.dtype)
    out[tuple(slice(0, s) for s in w.shape)] = w
    return out


@dataclass(frozen=True)
class PaddedShape:
    d: int
    n_heads: int

    @classmethod
    def of(cls, c: DenseConfig) -> PaddedShape:
        d = padded_size(c.d)
        if d % c.head_dim or (d // c.head_dim) % c.n_kv or d // c.head_dim < c.n_heads:
            raise Mc2ggufError("cannot pad the attention heads to the padded width")
        return cls(d, d // c.head_dim)


def pad_attention(c: DenseConfig, layer: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Norms and attention of layer ``index``, padded function-preservingly (zero query heads added per
    group). Llama's checkpoint names for these tensors are Mixtral's too."""
    p = PaddedShape.of(c)
    hd, group, new_group = c.head_dim, c.n_heads // c.n_kv, p.n_heads // c.n_kv
    scale = math.sqrt(c.d / p.d)
    q = torch.zeros(p.n_heads * hd, p.d)
    o = torch.zeros(p.d, p.n_heads * hd)
    for head in range(c.n_heads):
        new = (head // group) * new_group + head % group
        q[new * hd : (new + 1) * hd, : c.d] = layer["q"][head * hd : (head + 1) * hd]
        o[: c.d, new * hd : (new + 1) * hd] = layer["o"][:, head * hd : (head + 1) * hd]
    padded = {
        "input_norm": _pad(layer["input_norm"] * scale, (p.d,)),
        "post_norm": _pad(layer["post_norm"] * scale, (p.d,)),
        "q": q,
        "k": _pad(layer["k"], (c.n_kv * hd, p.d)),
        "v": _pad(layer["v"], (c.n_kv * hd, p.d)),
        "o": o,
    }
    return {MixtralAdapter.layer_tensor_name(index, key): w for key, w in padded.items()}


def pad_moe(c: DenseConfig, layer: dict[str, torch.Tensor], moe: MoELayer, index: int) -> dict[str, torch.Tensor]:
    """Router and experts of layer ``index``, padded: an expert's gate/up rows are the dense ones."""
    p = PaddedShape.of(c)
    n_experts, width = moe.neurons.shape
    out = {MixtralAdapter.layer_tensor_name(index, "router"): _pad(moe.router, (n_experts, p.d))}
    for k in range(n_experts):
        out[MixtralAdapter.expert_weight_name(index, k, "gate")] = _pad(layer["gate"][moe.neurons[k]], (width, p.d))
        out[MixtralAdapter.expert_weight_name(index, k, "down")] = _pad(moe.down[k], (p.d, width))
        out[MixtralAdapter.expert_weight_name(index, k, "up")] = _pad(layer["up"][moe.neurons[k]], (width, p.d))
    return out


def pad_globals(dense: DenseModel) -> dict[str, torch.Tensor]:
    c = dense.config
    p = PaddedShape.of(c)
    return {
        "model.embed_tokens.weight": _pad(dense.embed, (c.vocab, p.d)),
        "model.norm.weight": _pad(dense.norm * math.sqrt(c.d / p.d), (p.d,)),
    }


def _common_config(c: DenseConfig, n_layers: int, padded: bool) -> dict:
    p = PaddedShape.of(c)
    return dict(
        vocab_size=c.vocab, hidden_size=p.d if padded else c.d, num_hidden_layers=n_layers,
        num_attention_heads=p.n_heads if padded else c.n_heads, num_key_value_heads=c.n_kv,
        head_dim=c.head_dim, hidden_act="silu", max_position_embeddings=c.context,
        rms_norm_eps=c.eps * c.d / p.d if padded else c.eps, rope_theta=c.rope_theta,
        tie_word_embeddings=True, bos_token_id=c.bos_id, eos_token_id=c.eos_id, attention_dropout=0.0,
    )


def mixtral_config(c: DenseConfig, params: BuildParams):
    """The export's config: padded, with as many layers as ``c`` (already truncated by ``params.n_layers``)."""
    from transformers import MixtralConfig

    return MixtralConfig(
        architectures=["MixtralForCausalLM"], intermediate_size=params.expert_width,
        num_local_experts=params.n_experts, num_experts_per_tok=params.top_k, sliding_window=None,
        router_jitter_noise=0.0, dtype=params.dtype, **_common_config(c, c.n_layers, padded=True),
    )


def dense_llama(dense: DenseModel, padded: bool = False):
    """The dense model as a transformers ``LlamaForCausalLM`` (fp32), optionally padded like the export."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    c = dense.config
    config = LlamaConfig(intermediate_size=c.ffn, **_common_config(c, c.n_layers, padded))
    with torch.device("meta"):  # no random initialisation: every weight is assigned below
        model = LlamaForCausalLM(config)
    d = PaddedShape.of(c).d if padded else c.d
    if padded:
        state = pad_globals(dense)
    else:
        state = {"model.embed_tokens.weight": dense.embed, "model.norm.weight": dense.norm}
    for i, layer in enumerate(dense.layers):
        if padded:
            state.update(pad_attention(c, layer, i))
        else:
            state.update({MixtralAdapter.layer_tensor_name(i, key): layer[key] for key in ATTENTION_KEYS})
        for proj, shape in (("gate", (c.ffn, d)), ("up", (c.ffn, d)), ("down", (d, c.ffn))):
            state[f"model.layers.{i}.mlp.{proj}_proj.weight"] = _pad(layer[proj], shape) if padded else layer[proj]
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were made on the meta device
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise Mc2ggufError("internal error: dense_llama left tensors on the meta device")
    return model.eval()
