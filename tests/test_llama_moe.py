"""The llama.cpp patch series, MoE side (patches 0004-0006): per-expert type groups, ODP pruning in the graph,
runtime switches and the pruned-slot counter, checked through the patched library on the tiny Mixtral."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFValueType

from mc2gguf.convert import convert
from mc2gguf.gguf.edit import odp_kv, rewrite
from mc2gguf.gguf.writer import KeyValue, read_metadata
from mc2gguf.llama.runtime import eval_tokens
from mc2gguf.quant.types import quant_type

from odp_checks import CAPTURE, check_decisions, llama_tau, odp_meta

N_LAYER, N_EXPERT, N_VOCAB = 2, 4, 512
I32, ARRAY = GGUFValueType.INT32, GGUFValueType.ARRAY
BATCH_SIZES = [1, 7, 8, 9, 64, 512]


def merged_experts(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``path`` dequantized, type groups merged back into ``blk.L.ffn_P_exps.weight``."""
    from mc2gguf.gguf.reader import read_tensor

    reader = GGUFReader(path)
    out = {}
    grouped: dict[str, dict[int, torch.Tensor]] = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) == 5 and parts[2].endswith("_exps") and parts[3].isdigit():
            grouped.setdefault(".".join(parts[:3]), {})[int(parts[3])] = read_tensor(t)
        else:
            out[t.name] = read_tensor(t)
    for base, by_group in grouped.items():
        group_of = list(reader.fields[f"mc2gguf.{base}.groups"].contents())
        taken = {g: 0 for g in by_group}
        rows = []
        for g in group_of:
            rows.append(by_group[g][taken[g]])
            taken[g] += 1
        assert all(taken[g] == by_group[g].shape[0] for g in by_group)
        out[f"{base}.weight"] = torch.stack(rows)
    return out


def reference_logits(path: Path, source: Path, tokens: list[int], tmp: Path) -> tuple[np.ndarray, float]:
    """transformers' Mixtral on exactly the weights ``path`` holds (dequantized, groups merged): the logits, and
    the smallest gap between the second and third router logits of any token and layer (how far the top-2
    choice is from a tie that another backend's rounding could flip)."""
    import shutil

    from safetensors.torch import save_file
    from transformers import MixtralForCausalLM

    from mc2gguf.archs import adapter_for
    from mc2gguf.checkpoint import Checkpoint

    adapter = adapter_for(Checkpoint(source))
    weights = merged_experts(path)
    tmp.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copyfile(f, tmp / f.name)
    state = {}
    for spec in adapter.tensors():
        state.update(spec.to_checkpoint(weights[spec.name]))
    save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors")
    model = MixtralForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    with torch.no_grad():
        out = model(torch.tensor([tokens]), output_router_logits=True)
    ranked = [torch.sort(r.reshape(len(tokens), -1), -1, descending=True).values for r in out.router_logits]
    return out.logits[0].numpy(), min(float((r[:, 1] - r[:, 2]).min()) for r in ranked)


