"""ODP routing (docs/odp.md): the compiled op against the torch reference, and the reference against the
rule written out naively; protection scores against naive loops; calibration helpers."""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

from mc2gguf import odp

HAVE_OP = odp.BACKEND != "torch"
needs_op = pytest.mark.skipif(not HAVE_OP, reason=f"ODP extension not loaded ({odp.BACKEND_DETAIL})")
needs_cuda_op = pytest.mark.skipif(
    not (torch.cuda.is_available() and odp.BACKEND == "cuda"), reason="needs a GPU and the CUDA build of the op"
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def op_route(logits, top_k, mu, protect=None, importance=None, protect_ratio=0.0, renormalize=True):
    ids, weights, n = torch.ops.mc2gguf_odp.route(logits, top_k, float(mu), protect, importance, float(protect_ratio),
                                                  renormalize)
    return ids, weights, int(n)


def assert_same_routing(got, want):
    ids, weights, n = got
    ids_ref, weights_ref, n_ref = want
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids.cpu(), ids_ref.cpu())
    assert n == n_ref
    # the decisions are exact; the weights go through exp (std::exp / expf vs torch.exp): a few ulp
    torch.testing.assert_close(weights.cpu(), weights_ref.cpu(), rtol=4e-7, atol=1e-7)


def naive_route(logits, top_k, mu, protected, renormalize=True):
    """docs/odp.md written out token by token, in Python floats where the spec allows."""
    thr = torch.tensor(-math.inf if mu == 0 else math.log(mu), dtype=torch.float32)
    x = logits.float()
    ids_out, w_out, n_pruned = [], [], 0
    for t in range(x.shape[0]):
        row = x[t].tolist()
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))[:top_k]
        top = x[t, order[0]]
        keep = [s == 0 or bool(protected[t]) or not bool((x[t, order[s]] - top) < thr) for s in range(top_k)]
        ex = [math.exp(float(x[t, order[s]] - top)) if keep[s] else 0.0 for s in range(top_k)]
        total = sum(ex) if renormalize else sum(math.exp(float(v - top)) for v in x[t])
        ids_out.append([order[s] if keep[s] else -1 for s in range(top_k)])
        w_out.append([v / total for v in ex])
        n_pruned += keep.count(False)
    ids = torch.tensor(ids_out, dtype=torch.int64).reshape(-1, top_k)
    return ids, torch.tensor(w_out, dtype=torch.float32).reshape(-1, top_k), n_pruned


def naive_protect(importance, ratio):
    T = importance.shape[0]
    vals = [(-math.inf if math.isnan(v) else v) for v in importance.tolist()]
    n = odp.n_protect(ratio, T)
    chosen = sorted(range(T), key=lambda j: (-vals[j], j))[:n]
    mask = torch.zeros(T, dtype=torch.bool)
    mask[chosen] = True
    return mask


def make_logits(kind, T, E, dtype, gen):
    if kind == "random":
        x = torch.randn(T, E, generator=gen) * 2
    elif kind == "ties":  # few distinct values: ties everywhere, also with the top
        x = torch.randint(0, 3, (T, E), generator=gen).float()
    elif kind == "equal":
        x = torch.ones(T, E)
    elif kind == "masked":  # -inf logits (experts masked out), at most E - 1 per row
        x = torch.randn(T, E, generator=gen)
        x[torch.rand(T, E, generator=gen) < 0.5] = -math.inf
        x[:, 0] = torch.randn(T, generator=gen)
    elif kind == "zeros":  # +0.0 and -0.0 compare equal: the lower id wins
        x = torch.zeros(T, E)
        x[:, ::2] = -0.0
    elif kind == "huge":  # the dtype's largest values: fp32 differences overflow to -inf
        x = torch.randn(T, E, generator=gen).sign() * torch.finfo(dtype).max
    else:
        raise AssertionError(kind)
    return x.to(dtype)


# ------------------------------------------------------------------------------------------ the backend


def test_backend_is_named():
    assert odp.BACKEND in ("cpp", "cuda", "torch")
    assert odp.BACKEND_DETAIL


