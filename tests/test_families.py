"""The families beyond Mixtral (``archs/``: Qwen3-MoE, OLMoE, Qwen2-MoE, DeepSeek-V2/V3) end to end, on seeded random models made
from transformers' own config classes: the F16 file equals llama.cpp's own converter's, llama.cpp and the
adapter's forward compute transformers' logits, PMQ's per-expert types run in the patched llama.cpp with ODP
deciding and counting as the family's routing through ODP's rule does (fused and from ordinary ops, top-k > 2,
renormalised or not, DeepSeek-V3's sigmoid scores with a selection bias, groups and a weight scale), the stock layout loads in an unpatched build, and what the adapters do not implement is refused."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from odp_checks import CAPTURE, check_decisions, odp_meta
from safetensors.torch import save_file

from mc2gguf.cli import main
from mc2gguf.errors import Mc2ggufError
from mc2gguf.gguf.writer import read_metadata
from mc2gguf.paths import C4_SAMPLE
from mc2gguf.testmodel import (TinyDeepseekV2Config, TinyDeepseekV3Config, TinyOlmoeConfig, TinyQwen2MoeConfig,
                               TinyQwen3MoeConfig, build_tiny_moe, tiny_hf_config)

PROMPT = "Once upon a time there was a little dog who liked to play in the park with a red ball."
VARIANTS = {
    "qwen3moe-8x256-top2": TinyQwen3MoeConfig(),
    "qwen3moe-16x512-top4-head128": TinyQwen3MoeConfig(moe_intermediate_size=512, head_dim=128, num_experts=16,
                                                       num_experts_per_tok=4),
    "olmoe-16x256-top4": TinyOlmoeConfig(num_experts=16, num_experts_per_tok=4),
    "qwen2moe-8x256-top2-shared512": TinyQwen2MoeConfig(),
    "deepseekv2-dense1-8x256-top2-scale2": TinyDeepseekV2Config(routed_scaling_factor=2.0),
    "deepseekv3-dense1-8x256-top2-groups2": TinyDeepseekV3Config(),
    "deepseekv2-yarn4": TinyDeepseekV2Config(yarn_factor=4.0),
    # V2-Lite's form: no query LoRA (llama.cpp's deepseek2 then needs the "lite" layer count)
    "deepseekv2-lite27-no-q-lora": TinyDeepseekV2Config(num_hidden_layers=27, q_lora_rank=None, n_routed_experts=4),
}
#: one model per family for PMQ and ODP, top-k > 2: renormalised (Qwen3) and not (OLMoE, Qwen2-MoE)
PMQ_VARIANTS = {
    "qwen3moe-16x-top4": TinyQwen3MoeConfig(num_experts=16, num_experts_per_tok=4),
    "olmoe-16x-top8": TinyOlmoeConfig(num_experts=16, num_experts_per_tok=8),
    "qwen2moe-8x-top4": TinyQwen2MoeConfig(num_experts_per_tok=4),
    # sigmoid scores, selection bias, 4 groups of which 2 are chosen, renormalised and scaled by 2.5
    "deepseekv3-16x-top4-groups4": TinyDeepseekV3Config(n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                                                        topk_group=2, num_hidden_layers=3),
}
PMQ_ARGS = ["--bpw", "2.5", "--calib", str(C4_SAMPLE), "--nsamples", "4", "--seqlen", "64", "--eps-tokens", "64",
            "--palette", "IQ2_XXS,Q2_K,Q3_K,Q4_K", "--eps-method", "rtn"]


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request, tmp_path_factory):
    return build_tiny_moe(tmp_path_factory.mktemp(request.param), VARIANTS[request.param])


@pytest.fixture(scope="module", params=list(PMQ_VARIANTS))
def pmq_model(request, tmp_path_factory):
    return build_tiny_moe(tmp_path_factory.mktemp(request.param), PMQ_VARIANTS[request.param], seed=1)


@pytest.fixture(scope="module")
def pmq_file(pmq_model, tmp_path_factory, llama_build):
    """PMQ at 2.5 bits per expert weight, per-expert type groups, ODP thresholds calibrated as PMQ does."""
    out = tmp_path_factory.mktemp("pmq") / "mixed.gguf"
    assert main(["convert", str(pmq_model), str(out), *PMQ_ARGS]) == 0
    return out


def config(path) -> dict:
    return json.loads((path / "config.json").read_text())


def prompt_tokens(path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)(PROMPT)["input_ids"]


def architecture(path) -> str:
    return bytes(GGUFReader(path).fields["general.architecture"].parts[-1]).decode()


def hf_model(path):
    from transformers import AutoModelForCausalLM

    m, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert type(m).__name__ == config(path)["architectures"][0]
    # every checkpoint tensor is one transformers reads (no random init hiding a naming mistake)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    return m


@pytest.fixture(scope="module")
def reference(model):
    tokens = prompt_tokens(model)
    with torch.no_grad():
        return tokens, hf_model(model)(torch.tensor([tokens])).logits[0].numpy()


def test_f16_conversion_equals_upstream_converter(model, tmp_path, llama_build):
    upstream = tmp_path / "upstream.gguf"
    subprocess.run([sys.executable, str(llama_build.source_dir / "convert_hf_to_gguf.py"), str(model),
                    "--outtype", "f16", "--outfile", str(upstream)], check=True, capture_output=True)
    ours = tmp_path / "ours.gguf"
    assert main(["convert", str(model), str(ours), "--type", "F16"]) == 0
    up_kv = {kv.key: (kv.vtype, kv.value) for kv in read_metadata(upstream)}
    # every key but mc2gguf's own (the tensors' checksums)
    our_kv = {kv.key: (kv.vtype, kv.value) for kv in read_metadata(ours) if not kv.key.startswith("mc2gguf.")}
    assert architecture(ours) == architecture(upstream)
    assert our_kv.keys() == up_kv.keys()
    for key in up_kv:
        assert our_kv[key] == up_kv[key], key
    up_t = {t.name: t for t in GGUFReader(upstream).tensors}
    our_t = {t.name: t for t in GGUFReader(ours).tensors}
    assert {"blk.1.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight", "blk.1.ffn_up_exps.weight"} <= up_t.keys()
    assert our_t.keys() == up_t.keys()
    for name, t in up_t.items():
        assert (our_t[name].tensor_type, list(our_t[name].shape)) == (t.tensor_type, list(t.shape)), name
        assert np.array_equal(np.asarray(our_t[name].data), np.asarray(t.data)), name


def test_llama_cpp_runs_the_f32_file_like_transformers(model, reference, tmp_path, llama_build):
    from mc2gguf.llama.runtime import bindings, llama_logits

    tokens, expected = reference
    out = tmp_path / "m.gguf"
    assert main(["convert", str(model), str(out), "--type", "F32"]) == 0
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


def test_adapter_forward_equals_transformers(model, reference):
    from mc2gguf.archs import blocks
    from mc2gguf.evaluate import EvalModel

    tokens, expected = reference
    ours = EvalModel(model)
    assert ours.adapter.hf_architectures == tuple(config(model)["architectures"])
    logits = ours.forward(torch.tensor(tokens)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    assert (logits.argmax(-1) == expected.argmax(-1)).all()

    # queries_keys (ODP's attention protection reads them): transformers' (normed, biased) q/k of layer 1, RoPE'd
    if ours.adapter.gguf_architecture == "deepseek2":
        check_mla_queries_keys(model, ours, tokens)
        return
    hf = hf_model(model)
    seen, attn = {}, hf.model.layers[1].self_attn
    for name in ("q", "k"):
        module = getattr(attn, f"{name}_norm", None) or getattr(attn, f"{name}_proj")
        module.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
    inputs = {}
    hf.model.layers[1].register_forward_pre_hook(lambda _m, args, kw: inputs.__setitem__("h", kw.get(
        "hidden_states", args[0] if args else None)), with_kwargs=True)
    with torch.no_grad():
        hf(torch.tensor([tokens]))
    q, k = ours.adapter.queries_keys(ours.layers[1], inputs["h"])
    a = ours.adapter
    for mine, name, n in ((q, "q", a.n_head), (k, "k", a.n_head_kv)):
        theirs = seen[name].reshape(1, len(tokens), n, a.head_dim).transpose(1, 2)
        torch.testing.assert_close(mine, blocks.rope(theirs, a.rope_theta)[0], rtol=1e-4, atol=1e-4)


def check_mla_queries_keys(model, ours, tokens):
    """MLA's queries and keys (per head: a latent part and a RoPE part shared by the heads) have no module of
    their own in transformers: the attention pattern they make is compared with transformers' eager one."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="eager")
    inputs = {}
    hf.model.layers[1].register_forward_pre_hook(lambda _m, args, kw: inputs.__setitem__("h", kw.get(
        "hidden_states", args[0] if args else None)), with_kwargs=True)
    with torch.no_grad():
        expected = hf(torch.tensor([tokens]), output_attentions=True).attentions[1][0]  # [heads, S, S]
    q, k = ours.adapter.queries_keys(ours.layers[1], inputs["h"])
    scores = q @ k.transpose(1, 2) * ours.adapter.softmax_scale
    causal = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
    mine = torch.softmax(scores.masked_fill(~causal, -torch.inf), dim=-1)
    torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-5)