def random_tokens(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, N_VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_in_subprocess(build_root: Path | None, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if build_root is not None:
        env["MC2GGUF_LLAMA_BUILD"] = str(build_root)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


# --- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uniform(tiny_mixtral, tmp_path_factory, llama_build) -> Path:
    return convert(tiny_mixtral, tmp_path_factory.mktemp("uniform") / "q4k.gguf", quant_type("Q4_K")).out


# different groupings per projection; layer 1's gate stays one stock tensor. Every group holds two experts or
# more: on CPU a one-expert group is a 2D tensor, which ggml's repacked Q4_K path does not take (it runs the
# plain kernel, equal to a few ulp, see test_single_expert_groups)
SPLIT = {
    "blk.0.ffn_up_exps": [0, 1, 0, 1],
    "blk.0.ffn_gate_exps": [0, 0, 1, 1],
    "blk.0.ffn_down_exps": [0, 1, 1, 0],
    "blk.1.ffn_up_exps": [0, 1, 1, 0],
    "blk.1.ffn_down_exps": [0, 0, 1, 1],
}
SPLIT_SINGLES = {
    "blk.0.ffn_gate_exps": [0, 0, 1, 2],
    "blk.1.ffn_up_exps": [0, 1, 2, 3],
    "blk.1.ffn_down_exps": [0, 0, 0, 1],
}


@pytest.fixture(scope="module")
def grouped(uniform, tmp_path_factory) -> Path:
    return rewrite(uniform, tmp_path_factory.mktemp("grouped") / "grouped.gguf", groups=SPLIT)


# group g of a mixed projection has type MIXED_TYPES[g]. Types whose dot products round the activations to
# 8 bits with per-256 scales (K-quants, Q8_K) make llama.cpp differ from the float reference by up to ~10 %
# on a few tokens of this random model (router near-ties flip); these keep the comparison tight. K-quant
# groups are checked bit-exactly against one stock tensor in test_type_groups_equal_one_stock_tensor.
MIXED_TYPES = ("F32", "F16", "Q8_0")
MIXED = {
    "blk.0.ffn_up_exps": [0, 1, 0, 1],
    "blk.0.ffn_gate_exps": [0, 1, 2, 0],
    "blk.0.ffn_down_exps": [0, 0, 1, 2],
    "blk.1.ffn_up_exps": [0, 1, 1, 0],
    "blk.1.ffn_down_exps": [0, 1, 2, 2],
}


@pytest.fixture(scope="module")
def mixed(tiny_mixtral, tmp_path_factory, llama_build) -> Path:
    """Several types per layer and projection, as type groups (experts taken from conversions of the same
    model to each type), other groupings per projection, layer 1's gate one stock F32 tensor."""
    tmp = tmp_path_factory.mktemp("mixed")
    sources = [convert(tiny_mixtral, tmp / f"{t}.gguf", quant_type(t)).out for t in MIXED_TYPES]
    return rewrite(sources[0], tmp / "mixed.gguf", groups=MIXED, group_sources=sources)


@pytest.fixture(scope="module")
def odp_file(mixed, tmp_path_factory) -> Path:
    """The mixed file plus ODP metadata calibrated as mc2gguf does (mu: median of w_1/w_0; protect_norm: the
    router-input L1 norm exceeded by 2 % of the tokens; the norm quantiles), measured on llama.cpp's own
    router logits and inputs for 512 random tokens."""
    from mc2gguf.odp import calibrate_mu, slot_ratios

    run = eval_tokens(mixed, random_tokens(512, seed=1), capture=("ffn_norm", "ffn_moe_logits"))
    mu, quantiles = [], []
    for il in range(N_LAYER):
        logits = torch.from_numpy(np.concatenate(run["tensors"][f"ffn_moe_logits-{il}"]))
        mu.append(calibrate_mu(slot_ratios(logits, 2)))
        x = torch.from_numpy(np.concatenate(run["tensors"][f"ffn_norm-{il}"]))
        quantiles.append(torch.quantile(x.abs().sum(-1), torch.linspace(0, 1, 101)).numpy())
    quantiles = np.stack(quantiles)
    return rewrite(mixed, tmp_path_factory.mktemp("odp") / "odp.gguf",
                   set_kv=odp_kv(mu, quantiles[:, 98], 0.02, quantiles))


@pytest.fixture(scope="module")
def unpatched_build():
    """The pinned llama.cpp without any patch (libraries only; built once, cached)."""
    from mc2gguf.llama.build import BuildConfig, build_llama

    return build_llama(BuildConfig.unpatched())


def unpatched_logits(build, path: Path, tokens: list[int], tmp: Path) -> np.ndarray:
    out = tmp / "unpatched.npy"
    proc = run_in_subprocess(build.root, (
        "import numpy as np; from mc2gguf.llama.runtime import eval_tokens; "
        f"np.save({str(out)!r}, eval_tokens({str(path)!r}, {tokens!r})['logits'])"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(out)


# --- (a) pruning off / stock layers: bit-identical to unpatched llama.cpp ---------------------------------------

def test_stock_file_bit_identical_to_unpatched(uniform, unpatched_build, tmp_path):
    tokens = random_tokens(40)
    theirs = unpatched_logits(unpatched_build, uniform, tokens, tmp_path)
    ours = eval_tokens(uniform, tokens)
    assert ours["prune"] is False and ours["pruned"] == 0
    assert ours["routed"] == N_LAYER * len(tokens) * 2
    assert np.array_equal(ours["logits"], theirs)


def test_pruning_off_bit_identical_to_unpatched(uniform, unpatched_build, tmp_path):
    """A file with ODP metadata, pruning switched off: the stock graph."""
    tokens = random_tokens(40)
    path = rewrite(uniform, tmp_path / "odp.gguf", set_kv=odp_kv([0.5, 0.5], [1e9, 1e9]))
    theirs = unpatched_logits(unpatched_build, path, tokens, tmp_path)
    assert eval_tokens(path, tokens)["prune"] is True  # on by default
    ours = eval_tokens(path, tokens, prune=False)
    assert ours["pruned"] == 0
    assert np.array_equal(ours["logits"], theirs)


def test_unpatched_refuses_type_groups(grouped, unpatched_build):
    proc = run_in_subprocess(unpatched_build.root, (
        "from mc2gguf.llama.runtime import eval_tokens; "
        f"eval_tokens({str(grouped)!r}, [1, 2, 3])"))
    assert proc.returncode != 0
    # "check_tensor_dims: tensor 'blk.0.ffn_down_exps.weight' not found" (gate is optional in the stock loader)
    assert "error loading model" in proc.stderr and "'blk.0.ffn_down_exps.weight' not found" in proc.stderr, \
        proc.stderr[-3000:]


# --- (b) type groups -------------------------------------------------------------------------------------------

def test_type_groups_equal_one_stock_tensor(uniform, grouped):
    """The same Q4_K experts as type groups (other groupings per projection): the same logits, bit for bit
    (skipped slots add exact zeros)."""
    tokens = random_tokens(64, seed=3)
    assert np.array_equal(eval_tokens(grouped, tokens)["logits"], eval_tokens(uniform, tokens)["logits"])
    for n in (1, 9):  # the mat-vec paths
        assert np.array_equal(eval_tokens(grouped, tokens[:n])["logits"], eval_tokens(uniform, tokens[:n])["logits"])


def test_single_expert_groups(uniform, tmp_path):
    """Groups of one expert (2D tensors) compute exactly what the stock tensor does. Without repacking: with it,
    ggml's CPU repacks the stock 3D Q4_K tensor but not a 2D one, whose plain kernel differs by a few ulp, and
    those flip near-ties of the next layer's router on this random model (0.86 of the tokens within 1e-4 of the
    largest logit on one CPU, 0.9 or more on another)."""
    tokens = random_tokens(64, seed=3)
    path = rewrite(uniform, tmp_path / "singles.gguf", groups=SPLIT_SINGLES)
    ours = eval_tokens(path, tokens, repack=False)["logits"]
    assert np.array_equal(ours, eval_tokens(uniform, tokens, repack=False)["logits"])


def test_mixed_types_match_reference(mixed, tiny_mixtral, tmp_path):
    """A file with several types per layer runs what it holds: transformers on the file's dequantized
    weights (groups merged) agrees to 8-bit activation rounding, with the same top token wherever it is clear.

    The tokens are chosen so that no top-2 choice is near a tie: on an H100 another seed's tokens met a gap of
    2e-4 between the second and third router logits, CUDA's rounding (router logits 4e-4 apart) picked the other
    expert, and from there the logits differed by 0.4 of the largest, for the F32 stock file as for this one."""
    types = {t.name: t.tensor_type.name for t in GGUFReader(mixed).tensors}
    assert {types[f"blk.0.ffn_gate_exps.{g}.weight"] for g in range(3)} == set(MIXED_TYPES)
    tokens = random_tokens(48, seed=40)
    ours = eval_tokens(mixed, tokens)["logits"]
    expected, routing_margin = reference_logits(mixed, tiny_mixtral, tokens, tmp_path / "deq")
    assert routing_margin > 1e-2, f"the tokens meet a near-tie of the top-2 routing ({routing_margin:.2g})"
    assert np.isfinite(ours).all()
    err = np.abs(ours - expected).max() / np.abs(expected).max()
    assert err < 2e-2, err  # 6e-3 measured: F16 and 8-bit activation rounding
    assert np.corrcoef(ours.ravel(), expected.ravel())[0, 1] > 0.999
    # the same top token wherever the reference's top two are further apart than twice the largest error
    top2 = np.sort(expected, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * np.abs(ours - expected).max()
    assert clear.mean() > 0.5, clear.mean()  # 0.65 measured
    assert (ours.argmax(-1) == expected.argmax(-1))[clear].all()


# --- (c) ODP in the graph ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_tokens", BATCH_SIZES)
def test_odp_decisions_equal_reference(odp_file, n_tokens):
    mu, norm, q = odp_meta(odp_file)
    tokens = random_tokens(n_tokens, seed=10 + n_tokens)
    # the calibrated protect ratio (tau = protect_norm), then 30 % protected (tau = the 0.70 quantile)
    for ratio, tau in ((None, norm), (0.3, [llama_tau(q[il], 0.3) for il in range(N_LAYER)])):
        run = eval_tokens(odp_file, tokens, protect_ratio=ratio, capture=CAPTURE)
        assert run["prune"] is True
        assert np.isfinite(run["logits"]).all()
        n_ref = check_decisions(run, mu, tau)
        assert run["pruned"] == n_ref
        assert run["routed"] == N_LAYER * n_tokens * 2
        if n_tokens >= 64:
            assert 0 < n_ref < N_LAYER * n_tokens  # the test exercises both outcomes


def test_odp_across_ubatches_and_decode(odp_file):
    """Prefill split into uneven ubatches, then token-by-token decode, with flash attention: the counter sums
    what every graph did."""
    mu, norm, _ = odp_meta(odp_file)
    run = eval_tokens(odp_file, random_tokens(300, seed=5), n_ubatch=128, decode_steps=6, capture=CAPTURE,
                      flash_attn=True)
    assert len(run["tensors"]["ffn_moe_weights_odp-0"]) == 3 + 6
    assert np.isfinite(run["logits"]).all()
    assert run["pruned"] == check_decisions(run, mu, norm)
    assert run["routed"] == N_LAYER * (300 + 6) * 2


@pytest.mark.parametrize("n_ubatch, all_logits", [(64, True), (64, False), (None, False)],
                         ids=["ubatches-all-logits", "ubatches-last-logits", "one-ubatch-last-logits"])
def test_fused_graph_equals_graph_of_ordinary_ops(odp_file, tmp_path, n_ubatch, all_logits):
    """The fused MoE nodes (MUL_MAT_ID_MULTI for the type groups, MOE_PRUNE and MOE_PRUNE_WEIGHTS) against the
    graph llama.cpp builds from ordinary ops where a device lacks them (LLAMA_MOE_FUSED=0): the same logits bit
    for bit and the same counts, in prefill across ubatches and in decode. With only the last token's logits
    wanted (generation, llama.cpp's warm-up) the last layer runs on fewer tokens than the others; in one ubatch
    the graph has the shape of the one reserved with all outputs, whose allocation the scheduler reuses."""
    tokens = random_tokens(200, seed=12)
    out = tmp_path / "composed.npz"
    code = ("import numpy as np; from mc2gguf.llama.runtime import eval_tokens; "
            f"r = eval_tokens({str(odp_file)!r}, {tokens!r}, n_ubatch={n_ubatch}, decode_steps=4, "
            f"all_logits={all_logits}, "
            "capture=('ffn_moe_odp_pruned', 'ffn_moe_odp_prune')); "
            f"np.savez({str(out)!r}, logits=r['logits'], pruned=r['pruned'], routed=r['routed'], "
            "names=np.array(sorted(r['tensors'])))")
    env = {**os.environ, "LLAMA_MOE_FUSED": "0"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    composed = np.load(out)
    fused = eval_tokens(odp_file, tokens, n_ubatch=n_ubatch, decode_steps=4, all_logits=all_logits,
                        capture=("ffn_moe_odp_pruned", "ffn_moe_odp_prune"))
    # each graph is the one asked for
    assert all(n.startswith("ffn_moe_odp_prune-") for n in composed["names"])
    assert set(fused["tensors"]) == {f"ffn_moe_odp_pruned-{il}" for il in range(N_LAYER)}
    assert fused["pruned"] > 0 and fused["pruned"] == int(composed["pruned"])
    assert fused["routed"] == int(composed["routed"])
    assert np.array_equal(fused["logits"], composed["logits"])


def test_fused_count_in_llama_perplexity(odp_file, llama_build):
    """llama-perplexity scores the second half of each chunk: the last layer runs on the output rows only, in a
    graph of the shape it reserved with all outputs (whose allocation the scheduler reuses, the tensor flags
    unseen). The fused graph prunes and counts as the graph of ordinary ops does, chunk after chunk."""
    text = (Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text()
    counts = {}
    for fused in ("1", "0"):
        proc = subprocess.run([str(llama_build.binary("llama-perplexity")), "-m", str(odp_file), "-c", "128",
                               "-b", "128", "--chunks", "3", "-t", "2", "-f", "/dev/stdin"],
                              input=text[:20000], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "LLAMA_MOE_FUSED": fused})
        assert proc.returncode == 0, proc.stderr[-3000:]
        log = proc.stdout + proc.stderr
        pruned = re.search(r"MoE pruned slots = +(-?\d+) / (\d+) routed", log)
        ppl = re.search(r"Final estimate: PPL = ([\d.]+)", log)
        assert pruned and ppl, log[-2000:]
        counts[fused] = (int(pruned[1]), int(pruned[2]), ppl[1])
    assert counts["1"] == counts["0"]
    assert 0 < counts["1"][0] <= counts["1"][1] // 2


def test_odp_mu_zero_and_full_protection_change_nothing(odp_file, tmp_path):
    tokens = random_tokens(64, seed=6)
    off = eval_tokens(odp_file, tokens, prune=False)["logits"]
    on = eval_tokens(odp_file, tokens)
    assert on["pruned"] > 0 and not np.array_equal(on["logits"], off)
    protected = eval_tokens(odp_file, tokens, protect_ratio=1.0)
    assert protected["pruned"] == 0 and np.array_equal(protected["logits"], off)
    mu, norm, q = odp_meta(odp_file)
    zero = rewrite(odp_file, tmp_path / "mu0.gguf", set_kv=odp_kv([0.0] * N_LAYER, norm, 0.02, q))
    run = eval_tokens(zero, tokens)
    assert run["pruned"] == 0 and np.array_equal(run["logits"], off)


def test_protect_ratio_needs_quantiles(odp_file, tmp_path):
    path = rewrite(odp_file, tmp_path / "noq.gguf", drop=("mc2gguf.odp.router_norm_quantiles",))
    with pytest.raises(RuntimeError, match="refused"):
        eval_tokens(path, [1, 2, 3], protect_ratio=0.3)
    with pytest.raises(RuntimeError, match="refused"):
        eval_tokens(odp_file, [1, 2, 3], protect_ratio=1.5)
    assert eval_tokens(path, [1, 2, 3], protect_ratio=0.0)["prune"] is True  # 0, 1 and the stored ratio need none
    assert eval_tokens(path, [1, 2, 3], protect_ratio=0.02)["prune"] is True


def test_switches_refused_without_metadata(uniform):
    with pytest.raises(RuntimeError, match="refused"):
        eval_tokens(uniform, [1, 2, 3], prune=True)


# --- (d) malformed metadata --------------------------------------------------------------------------------------

MALFORMED = {
    "mu length": (odp_kv([0.5], [1.0, 1.0]), "mc2gguf.odp.mu has 1 values, expected 2"),
    "mu NaN": (odp_kv([0.5, float("nan")], [1.0, 1.0]), "mc2gguf.odp.mu[1] = nan"),
    "mu negative": (odp_kv([-0.5, 0.5], [1.0, 1.0]), "mc2gguf.odp.mu[0] = -0.5"),
    "mu above 1": (odp_kv([0.5, 1.5], [1.0, 1.0]), "mc2gguf.odp.mu[1] = 1.5"),
    "tau negative": (odp_kv([0.5, 0.5], [1.0, -1.0]), "mc2gguf.odp.protect_norm[1] = -1"),
    "tau inf": (odp_kv([0.5, 0.5], [float("inf"), 1.0]), "mc2gguf.odp.protect_norm[0] = inf"),
    "tau missing": (odp_kv([0.5, 0.5], [1.0, 1.0])[:1] + odp_kv([0.5, 0.5], [1.0, 1.0])[2:],
                    "mc2gguf.odp.protect_norm is missing"),
    "ratio": (odp_kv([0.5, 0.5], [1.0, 1.0], ratio=2.0), "mc2gguf.odp.protect_ratio = 2"),
    "quantiles length": (odp_kv([0.5, 0.5], [1.0, 1.0], quantiles=np.ones(101)),
                         "mc2gguf.odp.router_norm_quantiles has 101 values, expected 202"),
    "quantiles unsorted": (odp_kv([0.5, 0.5], [1.0, 1.0], quantiles=np.linspace(2, 1, 202)),
                           "mc2gguf.odp.router_norm_quantiles of layer 0 are not sorted"),
}


def _load_error(path: Path) -> str:
    proc = run_in_subprocess(None, (
        "from mc2gguf.llama.runtime import eval_tokens; "
        f"eval_tokens({str(path)!r}, [1, 2, 3])"))
    assert proc.returncode != 0, "the file was accepted"
    return proc.stderr


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_odp_metadata_refused(uniform, tmp_path, case):
    kvs, message = MALFORMED[case]
    path = rewrite(uniform, tmp_path / "bad.gguf", set_kv=kvs)
    err = _load_error(path)
    assert "invalid MoE pruning metadata" in err and message in err, err[-3000:]


@pytest.mark.parametrize("group_of, message", [
    ([0, 1, 0], "mc2gguf.blk.0.ffn_up_exps.groups has 3 values, expected one per expert (4)"),
    ([1, 0, 0, 1], "mc2gguf.blk.0.ffn_up_exps.groups: expert 0 has group 1"),
    ([0, 2, 1, 1], "mc2gguf.blk.0.ffn_up_exps.groups: expert 1 has group 2"),
])
def test_malformed_groups_refused(uniform, tmp_path, group_of, message):
    good = rewrite(uniform, tmp_path / "good.gguf", groups={"blk.0.ffn_up_exps": [0, 1, 0, 1]})
    fields = [kv for kv in read_metadata(good) if kv.key == "mc2gguf.blk.0.ffn_up_exps.groups"]
    assert fields
    bad = rewrite(good, tmp_path / "bad.gguf",
                  set_kv=[KeyValue("mc2gguf.blk.0.ffn_up_exps.groups", group_of, ARRAY, I32)])
    err = _load_error(bad)
    assert message in err, err[-3000:]
