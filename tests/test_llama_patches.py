"""The llama.cpp patch series, checked through llama.cpp's own test programs on the CPU backend.

(CUDA is checked the same way on a GPU machine; see the README.)
"""

from __future__ import annotations

import re
import subprocess

import pytest


def _run(binary, *args: str) -> str:
    proc = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)  # test-backend-ops colours its verdicts


def test_mul_mat_id_skips_negative_ids(llama_build):
    """Skipped slots (id -1) give exactly-zero rows; the others equal the unskipped computation, with
    1 and 4 threads, the reference and optimized paths, and repacked weights."""
    output = _run(llama_build.binary("test-mul-mat-id-skip"))
    assert output.strip().splitlines()[-1] == "OK"
    cpu = next(line for line in output.splitlines() if line.startswith("CPU:"))
    passed, total = cpu.split()[1].split("/")
    assert passed == total and int(total) > 1000


def test_backend_ops_mul_mat_id_with_skipped_slots(llama_build):
    output = _run(llama_build.binary("test-backend-ops"), "-b", "CPU", "-o", "MUL_MAT_ID")
    summary = [line for line in output.splitlines() if "tests passed" in line]
    assert summary, output[-2000:]
    passed, total = summary[-1].split()[0].split("/")
    assert passed == total and int(total) > 1000
    assert "Backend CPU: OK" in output


def test_fused_moe_ops_equal_their_composition(llama_build):
    """MUL_MAT_ID_MULTI equals the sum of per-group MUL_MAT_IDs, MOE_PRUNE and MOE_PRUNE_WEIGHTS equal the rule
    written with ordinary ops, bit for bit on the CPU (1 and 4 threads, reference and optimized paths)."""
    output = _run(llama_build.binary("test-moe-fused"))
    assert output.strip().splitlines()[-1] == "OK", output[-3000:]
    cpu = next(line for line in output.splitlines() if line.startswith("CPU:"))
    passed, total = cpu.split()[1].split("/")
    assert passed == total and int(total) > 500


@pytest.mark.parametrize("op", ["MUL_MAT_ID_MULTI", "MOE_PRUNE_WEIGHTS"])
def test_backend_ops_fused_moe(llama_build, op):
    output = _run(llama_build.binary("test-backend-ops"), "-b", "CPU", "-o", op)
    summary = [line for line in output.splitlines() if "tests passed" in line]
    assert summary, output[-2000:]
    passed, total = summary[-1].split()[0].split("/")
    assert passed == total and int(total) >= 20
    assert "Backend CPU: OK" in output
