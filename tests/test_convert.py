"""``mc2gguf convert`` end to end: llama.cpp runs what we write, and it matches transformers and upstream."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mc2gguf.quant.plan import uniform_plan
from mc2gguf.archs import adapter_for
from mc2gguf.checkpoint import Checkpoint
from mc2gguf.convert import convert
from mc2gguf.gguf.reader import dequantized_checkpoint
from mc2gguf.gguf.writer import read_metadata
from mc2gguf.llama.runtime import llama_logits
from mc2gguf.quant.types import QUANT_TYPES, quant_type

PROMPT = "Once upon a time there was a little dog who liked to play in the park with a red ball."


@pytest.fixture(scope="module")
def tokens(tiny_mixtral) -> list[int]:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_mixtral / "tokenizer.model"))
    return [1, *sp.encode(PROMPT)]


@pytest.fixture(scope="module")
def reference_logits(tiny_mixtral, tokens) -> np.ndarray:
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(tiny_mixtral, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


@pytest.mark.parametrize("type_name", ["F32", "F16"])
def test_llama_cpp_logits_match_transformers(tiny_mixtral, tmp_path, llama_build, tokens, reference_logits, type_name):
    out = convert(tiny_mixtral, tmp_path / "m.gguf", quant_type(type_name)).out
    logits = llama_logits(out, tokens)
    assert logits.shape == reference_logits.shape
    assert np.abs(logits - reference_logits).max() < 2e-2
    assert (logits.argmax(-1) == reference_logits.argmax(-1)).all()


def test_metadata_and_tensors_equal_upstream_converter(tiny_mixtral, tmp_path, llama_build):
    import subprocess
    import sys

    upstream = tmp_path / "upstream.gguf"
    subprocess.run(
        [sys.executable, str(llama_build.source_dir / "convert_hf_to_gguf.py"), str(tiny_mixtral),
         "--outtype", "f16", "--outfile", str(upstream)],
        check=True, capture_output=True,
    )
    ours = convert(tiny_mixtral, tmp_path / "ours.gguf", quant_type("F16")).out
    up_kv = {kv.key: (kv.vtype, kv.value) for kv in read_metadata(upstream)}
    # every key but mc2gguf's own (the tensors' checksums)
    our_kv = {kv.key: (kv.vtype, kv.value) for kv in read_metadata(ours) if not kv.key.startswith("mc2gguf.")}
    assert our_kv.keys() == up_kv.keys()
    for key in up_kv:
        assert our_kv[key] == up_kv[key], key
    assert len(up_kv["tokenizer.ggml.tokens"][1]) == 512
    up_t = {t.name: t for t in GGUFReader(upstream).tensors}
    our_t = {t.name: t for t in GGUFReader(ours).tensors}
    assert our_t.keys() == up_t.keys()
    for name, t in up_t.items():
        assert (our_t[name].tensor_type, list(our_t[name].shape)) == (t.tensor_type, list(t.shape)), name
        assert np.array_equal(np.asarray(our_t[name].data), np.asarray(t.data)), name


def test_tied_embeddings_take_the_output_type(tiny_mixtral, tmp_path):
    """Without lm_head (tied embeddings) token_embd is the output projection too and, as in llama.cpp, takes the
    output's type (Q6_K below it); untied, the embedding keeps the file's type and output.weight takes Q6_K."""
    tied = shutil.copytree(tiny_mixtral, tmp_path / "tied")
    head = next(f for f in sorted(tied.glob("*.safetensors")) if "lm_head.weight" in safe_open(f, "pt").keys())
    tensors = load_file(head)
    del tensors["lm_head.weight"]
    save_file(tensors, head, metadata={"format": "pt"})

    def types(model) -> dict[str, str]:
        plan = uniform_plan(adapter_for(Checkpoint(model)).tensors(), quant_type("Q4_K"))
        return {p.spec.name: p.qtype.name for p in plan.tensors if p.spec.layer is None}

    assert types(tiny_mixtral) == {"token_embd.weight": "Q4_K", "output_norm.weight": "F32", "output.weight": "Q6_K"}
    assert types(tied) == {"token_embd.weight": "Q6_K", "output_norm.weight": "F32"}


def test_expected_size_is_exact(tiny_mixtral, tmp_path):
    result = convert(tiny_mixtral, tmp_path / "m.gguf", quant_type("Q4_K"))
    assert result.out.stat().st_size == result.size


@pytest.mark.parametrize("type_name", [n for n in QUANT_TYPES if n not in ("F32", "F16")])
def test_llama_cpp_runs_every_type(tiny_mixtral, tmp_path, llama_build, tokens, type_name):
    """llama.cpp computes what the file holds: its logits track transformers run on the file's own
    dequantized weights (a misread block layout would decorrelate them)."""
    from transformers import MixtralForCausalLM

    out = convert(tiny_mixtral, tmp_path / "m.gguf", quant_type(type_name)).out
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.0.ffn_down_exps.weight"] == type_name
    assert types["blk.1.attn_q.weight"] == type_name
    logits = llama_logits(out, tokens)
    assert np.isfinite(logits).all()
    model = MixtralForCausalLM.from_pretrained(dequantized_checkpoint(out, tiny_mixtral, tmp_path / "deq"),
                                               dtype=torch.float32)
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0].numpy()
    # Not exact: llama.cpp rounds activations to 8 bits (Q8_K/Q8_1) for the quantized dot products, and at
    # 2 bits that noise is amplified differently by each CPU's kernels (0.977 for IQ2_S on one AMD EPYC).
    # A misread block layout gives a correlation near zero.
    assert np.corrcoef(logits.ravel(), expected.ravel())[0, 1] > 0.95
    # The random model's logits are nearly flat, so below 3 bits the same 8-bit activation noise flips a few
    # of the 20 argmaxes (0.70 for IQ2_S on this machine); a misread layout agrees on about 1 in 512.
    agreement = 0.75 if quant_type(type_name).bits_per_weight >= 3 else 0.5
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() >= agreement
