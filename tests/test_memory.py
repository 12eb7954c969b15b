"""Conversion streams: a checkpoint larger than the process's memory cap still converts.

The child process caps its address space (RLIMIT_AS) at its size after imports plus CAP, a bit more than
one layer of the test model, then converts a model about twice CAP in size.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mc2gguf.testmodel import TinyMixtralConfig, build_tiny_mixtral

CONFIG = TinyMixtralConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=2, num_local_experts=8)
LAYER_BYTES = 4 * (3 * 8 * 1024 * 2048 + 2 * 1024 * 1024 + 2 * 256 * 1024)  # fp32 experts + attention
CAP = 2 * LAYER_BYTES

CHILD = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    from mc2gguf.convert import convert
    from mc2gguf.quant.types import quant_type
    from mc2gguf.gguf.upstream import upstream_metadata

    src, out, cap = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    upstream_metadata(src)  # runs llama.cpp's converter in a subprocess; cached for convert() below
    vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + cap, vm + cap))
    convert(src, out, quant_type(sys.argv[4]))
""")


def test_conversion_fits_a_memory_cap_smaller_than_the_model(tmp_path, tokenizer_model):
    model = build_tiny_mixtral(tmp_path / "model", tokenizer_model, config=CONFIG)
    model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    assert model_bytes > 2 * CAP
    out = tmp_path / "out.gguf"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out), str(CAP), "Q8_0"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.stat().st_size > model_bytes / 4  # Q8_0 of an fp32 model: about 0.27x


def pmq_config(layers: int) -> TinyMixtralConfig:
    return TinyMixtralConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=layers, num_attention_heads=8,
                             num_key_value_heads=2, num_local_experts=4)


# One layer of PMQ's working set: fp32 weights, float32 Hessians (gate/up share one); the activations of
# 2 x 64 calibration tokens are negligible.
PMQ_LAYER_BYTES = 4 * (3 * 4 * 512 * 1024 + 4 * 512 * 512) + 4 * 4 * (512 * 512 + 1024 * 1024)
# GPTQ of a down projection on top of it: its Hessian in float64, the Cholesky factor and its inverse.
PMQ_GPTQ_BYTES = 3 * 8 * 1024 * 1024

PMQ_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from mc2gguf.text import load_calibration
    from mc2gguf.cli import main

    status = lambda key: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
    src, out, calib = sys.argv[1:4]
    main(["convert", src, out + ".warmup", "--type", "Q4_0"])  # imports, upstream metadata, allocator warm-up
    load_calibration(Path(src), [Path(calib)], 2, 64, 0)  # a cost that does not grow with the model: transformers
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current RSS
    base = status("VmRSS")
    code = main(["convert", src, out, "--bpw", "6", "--palette", "Q4_0,Q8_0", "--eps-method", "rtn",
                 "--calib", calib, "--nsamples", "2", "--seqlen", "64", "--eps-tokens", "64"])
    print("rss-growth", status("VmHWM") - base, flush=True)
    sys.exit(code)
