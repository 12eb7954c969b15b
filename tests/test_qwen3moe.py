"""Qwen3-MoE (``archs/qwen3moe.py``) end to end on seeded random models: the F16 file equals llama.cpp's own
converter's, llama.cpp and the adapter's forward compute transformers' logits, PMQ's stock layout runs in
llama.cpp (the mixed one is refused), and the registry names both families."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from safetensors.torch import save_file

from mc2gguf.cli import main
from mc2gguf.errors import Mc2ggufError
from mc2gguf.gguf.writer import read_metadata
from mc2gguf.paths import C4_SAMPLE
from mc2gguf.testmodel import TinyQwen3MoeConfig, build_tiny_qwen3moe

PROMPT = "Once upon a time there was a little dog who liked to play in the park with a red ball."
VARIANTS = {
    "8x256-top2": TinyQwen3MoeConfig(),
    "16x512-top4-head128": TinyQwen3MoeConfig(moe_intermediate_size=512, head_dim=128, num_experts=16,
                                              num_experts_per_tok=4),
}
PMQ_ARGS = ["--bpw", "3", "--calib", str(C4_SAMPLE), "--nsamples", "4", "--seqlen", "64", "--eps-tokens", "64",
            "--palette", "Q2_K,Q3_K,Q4_K", "--eps-method", "rtn"]


@pytest.fixture(scope="module", params=list(VARIANTS))
def qwen(request, tmp_path_factory):
    return build_tiny_qwen3moe(tmp_path_factory.mktemp(f"qwen3moe-{request.param}"), config=VARIANTS[request.param])


@pytest.fixture(scope="module")
def qwen8(tmp_path_factory):
    return build_tiny_qwen3moe(tmp_path_factory.mktemp("qwen3moe-pmq"), seed=1)


def prompt_tokens(model) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)(PROMPT)["input_ids"]


def architecture(path) -> str:
    return bytes(GGUFReader(path).fields["general.architecture"].parts[-1]).decode()


def transformers_logits(model, tokens) -> np.ndarray:
    from transformers import Qwen3MoeForCausalLM

    m, info = Qwen3MoeForCausalLM.from_pretrained(model, dtype=torch.float32, output_loading_info=True)
    # every checkpoint tensor is one transformers reads (no random init hiding a naming mistake)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    with torch.no_grad():
        return m(torch.tensor([tokens])).logits[0].numpy()


@pytest.fixture(scope="module")
def reference(qwen):
    tokens = prompt_tokens(qwen)
    return tokens, transformers_logits(qwen, tokens)


def test_f16_conversion_equals_upstream_converter(qwen, tmp_path, llama_build):
    upstream = tmp_path / "upstream.gguf"
    subprocess.run([sys.executable, str(llama_build.source_dir / "convert_hf_to_gguf.py"), str(qwen),
                    "--outtype", "f16", "--outfile", str(upstream)], check=True, capture_output=True)
    ours = tmp_path / "ours.gguf"
    assert main(["convert", str(qwen), str(ours), "--type", "F16"]) == 0
    up_kv = {kv.key: (kv.vtype, kv.value) for kv in read_metadata(upstream)}
    our_kv = {kv.key: (kv.vtype, kv.value) for kv in read_metadata(ours)}
    assert architecture(upstream) == architecture(ours) == "qwen3moe"
    assert our_kv.keys() == up_kv.keys()
    for key in up_kv:
        assert our_kv[key] == up_kv[key], key
    up_t = {t.name: t for t in GGUFReader(upstream).tensors}
    our_t = {t.name: t for t in GGUFReader(ours).tensors}
    assert {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight", "blk.1.ffn_gate_exps.weight"} <= up_t.keys()
    assert our_t.keys() == up_t.keys()
    for name, t in up_t.items():
        assert (our_t[name].tensor_type, list(our_t[name].shape)) == (t.tensor_type, list(t.shape)), name
        assert np.array_equal(np.asarray(our_t[name].data), np.asarray(t.data)), name


def test_llama_cpp_runs_the_f32_file_like_transformers(qwen, reference, tmp_path, llama_build):
    from mc2gguf.llama.runtime import bindings, llama_logits

    tokens, expected = reference
    out = tmp_path / "m.gguf"
    assert main(["convert", str(qwen), str(out), "--type", "F32"]) == 0
    # llama.cpp's default F16 KV cache rounds keys and values: differences of ~3e-3 here, while the top two of
    # 49152 random logits can be 2e-3 apart, so the argmax is compared with an F32 cache (differences ~5e-6)
    logits = llama_logits(out, tokens)
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() < 2e-2
    llm = bindings().Llama(model_path=str(out), n_ctx=64, n_batch=64, logits_all=True, verbose=False,
                           n_threads=2, type_k=0, type_v=0)  # GGML_TYPE_F32
    try:
        llm.eval(tokens)
        exact = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()
    np.testing.assert_allclose(exact, expected, rtol=0, atol=1e-4)
    assert (exact.argmax(-1) == expected.argmax(-1)).all()


def test_adapter_forward_equals_transformers(qwen, reference):
    from transformers import Qwen3MoeForCausalLM

    from mc2gguf.archs import blocks
    from mc2gguf.evaluate import EvalModel

    tokens, expected = reference
    model = EvalModel(qwen)
    assert type(model.adapter).__name__ == "Qwen3MoeAdapter"
    logits = model.forward(torch.tensor(tokens)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    assert (logits.argmax(-1) == expected.argmax(-1)).all()

    # queries_keys (ODP's attention protection reads them): transformers' normed q/k of layer 1, RoPE'd
    hf = Qwen3MoeForCausalLM.from_pretrained(qwen, dtype=torch.float32)
    seen, attn = {}, hf.model.layers[1].self_attn
    attn.q_norm.register_forward_hook(lambda _m, _i, out: seen.__setitem__("q", out))
    attn.k_norm.register_forward_hook(lambda _m, _i, out: seen.__setitem__("k", out))
    inputs = {}
    hf.model.layers[1].register_forward_pre_hook(lambda _m, args, kw: inputs.__setitem__("h", kw.get(
        "hidden_states", args[0] if args else None)), with_kwargs=True)
    with torch.no_grad():
        hf(torch.tensor([tokens]))
    q, k = model.adapter.queries_keys(model.layers[1], inputs["h"])
    theta = model.adapter.rope_theta
    torch.testing.assert_close(q, blocks.rope(seen["q"].transpose(1, 2), theta)[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k, blocks.rope(seen["k"].transpose(1, 2), theta)[0], rtol=1e-4, atol=1e-4)


def test_pmq_stock_layout_runs_in_llama_cpp_and_mixed_is_refused(qwen8, tmp_path, llama_build, capsys):
    from mc2gguf.evaluate import EvalModel
    from mc2gguf.llama.runtime import eval_tokens

    mixed = tmp_path / "mixed.gguf"
    assert main(["convert", str(qwen8), str(mixed), *PMQ_ARGS, "--layout", "mixed"]) == 1
    err = capsys.readouterr().err
    assert "per-expert type groups are read by the patched llama.cpp for llama only" in err
    assert "use --layout stock for qwen3moe" in err
    assert not mixed.exists() and not mixed.with_name(mixed.name + ".mc2gguf-work").exists()  # refused first

    out = tmp_path / "stock.gguf"
    assert main(["convert", str(qwen8), str(out), *PMQ_ARGS, "--layout", "stock"]) == 0
    reader = GGUFReader(out)
    assert architecture(out) == "qwen3moe"
    assert not [k for k in reader.fields if k.endswith(".groups")]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    experts = {f"blk.{i}.ffn_{p}_exps.weight" for i in range(2) for p in ("gate", "up", "down")}
    assert experts <= types.keys()
    assert {types[n] for n in experts} <= {"Q2_K", "Q3_K", "Q4_K"}
    tokens = prompt_tokens(qwen8)
    result = eval_tokens(out, tokens, decode_steps=4)
    assert result["logits"].shape == (len(tokens) + 4, 49152)
    assert np.isfinite(result["logits"]).all()
    # llama.cpp computes what the file holds: the adapter's forward on the file's dequantized weights. Not
    # exact: llama.cpp rounds activations to 8 bits for the Q2_K products and keys/values to F16 (0.957 on
    # this machine); a misread layout gives a correlation near zero.
    expected = EvalModel(qwen8, out).forward(torch.tensor(tokens)).numpy()
    assert np.corrcoef(result["logits"][: len(tokens)].ravel(), expected.ravel())[0, 1] > 0.9


def _config_only(tmp_path, **config):
    """A model directory that ``Checkpoint`` opens: the config and one small shard."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    return tmp_path


