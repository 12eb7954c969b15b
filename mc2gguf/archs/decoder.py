"""The decoder most MoE families share: Llama-style attention (optionally with q/k/v biases and an RMSNorm of the
queries and keys) and a routed mixture of SwiGLU experts, optionally beside a gated shared expert, described by
class-level tables so that a family is its tables, its config fields and its routing. Each family's module
subclasses ``MoEDecoderAdapter`` (as llama.cpp's converter classes subclass one another)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from gguf import MODEL_TENSOR

from ..errors import Mc2ggufError
from ..gguf.keys import expert_tensor_name, tensor_name
from . import blocks
from .base import PROJECTIONS, ArchAdapter, ExpertWeights, LayerWeights, MoEShape, Role, TensorSpec


class LayerTensor(NamedTuple):
    """A non-expert tensor of a decoder layer: its checkpoint name under ``model.layers.N`` (without
    ``.weight``/``.bias``), llama.cpp's tensor, its role and which of the two it is."""

    checkpoint: str
    tensor: MODEL_TENSOR
    role: Role
    suffix: str = "weight"
    gguf_suffix: str = ""  # the GGUF name's suffix where it differs from the checkpoint's


#: the tensors of a Llama decoder layer besides its FFN, under Hugging Face's names (every family here has them)
LLAMA_LAYER = {
    "input_norm": LayerTensor("input_layernorm", MODEL_TENSOR.ATTN_NORM, Role.NORM),
    "q": LayerTensor("self_attn.q_proj", MODEL_TENSOR.ATTN_Q, Role.ATTENTION),
    "k": LayerTensor("self_attn.k_proj", MODEL_TENSOR.ATTN_K, Role.ATTENTION),
    "v": LayerTensor("self_attn.v_proj", MODEL_TENSOR.ATTN_V, Role.ATTENTION),
    "o": LayerTensor("self_attn.o_proj", MODEL_TENSOR.ATTN_OUT, Role.ATTENTION),
    "post_norm": LayerTensor("post_attention_layernorm", MODEL_TENSOR.FFN_NORM, Role.NORM),
}
#: the per-head (Qwen3) or whole-projection (OLMoE) RMSNorm of the queries and keys
QK_NORM = {
    "q_norm": LayerTensor("self_attn.q_norm", MODEL_TENSOR.ATTN_Q_NORM, Role.NORM),
    "k_norm": LayerTensor("self_attn.k_norm", MODEL_TENSOR.ATTN_K_NORM, Role.NORM),
}


