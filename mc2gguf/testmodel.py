"""Seeded random Mixtral, Qwen3-MoE, OLMoE and Qwen2-MoE checkpoints, for tests and for the command-line demo.

Hidden and expert sizes are multiples of 256 so every K-quant and codebook type applies. Weights are
fp16-representable and drawn with a larger spread than transformers' default initialisation so that the logits are far from
uniform (a random model with near-identical logits would make argmax comparisons meaningless).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .archs.mixtral import MixtralAdapter
from .errors import Mc2ggufError
from .paths import BPE_TOKENIZER, TOKENIZER_512

@dataclass(frozen=True)
class TinyMixtralConfig:
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_local_experts: int = 4
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0


_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "legacy": True,
}


def _vocab_size(tokenizer_model: Path) -> int:
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model)).vocab_size()


def _random(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm weights: around 1, not all equal
        t = 1.0 + 0.2 * torch.randn(shape, generator=generator)
    else:  # std 1/sqrt(fan_in) keeps activations O(1) through the layers
        t = torch.randn(shape, generator=generator) / shape[-1] ** 0.5
    # fp16-representable values: an F16 GGUF then holds exactly the checkpoint's weights
    return t.half().to(dtype)


def _write_shards(out_dir: Path, groups: list[dict[str, tuple[int, ...]]], generator: torch.Generator,
                  dtype: torch.dtype) -> None:
    """One safetensors shard per group of seeded random tensors, and the index."""
    weight_map = {}
    for k, shapes in enumerate(groups):
        shard = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({name: _random(shape, generator, dtype) for name, shape in shapes.items()}, out_dir / shard,
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shapes, shard))
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _globals(vocab: int, hidden: int) -> dict[str, tuple[int, ...]]:
    return {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
            "lm_head.weight": (vocab, hidden)}


def build_tiny_mixtral(
    out_dir: Path,
    tokenizer_model: Path,
    seed: int = 0,
    config: TinyMixtralConfig = TinyMixtralConfig(),
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a seeded random ``MixtralForCausalLM`` checkpoint in the on-disk layout of Hugging Face
    (``block_sparse_moe.experts.N.w1/w2/w3``), one safetensors shard per layer plus one for the embeddings
    and head, streaming: memory holds one layer, so tests can make checkpoints larger than a memory cap."""
    from transformers import MixtralConfig

    tokenizer_model = Path(tokenizer_model)
    if not tokenizer_model.is_file():
        raise Mc2ggufError(f"tokenizer model {tokenizer_model} not found")
    vocab = _vocab_size(tokenizer_model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config = MixtralConfig(
        architectures=["MixtralForCausalLM"], vocab_size=vocab, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, **asdict(config)
    )
    hf_config.to_json_file(out_dir / "config.json")
    groups = [MixtralAdapter.checkpoint_layer_shapes(hf_config.to_dict(), i) for i in range(config.num_hidden_layers)]
    groups.append(_globals(vocab, config.hidden_size))
    _write_shards(out_dir, groups, torch.Generator().manual_seed(seed), dtype)
    shutil.copyfile(tokenizer_model, out_dir / "tokenizer.model")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG, indent=2))
    return out_dir


@dataclass(frozen=True)
class TinyQwen3MoeConfig:
    hidden_size: int = 256
    moe_intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    num_experts: int = 8
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0


@dataclass(frozen=True)
class TinyOlmoeConfig:
    hidden_size: int = 256
    intermediate_size: int = 256  # each expert's
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4  # llama.cpp's olmoe needs as many as query heads
    num_experts: int = 8
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-5  # what llama.cpp's converter writes for every OLMoE
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class TinyQwen2MoeConfig:
    hidden_size: int = 256
    moe_intermediate_size: int = 256
    shared_expert_intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_experts: int = 8
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0


@dataclass(frozen=True)
class TinyDeepseekV2Config:
    hidden_size: int = 256
    intermediate_size: int = 512  # the dense layers' FFN
    moe_intermediate_size: int = 256
    num_hidden_layers: int = 2
    first_k_dense_replace: int = 1
    num_attention_heads: int = 2
    q_lora_rank: int | None = 256  # llama.cpp's deepseek2 needs it unless the model has 26 or 27 layers
    kv_lora_rank: int = 256
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    routed_scaling_factor: float = 1.0
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    yarn_factor: float = 0.0  # > 0: YaRN RoPE with DeepSeek-V2-Lite's other parameters, original context 128


@dataclass(frozen=True)
class TinyDeepseekV3Config(TinyDeepseekV2Config):
    n_group: int = 2
    topk_group: int = 1
    routed_scaling_factor: float = 2.5