@pytest.mark.skipif(os.environ.get("MC2GGUF_ODP_BACKEND") == "torch", reason="torch backend forced")
def test_compiled_op_is_active():
    """Where a C++ compiler is present (CI, every dev machine) the op must have been built, not fallen back."""
    assert odp.BACKEND in ("cpp", "cuda"), odp.BACKEND_DETAIL


# ------------------------------------------------------------------------------------------ op vs reference


@needs_op
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("E,k", [(8, 1), (8, 2), (8, 4), (64, 1), (64, 2), (64, 4)])
@pytest.mark.parametrize("kind", ["random", "ties", "equal", "masked", "zeros", "huge"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renormalised", "softmax-weights"])
def test_op_matches_reference(dtype, E, k, kind, renormalize):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype} {E} {k} {kind}".encode()))
    for T in (0, 1, 300):
        logits = make_logits(kind, T, E, dtype, gen)
        prot = torch.rand(T, generator=gen) < 0.3
        imp = torch.randn(T, generator=gen).to(dtype)
        for mu in (0.0, 0.3, 0.8, 1.0):
            cases = [
                {},
                {"protect": prot},
                {"protect": torch.ones(T, dtype=torch.bool)},
                {"importance": imp, "protect_ratio": 0.02},
                {"importance": imp, "protect_ratio": 0.5, "protect": prot},
            ]
            for extra in cases:
                extra["renormalize"] = renormalize
                want = odp.route_reference(logits, k, mu, **extra)
                assert_same_routing(op_route(logits, k, mu, **extra), want)
                assert_same_routing(odp.route(logits, k, mu, **extra), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("kind", ["random", "ties", "masked", "zeros"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renormalised", "softmax-weights"])
def test_reference_matches_naive_rule(dtype, kind, k, renormalize):
    gen = torch.Generator().manual_seed(7 + k)
    logits = make_logits(kind, 40, 8, dtype, gen)
    prot = torch.rand(40, generator=gen) < 0.25
    for mu in (0.0, 0.3, 0.6, 1.0):
        ids, w, n = odp.route_reference(logits, k, mu, protect=prot, renormalize=renormalize)
        ids_n, w_n, n_n = naive_route(logits, k, mu, prot, renormalize)
        assert torch.equal(ids, ids_n) and n == n_n
        torch.testing.assert_close(w, w_n, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_plain_routing_of_each_gating_kind(impl):
    """mu = 0 is the families' plain routing: softmax over all experts, top-k, then the k weights renormalised
    (Mixtral, Qwen3-MoE) or kept (OLMoE, Qwen2-MoE). Without renormalisation a survivor of pruning keeps its
    plain weight bit for bit."""
    if impl == "op" and not HAVE_OP:
        pytest.skip(f"ODP extension not loaded ({odp.BACKEND_DETAIL})")
    route = op_route if impl == "op" else odp.route_reference
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(500, 64, generator=gen) * 2
    probs = torch.softmax(logits.double(), -1)
    top = torch.topk(probs, 8, -1)
    for renormalize in (True, False):
        ids, w, n = route(logits, 8, 0.0, renormalize=renormalize)
        assert n == 0 and torch.equal(ids, top.indices)
        want = top.values / top.values.sum(-1, keepdim=True) if renormalize else top.values
        torch.testing.assert_close(w.double(), want, rtol=2e-6, atol=1e-7)
    plain = route(logits, 8, 0.0, renormalize=False)[1]
    ids, w, n = route(logits, 8, 0.5, renormalize=False)
    assert 0 < n < 500 * 7
    kept = ids >= 0
    assert torch.equal(w[kept], plain[kept]) and (w[~kept] == 0).all()


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_threshold_equality_is_kept(impl):
    """Slot s is pruned iff fl32(l_s - l_0) < fl32(ln mu): a gap exactly at the threshold survives."""
    if impl == "op" and not HAVE_OP:
        pytest.skip("no op")
    fn = op_route if impl == "op" else odp.route_reference
    mu = 0.37
    thr = torch.tensor(math.log(mu), dtype=torch.float32)
    below = torch.nextafter(thr, torch.tensor(-math.inf))
    logits = torch.stack([
        torch.tensor([0.0, float(thr), -20.0, -20.0]),
        torch.tensor([0.0, float(below), -20.0, -20.0]),
    ])
    ids, w, n = fn(logits, 2, mu)
    assert ids.tolist() == [[0, 1], [0, -1]] and n == 1
    assert w[1].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_mu0_is_plain_topk_routing(impl, dtype):
    if impl == "op" and not HAVE_OP:
        pytest.skip("no op")
    fn = op_route if impl == "op" else odp.route_reference
    gen = torch.Generator().manual_seed(3)
    # distinct logits in every row (exact in every dtype), so that torch.topk's tie order does not matter
    logits = (torch.argsort(torch.rand(500, 8, generator=gen), dim=1).float() * 0.75 - 2.5).to(dtype)
    ids, w, n = fn(logits, 2, 0.0)
    # what Mixtral does: softmax in fp32, top-2, renormalise
    probs = torch.softmax(logits.float(), dim=-1)
    top_w, top_i = torch.topk(probs, 2, dim=-1)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    assert n == 0
    assert torch.equal(ids, top_i)
    torch.testing.assert_close(w, top_w, rtol=2e-6, atol=2e-7)
    # and exactly what the op returns with the protection machinery switched on but irrelevant
    assert_same_routing(fn(logits, 2, 0.0, importance=torch.rand(500), protect_ratio=0.5), (ids, w, n))


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_mu1_prunes_every_untied_slot_of_unprotected_tokens(impl):
    if impl == "op" and not HAVE_OP:
        pytest.skip("no op")
    fn = op_route if impl == "op" else odp.route_reference
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(300, 8, generator=gen)  # continuous: no ties
    prot = torch.zeros(300, dtype=torch.bool)
    prot[::7] = True
    ids, w, n = fn(logits, 4, 1.0, protect=prot)
    plain_ids, plain_w, _ = fn(logits, 4, 0.0)
    assert torch.equal(ids[prot], plain_ids[prot]) and torch.equal(w[prot], plain_w[prot])
    assert (ids[~prot, 1:] == -1).all() and (w[~prot, 0] == 1.0).all() and (w[~prot, 1:] == 0).all()
    assert n == int((~prot).sum()) * 3
    # a tie with the top expert is not below mu = 1: both kept, half each
    ids, w, n = fn(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), 2, 1.0)
    assert ids.tolist() == [[1, 2]] and w.tolist() == [[0.5, 0.5]] and n == 0


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_output_invariants(impl):
    if impl == "op" and not HAVE_OP:
        pytest.skip("no op")
    fn = op_route if impl == "op" else odp.route_reference
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(400, 64, generator=gen)
    ids, w, n = fn(logits, 4, 0.5)
    kept = ids >= 0
    assert n == int((~kept).sum()) > 0
    assert kept[:, 0].all()
    assert torch.equal(kept, kept.cummin(dim=1).values)  # survivors are a prefix of the slots
    assert (w[~kept] == 0).all()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(400), rtol=0, atol=2e-7)
    assert (w[:, :-1] >= w[:, 1:]).all()


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_importance_protection_matches_naive_selection(impl):
    if impl == "op" and not HAVE_OP:
        pytest.skip("no op")
    fn = op_route if impl == "op" else odp.route_reference
    gen = torch.Generator().manual_seed(13)
    T = 211
    logits = torch.randn(T, 8, generator=gen)
    imp = torch.randint(0, 6, (T,), generator=gen).float()  # many ties: lower index must win
    imp[5] = math.nan
    imp[17] = math.inf
    for ratio in (0.0, 0.02, 0.07, 0.5, 1.0):
        mask = naive_protect(imp, ratio)
        assert int(mask.sum()) == odp.n_protect(ratio, T)
        assert torch.equal(odp.protect_mask(T, importance=imp, protect_ratio=ratio), mask)
        assert_same_routing(fn(logits, 2, 1.0, importance=imp, protect_ratio=ratio), fn(logits, 2, 1.0, protect=mask))
    # float64 importance is ranked in float64 (no rounding to fp32 first)
    imp64 = torch.tensor([1.0, 1.0 + 1e-12, 0.5], dtype=torch.float64)
    ids, _, n = fn(torch.tensor([[0.0, -0.1]] * 3), 2, 1.0, importance=imp64, protect_ratio=0.2)
    assert ids[:, 1].tolist() == [-1, 1, -1] and n == 2


def test_n_protect():
    assert odp.n_protect(0.02, 100) == 2
    assert odp.n_protect(0.07, 100) == 7  # 0.07 * 100 = 7.000000000000001 in double
    assert odp.n_protect(0.02, 101) == 3
    assert odp.n_protect(0.02, 1) == 1
    assert odp.n_protect(0.02, 0) == 0
    assert odp.n_protect(0.0, 10) == 0
    assert odp.n_protect(1.0, 10) == 10
    with pytest.raises(ValueError):
        odp.n_protect(1.5, 10)


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_bad_arguments(impl):
    if impl == "op" and not HAVE_OP:
        pytest.skip("no op")
    fn = op_route if impl == "op" else odp.route_reference
    x = torch.randn(4, 8)
    for args, kwargs, exc in [
        ((torch.randn(8), 2, 0.5), {}, ValueError),
        ((x, 0, 0.5), {}, ValueError),
        ((x, 9, 0.5), {}, ValueError),
        ((x, 2, -0.1), {}, ValueError),
        ((x, 2, math.nan), {}, ValueError),
        ((x.int(), 2, 0.5), {}, TypeError),
        ((x, 2, 0.5), {"protect": torch.ones(3, dtype=torch.bool)}, ValueError),
        ((x, 2, 0.5), {"protect_ratio": 0.1}, ValueError),
        ((x, 2, 0.5), {"importance": torch.ones(4), "protect_ratio": 1.5}, ValueError),
        ((x, 2, 0.5), {"importance": torch.ones(4, dtype=torch.int64), "protect_ratio": 0.5}, TypeError),
    ]:
        with pytest.raises(exc):
            fn(*args, **kwargs)


def test_route_wrapper_under_autograd_uses_the_reference():
    logits = torch.randn(10, 8, requires_grad=True)
    ids, w, _ = odp.route(logits, 2, 0.0)
    w.sum().backward()  # differentiable: the reference ran
    assert logits.grad is not None


# ------------------------------------------------------------------------------------------ torch.compile


@needs_op
def test_op_registration_passes_opcheck():
    gen = torch.Generator().manual_seed(17)
    logits = torch.randn(33, 8, generator=gen)
    torch.library.opcheck(torch.ops.mc2gguf_odp.route.default, (logits, 2, 0.5, None, torch.rand(33), 0.1))
    torch.library.opcheck(torch.ops.mc2gguf_odp.route.default, (logits.bfloat16(), 2, 0.5, torch.rand(33) < 0.5))


@needs_op
def test_op_under_torch_compile():
    def moe_routing(logits, importance):
        ids, w, n = torch.ops.mc2gguf_odp.route(logits, 2, 0.6, None, importance, 0.05)
        return ids, w * 2.0, n

    compiled = torch.compile(moe_routing, backend="aot_eager", fullgraph=True, dynamic=True)
    for T in (16, 40):
        logits, imp = torch.randn(T, 8), torch.rand(T)
        got, want = compiled(logits, imp), moe_routing(logits, imp)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and int(got[2]) == int(want[2])


# ------------------------------------------------------------------------------------------ CUDA


@needs_cuda_op
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("E,k", [(8, 1), (8, 2), (64, 4)])
def test_cuda_matches_cpu(dtype, E, k):
    gen = torch.Generator().manual_seed(23)
    for kind in ("random", "ties", "masked", "huge"):
        for T in (0, 1, 5000):
            logits = make_logits(kind, T, E, dtype, gen)
            prot = torch.rand(T, generator=gen) < 0.2
            imp = torch.randn(T, generator=gen)
            for mu in (0.0, 0.5, 1.0):
                want = op_route(logits, k, mu, protect=prot, importance=imp, protect_ratio=0.02)
                got = op_route(logits.cuda(), k, mu, protect=prot.cuda(), importance=imp.cuda(), protect_ratio=0.02)
                assert got[0].is_cuda
                assert_same_routing(got, want)
                assert_same_routing(odp.route_reference(logits.cuda(), k, mu, prot.cuda(), imp.cuda(), 0.02), want)


# ------------------------------------------------------------------------------------------ protection scores


def causal_probs(heads, T, gen):
    s = torch.randn(heads, T, T, generator=gen) * 2
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    return torch.softmax(s.masked_fill(future, -math.inf), dim=-1)


def naive_importance(hidden, attn):
    H, T, _ = attn.shape
    out = []
    for j in range(T):
        received = sum(float(attn[h, i, j]) for h in range(H) for i in range(j, T)) / (H * (T - j))
        out.append(sum(abs(float(v)) for v in hidden[j]) * received)
    return torch.tensor(out, dtype=torch.float32)


def test_token_importance_matches_naive_loop():
    gen = torch.Generator().manual_seed(29)
    H, T, D = 3, 9, 5
    attn = causal_probs(H, T, gen)
    hidden = torch.randn(T, 16, generator=gen)
    want = naive_importance(hidden, attn)
    torch.testing.assert_close(odp.token_importance(hidden, attn), want, rtol=1e-5, atol=1e-7)
    # chunked: row blocks, a callable, tiny chunks of the full tensor
    blocks = [attn[:, r:r + 2] for r in range(0, T, 2)]
    torch.testing.assert_close(odp.token_importance(hidden, iter(blocks)), want, rtol=1e-5, atol=1e-7)
    rec = odp.attention_received(lambda a, b: attn[:, a:b], n_tokens=T, chunk_rows=4)
    torch.testing.assert_close(odp.token_importance(hidden, rec), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(odp.attention_received(attn, chunk_rows=1) * odp.router_input_norm(hidden), want,
                               rtol=1e-5, atol=1e-7)
    # entries above the diagonal are not attention a causal token can pay: ignored
    noisy = attn + torch.ones(T, T).triu(1)
    torch.testing.assert_close(odp.token_importance(hidden, noisy), want, rtol=1e-5, atol=1e-7)
    # single head, [T, T]
    torch.testing.assert_close(odp.token_importance(hidden, attn[1]), naive_importance(hidden, attn[1:2]),
                               rtol=1e-5, atol=1e-7)
    # it is not the paper code's 1/(T - j) (its row sums are all 1)
    assert not torch.allclose(odp.attention_received(attn), 1 / torch.arange(T, 0, -1).float())


def test_attention_received_from_qk_matches_probabilities():
    gen = torch.Generator().manual_seed(31)
    heads, kv_heads, T, D = 4, 2, 37, 8
    q, k = torch.randn(heads, T, D, generator=gen), torch.randn(kv_heads, T, D, generator=gen)
    kk = k.repeat_interleave(heads // kv_heads, dim=0)
    s = q @ kk.transpose(1, 2) / math.sqrt(D)
    probs = torch.softmax(s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf), dim=-1)
    want = odp.attention_received(probs)
    torch.testing.assert_close(odp.attention_received_from_qk(q, k, chunk_rows=5), want, rtol=1e-5, atol=1e-7)
    assert odp.attention_received_from_qk(q[:, :0], k[:, :0]).shape == (0,)


def test_attention_received_rejects_incomplete_blocks():
    attn = causal_probs(2, 6, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError):
        odp.attention_received([attn[:, :4]])
    with pytest.raises(ValueError):
        odp.attention_received(lambda a, b: attn[:, a:b])  # no n_tokens


def test_decode_protect_and_calibration():
    gen = torch.Generator().manual_seed(37)
    x = torch.randn(1000, 64, generator=gen) * torch.rand(1000, 1, generator=gen) * 4
    norms = odp.router_input_norm(x)
    thr = odp.calibrate_protect_norm(norms, 0.02)
    assert int(odp.decode_protect(x, thr).sum()) == 20
    assert odp.calibrate_protect_norm(norms, 0.0) == math.inf
    assert odp.calibrate_protect_norm(norms, 1.0) == -math.inf
    assert not odp.decode_protect(x, math.inf).any() and odp.decode_protect(x, -math.inf).all()
    # calibrating on the norms of the same layer, batch by batch, gives the same threshold
    assert odp.calibrate_protect_norm([norms[:300], norms[300:]], 0.02) == thr

    assert odp.calibrate_mu([0.1, 0.5, 0.3]) == 0.3
    assert odp.calibrate_mu(torch.tensor([0.1, 0.2, 0.4, 0.9])) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        odp.calibrate_mu([])
    logits = torch.randn(501, 8, generator=gen)
    ratios = odp.slot_ratios(logits, 2)
    _, w, _ = odp.route_reference(logits, 2, 0.0)
    torch.testing.assert_close(ratios, w[:, 1] / w[:, 0], rtol=1e-6, atol=0)
    # mu = the median ratio prunes the tokens whose ratio is below it: about half
    mu = odp.calibrate_mu(ratios)
    _, _, n = odp.route(logits, 2, mu)
    # (the rule compares logit gaps with fl32(ln mu): the median token itself may go either way)
    assert abs(n - int((ratios < mu).sum())) <= 1 and 240 <= n <= 251
    # top-4: the ratios of slots 1-3, in slot order per token, the same for plain softmax weights; the median
    # prunes about half of the non-top slots
    ratios = odp.slot_ratios(logits, 4)
    _, w, _ = odp.route_reference(logits, 4, 0.0, renormalize=False)
    torch.testing.assert_close(ratios, (w[:, 1:] / w[:, :1]).reshape(-1), rtol=1e-6, atol=0)
    _, _, n = odp.route(logits, 4, odp.calibrate_mu(ratios), renormalize=False)
    assert abs(n - 501 * 3 // 2) <= 2


# --- sigmoid scores (DeepSeek-V3): route_sigmoid ------------------------------------------------------------


def deepseek_v3_router(logits, bias, top_k, n_group, topk_group, renormalize):
    """transformers' DeepseekV3TopkRouter on given logits (its weight-free part), scale 1."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    E = logits.shape[1]
    cfg = DeepseekV3Config(n_routed_experts=E, num_experts_per_tok=top_k, n_group=n_group, topk_group=topk_group,
                           norm_topk_prob=renormalize, routed_scaling_factor=1.0, hidden_size=E)
    router = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))  # router(x) = x: the logits themselves
        router.e_score_correction_bias.copy_(bias)
        _, weights, ids = router(logits)
    return ids, weights


@pytest.mark.parametrize("n_group, topk_group, renormalize", [(1, 1, True), (4, 2, True), (8, 3, False)])
def test_sigmoid_mu0_is_transformers_routing(n_group, topk_group, renormalize):
    g = torch.Generator().manual_seed(n_group)
    logits, bias = torch.randn(300, 32, generator=g), 0.3 * torch.randn(32, generator=g)
    ids, weights, n = odp.route_sigmoid(logits, 6, 0.0, odp.SigmoidGating(bias, n_group, topk_group),
                                        renormalize=renormalize)
    assert n == 0 and (ids >= 0).all()
    want_ids, want_w = deepseek_v3_router(logits, bias, 6, n_group, topk_group, renormalize)
    # transformers returns its top-k unsorted: compare as sets of (expert, weight)
    order = torch.argsort(want_ids, dim=1)
    mine = torch.argsort(ids, dim=1)
    assert torch.equal(ids.gather(1, mine), want_ids.gather(1, order))
    torch.testing.assert_close(weights.gather(1, mine), want_w.gather(1, order), rtol=1e-6, atol=1e-7)
    # slots ordered by biased score, every chosen expert in one of the topk_group chosen groups
    choice = (torch.sigmoid(logits) + bias).gather(1, ids)
    assert (choice[:, :-1] >= choice[:, 1:]).all()
    assert all(len(set((row // (32 // n_group)).tolist())) <= topk_group for row in ids)


def test_sigmoid_pruning_rule():
    g = torch.Generator().manual_seed(7)
    logits, bias = torch.randn(400, 16, generator=g), 0.5 * torch.randn(16, generator=g)
    gating = odp.SigmoidGating(bias, 4, 2)
    plain_ids, plain_w, _ = odp.route_sigmoid(logits, 4, 0.0, gating, renormalize=False)
    protect = torch.rand(400, generator=g) < 0.1
    mu = 0.7
    ids, w, n = odp.route_sigmoid(logits, 4, mu, gating, protect=protect, renormalize=True)
    mu32 = torch.tensor(mu, dtype=torch.float32)
    pruned = (plain_w < plain_w[:, :1] * mu32) & ~protect[:, None]
    pruned[:, 0] = False
    assert n == int(pruned.sum()) > 0
    assert torch.equal(ids, torch.where(pruned, -1, plain_ids))
    assert (w[pruned] == 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(400))  # survivors renormalised
    assert torch.equal(ids[protect], plain_ids[protect])  # protected tokens: plain routing
    # not renormalised: survivors keep their scores
    _, w_plain_kept, _ = odp.route_sigmoid(logits, 4, mu, gating, protect=protect, renormalize=False)
    assert torch.equal(w_plain_kept, torch.where(pruned, 0.0, plain_w))


@needs_op
@pytest.mark.parametrize("E, k, n_group, topk_group", [(16, 4, 1, 1), (32, 6, 4, 2), (64, 8, 8, 3), (8, 2, 4, 1)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_scores_op_matches_reference(E, k, n_group, topk_group, renormalize):
    """The compiled route_scores against route_sigmoid_reference: the same ids and count bit for bit, weights to
    rounding, ties in the scores included (logits on a coarse grid), with protection and pruning."""
    g = torch.Generator().manual_seed(E * k + n_group)
    logits = torch.randint(-8, 8, (700, E), generator=g).float() / 4  # many equal scores
    bias = torch.randint(-2, 3, (E,), generator=g).float() / 8
    protect = torch.rand(700, generator=g) < 0.1
    importance = torch.rand(700, generator=g)
    gating = odp.SigmoidGating(bias, n_group, topk_group)
    for mu in (0.0, 0.5, 0.9, 1.0):
        want = odp.route_sigmoid_reference(logits, k, mu, gating, protect, importance, 0.05, renormalize)
        got = odp.route_sigmoid(logits, k, mu, gating, protect, importance, 0.05, renormalize)
        assert_same_routing(got, want)
        if mu == 0.9:
            assert 0 < got[2] < 700 * (k - 1)


@needs_op
def test_scores_op_checks_its_arguments():
    logits = torch.zeros(3, 8)
    with pytest.raises(ValueError, match="n_group must divide E=8"):
        odp.route_sigmoid(logits, 2, 0.5, odp.SigmoidGating(None, 3, 1))
    with pytest.raises(ValueError, match="topk_group must be in"):
        odp.route_sigmoid(logits, 2, 0.5, odp.SigmoidGating(None, 2, 3))
    with pytest.raises(ValueError, match="top_k 6 exceeds the experts of 1 groups"):
        odp.route_sigmoid(logits, 6, 0.5, odp.SigmoidGating(None, 2, 1))
    with pytest.raises(ValueError, match="bias must be"):
        odp.route_sigmoid(logits, 2, 0.5, odp.SigmoidGating(torch.zeros(4), 1, 1))


@needs_op
def test_scores_op_registration_passes_opcheck():
    scores = torch.rand(16, 8)
    torch.library.opcheck(torch.ops.mc2gguf_odp.route_scores.default,
                          (scores, 2, 0.5, torch.zeros(8), 2, 1, None, None, 0.0, True))