def test_pmq_types_run_in_llama_cpp(pmq_model, pmq_file):
    """Per-expert types as type groups: llama.cpp computes what the file holds, the adapter's forward on the
    file's dequantized weights (ODP off on both sides). Not exact: llama.cpp rounds activations to 8 bits for
    the K-quant products and keys/values to F16; a misread layout gives a correlation near zero."""
    from mc2gguf.evaluate import EvalModel
    from mc2gguf.llama.runtime import eval_tokens

    reader = GGUFReader(pmq_file)
    assert [k for k in reader.fields if k.endswith(".groups")]
    types = {t.tensor_type.name for t in reader.tensors if "_exps." in t.name}
    assert len(types) > 1 and types <= {"IQ2_XXS", "Q2_K", "Q3_K", "Q4_K"}
    tokens = prompt_tokens(pmq_model)
    result = eval_tokens(pmq_file, tokens, decode_steps=4, prune=False)
    assert np.isfinite(result["logits"]).all()
    expected = EvalModel(pmq_model, pmq_file).forward(torch.tensor(tokens)).numpy()
    assert np.corrcoef(result["logits"][: len(tokens)].ravel(), expected.ravel())[0, 1] > 0.9


def family_route(adapter):
    """``check_decisions``' reference for DeepSeek: the adapter's own routing (sigmoid scores with the layer's
    selection bias and groups, the weight scale); ``None`` (``mc2gguf.odp.route``) for the softmax families."""
    if adapter.gguf_architecture != "deepseek2":
        return None
    layers = {}

    def route_fn(il, logits, mu, protect):
        layer = layers.setdefault(il, adapter.load_layer(il))
        return adapter.route(layer, logits, mu, protect)

    return route_fn