#: a test-model config -> its transformers config class and the fields every test model of the family has:
#: every layer MoE, the routing llama.cpp's graph implements
_BPE_FAMILIES = {
    TinyQwen3MoeConfig: ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", lambda c: dict(
        intermediate_size=2 * c.moe_intermediate_size, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True)),
    TinyOlmoeConfig: ("OlmoeConfig", "OlmoeForCausalLM", lambda c: dict(norm_topk_prob=False, clip_qkv=None)),
    TinyQwen2MoeConfig: ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", lambda c: dict(
        intermediate_size=2 * c.moe_intermediate_size, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=False, qkv_bias=True, use_sliding_window=False)),
    TinyDeepseekV2Config: ("DeepseekV2Config", "DeepseekV2ForCausalLM", lambda c: dict(
        num_key_value_heads=c.num_attention_heads, topk_method="greedy", norm_topk_prob=False, n_group=None,
        topk_group=None)),
    # scoring_func and topk_method as DeepSeek-V3's config.json has them (transformers' class implies them)
    TinyDeepseekV3Config: ("DeepseekV3Config", "DeepseekV3ForCausalLM", lambda c: dict(
        num_key_value_heads=c.num_attention_heads, norm_topk_prob=True, scoring_func="sigmoid",
        topk_method="noaux_tc", num_nextn_predict_layers=0)),
}
TinyConfig = (TinyQwen3MoeConfig | TinyOlmoeConfig | TinyQwen2MoeConfig | TinyDeepseekV2Config
              | TinyDeepseekV3Config)


def tiny_hf_config(config: TinyConfig, tokenizer_dir: Path = BPE_TOKENIZER):
    """The transformers config (its own class) of a test model of the family ``config`` names."""
    import transformers

    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise Mc2ggufError(f"no tokenizer.json in {tokenizer_dir}")
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    config_class, architecture, fixed = _BPE_FAMILIES[type(config)]
    fields = {k: v for k, v in asdict(config).items() if k not in ("rope_theta", "yarn_factor")}
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if getattr(config, "yarn_factor", 0.0):
        rope = {"rope_type": "yarn", "rope_theta": config.rope_theta, "factor": config.yarn_factor,
                "original_max_position_embeddings": 128, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707,
                "mscale_all_dim": 0.707}
    return getattr(transformers, config_class)(
        architectures=[architecture], vocab_size=vocab, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=None, pad_token_id=None, rope_parameters=rope, **fields, **fixed(config),
    )


def build_tiny_moe(
    out_dir: Path,
    config: TinyConfig = TinyQwen3MoeConfig(),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer_dir: Path = BPE_TOKENIZER,
) -> Path:
    """Write a seeded random checkpoint of the family ``config`` names (Qwen3-MoE, OLMoE, Qwen2-MoE, DeepSeek-V2/V3) from
    transformers' own config class: untied head, experts one by one (``mlp.experts.N.{gate,up,down}_proj``, what
    transformers 5's ``save_pretrained`` writes), one shard per layer plus one for the embeddings and head,
    and the Hugging Face tokenizer files of ``tokenizer_dir`` (a ``tokenizer.json`` directory)."""
    from .archs import adapter_class

    hf_config = tiny_hf_config(config, tokenizer_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config.to_json_file(out_dir / "config.json")
    adapter = adapter_class(hf_config.architectures[0])
    groups = [adapter.checkpoint_layer_shapes(hf_config.to_dict(), i) for i in range(config.num_hidden_layers)]
    groups.append(_globals(hf_config.vocab_size, config.hidden_size))
    _write_shards(out_dir, groups, torch.Generator().manual_seed(seed), dtype)
    for f in sorted(Path(tokenizer_dir).iterdir()):
        if f.is_file():
            shutil.copyfile(f, out_dir / f.name)
    return out_dir


def default_tokenizer(workdir: Path) -> Path:
    """The project's shared 512-piece SentencePiece model when the checkout has ``../shared`` beside it;
    otherwise a 512-piece BPE model trained here, deterministically, on mc2gguf's own source text."""
    if TOKENIZER_512.is_file():
        return TOKENIZER_512
    import sentencepiece

    prefix = Path(workdir) / "tok512"
    model = prefix.with_suffix(".model")
    if not model.is_file():
        corpus = Path(workdir) / "tokenizer-corpus.txt"
        sources = sorted(Path(__file__).resolve().parent.rglob("*.py"))
        corpus.write_text("\n".join(p.read_text() for p in sources))
        sentencepiece.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(prefix), vocab_size=512, model_type="bpe",
            character_coverage=1.0, byte_fallback=True, num_threads=1, minloglevel=2,
        )
    return model
