"""``mc2gguf convert``: checkpoint -> plan -> quantize -> GGUF, streamed one tensor at a time."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .quant.plan import Plan, TensorPlan, encode_tensor, uniform_plan
from .archs import adapter_for
from .checkpoint import Checkpoint
from .gguf.writer import TensorPayload, atomic_output, expected_file_size, write_gguf
from .quant.types import QuantType
from .gguf.upstream import model_metadata


@dataclass(frozen=True)
class ConvertResult:
    out: Path
    size: int
    plan: Plan


def _payload(plan: TensorPlan) -> TensorPayload:
    return TensorPayload(plan.spec.name, plan.spec.shape, plan.qtype.ggml_type, plan.nbytes)


def convert(src: Path, out: Path, qtype: QuantType, force: bool = False) -> ConvertResult:
    checkpoint = Checkpoint(src)
    adapter = adapter_for(checkpoint)
    plan = uniform_plan(adapter.tensors(), qtype)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    payloads = [_payload(t) for t in plan.tensors]
    metadata = model_metadata(checkpoint.path, adapter.gguf_architecture, payloads, qtype.file_type)
    size = expected_file_size(adapter.gguf_architecture, metadata, payloads)
    by_name = {t.spec.name: t for t in plan.tensors}
    with atomic_output(out, force, size) as tmp, torch.inference_mode():
        with tqdm(total=len(payloads), unit="tensor", desc="convert", file=sys.stderr) as bar:

            def progress(p: TensorPayload) -> None:
                bar.set_postfix_str(p.name, refresh=False)
                bar.update()

            write_gguf(tmp, adapter.gguf_architecture, metadata, payloads,
                       lambda p: encode_tensor(by_name[p.name]), progress)
    return ConvertResult(Path(out), size, plan)