@pytest.mark.parametrize("n_tokens", [1, 9, 64, 512])
def test_odp_decisions_and_count_equal_reference(pmq_model, pmq_file, n_tokens):
    from mc2gguf.archs import adapter_for
    from mc2gguf.checkpoint import Checkpoint
    from mc2gguf.llama.runtime import eval_tokens

    adapter = adapter_for(Checkpoint(pmq_model))
    k, n_moe = adapter.moe.top_k, sum(map(adapter.is_moe_layer, range(adapter.moe.n_layers)))
    mu, norm, _ = odp_meta(pmq_file)
    tokens = torch.randint(3, 49000, (n_tokens,), generator=torch.Generator().manual_seed(n_tokens)).tolist()
    run = eval_tokens(pmq_file, tokens, capture=CAPTURE)
    assert run["prune"] is True and np.isfinite(run["logits"]).all()
    n_ref = check_decisions(run, mu, norm, k, adapter.renormalize, family_route(adapter))
    assert run["pruned"] == n_ref
    assert run["routed"] == n_moe * n_tokens * k
    if n_tokens >= 64:
        assert 0 < n_ref < n_moe * n_tokens * (k - 1)  # the test exercises both outcomes


def test_odp_graph_of_ordinary_ops_equals_fused(pmq_model, pmq_file, tmp_path):
    """Where a device lacks the fused ops (LLAMA_MOE_FUSED=0) the graph of ordinary ops prunes any top-k, with
    the family's renormalisation: the same decisions as the reference, the same count and the same logits as the
    fused graph (up to the order of the weights' sums)."""
    from mc2gguf.archs import adapter_for
    from mc2gguf.checkpoint import Checkpoint
    from mc2gguf.llama.runtime import eval_tokens

    adapter = adapter_for(Checkpoint(pmq_model))
    mu, norm, _ = odp_meta(pmq_file)
    tokens = torch.randint(3, 49000, (100,), generator=torch.Generator().manual_seed(3)).tolist()
    ops = eval_in_subprocess(pmq_file, tokens, tmp_path / "ops.pickle", LLAMA_MOE_FUSED="0")
    assert not [n for n in ops["tensors"] if n.startswith("ffn_moe_odp_pruned-")]  # really the other graph
    n_ref = check_decisions(ops, mu, norm, adapter.moe.top_k, adapter.renormalize, family_route(adapter))
    fused = eval_tokens(pmq_file, tokens)
    assert ops["pruned"] == fused["pruned"] == n_ref > 0
    np.testing.assert_allclose(ops["logits"], fused["logits"], rtol=0, atol=1e-3 * np.abs(fused["logits"]).max())


