"""``mc2gguf eval`` (mc2gguf/evaluate.py): llama-perplexity's windows and formula, GGUF weights in PyTorch,
ODP in the forward (mu = 0, skip-ratio counting, calibration), bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mc2gguf import evaluate as ev
from mc2gguf.archs import blocks
from mc2gguf import odp
from mc2gguf.cli import main
from mc2gguf.errors import Mc2ggufError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI = SHARED / "wikitext-2-raw" / "wiki.test.raw"
C4 = SHARED / "c4" / "c4-sample.jsonl"
CTX = 64


@pytest.fixture(scope="module")
def wiki_small(tmp_path_factory) -> Path:
    """The first ~6 KB of WikiText-2 test (about 3,000 tokens of the 512-piece tokenizer)."""
    if not WIKI.is_file():
        pytest.fail(f"{WIKI} is missing (../shared must sit beside the checkout)")
    path = tmp_path_factory.mktemp("text") / "wiki-small.txt"
    path.write_bytes(WIKI.read_bytes()[:6000])
    return path


@pytest.fixture(scope="module")
def model(tiny_mixtral) -> ev.EvalModel:
    return ev.EvalModel(tiny_mixtral)


@pytest.fixture(scope="module")
def windows(tiny_mixtral, wiki_small) -> ev.Windows:
    tok = ev.load_tokenizer(tiny_mixtral)
    add_bos = ev.tokenizer_adds_bos(tok)
    assert add_bos  # the SentencePiece test tokenizer adds BOS, as llama.cpp's SPM vocabulary does
    tokens = ev.tokenize_text(tok, ev.read_eval_text(wiki_small), add_bos, tok.bos_token_id)
    return ev.perplexity_windows(tokens, CTX, 3, add_bos, tok.bos_token_id)


def _params(model, mu, protect_norm=None, ratio=0.02):
    n = model.n_layers
    return ev.OdpParams([float(mu)] * n if not isinstance(mu, list) else mu,
                        protect_norm if protect_norm is not None else [0.0] * n, ratio, "test")


# --------------------------------------------------------------------------------------------------------
# llama-perplexity's definition


def llama_perplexity_reference(tokens, n_ctx, n_chunks, add_bos, bos):
    """tools/perplexity/perplexity.cpp (pinned), perplexity() with n_seq = 1, written out as loops: what is
    fed for each chunk, and which (logit position, target token) pairs are scored."""
    if len(tokens) < 2 * n_ctx:
        return None
    n_chunk_max = len(tokens) // n_ctx
    n_chunk = n_chunk_max if n_chunks < 0 else min(n_chunks, n_chunk_max)
    first = n_ctx // 2
    fed, scored = [], []
    for i in range(n_chunk):
        start = i * n_ctx
        batch = list(tokens[start : start + n_ctx])
        if add_bos:
            batch[0] = bos
        fed.append(batch)
        tokens_data = tokens[start + first :]
        scored.append([(first + k, tokens_data[k + 1]) for k in range(n_ctx - 1 - first)])
    return fed, scored


@pytest.mark.parametrize("n_ctx", [8, 9, 16])
@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("n_tokens, n_chunks", [(70, -1), (70, 2), (70, 100), (16, -1), (17, -1), (18, 1)])
def test_windows_match_llama_perplexity(n_ctx, add_bos, n_tokens, n_chunks):
    tokens = list(range(100, 100 + n_tokens))
    want = llama_perplexity_reference(tokens, n_ctx, n_chunks, add_bos, 1)
    if want is None:
        with pytest.raises(Mc2ggufError, match="at least"):
            ev.perplexity_windows(tokens, n_ctx, None if n_chunks < 0 else n_chunks, add_bos, 1)
        return
    w = ev.perplexity_windows(tokens, n_ctx, None if n_chunks < 0 else n_chunks, add_bos, 1)
    fed, scored = want
    assert w.inputs.tolist() == fed
    got_scored = [[(p, int(w.targets[c, p + 1])) for p in w.score_positions()] for c in range(w.n_chunk)]
    assert got_scored == scored
    assert w.scored_per_chunk == len(scored[0])


def test_accumulator_is_llama_perplexitys_formula():
    g = torch.Generator().manual_seed(0)
    n_ctx, vocab, first = 12, 50, 6
    acc = ev.PerplexityAccumulator()
    nll = nll2 = 0.0
    count = 0
    for _ in range(3):
        logits = torch.randn(n_ctx, vocab, generator=g) * 3
        targets = torch.randint(0, vocab, (n_ctx,), generator=g)
        acc.add_chunk(logits, targets, first)
        for i in range(n_ctx - 1 - first):  # process_logits / log_softmax, float max and expf, double sum
            row = logits[first + i].numpy()
            mx = row.max()
            s = sum(float(np.exp(np.float32(v - mx))) for v in row)
            v = -(float(row[int(targets[first + i + 1])] - mx) - math.log(s))
            nll += v
            nll2 += v * v
        count += n_ctx - first - 1
    assert acc.count == count
    ppl = math.exp(nll / count)
    assert acc.ppl == pytest.approx(ppl, rel=1e-6)
    mean = nll / count
    assert acc.stderr == pytest.approx(math.sqrt((nll2 / count - mean * mean) / (count - 1)) * ppl, rel=1e-5)
    assert acc.chunk_ppl[-1] == acc.ppl and len(acc.chunk_ppl) == 3


class RecordingModel:
    """Stands in for EvalModel: logits that depend on the fed tokens; records what it was fed."""

    n_layers = 1

    def __init__(self, vocab=40):
        self.vocab, self.fed = vocab, []

    def forward(self, tokens, odp_cfg=None, stats=None):
        self.fed.append(tokens.clone())
        g = torch.Generator().manual_seed(int(tokens.sum()))
        return torch.randn(tokens.numel(), self.vocab, generator=g)


def test_evaluate_windows_feeds_bos_windows_and_scores_original_tokens():
    tokens = [1] + [(7 * i) % 37 + 3 for i in range(60)]
    w = ev.perplexity_windows(tokens, 16, None, True, 1)
    fake = RecordingModel()
    result = ev.evaluate_windows(fake, w)
    assert [t.tolist() for t in fake.fed] == llama_perplexity_reference(tokens, 16, -1, True, 1)[0]
    nll = 0.0
    for c, fed in enumerate(list(fake.fed)):
        logits = fake.forward(fed)
        for p in w.score_positions():
            nll -= float(torch.log_softmax(logits[p].double(), -1)[tokens[c * 16 + p + 1]])
    assert result.scored_tokens == 3 * 7
    assert result.ppl == pytest.approx(math.exp(nll / 21), rel=1e-9)
    assert not result.odp and result.skip_ratio == 0.0


def test_read_eval_text_drops_one_trailing_newline(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"a\n\nb\n\n")
    assert ev.read_eval_text(p) == "a\n\nb\n"


# --------------------------------------------------------------------------------------------------------
# The forward


def test_no_odp_forward_is_the_adapters_forward(model, windows):
    tokens = windows.inputs[0]
    a = model.adapter
    with torch.inference_mode():
        h = a.embed(tokens.view(1, -1))
        for layer in model.layers:
            h = a.layer_forward(layer, h)
        want = a.head(h)[0]
    assert torch.equal(model.forward(tokens), want)


def test_queries_keys_are_those_of_the_attention(model, windows):
    """Softmax(q k^T / sqrt(D)) v through o_proj reproduces the layer's attention block: the attention
    importance is computed from the attention the model really runs."""
    a = model.adapter
    layer = model.layers[1]
    with torch.inference_mode():
        h = a.embed(windows.inputs[0].view(1, -1))
        h = a.layer_forward(model.layers[0], h)
        q, k = model.adapter.queries_keys(layer, h)
        x = blocks.rms_norm(h, layer.tensors["input_norm"], a.rms_eps)
        v = (x @ layer.tensors["v"].T).view(1, -1, a.n_head_kv, a.head_dim).transpose(1, 2)[0]
        rep = q.shape[0] // k.shape[0]
        s = q @ k.repeat_interleave(rep, 0).transpose(1, 2) / math.sqrt(q.shape[-1])
        T = s.shape[-1]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
        o = torch.softmax(s, -1) @ v.repeat_interleave(rep, 0)
        got = h + o.transpose(0, 1).reshape(1, T, -1) @ layer.tensors["o"].T
        torch.testing.assert_close(got, a.attention_block(layer, h), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("protection", ev.PROTECTIONS)
def test_odp_with_mu_zero_is_the_unpruned_model(model, windows, protection):
    off = ev.evaluate_windows(model, windows)
    cfg = ev.OdpConfig(_params(model, 0.0), protection)
    on = ev.evaluate_windows(model, windows, cfg)
    assert on.n_pruned == 0 and on.skip_ratio == 0.0
    assert on.n_routed == windows.n_chunk * CTX * model.top_k * model.n_layers
    assert on.ppl == off.ppl
    logits_off = model.forward(windows.inputs[1])
    logits_on = model.forward(windows.inputs[1], cfg)
    assert torch.equal(logits_on, logits_off)


def reference_pruned_run(model, tokens, cfg):
    """The ODP forward written out with route_reference, the plain attention-map importance and explicit
    expert loops: logits and pruned slots per layer."""
    a = model.adapter
    pruned = []
    with torch.inference_mode():
        h = a.embed(tokens.view(1, -1))
        for i, layer in enumerate(model.layers):
            q, k = model.adapter.queries_keys(layer, h)
            h = a.attention_block(layer, h)
            x = a.moe_input(layer, h)[0]
            logits = x @ layer.tensors["router"].T
            protect = importance = None
            ratio = 0.0
            if cfg.protection in ("norm", "both"):
                protect = x.abs().sum(-1) > cfg.params.protect_norm[i]
            if cfg.protection in ("attention", "both"):
                rep = q.shape[0] // k.shape[0]
                s = q @ k.repeat_interleave(rep, 0).transpose(1, 2) / math.sqrt(q.shape[-1])
                T = s.shape[-1]
                probs = torch.softmax(s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf), -1)
                importance = odp.token_importance(x, probs)  # from the materialised map
                ratio = cfg.params.protect_ratio
            ids, weights, n = odp.route_reference(logits, model.top_k, cfg.mu(i), protect, importance, ratio)
            pruned.append(n)
            out = torch.zeros_like(x)
            for t in range(x.shape[0]):
                for slot in range(model.top_k):
                    e = int(ids[t, slot])
                    if e >= 0:
                        ex = layer.experts[e]
                        out[t] += weights[t, slot] * ((F.silu(x[t] @ ex.gate.T) * (x[t] @ ex.up.T)) @ ex.down.T)
            h = h + out
        return a.head(h)[0], pruned


@pytest.mark.parametrize("protection", ev.PROTECTIONS)
def test_skip_ratio_equals_the_reference_count(model, windows, protection):
    cal = ev.calibrate_odp(model, [C4], 0.1, nsamples=2, seqlen=CTX)
    cfg = ev.OdpConfig(cal.params, protection, mu_scale=1.0)
    stats = ev.RunStats(model.n_layers)
    want_pruned = [0] * model.n_layers
    for c in range(2):
        logits = model.forward(windows.inputs[c], cfg, stats)
        ref_logits, pruned = reference_pruned_run(model, windows.inputs[c], cfg)
        want_pruned = [w + p for w, p in zip(want_pruned, pruned)]
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert stats.n_pruned == want_pruned
    assert sum(want_pruned) > 0
    assert stats.skip_ratio == sum(want_pruned) / (2 * CTX * model.top_k * model.n_layers)
    if protection != "none":
        assert min(stats.n_protected) > 0


def test_protection_lowers_the_skip_ratio(model, windows):
    cal = ev.calibrate_odp(model, [C4], 0.1, nsamples=2, seqlen=CTX)
    skip = {p: ev.evaluate_windows(model, windows, ev.OdpConfig(cal.params, p)).skip_ratio for p in ev.PROTECTIONS}
    assert skip["none"] > 0.05
    assert skip["both"] <= min(skip["attention"], skip["norm"]) <= max(skip["attention"], skip["norm"]) <= skip["none"]


def test_calibrated_mu_is_calibrate_mu_of_the_collected_ratios(model):
    from mc2gguf.text import load_calibration

    cal = ev.calibrate_odp(model, [C4], 0.05, nsamples=3, seqlen=CTX, seed=7)
    tokens = load_calibration(model.model_dir, [C4], 3, CTX, 7).tokens
    a = model.adapter
    ratios = [[] for _ in model.layers]
    norms = [[] for _ in model.layers]
    with torch.inference_mode():
        for row in tokens:
            h = a.embed(row.view(1, -1))
            for i, layer in enumerate(model.layers):
                x = a.moe_input(layer, a.attention_block(layer, h))[0]
                top = torch.topk(a.router_logits(layer, x), 2, dim=1).values
                ratios[i].append(torch.exp(top[:, 1] - top[:, 0]))
                norms[i].append(x.abs().sum(-1))
                h = a.layer_forward(layer, h)
    for i in range(model.n_layers):
        r, n = torch.cat(ratios[i]), torch.cat(norms[i])
        assert r.numel() == 3 * CTX
        assert torch.equal(cal.ratios[i], r)
        assert cal.params.mu[i] == odp.calibrate_mu(r)
        assert cal.params.protect_norm[i] == odp.calibrate_protect_norm(n, 0.05)
        assert int((n > cal.params.protect_norm[i]).sum()) == odp.n_protect(0.05, n.numel())
    assert cal.params.protect_ratio == 0.05


def test_equal_skip_interpolation():
    assert ev.interpolate_at([(0.1, 10.0), (0.3, 14.0)], 0.2) == pytest.approx(12.0)
    assert ev.interpolate_at([(0.1, 10.0), (0.3, 14.0)], 0.4) is None


# --------------------------------------------------------------------------------------------------------
# GGUF weights


@pytest.fixture(scope="module")
def converted(tiny_mixtral, tmp_path_factory):
    from mc2gguf.convert import convert
    from mc2gguf.quant.types import quant_type

    out = tmp_path_factory.mktemp("gguf")
    return {t: convert(tiny_mixtral, out / f"{t}.gguf", quant_type(t)).out for t in ("F16", "Q8_0")}


def test_gguf_f16_and_q8_0_evaluate_like_the_checkpoint(tiny_mixtral, converted, model, windows):
    base = ev.evaluate_windows(model, windows)
    f16 = ev.EvalModel(tiny_mixtral, converted["F16"])
    assert f16.gguf_add_bos is True and f16.gguf_odp is None
    assert set(f16.gguf_types["blk.0.ffn_down_exps.weight"]) == {"F16"}
    # the tiny model's weights are fp16 numbers: an F16 file holds exactly them
    assert torch.equal(f16.layers[1].experts[3].down, model.layers[1].experts[3].down)
    assert ev.evaluate_windows(f16, windows).ppl == pytest.approx(base.ppl, rel=1e-6)
    q8 = ev.EvalModel(tiny_mixtral, converted["Q8_0"])
    assert set(q8.gguf_types["blk.1.ffn_up_exps.weight"]) == {"Q8_0"}
    assert not torch.equal(q8.layers[0].experts[0].gate, model.layers[0].experts[0].gate)
    assert ev.evaluate_windows(q8, windows).ppl == pytest.approx(base.ppl, rel=0.02)


def test_eval_of_an_f16_file_agrees_with_llama_perplexity(converted, tiny_mixtral, wiki_small, llama_build, tmp_path):
    """Same tokens (llama.cpp's tokenizer), chunks, BOS and scored positions: the PPL of the pinned
    llama-perplexity on the F16 file and ours on the same weights agree to llama.cpp's float error."""
    import re
    import subprocess

    proc = subprocess.run(
        [str(llama_build.binary("llama-perplexity")), "-m", str(converted["F16"]), "-f", str(wiki_small),
         "-c", str(CTX), "--chunks", "3", "-t", "2"], capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The running estimate after the last chunk ("[3]908.62,") is the final PPL; llama.cpp's asynchronous
    # logger does not always flush its "Final estimate" line to a pipe before the process exits.
    running = dict(re.findall(r"\[(\d+)\]([0-9.]+),", proc.stdout + proc.stderr))
    assert "3" in running, (proc.stdout + proc.stderr)[-1500:]
    llama_ppl = float(running["3"])
    report = ev.run_eval(ev.EvalOptions(model=tiny_mixtral, text=wiki_small, gguf=converted["F16"], ctx=CTX,
                                        chunks=3, json_out=tmp_path / "r.json"))
    assert report["tokenizer"] == "llama.cpp"
    assert report["runs"][0]["ppl"] == pytest.approx(llama_ppl, rel=1e-3)


def test_gguf_type_groups_and_odp_metadata_are_read(tiny_mixtral, converted, model, tmp_path):
    """A file whose layer-0 down experts are stored as two type groups (docs/gguf-layout.md) and that carries
    ODP metadata: each expert comes back from its group, and mu/protect_norm are used."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import quantize

    src = GGUFReader(converted["F16"])
    out = tmp_path / "groups.gguf"
    writer = GGUFWriter(out, "llama")
    groups = [1, 0, 1, 0]  # experts 1, 3 -> group 0 (Q8_0); 0, 2 -> group 1 (F16)
    for t in src.tensors:
        data = np.asarray(t.data)
        if t.name == "blk.0.ffn_down_exps.weight":
            w = data.astype(np.float32)
            writer.add_tensor("blk.0.ffn_down_exps.0.weight", quantize(w[[1, 3]], GGMLQuantizationType.Q8_0),
                              raw_dtype=GGMLQuantizationType.Q8_0)
            writer.add_tensor("blk.0.ffn_down_exps.1.weight", data[[0, 2]])
        else:
            writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    writer.add_array("mc2gguf.blk.0.ffn_down_exps.groups", groups)
    writer.add_key_value("mc2gguf.odp.mu", [0.25, 0.5], GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
    writer.add_key_value("mc2gguf.odp.protect_norm", [30.0, 40.0], GGUFValueType.ARRAY,
                         sub_type=GGUFValueType.FLOAT32)
    writer.add_key_value("mc2gguf.odp.protect_ratio", 0.03, GGUFValueType.FLOAT32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    m = ev.EvalModel(tiny_mixtral, out)
    assert m.gguf_types["blk.0.ffn_down_exps.weight"] == ["F16", "Q8_0", "F16", "Q8_0"]
    for e in (0, 2):
        assert torch.equal(m.layers[0].experts[e].down, model.layers[0].experts[e].down)
    for e in (1, 3):
        want = model.layers[0].experts[e].down
        got = m.layers[0].experts[e].down
        assert not torch.equal(got, want)
        assert float((got - want).abs().max()) < 0.01 * float(want.abs().max())
    assert m.gguf_odp.mu == [0.25, 0.5]
    assert m.gguf_odp.protect_norm == [30.0, 40.0]
    assert m.gguf_odp.protect_ratio == pytest.approx(0.03)


# --------------------------------------------------------------------------------------------------------
# The command line


def test_cli_eval_with_calibration_writes_json_and_reuses_parameters(tiny_mixtral, wiki_small, tmp_path, capsys):
    out, params = tmp_path / "r.json", tmp_path / "odp.json"
    common = ["eval", str(tiny_mixtral), "--text", str(wiki_small), "--ctx", str(CTX), "--chunks", "2"]
    assert main([*common, "--calibrate-odp", str(C4), "--calib-samples", "2", "--protection", "both",
                 "--save-odp", str(params), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Final estimate: PPL = " in text and "skip ratio" in text
    report = json.loads(out.read_text())
    assert report["chunks"] == 2 and report["scored_tokens"] == 2 * (CTX - CTX // 2 - 1)
    (run,) = report["runs"]
    assert run["odp"] and run["protection"] == "both" and 0 < run["skip_ratio"] < 0.5
    saved = json.loads(params.read_text())
    assert set(saved) >= {"mu", "protect_norm", "protect_ratio"} and len(saved["mu"]) == 2
    assert saved["protect_ratio"] == 0.02
    assert main([*common, "--odp-params", str(params), "--protection", "both", "--json", str(out)]) == 0
    again = json.loads(out.read_text())["runs"][0]
    assert again["ppl"] == run["ppl"] and again["n_pruned"] == run["n_pruned"]


def test_cli_eval_without_odp_parameters(tiny_mixtral, wiki_small, capsys):
    assert main(["eval", str(tiny_mixtral), "--text", str(wiki_small), "--ctx", str(CTX), "--chunks", "1"]) == 0
    assert "[odp off]" in capsys.readouterr().out
    assert main(["eval", str(tiny_mixtral), "--text", str(wiki_small), "--ctx", str(CTX), "--odp", "on"]) == 1
    assert "--odp on needs mu" in capsys.readouterr().err


def test_cli_missing_text_is_a_clear_error(tiny_mixtral, tmp_path, capsys):
    assert main(["eval", str(tiny_mixtral), "--text", str(tmp_path / "nope.txt")]) == 1
    err = capsys.readouterr().err
    assert "mc2gguf: error:" in err and "nope.txt not found" in err


def test_cli_text_shorter_than_a_window_is_a_clear_error(tiny_mixtral, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.\n")
    assert main(["eval", str(tiny_mixtral), "--text", str(short), "--ctx", str(CTX)]) == 1
    err = capsys.readouterr().err
    assert "mc2gguf: error:" in err and "tokenizes to only" in err and f"2 x {CTX}" in err
    with pytest.raises(Mc2ggufError, match="tokenizes to only"):
        ev.run_eval(ev.EvalOptions(model=tiny_mixtral, text=short, ctx=CTX))


def test_cli_missing_calibration_file_and_bad_protection(tiny_mixtral, wiki_small, tmp_path, capsys):
    args = ["eval", str(tiny_mixtral), "--text", str(wiki_small), "--ctx", str(CTX)]
    assert main([*args, "--calibrate-odp", str(tmp_path / "none.jsonl")]) == 1
    assert "none.jsonl not found" in capsys.readouterr().err
    assert main([*args, "--protection", "sometimes"]) == 1
    assert "--protection" in capsys.readouterr().err
