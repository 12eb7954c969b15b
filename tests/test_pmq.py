"""PMQ end to end on a tiny seeded Mixtral: calibration, eps, allocation, GPTQ, layout, resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from mc2gguf.cli import main
from mc2gguf.gguf.reader import read_tensor
from mc2gguf.quant.types import quant_type

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
    quantiles = np.array(fields["mc2gguf.odp.router_norm_quantiles"].contents()).reshape(2, 101)
    assert (np.diff(quantiles, axis=1) >= 0).all() and quantiles[:, 0].min() > 0
    protect_norm = np.array(fields["mc2gguf.odp.protect_norm"].contents())  # exceeded by 2 % (the default ratio)
    assert (quantiles[:, 97] <= protect_norm).all() and (protect_norm <= quantiles[:, 99]).all()
    assert "files: c4-sample.jsonl" in fields["mc2gguf.calibration.source"].contents()
    assert fields["mc2gguf.calibration.n_tokens"].contents() == 4 * 64
    assert out.with_name(out.name + ".report.png").stat().st_size > 10_000
    from mc2gguf.gguf.inspect import summarize

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
    from mc2gguf.llama.runtime import llama_logits

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
    from mc2gguf.pmq.traversal import WorkDir  # noqa: F401  (the dry run keeps its measurements)

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


def test_resume_after_kill_is_byte_identical(tiny_mixtral, tmp_path):
    argv = [sys.executable, "-m", "mc2gguf.cli", "convert", str(tiny_mixtral), "OUT", *SMALL, "--bpw", "4.5",
            "--palette", "Q3_K,Q4_K,Q6_K", "--eps-method", "rtn", "--sequential"]
    reference = tmp_path / "ref.gguf"
    subprocess.run([a if a != "OUT" else str(reference) for a in argv], check=True, capture_output=True)
    out = tmp_path / "resumed.gguf"
    work = tmp_path / "resumed.gguf.mc2gguf-work"
    proc = subprocess.Popen([a if a != "OUT" else str(out) for a in argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (work / "quantize" / "layers" / "layer-000.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    subprocess.run([a if a != "OUT" else str(out) for a in argv], check=True, capture_output=True)
    assert out.read_bytes() == reference.read_bytes()
    assert not work.exists()


def test_resume_after_kills_at_random_moments(tiny_mixtral, tmp_path):
    """Two seeded SIGKILL moments anywhere in a run (calibration, eps, allocation, quantization, writing), each
    resumed: byte-identical to the uninterrupted file (``python3 tests/kill_resume.py --points 10`` runs more)."""
    from kill_resume import soak

    from mc2gguf.paths import C4_SAMPLE

    identical, interrupted = soak(tiny_mixtral, C4_SAMPLE, tmp_path, points=2, seed=1)
    assert identical == interrupted > 0


def test_measurements_serve_other_budgets(tiny_mixtral, tmp_path, monkeypatch):
    """A --work-dir keeps the measurements (and the eps stage's GPTQ bytes, and the non-expert tensors' bytes): a
    second budget from it measures and quantizes nothing again, and its file is byte-identical to a conversion
    that measured and quantized from scratch."""
    import mc2gguf.pmq.measure

    work = tmp_path / "work"
    fast = ["--palette", "Q3_K,Q4_K,Q6_K", "--eps-tokens", "64"]
    assert _convert(tiny_mixtral, tmp_path / "a.gguf", "--bpw", "4", *fast, "--work-dir", str(work)) == 0
    records = sorted((work / "measure").glob("*.pt"))
    assert [p.name for p in records] == [f"candidates-{i:03d}-{t}.pt" for i in range(2) for t in ("Q3_K", "Q4_K", "Q6_K")] \
        + ["layer-000.pt", "layer-001.pt"]
    records += sorted((work / "tensors").glob("*.pt"))  # the non-expert tensors' bytes, for every budget
    assert any(p.name.startswith("blk.0.attn_q.weight") for p in records)
    measured = {p: p.stat().st_mtime_ns for p in records}
    assert _convert(tiny_mixtral, tmp_path / "b.gguf", "--bpw", "5", *fast, "--work-dir", str(work)) == 0
    assert {p: p.stat().st_mtime_ns for p in records} == measured
    assert not (work / "quantize").exists()
    monkeypatch.setattr(mc2gguf.pmq.measure, "keeps_candidates", lambda *args: False)
    assert _convert(tiny_mixtral, tmp_path / "c.gguf", "--bpw", "5", *fast) == 0
    assert not (tmp_path / "c.gguf.mc2gguf-work").exists()
    assert (tmp_path / "b.gguf").read_bytes() == (tmp_path / "c.gguf").read_bytes()
    assert (tmp_path / "a.gguf").read_bytes() != (tmp_path / "b.gguf").read_bytes()


def test_written_experts_dequantize_to_what_gptq_produced(tiny_mixtral, tmp_path):
    """The file's expert bytes are GPTQ's output for the chosen type (not a re-quantization)."""
    import torch

    from mc2gguf.archs import adapter_for
    from mc2gguf.text import load_calibration
    from mc2gguf.pmq.calibrate import calibrate_layer
    from mc2gguf.checkpoint import Checkpoint
    from mc2gguf.quant.gptq import gptq_quantize

    out = tmp_path / "m.gguf"
    assert _convert(tiny_mixtral, out, "--bpw", "3", "--palette", K_LADDER, "--eps-method", "rtn") == 0
    report = _report(out)
    adapter = adapter_for(Checkpoint(tiny_mixtral))
    cal = load_calibration(tiny_mixtral, [C4], 4, 64, 0)
    layer = adapter.load_layer(0)
    with torch.inference_mode():
        _, calibration = calibrate_layer(adapter, layer, adapter.embed(cal.tokens), 0, 0)
    expert = 2
    qtype = quant_type(next(e["type"] for e in report["experts"] if e["layer"] == 0 and e["expert"] == expert))
    expected = gptq_quantize(layer.experts[expert].down, calibration.experts[expert].hessians["down"], qtype)
    reader = GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    key = "mc2gguf.blk.0.ffn_down_exps.groups"
    if key in reader.fields:
        groups = list(reader.fields[key].contents())
        g = groups[expert]
        stored = read_tensor(tensors[f"blk.0.ffn_down_exps.{g}.weight"])[groups[:expert].count(g)]
    else:
        stored = read_tensor(tensors["blk.0.ffn_down_exps.weight"])[expert]
    assert torch.equal(stored, expected.weights)


def test_without_calibration_text_the_model_samples_its_own(tiny_mixtral, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    argv = ["convert", str(tiny_mixtral), str(out), "--bpw", "3", "--palette", K_LADDER, "--eps-method", "rtn",
            "--nsamples", "2", "--seqlen", "32", "--eps-tokens", "32"]
    assert main(argv) == 0
    assert "samples itself" in capsys.readouterr().err
    fields = GGUFReader(out).fields
    assert "self-sampled" in fields["mc2gguf.calibration.source"].contents()
    assert fields["mc2gguf.calibration.n_tokens"].contents() == 64


def test_odp_thresholds_are_those_eval_calibrates(tiny_mixtral, tmp_path):
    """One definition of ODP's thresholds: on the same calibration windows, the mu and protection norms that
    `convert` writes (and that the bench reads from its files) equal what `eval --calibrate-odp` computes."""
    from mc2gguf.evaluate import EvalModel, calibrate_odp

    out = tmp_path / "m.gguf"
    assert _convert(tiny_mixtral, out, "--bpw", "3", "--palette", K_LADDER, "--eps-method", "rtn",
                    "--protect-ratio", "0.05", "--seed", "3") == 0
    fields = GGUFReader(out).fields
    params = calibrate_odp(EvalModel(tiny_mixtral), [C4], protect_ratio=0.05, nsamples=4, seqlen=64, seed=3).params
    assert np.allclose(fields["mc2gguf.odp.mu"].contents(), params.mu, rtol=1e-5, atol=0)
    assert np.allclose(fields["mc2gguf.odp.protect_norm"].contents(), params.protect_norm, rtol=1e-5, atol=0)
    assert float(fields["mc2gguf.odp.protect_ratio"].contents()) == pytest.approx(0.05)


def test_full_disk_in_the_work_directory_then_resume(tiny_mixtral, tmp_path, capsys, monkeypatch):
    """The disk fills while PMQ writes its work directory (the third record): a clear error, no output, nothing
    half-written taken as done; with space back the same command resumes to the uninterrupted run's bytes."""
    import errno

    import torch

    import mc2gguf.pmq.traversal as traversal

    args = [*SMALL, "--bpw", "4.5", "--palette", "Q3_K,Q4_K,Q6_K", "--eps-method", "rtn"]
    assert _convert(tiny_mixtral, tmp_path / "ref.gguf", *args) == 0
    real_save, calls = torch.save, []

    def save(obj, path, *a, **kw):
        calls.append(path)
        if len(calls) == 3:
            Path(path).write_bytes(b"partial")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(traversal.torch, "save", save)
    out = tmp_path / "out.gguf"
    capsys.readouterr()
    assert _convert(tiny_mixtral, out, *args) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "run the same command again to resume" in err
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))
    monkeypatch.setattr(traversal.torch, "save", real_save)
    assert _convert(tiny_mixtral, out, *args) == 0
    assert out.read_bytes() == (tmp_path / "ref.gguf").read_bytes()
