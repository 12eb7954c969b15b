"""The decoder most MoE families share: Llama-style attention (optionally with a per-head q/k RMSNorm) and a
routed mixture of SwiGLU experts, described by class-level tables so that a family is its tables, its config
fields and its routing. Each family's module subclasses ``MoEDecoderAdapter`` (as llama.cpp's converter
classes subclass one another)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import MODEL_TENSOR

from ..errors import Mc2ggufError
from ..gguf.keys import expert_tensor_name, tensor_name
from . import blocks
from .base import PROJECTIONS, ArchAdapter, ExpertWeights, LayerWeights, MoEShape, Role, TensorSpec


class MoEDecoderAdapter(ArchAdapter):
    family: str = ""  # for messages
    #: key in ``LayerWeights.tensors`` -> (checkpoint name under ``model.layers.N``, llama.cpp tensor, role);
    #: keys ``q_norm``/``k_norm`` switch on the per-head q/k norm
    layer_tensors: dict[str, tuple[str, MODEL_TENSOR, Role]] = {}
    #: an expert's weight under ``model.layers.N``, ``{expert}`` and ``{name}`` filled from ``projection_names``
    expert_name: str = ""
    projection_names: dict[str, str] = {}
    #: the stacked expert tensors in the order llama.cpp's converter writes them
    expert_order: tuple[str, ...] = PROJECTIONS
    #: llama.cpp's ``llama`` graph wants q/k rows interleaved; NEOX-RoPE graphs read Hugging Face's as they are
    permute_qk: bool = False
    #: config keys of the experts' count (first present wins) and width; RMSNorm epsilon's default
    n_experts_keys: tuple[str, ...] = ("num_local_experts",)
    expert_size_key: str = "intermediate_size"
    rms_eps_default: float = 1e-5

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

    def check_config(self, cfg: dict) -> None:
        """Refuse what the family's config can say but this adapter does not implement."""

    @property
    def moe(self) -> MoEShape:
        return self._moe

    # --- names and tensors ------------------------------------------------------------------------------

    @classmethod
    def layer_tensor_name(cls, layer: int, key: str) -> str:
        """The checkpoint name of a layer's non-expert tensor (``key`` as in ``LayerWeights.tensors``)."""
        return f"model.layers.{layer}.{cls.layer_tensors[key][0]}.weight"

    @classmethod
    def expert_weight_name(cls, layer: int, expert: int, projection: str) -> str:
        name = cls.expert_name.format(expert=expert, name=cls.projection_names[projection])
        return f"model.layers.{layer}.{name}.weight"

    @classmethod
    def checkpoint_layer_shapes(cls, layer: int, hidden: int, expert_size: int, n_head: int, n_head_kv: int,
                                head_dim: int, n_experts: int) -> dict[str, tuple[int, ...]]:
        """Every checkpoint tensor of one decoder layer and its shape (what a checkpoint of the family holds)."""
        shapes = {"input_norm": (hidden,), "q": (n_head * head_dim, hidden), "q_norm": (head_dim,),
                  "k": (n_head_kv * head_dim, hidden), "k_norm": (head_dim,), "v": (n_head_kv * head_dim, hidden),
                  "o": (hidden, n_head * head_dim), "post_norm": (hidden,), "router": (n_experts, hidden)}
        out = {cls.layer_tensor_name(layer, key): shapes[key] for key in cls.layer_tensors}
        expert = {"gate": (expert_size, hidden), "up": (expert_size, hidden), "down": (hidden, expert_size)}
        for e in range(n_experts):
            out.update({cls.expert_weight_name(layer, e, p): expert[p] for p in cls.expert_order})
        return out

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
        permuted = {"q": self.n_head, "k": self.n_head_kv} if self.permute_qk else {}
        for i in range(self.moe.n_layers):
            for key, (_, tensor, role) in self.layer_tensors.items():
                gguf_name, hf_name = tensor_name(tensor, i), self.layer_tensor_name(i, key)
                specs.append(self._rope_permuted(gguf_name, hf_name, i, permuted[key]) if key in permuted
                             else self._plain(gguf_name, hf_name, role, i))
            specs += [self._experts(i, p) for p in self.expert_order]
        specs.append(self._plain(tensor_name(MODEL_TENSOR.OUTPUT_NORM), "model.norm.weight", Role.NORM, None))
        if not tied:
            specs.append(self._plain(tensor_name(MODEL_TENSOR.OUTPUT), "lm_head.weight", Role.OUTPUT, None))
        return specs

    # --- forward ----------------------------------------------------------------------------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.checkpoint.load("model.embed_tokens.weight"))

    def load_layer(self, index: int) -> LayerWeights:
        names = {key: self.layer_tensor_name(index, key) for key in self.layer_tensors}
        tensors = {key: self.checkpoint.load(name) for key, name in names.items()}
        experts = [ExpertWeights(*(self.checkpoint.load(self.expert_weight_name(index, e, p)) for p in PROJECTIONS))
                   for e in range(self.moe.n_experts)]
        return LayerWeights(index, tensors, experts, {name: key for key, name in names.items()})

    def _attention_args(self, layer: LayerWeights) -> dict:
        t = layer.tensors
        args = {"n_head": self.n_head, "n_head_kv": self.n_head_kv, "head_dim": self.head_dim,
                "theta": self.rope_theta}
        if "q_norm" in t:
            args.update(q_norm=t["q_norm"], k_norm=t["k_norm"], norm_eps=self.rms_eps)
        return args

    def attention_block(self, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        t = layer.tensors
        x = blocks.rms_norm(h, t["input_norm"], self.rms_eps)
        return h + blocks.attention(x, t["q"], t["k"], t["v"], t["o"], **self._attention_args(layer))

    def queries_keys(self, layer: LayerWeights, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = layer.tensors
        x = blocks.rms_norm(h, t["input_norm"], self.rms_eps)
        q, k = blocks.queries_keys(x, t["q"], t["k"], **self._attention_args(layer))
        return q[0], k[0]

    def moe_input(self, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        return blocks.rms_norm(h, layer.tensors["post_norm"], self.rms_eps)

    def router_logits(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        return x @ layer.tensors["router"].T

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax over all experts, top-k, the k weights renormalised (Mixtral's routing).

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
