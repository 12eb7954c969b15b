"""The reference-MoE builder's building blocks, on tiny sizes: SmolLM2-135M-Instruct's first two layers,
1024 calibration tokens, experts of width 256. The whole 30-layer build is not a test (it takes 30-60
minutes on 2 cores); its numbers are in its stamp file."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from mc2gguf import reference as R
from mc2gguf.archs import blocks
from mc2gguf.errors import Mc2ggufError
from mc2gguf.paths import C4_SAMPLE as C4
SMALL = dict(n_tokens=1024, seq_len=256, expert_width=256, n_layers=2, evaluate=False, progress=False)
BUILD_PARAMS = {k: v for k, v in SMALL.items() if k not in ("evaluate", "progress")}


@pytest.fixture(scope="module", autouse=True)
def dense_loaded_once():
    """Every build in this module dequantizes the same GGUF layers: do it once per layer count (slow on
    2 cores). The builder never modifies the dense model's tensors."""
    patch = pytest.MonkeyPatch()
    patch.setattr(R, "load_dense", functools.cache(R.load_dense))
    yield
    patch.undo()


@pytest.fixture(scope="module")
def dense2() -> R.DenseModel:
    """SmolLM2-135M-Instruct's first two layers (from the pip package, or its wheel fetched into the cache)."""
    return R.load_dense(R.dense_gguf_path(), 2)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    if not C4.is_file():
        pytest.fail(f"the shared C4 sample {C4} is missing (../shared must sit beside the checkout)")
    path = tmp_path_factory.mktemp("calib") / "c4-head.jsonl"
    path.write_text("".join(C4.read_text(encoding="utf-8").splitlines(keepends=True)[:20]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def built_fp32(tmp_path_factory, calib_file) -> R.ReferenceMoE:
    return R.build_reference_moe(tmp_path_factory.mktemp("ref") / "fp32", calib_file, dtype="float32", **SMALL)


def test_dense_loader_matches_transformers_llama(dense2):
    """The GGUF loader (dequantization, un-permuted q/k rows) and the builder's functional forward (the
    shared blocks) agree with transformers' Llama on the same weights; the logits are far from uniform (real
    weights)."""
    tokens = torch.tensor([[19556, 905, 28, 540, 314, 253, 1345, 30, 378, 6012, 314, 2134, 30]])
    c = dense2.config
    with torch.no_grad():
        ref = R.dense_llama(dense2)(tokens).logits
        h = dense2.embed[tokens]
        for layer in dense2.layers:
            h = h + R.self_attention(c, layer, h)
            x = blocks.rms_norm(h, layer["post_norm"], c.eps)
            h = h + blocks.swiglu(x, layer["gate"], layer["up"]) @ layer["down"].T
        own = blocks.rms_norm(h, dense2.norm, c.eps) @ dense2.embed.T
    assert (own - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert ref.std(dim=-1).min() > 1.0


def test_padding_is_function_preserving(dense2):
    """576 -> 768 and 9 -> 12 query heads (zero heads, zero o_proj columns), scaled norms and eps."""
    unpadded, padded = R.dense_llama(dense2), R.dense_llama(dense2, padded=True)
    assert padded.config.hidden_size == 768 and padded.config.num_attention_heads == 12
    assert padded.config.num_key_value_heads == 3 and padded.config.head_dim == 64
    assert padded.config.rms_norm_eps == pytest.approx(dense2.config.eps * 576 / 768)
    tokens = torch.randint(0, dense2.config.vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = unpadded(tokens).logits, padded(tokens).logits
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    # the padding heads really are zero, and every original head kept its GQA group
    q = padded.model.layers[0].self_attn.q_proj.weight.view(12, 64, 768)
    assert [int(h.abs().sum() == 0) for h in q] == [0, 0, 0, 1] * 3
    orig = dense2.layers[0]["q"].view(9, 64, 576)
    assert torch.equal(q[4, :, :576], orig[3]) and torch.equal(q[10, :, :576], orig[8])
    o = padded.model.layers[0].self_attn.o_proj.weight.view(768, 12, 64)
    assert not o[:, 3::4].any() and not o[576:].any()


@pytest.mark.parametrize("ratio", [0.6, 0.3])
def test_router_median_ratio(dense2, ratio):
    x = blocks.rms_norm(dense2.embed[torch.arange(1000, 5001)], dense2.layers[0]["post_norm"], dense2.config.eps)
    router = R.fit_router(x, 8, ratio, 25, torch.Generator().manual_seed(0))
    ids, weights = R.routing(x, router, 2)
    assert float((weights[:, 1] / weights[:, 0]).median()) == pytest.approx(ratio, abs=2e-3)
    # ODP's rule with mu = 0 is Mixtral's softmax, top-2, renormalised, up to rounding
    top = torch.softmax(x @ router.T, dim=-1).topk(2, dim=-1)
    assert torch.equal(ids, top.indices)
    assert torch.allclose(weights, top.values / top.values.sum(-1, keepdim=True), rtol=0, atol=1e-6)
    assert torch.allclose(router.norm(dim=1), router.norm(dim=1)[0].expand(8))  # scaled unit centroids
    with pytest.raises(Mc2ggufError):
        R.fit_router(x, 8, 1.0, 25, torch.Generator().manual_seed(0))


def test_select_neurons_takes_each_experts_strongest_neurons():
    """Tokens whose first expert is k (0-3) fire neurons 8k..8k+4 hard; neuron 8k+4 writes nothing (zero
    down column), so it carries no energy. Every token's second expert is 4, which takes the neurons of
    largest total energy; expert 5, which no token selects, gets the first neurons (a deterministic tie)."""
    n, ffn, d, experts, width = 400, 40, 6, 6, 4
    g = torch.Generator().manual_seed(0)
    indices = torch.stack((torch.arange(n) % 4, torch.full((n,), 4)), dim=1)
    acts = 0.01 * torch.randn(n, ffn, generator=g)
    down = torch.randn(d, ffn, generator=g)
    for k in range(4):
        acts[indices[:, 0] == k, 8 * k : 8 * k + 5] += 3.0
        down[:, 8 * k + 4] = 0.0
    neurons = R.select_neurons(acts, down, indices, experts, width)
    energy = (acts.pow(2) * down.pow(2).sum(0)).sum(0)  # all tokens select expert 4
    strongest = sorted(energy.topk(width).indices.tolist())
    expected = [list(range(8 * k, 8 * k + 4)) for k in range(4)] + [strongest, [0, 1, 2, 3]]
    assert neurons.tolist() == expected
    with pytest.raises(Mc2ggufError, match="exceeds"):
        R.select_neurons(acts, down, indices, experts, ffn + 1)


def test_ridge_refit_recovers_down_projections():
    """Targets made by known down projections (square, width == d: a transposed matrix would fit no
    better than chance) are recovered by the joint refit with a negligible ridge term."""
    g = torch.Generator().manual_seed(1)
    n, ffn, d, width, experts = 3000, 48, 16, 16, 4
    acts = torch.randn(n, ffn, generator=g)
    neurons = torch.stack([torch.randperm(ffn, generator=g)[:width].sort().values for _ in range(experts)])
    weights, indices = torch.softmax(torch.randn(n, experts, generator=g), -1).topk(2, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    down = torch.randn(experts, d, width, generator=g)
    target = torch.zeros(n, d)
    for slot in range(2):
        k = indices[:, slot]
        per_token = torch.einsum("tdw,tw->td", down[k], torch.gather(acts, 1, neurons[k]))
        target += weights[:, slot, None] * per_token
    holdout = torch.rand(n, generator=g) < 0.1
    fit, stats = R.ridge_refit(acts, target, neurons, indices, weights, (1e-9, 1e-1), holdout)
    assert stats["alpha"] == 1e-9 and stats["heldout_rel_err"] < 1e-6
    assert (fit - down).abs().max() < 1e-3


def test_export_loads_as_mixtral_and_matches_builder(built_fp32, dense2, calib_file):
    """The written checkpoint is a MixtralForCausalLM whose logits equal the builder's own (unpadded)
    MoE forward, rebuilt here from the same parameters: bit-identical layers (the build is deterministic)."""
    from transformers import AutoTokenizer, MixtralForCausalLM

    out = built_fp32.path
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["tie_word_embeddings"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_local_experts"]) == (768, 256, 8)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.block_sparse_moe.experts.7.w2.weight" in index
    assert "model.layers.0.block_sparse_moe.gate.weight" in index and "lm_head.weight" not in index
    stamp = built_fp32.stamp
    assert [layer["median_weight_ratio"] for layer in stamp["layers"]] == pytest.approx([0.6, 0.6], abs=1e-2)
    assert all(0 < layer["rel_err"] < 1 for layer in stamp["layers"])

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("Hello world")["input_ids"] == [19556, 905]
    params = R.BuildParams(dtype="float32", **BUILD_PARAMS)
    calib = R.calibration_tokens(tokenizer, calib_file, params.n_tokens, params.seq_len, params.seed)
    moes = list(R.build_moe_layers(dense2, calib, params))
    model = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = calib[1:3, :128]
    with torch.no_grad():
        ref = R.moe_logits(dense2, moes, tokens)
        got = model(tokens).logits
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    for i, (moe, layer) in enumerate(zip(moes, model.model.layers)):
        assert len({tuple(n.tolist()) for n in moe.neurons}) == 8  # the experts differ
        assert torch.equal(layer.mlp.gate.weight[:, :576], moe.router) and not layer.mlp.gate.weight[:, 576:].any()
        down, gate_up = layer.mlp.experts.down_proj, layer.mlp.experts.gate_up_proj  # [8, 768, 256], [8, 512, 768]
        assert torch.equal(down[:, :576], moe.down) and not down[:, 576:].any()
        for k in range(8):
            assert torch.equal(gate_up[k, :256, :576], dense2.layers[i]["gate"][moe.neurons[k]])
            assert torch.equal(gate_up[k, 256:, :576], dense2.layers[i]["up"][moe.neurons[k]])


def test_build_is_cached_and_bf16(built_fp32, calib_file, tmp_path):
    """A complete build of the same parameters is found again at once; the default dtype is bf16, whose
    tensors are exactly the fp32 build's rounded to bf16; other parameters replace the directory."""
    from safetensors.torch import load_file

    stamp_before = (built_fp32.path / R.STAMP_NAME).read_bytes()
    again = R.build_reference_moe(built_fp32.path, calib_file, dtype="float32", **SMALL)
    assert again.cached and (built_fp32.path / R.STAMP_NAME).read_bytes() == stamp_before

    bf16 = R.build_reference_moe(tmp_path / "bf16", calib_file, **SMALL)
    assert not bf16.cached and json.loads((bf16.path / "config.json").read_text())["dtype"] == "bfloat16"
    assert not list(tmp_path.glob(".bf16.building-*"))
    for shard in sorted(built_fp32.path.glob("*.safetensors")):
        fp32, rounded = load_file(shard), load_file(bf16.path / shard.name)
        assert fp32.keys() == rounded.keys()
        assert all(torch.equal(fp32[name].to(torch.bfloat16), rounded[name]) for name in fp32)
    other = R.build_reference_moe(bf16.path, calib_file, **{**SMALL, "n_layers": 1})
    assert not other.cached and other.stamp["params"]["n_layers"] == 1
    assert len(list(other.path.glob("*.safetensors"))) == 2


def test_interrupted_build_resumes_bit_identically(built_fp32, calib_file, tmp_path, monkeypatch):
    """A build killed after its layers were fit keeps its per-layer work files; the next call replays them
    and writes exactly the files of an uninterrupted build."""
    real = R.pad_globals
    monkeypatch.setattr(R, "pad_globals", lambda dense: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        R.build_reference_moe(tmp_path / "resumed", calib_file, dtype="float32", **SMALL)
    work = list(tmp_path.glob(".resumed.building-*/layer-*.pt"))
    assert len(work) == 2 and not (tmp_path / "resumed").exists()
    monkeypatch.setattr(R, "pad_globals", real)
    resumed = R.build_reference_moe(tmp_path / "resumed", calib_file, dtype="float32", **SMALL)
    assert not list(tmp_path.glob(".resumed.building-*")) and not list(resumed.path.glob("layer-*"))
    assert resumed.stamp["layers"] == built_fp32.stamp["layers"]
    shards = sorted(p.name for p in built_fp32.path.glob("*.safetensors"))
    assert shards == sorted(p.name for p in resumed.path.glob("*.safetensors"))
    for name in shards:
        assert (built_fp32.path / name).read_bytes() == (resumed.path / name).read_bytes()


def test_refuses_foreign_directory_and_bad_params(tmp_path, calib_file):
    (tmp_path / "mine.txt").write_text("not a model")
    with pytest.raises(Mc2ggufError, match="holds no reference-MoE build"):
        R.build_reference_moe(tmp_path, calib_file, **SMALL)
    with pytest.raises(Mc2ggufError, match="multiple of 256"):
        R.build_reference_moe(tmp_path / "x", calib_file, **{**SMALL, "expert_width": 300})
    with pytest.raises(Mc2ggufError, match="not found"):
        R.build_reference_moe(tmp_path / "x", tmp_path / "missing.jsonl", **SMALL)
    assert R.padded_size(576) == 768 and R.padded_size(768) == 768