class MoEDecoderAdapter(ArchAdapter):
    family: str = ""  # for messages
    #: key in ``LayerWeights.tensors`` -> its ``LayerTensor``. Keys the forward reads besides the attention,
    #: norms and router: ``q_norm``/``k_norm`` (the q/k RMSNorm), ``q_bias``/``k_bias``/``v_bias``, and
    #: ``shared_gate``/``shared_up``/``shared_down``/``shared_router`` (a shared expert, scaled by
    #: ``sigmoid(x @ shared_router)`` where the family has that gate)
    layer_tensors: dict[str, LayerTensor] = {}
    #: an expert's weight under ``model.layers.N``, ``{expert}`` and ``{name}`` filled from ``projection_names``
    expert_name: str = ""
    projection_names: dict[str, str] = {}
    #: the stacked expert tensors in the order llama.cpp's converter writes them
    expert_order: tuple[str, ...] = PROJECTIONS
    #: llama.cpp's ``llama`` graph wants q/k rows interleaved; NEOX-RoPE graphs read Hugging Face's as they are
    permute_qk: bool = False
    #: the q/k RMSNorm normalises each head's vector (Qwen3) or the whole projection (OLMoE)
    qk_norm_per_head: bool = True
    #: config keys of the experts' count (first present wins) and width, the shared expert's width; RMSNorm
    #: epsilon's default
    n_experts_keys: tuple[str, ...] = ("num_local_experts",)
    expert_size_key: str = "intermediate_size"
    shared_expert_size_key: str | None = None
    rms_eps_default: float = 1e-5
    #: whether the top-k weights are renormalised to sum 1 (llama.cpp's graph for the architecture fixes it), and
    #: the Hugging Face default of the config's ``norm_topk_prob`` (``None``: the family has no such field)
    renormalize: bool = True
    norm_topk_prob_default: bool | None = None

    def __init__(self, checkpoint):
        super().__init__(checkpoint)
        cfg = checkpoint.config
        try:
            self._moe = MoEShape(
                n_layers=int(cfg["num_hidden_layers"]),
                n_experts=int(next(cfg[k] for k in self.n_experts_keys if cfg.get(k))),
                top_k=int(cfg["num_experts_per_tok"]),
                hidden_size=int(cfg["hidden_size"]),
                expert_size=int(cfg[self.expert_size_key]),
            )
            self.n_head = int(cfg["num_attention_heads"])
            self.n_head_kv = int(cfg.get("num_key_value_heads", self.n_head))
            self.head_dim = int(cfg.get("head_dim") or self._moe.hidden_size // self.n_head)
            self.rms_eps = float(cfg.get("rms_norm_eps", self.rms_eps_default))
            # transformers >= 5 nests it in rope_parameters; older checkpoints keep it at the top level
            self.rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
            self.rope_theta = float(self.rope.get("rope_theta") or cfg.get("rope_theta", 1e6))
        except (KeyError, TypeError, ValueError, StopIteration) as e:
            raise Mc2ggufError(f"{checkpoint.path / 'config.json'}: missing or bad {self.family} field "
                               f"{e or self.n_experts_keys}") from None
        self.check_config(cfg)
        if self.norm_topk_prob_default is not None:
            if bool(cfg.get("norm_topk_prob", self.norm_topk_prob_default)) != self.renormalize:
                raise Mc2ggufError(
                    f"{checkpoint.path / 'config.json'}: {self.family} with norm_topk_prob "
                    f"{not self.renormalize} is not supported: llama.cpp's {self.gguf_architecture} graph "
                    f"{'always' if self.renormalize else 'never'} renormalises the top-k routing weights")
        self.check_shapes(cfg)

    def check_config(self, cfg: dict) -> None:
        """Refuse what the family's config can say but this adapter does not implement (``refuse``)."""

    def check_shapes(self, cfg: dict) -> None:
        """Every tensor the config implies is in the checkpoint with the shape it implies: a config that lies
        about a size (or a shard of another model) is a clear error naming the tensor, not a failure later."""
        for i in range(int(cfg["num_hidden_layers"])):
            try:
                expected = self.checkpoint_layer_shapes(cfg, i)
            except (KeyError, TypeError) as e:
                raise Mc2ggufError(f"{self.checkpoint.path / 'config.json'}: missing or bad {self.family} field "
                                   f"{e}") from None
            for name, shape in expected.items():
                if self.checkpoint.shape(name) != tuple(shape):
                    raise Mc2ggufError(f"{self.checkpoint.path}: {name} has shape {self.checkpoint.shape(name)}, "
                                       f"config.json implies {tuple(shape)}")

    def refuse(self, unsupported: list[tuple[bool, str]]) -> None:
        """``(condition, what)``: a clear error for the first condition that holds."""
        for bad, what in unsupported:
            if bad:
                raise Mc2ggufError(f"{self.checkpoint.path / 'config.json'}: {self.family} with {what} is not "
                                   f"supported yet")

    @property
    def rope_type(self) -> str:
        # "type" in configs written before transformers named it rope_type
        return self.rope.get("rope_type") or self.rope.get("type") or "default"

    def default_rope(self) -> list[tuple[bool, str]]:
        """RoPE scaling, which the decoder does not implement."""
        return [(self.rope_type != "default", f"rope_type {self.rope_type!r}")]

    def every_layer_moe_default_rope(self, cfg: dict) -> list[tuple[bool, str]]:
        """The Qwen-style config fields for dense layers, and RoPE scaling: what the decoder does not implement."""
        step, dense = int(cfg.get("decoder_sparse_step", 1)), list(cfg.get("mlp_only_layers") or [])
        return [(bool(dense) or step != 1, f"dense MLP layers (mlp_only_layers {dense}, decoder_sparse_step {step})"),
                *self.default_rope()]

    @property
    def moe(self) -> MoEShape:
        return self._moe

    # --- names and tensors ------------------------------------------------------------------------------

    @classmethod
    def layer_tensor_name(cls, layer: int, key: str) -> str:
        """The checkpoint name of a layer's non-expert tensor (``key`` as in ``LayerWeights.tensors``)."""
        entry = cls.layer_tensors[key]
        return f"model.layers.{layer}.{entry.checkpoint}.{entry.suffix}"

    @classmethod
    def expert_weight_name(cls, layer: int, expert: int, projection: str) -> str:
        name = cls.expert_name.format(expert=expert, name=cls.projection_names[projection])
        return f"model.layers.{layer}.{name}.weight"

    @classmethod
    def checkpoint_layer_shapes(cls, cfg: dict, layer: int) -> dict[str, tuple[int, ...]]:
        """Every checkpoint tensor of one decoder layer and its shape, for the Hugging Face config ``cfg``
        (what a checkpoint of the family holds; the test models are made from it)."""
        hidden, n_experts = cfg["hidden_size"], next(cfg[k] for k in cls.n_experts_keys if cfg.get(k))
        n_head = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or hidden // n_head
        q, kv = n_head * head_dim, cfg.get("num_key_value_heads", n_head) * head_dim
        expert, shared = cfg[cls.expert_size_key], cfg.get(cls.shared_expert_size_key or "", 0)
        shapes = {"input_norm": (hidden,), "q": (q, hidden), "k": (kv, hidden), "v": (kv, hidden),
                  "o": (hidden, q), "q_bias": (q,), "k_bias": (kv,), "v_bias": (kv,),
                  "q_norm": (head_dim,) if cls.qk_norm_per_head else (q,),
                  "k_norm": (head_dim,) if cls.qk_norm_per_head else (kv,),
                  "post_norm": (hidden,), "router": (n_experts, hidden),
                  "shared_gate": (shared, hidden), "shared_up": (shared, hidden), "shared_down": (hidden, shared),
                  "shared_router": (1, hidden)}
        out = {cls.layer_tensor_name(layer, key): shapes[key] for key in cls.layer_tensors}
        per_expert = {"gate": (expert, hidden), "up": (expert, hidden), "down": (hidden, expert)}
        for e in range(n_experts):
            out.update({cls.expert_weight_name(layer, e, p): per_expert[p] for p in cls.expert_order})
        return out

    def layer_keys(self, index: int) -> list[str]:
        """The ``layer_tensors`` keys decoder layer ``index`` has (all of them, in families without dense layers or
        optional projections)."""
        return list(self.layer_tensors)

    def _layer_spec(self, layer: int, key: str) -> TensorSpec:
        entry = self.layer_tensors[key]
        gguf_name = tensor_name(entry.tensor, layer, entry.gguf_suffix or entry.suffix)
        hf_name, role = self.layer_tensor_name(layer, key), entry.role
        if self.permute_qk and key in ("q", "k"):
            return self._rope_permuted(gguf_name, hf_name, layer, self.n_head if key == "q" else self.n_head_kv)
        return self._plain(gguf_name, hf_name, role, layer)

    def _load_layer_tensor(self, layer: int, key: str) -> torch.Tensor:
        return self.checkpoint.load(self.layer_tensor_name(layer, key))

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
        names = [self.expert_weight_name(layer, e, projection) for e in range(self.moe.n_experts)]
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
        for i in range(self.moe.n_layers):
            for key in self.layer_keys(i):
                specs.append(self._layer_spec(i, key))
            if self.is_moe_layer(i):
                specs += [self._experts(i, p) for p in self.expert_order]
        specs.append(self._plain(tensor_name(MODEL_TENSOR.OUTPUT_NORM), "model.norm.weight", Role.NORM, None))
        if not tied:
            specs.append(self._plain(tensor_name(MODEL_TENSOR.OUTPUT), "lm_head.weight", Role.OUTPUT, None))
        return specs

    # --- forward ----------------------------------------------------------------------------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.checkpoint.load("model.embed_tokens.weight"))

    def load_layer(self, index: int) -> LayerWeights:
        names = {key: self.layer_tensor_name(index, key) for key in self.layer_keys(index)}
        tensors = {key: self._load_layer_tensor(index, key) for key in names}
        experts = [ExpertWeights(*(self.checkpoint.load(self.expert_weight_name(index, e, p)) for p in PROJECTIONS))
                   for e in range(self.moe.n_experts)] if self.is_moe_layer(index) else []
        return LayerWeights(index, tensors, experts, {name: key for key, name in names.items()})

    def _projections(self, layer: LayerWeights) -> blocks.QKV:
        t = layer.tensors
        return blocks.QKV(t["q"], t["k"], t["v"], t.get("q_bias"), t.get("k_bias"), t.get("v_bias"),
                          t.get("q_norm"), t.get("k_norm"), self.qk_norm_per_head, self.rms_eps)

    def _heads(self) -> blocks.Heads:
        return blocks.Heads(self.n_head, self.n_head_kv, self.head_dim, self.rope_theta)

    def attention_block(self, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        t = layer.tensors
        x = blocks.rms_norm(h, t["input_norm"], self.rms_eps)
        return h + blocks.attention(x, self._projections(layer), t["o"], self._heads())

    def queries_keys(self, layer: LayerWeights, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = blocks.rms_norm(h, layer.tensors["input_norm"], self.rms_eps)
        q, k = blocks.queries_keys(x, self._projections(layer), self._heads())
        return q[0], k[0]

    def moe_input(self, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        return blocks.rms_norm(h, layer.tensors["post_norm"], self.rms_eps)

    def router_logits(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        return x @ layer.tensors["router"].T

    def route(self, layer: LayerWeights, logits: torch.Tensor, mu: float = 0.0, protect: torch.Tensor | None = None,
              importance: torch.Tensor | None = None, protect_ratio: float = 0.0
              ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Softmax over all experts, top-k, the k weights renormalised where the family renormalises them.

        Computed as ODP's rule (docs/odp.md: with renormalisation the softmax denominator cancels), so that
        pruning with mu = 0 is bit-identical to plain routing rather than equal up to rounding.
        """
        from ..odp import route

        return route(logits, self.moe.top_k, mu, protect, importance, protect_ratio, self.renormalize)

    def moe_forward(self, layer: LayerWeights, x: torch.Tensor, routing=None, visit=None):
        out, ids, weights = super().moe_forward(layer, x, routing, visit)
        t = layer.tensors
        if "shared_down" in t:  # the shared expert(s) every token takes, scaled by their sigmoid gate if any
            shared = blocks.swiglu(x, t["shared_gate"], t["shared_up"]) @ t["shared_down"].T
            out = out + (torch.sigmoid(x @ t["shared_router"].T) * shared if "shared_router" in t else shared)
        return out, ids, weights

    def expert_activation(self, expert: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
        return blocks.swiglu(x, expert.gate, expert.up)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        h = blocks.rms_norm(h, self.checkpoint.load("model.norm.weight"), self.rms_eps)
        name = "lm_head.weight" if self.checkpoint.has("lm_head.weight") else "model.embed_tokens.weight"
        return h @ self.checkpoint.load(name).T


class QwenStyleMoEAdapter(MoEDecoderAdapter):
    """The layout Qwen2-MoE set and Qwen3-MoE and OLMoE share: the router ``mlp.gate``, the experts
    ``mlp.experts.N.{gate,up,down}_proj`` (transformers 5 saves them one by one), stacked in the order of
    llama.cpp's converter (``Qwen2MoeModel.modify_tensors``, copied by ``OlmoeModel``): down, gate, up; NEOX
    RoPE on Hugging Face's rows as they are."""

    router = {"router": LayerTensor("mlp.gate", MODEL_TENSOR.FFN_GATE_INP, Role.ROUTER)}
    expert_name = "mlp.experts.{expert}.{name}"
    projection_names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    expert_order = ("down", "gate", "up")
    # real checkpoints say num_experts; transformers 5 writes num_local_experts
    n_experts_keys = ("num_experts", "num_local_experts")