""")


def _pmq_peak_growth(tmp_path: Path, tokenizer_model, layers: int) -> tuple[int, int]:
    """PMQ's peak RSS growth converting a test model of ``layers`` layers, and the model's size."""
    model = build_tiny_mixtral(tmp_path / f"model-{layers}", tokenizer_model, config=pmq_config(layers))
    model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    return _pmq_peak_growth_of(model, tmp_path), model_bytes


def _pmq_peak_growth_of(model: Path, tmp_path: Path) -> int:
    calib = Path(__file__).resolve().parents[2] / "shared" / "data" / "c4" / "c4-sample.jsonl"
    # glibc serves a block below its mmap threshold from the heap, where it stays resident once freed while other
    # blocks sit above it; the threshold adapts up to 32 MiB, above this model's tensors (2 to 8 MiB) and far
    # below a real model's, which get mappings of their own. Fixed low, the test model's blocks do too, and the
    # growth measures what PMQ holds rather than where the heap happened to place them.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
    out = tmp_path / f"out-{model.name}.gguf"
    proc = subprocess.run([sys.executable, "-c", PMQ_CHILD, str(model), str(out), str(calib)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split("rss-growth")[1].split()[0])


def test_pmq_peak_memory_is_about_one_layer(tmp_path, tokenizer_model):
    """PMQ holds one layer (weights, Hessians, activations) and one GPTQ at a time: its peak RSS growth does not
    grow with the number of layers (8 more layers, 213 MiB of weights, add less than one layer's working set),
    and it stays within twice one layer's working set plus a fixed part (torch code run for the first time, the
    records, per-thread buffers), below the model. Measured on 2 cores: 147 MiB with 4 layers, 144 MiB with 12;
    a bound of twice one layer alone (144 MiB) failed by a few MiB with 2 threads.

    The peak is the child's own VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a
    child forked from a large pytest process reports the parent's RSS (296 to 376 MiB of "growth" after the test
    above, 100 MiB alone)."""
    small, _ = _pmq_peak_growth(tmp_path, tokenizer_model, 4)
    large, model_bytes = _pmq_peak_growth(tmp_path, tokenizer_model, 12)
    layer = PMQ_LAYER_BYTES + PMQ_GPTQ_BYTES
    print(f"PMQ peak RSS growth {small / 2**20:.0f} MiB with 4 layers, {large / 2**20:.0f} MiB with 12 layers "
          f"(model {model_bytes / 2**20:.0f} MiB); one layer's working set {PMQ_LAYER_BYTES / 2**20:.0f} MiB, "
          f"with GPTQ's {layer / 2**20:.0f} MiB")
    assert large - small < PMQ_LAYER_BYTES
    assert large < 2 * layer + (96 << 20) < model_bytes


# Many small experts in a wide model (DeepSeek's and Qwen3's shape): a layer's Hessians, 32 x (1024^2 + 128^2)
# floats = 130 MiB, are far more than its weights (32 x 3 x 1024 x 128 floats = 48 MiB).
MANY_EXPERTS = TinyMixtralConfig(hidden_size=1024, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                                 num_key_value_heads=2, num_local_experts=32)
MANY_LAYER_WEIGHT_BYTES = 4 * (3 * 32 * 1024 * 128 + 2 * 1024 * 1024 + 2 * 256 * 1024)
MANY_EXPERT_HESSIAN_BYTES = 4 * (1024 * 1024 + 128 * 128)


def test_pmq_holds_one_experts_hessians_at_a_time(tmp_path, tokenizer_model):
    """PMQ's per-expert calibration is made one expert at a time (pmq/calibrate.py ``ExpertCalibrations``): with 32
    experts whose Hessians (130 MiB a layer) outweigh their weights, the peak RSS growth stays below the layer's
    weights, a few experts' Hessians, one GPTQ of the widest matrix and the fixed part of the test above, far
    below what holding every expert's Hessians would need. Measured 2026-12-08 on 2 cores: 135 MiB (bound 184);
    258 MiB before, when a layer's calibration held every expert's Hessians and hidden activations."""
    model = build_tiny_mixtral(tmp_path / "model-many", tokenizer_model, config=MANY_EXPERTS)
    growth = _pmq_peak_growth_of(model, tmp_path)
    every_hessian = 32 * MANY_EXPERT_HESSIAN_BYTES
    bound = MANY_LAYER_WEIGHT_BYTES + 4 * MANY_EXPERT_HESSIAN_BYTES + 3 * 8 * 1024 * 1024 + (96 << 20)
    print(f"PMQ peak RSS growth {growth / 2**20:.0f} MiB with 32 experts; bound {bound / 2**20:.0f} MiB; every "
          f"expert's Hessians {every_hessian / 2**20:.0f} MiB")
    assert growth < bound < MANY_LAYER_WEIGHT_BYTES + every_hessian + (96 << 20)
