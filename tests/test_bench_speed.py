"""`mc2gguf bench-speed` on the tiny shape: the files it makes are what it says, every comparison is measured
and reported, the README section is replaced. Speeds themselves are not asserted (no timed assertions)."""

from __future__ import annotations

import json

import pytest
from gguf import GGUFReader

from mc2gguf.bench_speed import (GROUP_TYPES, RATIOS, RUNS, SHAPES, UNPATCHED_RUN, README_BEGIN, README_END,
                                 SpeedConfig, read_bytes_per_token, run_speed_bench, update_readme)
from mc2gguf.errors import Mc2ggufError
from mc2gguf.gguf.keys import Keys, is_expert_tensor, type_groups_key


@pytest.fixture(scope="module")
def speed_run(tmp_path_factory, llama_build):
    config = SpeedConfig(work=tmp_path_factory.mktemp("speed"), shapes=("tiny",), rounds=2, n_prompt=16, n_gen=4)
    return config, run_speed_bench(config)


def test_files_are_the_layouts_compared(speed_run):
    config, _ = speed_run
    shape = SHAPES["tiny"]
    out = config.work / "tiny"
    stock = {t.name: t.tensor_type.name for t in GGUFReader(out / "stock.gguf").tensors}
    assert {stock[n] for n in stock if is_expert_tensor(n)} == {"Q3_K"}
    grouped = GGUFReader(out / "grouped.gguf")
    cycle = [e % len(GROUP_TYPES) for e in range(shape.experts)]
    for il in range(shape.layers):
        for p in ("gate", "up", "down"):
            base = f"blk.{il}.ffn_{p}_exps"
            assert list(grouped.fields[type_groups_key(base)].contents()) == cycle
            types = {t.name: t.tensor_type.name for t in grouped.tensors}
            assert [types[f"{base}.{g}.weight"] for g in range(len(GROUP_TYPES))] == list(GROUP_TYPES)
    split = {t.name: t.tensor_type.name for t in GGUFReader(out / "split.gguf").tensors}
    assert {split[n] for n in split if is_expert_tensor(n)} == {"Q3_K"} and "blk.0.ffn_up_exps.2.weight" in split
    odp = GGUFReader(out / "odp.gguf")
    mu = list(odp.fields[Keys.ODP_MU].contents())
    assert len(mu) == shape.layers and all(0 < m < 1 for m in mu)


def test_every_comparison_is_measured(speed_run):
    config, results = speed_run
    r = results["shapes"]["tiny"]
    assert set(r["samples"]) == set(RUNS) and all(len(s) == config.rounds for s in r["samples"].values())
    expected = {f"{a} / {b}" for a, b, _ in RATIOS if UNPATCHED_RUN not in (a, b)}
    assert set(r["ratios"]) == expected
    for name, ratio in r["ratios"].items():
        assert ratio["pp"] > 0 and ratio["tg"] > 0, name
    # ODP prunes at the calibrated mu (the median top-2 ratio: about a quarter of the slots), only when on
    assert 0.05 < r["median"]["odp on fused"]["pruned"] < 0.5
    assert r["median"]["odp on fused"]["pruned"] == r["median"]["odp on ops"]["pruned"]
    assert r["median"]["odp off"].get("pruned", 0.0) == 0.0
    assert results["bandwidth"] > 1e8
    assert json.loads((config.work / "speed.json").read_text())["shapes"]["tiny"]["ratios"] == r["ratios"]
    table = (config.work / "speed.md").read_text()
    assert "| type groups, fused graph |" in table and "| tiny |" in table


def test_bytes_per_token(speed_run):
    config, _ = speed_run
    shape = SHAPES["tiny"]
    path = config.work / "tiny" / "stock.gguf"
    tensors = GGUFReader(path).tensors
    experts = sum(t.n_bytes for t in tensors if is_expert_tensor(t.name))
    full = read_bytes_per_token(path, shape.top_k, shape.experts)
    half = read_bytes_per_token(path, shape.top_k, shape.experts, pruned_share=0.5)
    assert abs((full - half) - experts * shape.top_k / shape.experts / 2) <= 2
    embd = next(t for t in tensors if t.name == "token_embd.weight")
    others = sum(t.n_bytes for t in tensors if not is_expert_tensor(t.name) and t is not embd)
    assert abs(full - (others + experts * shape.top_k / shape.experts + embd.n_bytes / embd.shape[-1])) <= 2


def test_readme_section_replaced(speed_run, tmp_path):
    config, _ = speed_run
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold\n{README_END}\nafter\n")
    update_readme(readme, config.work)
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith(f"{README_END}\nafter\n")
    assert (config.work / "speed.md").read_text() in text
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    with pytest.raises(Mc2ggufError, match="no speed section"):
        update_readme(plain, config.work)


def test_unknown_shape_refused(tmp_path):
    with pytest.raises(Mc2ggufError, match="unknown shape"):
        run_speed_bench(SpeedConfig(work=tmp_path, shapes=("llama-70b",)))