def test_odp_mu_zero_changes_nothing(pmq_file, tmp_path):
    """mu = 0 never prunes: the logits bit for bit those of pruning off, in the fused graph and in the graph of
    ordinary ops."""
    from mc2gguf.gguf.edit import odp_kv, rewrite
    from mc2gguf.llama.runtime import eval_tokens

    mu, norm, q = odp_meta(pmq_file)
    zero = rewrite(pmq_file, tmp_path / "mu0.gguf", set_kv=odp_kv([0.0] * len(mu), norm, 0.02, q))
    tokens = torch.randint(3, 49000, (64,), generator=torch.Generator().manual_seed(4)).tolist()
    off = eval_tokens(pmq_file, tokens, prune=False)
    for fused in ("1", "0"):
        on = eval_in_subprocess(zero, tokens, tmp_path / f"fused-{fused}.pickle", LLAMA_MOE_FUSED=fused)
        assert on["prune"] is True and on["pruned"] == 0
        assert np.array_equal(on["logits"], off["logits"])


def eval_in_subprocess(path, tokens, out, **env) -> dict:
    """``eval_tokens`` in a fresh process with ``env`` set (llama.cpp reads LLAMA_MOE_FUSED once)."""
    code = ("import pickle; from mc2gguf.llama.runtime import eval_tokens; "
            f"pickle.dump(eval_tokens({str(path)!r}, {tokens!r}, capture={CAPTURE!r}), open({str(out)!r}, 'wb'))")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pickle.loads(out.read_bytes())


