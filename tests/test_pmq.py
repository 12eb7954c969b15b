"""PMQ end to end on a tiny seeded Mixtral: calibration, eps, allocation, GPTQ, layout, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from mc2gguf.cli import main

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
C4 = SHARED_DATA / "c4" / "c4-sample.jsonl"
SMALL = ["--calib", str(C4), "--nsamples", "4", "--seqlen", "64", "--eps-tokens", "128"]
K_LADDER = "Q2_K,Q3_K,Q4_K,Q5_K,Q6_K"


def _convert(model, out, *extra) -> int:
    return main(["convert", str(model), str(out), *SMALL, *extra])


def _report(out: Path) -> dict:
    return json.loads(out.with_name(out.name + ".report.json").read_text())


def test_bpw_budget_is_met_and_types_differ(tiny_mixtral, tmp_path, llama_build):
    out = tmp_path / "m.gguf"
    assert _convert(tiny_mixtral, out, "--bpw", "3.2", "--palette", K_LADDER, "--eps-method", "rtn") == 0
    report = _report(out)
    n_expert_weights = sum(len(e["projections"]) for e in report["experts"]) * 512 * 256
    assert report["expert_bytes"] * 8 <= 3.2 * n_expert_weights
    assert report["file_size"] == out.stat().st_size
    chosen = {e["type"] for e in report["experts"]}
    assert len(chosen) > 1, chosen
    reader = GGUFReader(out)
    fields = reader.fields
    assert len(fields["mc2gguf.odp.mu"].contents()) == 2
    assert 0.0 < min(fields["mc2gguf.odp.mu"].contents()) <= 1.0
    assert "files: c4-sample.jsonl" in fields["mc2gguf.calibration.source"].contents()
    assert fields["mc2gguf.calibration.n_tokens"].contents() == 4 * 64
    assert out.with_name(out.name + ".report.png").stat().st_size > 10_000
    from mc2gguf.inspect_gguf import summarize

    summary = summarize(out)  # per-expert types, as inspect shows them, match the report
    for layer in range(2):
        types = [e["type"] for e in report["experts"] if e["layer"] == layer]
        assert summary.expert_types.get(f"blk.{layer}.ffn_up_exps", types) == types
    # each expert's bytes in its group tensor are those of its chosen type
    tensors = {t.name: t for t in reader.tensors}
    for layer in range(2):
        key = f"mc2gguf.blk.{layer}.ffn_down_exps.groups"
        types = [e["type"] for e in report["experts"] if e["layer"] == layer]
        if key in fields:
            groups = fields[key].contents()
            for g in set(groups):
                t = tensors[f"blk.{layer}.ffn_down_exps.{g}.weight"]
                members = [types[e] for e in range(4) if groups[e] == g]
                assert {t.tensor_type.name} == set(members)
                assert t.shape[-1] == len(members)
        else:
            assert len(set(types)) == 1


def test_size_budget_gives_a_file_within_the_size(tiny_mixtral, tmp_path):
    out = tmp_path / "m.gguf"
    target = 1_800_000
    assert _convert(tiny_mixtral, out, "--size", str(target), "--palette", K_LADDER, "--eps-method", "rtn") == 0
    assert out.stat().st_size <= target
    assert out.stat().st_size > 0.95 * target


def test_stock_layout_runs_in_unpatched_llama_cpp_layout(tiny_mixtral, tmp_path, llama_build):
    from mc2gguf.llama_runtime import llama_logits

    out = tmp_path / "m.gguf"
    assert _convert(tiny_mixtral, out, "--bpw", "3.2", "--palette", K_LADDER, "--eps-method", "rtn",
                    "--layout", "stock") == 0
    reader = GGUFReader(out)
    assert not [k for k in reader.fields if k.endswith(".groups")]
    names = {t.name for t in reader.tensors}
    assert {f"blk.{i}.ffn_{p}_exps.weight" for i in range(2) for p in ("gate", "up", "down")} <= names
    logits = llama_logits(out, [1, 20, 30, 40, 50])
    assert np.isfinite(logits).all()


def test_eps_decreases_with_bits_for_every_expert(tiny_mixtral, tmp_path):
    out = tmp_path / "m.gguf"
    assert _convert(tiny_mixtral, out, "--bpw", "4", "--palette", K_LADDER, "--dry-run") == 0
    from mc2gguf.workdir import WorkDir  # noqa: F401  (the dry run keeps its measurements)

    records = [p for p in (tmp_path / "m.gguf.mc2gguf-work" / "measure").glob("layer-*.pt")]
    assert len(records) == 2
    import torch

    ladder = K_LADDER.split(",")
    for path in records:
        for (expert, _), eps in torch.load(path, weights_only=False)["eps"].items():
            values = [eps[t] for t in ladder]
            assert all(a > b for a, b in zip(values, values[1:])), (path.name, expert, values)


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_mixtral, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert _convert(tiny_mixtral, out, "--bpw", "3", "--palette", K_LADDER, "--eps-method", "rtn", "--dry-run") == 0
    err = capsys.readouterr().err
    assert "layer   0:" in err and "output file:" in err and "(exact)" in err
    assert not out.exists()


@pytest.mark.parametrize("budget", [["--bpw", "1.0"], ["--bpw", "0.5"], ["--size", "1000"]])
def test_impossible_budget(tiny_mixtral, tmp_path, capsys, budget):
    out = tmp_path / "m.gguf"
    assert _convert(tiny_mixtral, out, *budget, "--palette", K_LADDER, "--eps-method", "rtn") == 1
    err = capsys.readouterr().err
    assert "infeasible" in err or "largest" in err
    assert not out.exists()


@pytest.mark.parametrize("content, message", [
    ("", "holds no text"),
    ('{"txt": "hello"}\n', '"text" field'),
    ("{not json\n", "not valid JSON"),
    ('{"text": "hi"}\n', "too short"),
])
def test_bad_calibration_input(tiny_mixtral, tmp_path, capsys, content, message):
    calib = tmp_path / "calib.jsonl"
    calib.write_text(content)
    out = tmp_path / "m.gguf"
    argv = ["convert", str(tiny_mixtral), str(out), "--bpw", "3", "--calib", str(calib), "--seqlen", "64"]
    assert main(argv) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()