def test_unknown_architecture_lists_both_supported(tmp_path):
    from mc2gguf.archs import adapter_for
    from mc2gguf.checkpoint import Checkpoint

    with pytest.raises(Mc2ggufError, match="supported: MixtralForCausalLM, Qwen3MoeForCausalLM$"):
        adapter_for(Checkpoint(_config_only(tmp_path, architectures=["FooForCausalLM"])))


@pytest.mark.parametrize("change, message", [
    ({"norm_topk_prob": False}, "norm_topk_prob false"),
    ({"mlp_only_layers": [1]}, "dense MLP layers"),
    ({"decoder_sparse_step": 2}, "dense MLP layers"),
    ({"moe_intermediate_size": None}, "missing or bad Qwen3-MoE field"),
])
def test_unsupported_qwen3moe_configs_are_refused(qwen8, tmp_path, change, message):
    from mc2gguf.archs import adapter_for
    from mc2gguf.checkpoint import Checkpoint

    config = json.loads((qwen8 / "config.json").read_text())
    config.update(change)
    with pytest.raises(Mc2ggufError, match=message):
        adapter_for(Checkpoint(_config_only(tmp_path / "m", **config)))
    del config["num_local_experts"]
    config.update({"num_experts": 8, "norm_topk_prob": True, "mlp_only_layers": [], "decoder_sparse_step": 1,
                   "moe_intermediate_size": 256})  # real checkpoints name it num_experts
    assert adapter_for(Checkpoint(_config_only(tmp_path / "ok", **config))).moe.n_experts == 8