def test_pmq_stock_layout_loads_in_unpatched_build(pmq_model, tmp_path):
    from mc2gguf.llama.build import BuildConfig, build_llama

    out = tmp_path / "stock.gguf"
    assert main(["convert", str(pmq_model), str(out), *PMQ_ARGS, "--layout", "stock"]) == 0
    reader = GGUFReader(out)
    assert not [k for k in reader.fields if k.endswith(".groups")]
    unpatched = build_llama(BuildConfig.unpatched())
    tokens = prompt_tokens(pmq_model)
    code = ("import numpy as np; from mc2gguf.llama.runtime import llama_logits; "
            f"assert np.isfinite(llama_logits({str(out)!r}, {tokens!r})).all()")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MC2GGUF_LLAMA_BUILD": str(unpatched.root)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _config_only(tmp_path, **cfg):
    """A model directory that ``Checkpoint`` opens: the config and one small shard."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    return tmp_path


def test_unknown_architecture_lists_the_supported(tmp_path):
    from mc2gguf.archs import adapter_for
    from mc2gguf.checkpoint import Checkpoint

    with pytest.raises(Mc2ggufError, match="supported: DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, "
                                           "MixtralForCausalLM, OlmoeForCausalLM, Qwen2MoeForCausalLM, "
                                           "Qwen3MoeForCausalLM$"):
        adapter_for(Checkpoint(_config_only(tmp_path, architectures=["FooForCausalLM"])))


@pytest.mark.parametrize("family, change, message", [
    (TinyQwen3MoeConfig(), {"norm_topk_prob": False}, "norm_topk_prob False is not supported: llama.cpp's qwen3moe "
                                                      "graph always renormalises"),
    (TinyQwen3MoeConfig(), {"mlp_only_layers": [1]}, "dense MLP layers"),
    (TinyQwen3MoeConfig(), {"decoder_sparse_step": 2}, "dense MLP layers"),
    (TinyQwen3MoeConfig(), {"moe_intermediate_size": None}, "missing or bad Qwen3-MoE field"),
    (TinyOlmoeConfig(), {"norm_topk_prob": True}, "never renormalises"),
    (TinyOlmoeConfig(), {"clip_qkv": 8.0}, "clip_qkv 8.0"),
    (TinyOlmoeConfig(), {"num_key_value_heads": 2}, "2 key/value heads for 4 query heads"),
    (TinyQwen2MoeConfig(), {"norm_topk_prob": True}, "never renormalises"),
    (TinyQwen2MoeConfig(), {"qkv_bias": False}, "qkv_bias false"),
    (TinyQwen2MoeConfig(), {"mlp_only_layers": [0]}, "dense MLP layers"),
    (TinyDeepseekV2Config(), {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1},
     "topk_method 'group_limited_greedy'"),
    (TinyDeepseekV2Config(), {"norm_topk_prob": True}, "norm_topk_prob true"),
    (TinyDeepseekV2Config(), {"q_lora_rank": None}, "no q_lora_rank and 2 layers"),
    (TinyDeepseekV2Config(), {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}},
     "rope_type 'linear'"),
    (TinyDeepseekV3Config(), {"scoring_func": None}, "scoring_func None"),
    (TinyDeepseekV3Config(), {"topk_group": 2}, "8 experts in n_group 2 with topk_group 2"),
    (TinyDeepseekV3Config(), {"attention_bias": True}, "attention_bias"),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__ if not isinstance(v, dict) else "-".join(v))
def test_unsupported_configs_are_refused(tmp_path, family, change, message):
    from mc2gguf.archs import adapter_for
    from mc2gguf.checkpoint import Checkpoint

    good = tiny_hf_config(family).to_dict()
    # the good config passes every check of the config, up to the tensors it implies
    with pytest.raises(Mc2ggufError, match="is missing from the checkpoint"):
        adapter_for(Checkpoint(_config_only(tmp_path / "ok", **good)))
    with pytest.raises(Mc2ggufError, match=message):
        adapter_for(Checkpoint(_config_only(tmp_path / "bad", **{**good, **change})))


def test_inspect_chat_and_serve(pmq_model, pmq_file):
    """The user-facing commands on the family's PMQ file: inspect names the architecture and the type groups;
    chat answers piped lines in the file's own chat template (the tokenizer's chat_template.jinja, which the
    converter copied), the pruned-slot count after each answer; serve answers a chat request."""
    from test_chat_serve import ENV, HANG, REPO, Server, cli, post

    proc = subprocess.run(cli("inspect", pmq_file), capture_output=True, text=True, env=ENV, cwd=REPO, timeout=HANG)
    assert proc.returncode == 0, proc.stderr
    assert f"architecture: {architecture(pmq_file)}" in proc.stdout and "per-expert types" in proc.stdout
    template = (pmq_model / "chat_template.jinja").read_text()
    assert str(GGUFReader(pmq_file).fields["tokenizer.chat_template"].contents()) == template
    proc = subprocess.run(cli("chat", pmq_file, "--max-tokens", 6, "--temp", 0, "--threads", 1, "--ctx", 512),
                          input="hi\nhow are you\n", capture_output=True, text=True, env=ENV, cwd=REPO, timeout=HANG)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) >= 2
    assert "chat template: the file's tokenizer.chat_template" in proc.stderr
    srv = Server(pmq_file, "--ctx", 512)
    try:
        status, text = post(srv.base + "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0})
        assert status == 200 and text
        assert srv.interrupt()[0] == 0
    finally:
        srv.close()
