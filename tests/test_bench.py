"""`mc2gguf bench` end to end on the tiny Mixtral: every kind of row, the numbers read back from llama.cpp's
own output, resume without redoing a stage, and the README section it writes."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from mc2gguf.bench import README_BEGIN, README_END, Bench, BenchConfig, update_readme
from mc2gguf.errors import Mc2ggufError
from mc2gguf.gguf.inspect import summarize

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def bench_run(tiny_mixtral, tmp_path_factory, llama_build):
    config = BenchConfig(
        model=tiny_mixtral, work=tmp_path_factory.mktemp("bench"),
        calib=(SHARED_DATA / "c4" / "c4-sample.jsonl",), eval_text=SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw",
        ctx=128, chunks=3, llama_types=("Q2_K",), bpws=(2.5,), layouts=("mixed",), nsamples=8, seqlen=128,
        speed=False, mu_scales=(0.5, 1.5),
    )
    return config, Bench(config).run()


def test_rows_and_numbers(bench_run):
    config, results = bench_run
    rows = {(r["name"], r["odp"]): r for r in results["rows"] if r["mu_scale"] == 1.0}
    assert set(rows) == {("f16", False), ("Q2_K + imatrix", False), ("layer mix @ 2.50", False),
                         ("PMQ 2.50 mixed", False), ("PMQ 2.50 mixed", True)}
    for r in results["rows"]:
        assert r["size"] == os.path.getsize(r["file"]) == summarize(Path(r["file"])).size
        assert r["ppl"] > 1 and r["ppl_err"] > 0
        assert r["kld"] >= 0 and 0 <= r["same_top"] <= 100
    assert rows[("f16", False)]["expert_bpw"] == 16.0
    pmq = rows[("PMQ 2.50 mixed", False)]
    # the budget is an upper bound, filled as closely as the palette's sizes allow on the tiny model's 8 experts
    assert 0.99 * 2.5 <= pmq["expert_bpw"] <= 2.5
    assert pmq["skip_ratio"] is None and 0 < rows[("PMQ 2.50 mixed", True)]["skip_ratio"] < 1
    assert rows[("PMQ 2.50 mixed", True)]["ppl"] != pmq["ppl"]
    # the ODP sweep: the same file with mu scaled (at most 1) prunes more as mu grows
    sweep = {r["mu_scale"]: r for r in results["rows"] if r["name"] == "PMQ 2.50 mixed" and r["odp"]}
    assert set(sweep) == {0.5, 1.0, 1.5}
    assert sweep[0.5]["skip_ratio"] < sweep[1.0]["skip_ratio"] < sweep[1.5]["skip_ratio"]
    mu = {s: np.array(GGUFReader(sweep[s]["file"]).fields["mc2gguf.odp.mu"].contents()) for s in sweep}
    assert np.allclose(mu[0.5], 0.5 * mu[1.0]) and np.allclose(mu[1.5], np.minimum(1.0, 1.5 * mu[1.0]))
    assert sweep[0.5]["size"] == sweep[1.0]["size"]
    # the layer mix: IQ2_S (2.5625) for the experts of as many of the 2 layers as fit in 2.5, IQ2_XS (2.3125)
    # for the others
    assert rows[("layer mix @ 2.50", False)]["expert_bpw"] == pytest.approx((2.5625 + 2.3125) / 2)
    assert pmq["cost"]["pmq-2.50-mixed"]["seconds"] > 0 and pmq["cost"]["pmq-2.50-mixed"]["peak_rss"] > 0
    assert json.loads((config.work / "results.json").read_text())["rows"] == results["rows"]
    table = (config.work / "results.md").read_text()
    assert "PMQ 2.50 mixed" in table and "Q2_K + imatrix" in table
    assert (config.work / "ppl_vs_size.png").stat().st_size > 0


def test_second_run_resumes(bench_run):
    config, results = bench_run
    before = {p.name: p.stat().st_mtime_ns for p in config.work.glob("*.gguf")}
    again = Bench(config).run()
    assert {p.name: p.stat().st_mtime_ns for p in config.work.glob("*.gguf")} == before
    assert [(r["name"], r["ppl"], r["kld"]) for r in again["rows"]] == [(r["name"], r["ppl"], r["kld"])
                                                                        for r in results["rows"]]


def test_work_directory_of_other_options_is_refused(bench_run):
    config, _ = bench_run
    with pytest.raises(Mc2ggufError, match="other options"):
        Bench(replace(config, nsamples=config.nsamples + 1))
    # other evaluation settings are evaluated again, beside the first ones, from the same files
    other = Bench(replace(config, chunks=config.chunks + 1))
    assert other.eval_dir != Bench(config).eval_dir and other.eval_dir.parent == config.work


def test_readme_section(bench_run, tmp_path):
    config, _ = bench_run
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_BEGIN}\nold\n{README_END}\n\ntail\n")
    update_readme(readme, config.work)
    text = readme.read_text()
    assert "old" not in text and "PMQ 2.50 mixed" in text and text.endswith("tail\n")
    readme.write_text("# no section\n")
    with pytest.raises(Exception, match="no results section"):
        update_readme(readme, config.work)
