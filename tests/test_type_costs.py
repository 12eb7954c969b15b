"""Decode costs per type (``mc2gguf type-costs``) and PMQ under ``--min-speed``: the probe files hold what they
claim, llama-bench times them, the costs follow from the timings and are cached, and convert honours the limit
or says why it cannot. Speeds themselves are not asserted (the README's figures come from the command)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGUFReader

from mc2gguf import type_costs
from mc2gguf.cli import main
from mc2gguf.errors import Mc2ggufError
from mc2gguf.paths import C4_SAMPLE
from mc2gguf.type_costs import TypeCosts

PMQ = ["--bpw", "2.55", "--granularity", "projection", "--calib", str(C4_SAMPLE), "--nsamples", "4", "--seqlen", "64",
       "--eps-tokens", "64", "--palette", "IQ2_XXS,Q2_K,Q4_K", "--eps-method", "rtn"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(type_costs, "cache_root", lambda: tmp_path / "cache")
    return tmp_path / "cache"


def test_probe_files_hold_each_type_and_llama_bench_times_them(cache, llama_build):
    work = cache / "probe"
    work.mkdir(parents=True)
    files = type_costs._probe_files(type_costs.PROBES["tiny"], ["IQ2_XXS", "Q4_K"], work)
    wide = {t.name: t for t in GGUFReader(files["wide"]).tensors}
    for name in ("IQ2_XXS", "Q4_K"):
        tensors = {t.name: t for t in GGUFReader(files[name]).tensors}
        assert tensors.keys() == wide.keys()
        for tname, t in tensors.items():
            expert = "_exps." in tname
            assert t.tensor_type.name == (name if expert else wide[tname].tensor_type.name), tname
            if not expert:
                assert np.array_equal(np.asarray(t.data), np.asarray(wide[tname].data))
    narrow = type_costs._expert_weights_per_token(files["narrow"])
    assert type_costs._expert_weights_per_token(files["wide"]) == type_costs.NARROW * narrow
    seconds = type_costs._decode_seconds(llama_build.bin_dir, {k: files[k] for k in ("narrow", "Q4_K")}, 1, 1, 4)
    assert all(np.isfinite(v) and v > 0 for v in seconds.values())


def test_costs_follow_from_the_timings_and_are_cached(cache, llama_build, monkeypatch):
    wide = 2 * 4 * 3 * 256 * 2048  # the tiny probe: every token reads all of its experts
    fixed, per_weight = 1e-4, {"Q2_K": 3e-11, "Q4_K": 2e-11, "Q8_0": 4e-11}
    calls = []

    def fake(bin_dir, files, threads, rounds, n_gen):
        calls.append(sorted(files))
        out = {t: fixed + c * wide for t, c in per_weight.items() if t in files}
        return out | {"wide": fixed + per_weight["Q8_0"] * wide,
                      "narrow": fixed + per_weight["Q8_0"] * wide / type_costs.NARROW}

    monkeypatch.setattr(type_costs, "_decode_seconds", fake)
    costs = type_costs.measure_type_costs(["Q2_K", "Q4_K"], threads=1, probe="tiny")
    assert costs.seconds_per_weight == pytest.approx({"Q2_K": 3e-11, "Q4_K": 2e-11}, rel=1e-9)
    assert costs.fixed_seconds == pytest.approx(fixed, rel=1e-6)
    assert "Q2_K" in costs.render() and "1.50" in costs.render()  # 3e-11 / 2e-11 per weight
    # cached: asking again measures nothing; a new type measures only that one
    assert type_costs.measure_type_costs(["Q4_K", "Q2_K"], threads=1, probe="tiny") == costs
    assert len(calls) == 1
    type_costs.measure_type_costs(["Q8_0", "Q4_K"], threads=1, probe="tiny")
    assert calls[-1] == ["Q8_0", "narrow", "wide"]


def test_noisy_timings_are_refused(cache, llama_build, monkeypatch):
    # Q2_K faster than the experts-free intercept: a measurement to repeat, not a cost
    monkeypatch.setattr(type_costs, "_decode_seconds",
                        lambda *a: {"wide": 2e-3, "narrow": 1.1e-3, "Q2_K": 9e-4})
    with pytest.raises(Mc2ggufError, match="Q2_K came out non-positive"):
        type_costs.measure_type_costs(["Q2_K"], threads=1, probe="tiny")


def test_costs_file_errors(tmp_path):
    with pytest.raises(Mc2ggufError, match="not found"):
        TypeCosts.load(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"seconds_per_weight\": {\"Q4_K\": -1}}")
    with pytest.raises(Mc2ggufError, match="not a type costs file"):
        TypeCosts.load(bad)


def _costs_file(path, **costs):
    TypeCosts(costs, 2, "test", "tiny", "test", 0.0).save(path)
    return path


def test_convert_min_speed(tiny_mixtral, tmp_path, llama_build, capsys):
    """The measured kernel mix bound: IQ2_XXS slower per weight than Q2_K and Q4_K (as on this machine), so a
    speed limit trades it for the faster types; the file records the prediction; out-of-reach limits and
    missing costs are clear errors, and nothing is written."""
    costs = _costs_file(tmp_path / "costs.json", IQ2_XXS=6.6e-11, Q2_K=2.8e-11, Q4_K=2.4e-11)
    work = tmp_path / "work"

    def convert(name, *extra):
        return main(["convert", str(tiny_mixtral), str(tmp_path / name), *PMQ, "--work-dir", str(work), *extra])

    def summary(name):
        return json.loads(str(GGUFReader(tmp_path / name).fields["mc2gguf.allocation"].contents()))

    def n_iq2(name):
        return sum(t.n_elements for t in GGUFReader(tmp_path / name).tensors if t.tensor_type.name == "IQ2_XXS")

    assert convert("free.gguf") == 0
    assert convert("fast.gguf", "--min-speed", "0.75", "--type-costs", str(costs)) == 0
    assert "min_speed" not in summary("free.gguf")
    s = summary("fast.gguf")
    assert s["min_speed"] == 0.75 and s["speed_reference"] == "Q4_K" and s["predicted_speed"] >= 0.75 - 1e-9
    assert 0 < n_iq2("fast.gguf") < n_iq2("free.gguf")
    capsys.readouterr()
    assert convert("x.gguf", "--min-speed", "1.5", "--type-costs", str(costs)) == 1
    assert "--min-speed 1.5 is out of reach: with this palette the experts decode at most 1.000x" in \
        capsys.readouterr().err
    assert convert("y.gguf", "--min-speed", "0.9", "--type-costs", str(costs)) == 1
    assert "infeasible under this budget, --min-speed 0.9" in capsys.readouterr().err
    assert convert("z.gguf", "--min-speed", "0.75", "--type-costs",
                   str(_costs_file(tmp_path / "c2.json", Q4_K=2e-11))) == 1
    assert "has no decode cost for IQ2_XXS, Q2_K" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name[0] in "xyz"]
