"""``mc2gguf convert``: checkpoint -> plan -> quantize -> GGUF, streamed one tensor at a time."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFValueType, GGUFWriter, LlamaFileType, size_label
from tqdm import tqdm

from . import quant
from .allocate import Plan, TensorPlan, uniform_plan
from .archs import adapter_for
from .checkpoint import Checkpoint
from .gguf_out import KeyValue, TensorPayload, atomic_output, expected_file_size, write_gguf
from .qtypes import QuantType
from .upstream import upstream_metadata


@dataclass(frozen=True)
class ConvertResult:
    out: Path
    size: int
    plan: Plan


def encode_tensor(plan: TensorPlan) -> np.ndarray:
    """Load one tensor and quantize it: ``[..., row_bytes]`` uint8 (experts one at a time)."""
    weights = plan.spec.load()
    if weights.ndim == 1:
        return quant.quantize(weights[None, :], plan.qtype)[0]
    if weights.ndim == 2:
        return quant.quantize(weights, plan.qtype)
    return np.stack([quant.quantize(w, plan.qtype) for w in weights])


def _payload(plan: TensorPlan) -> TensorPayload:
    return TensorPayload(plan.spec.name, plan.spec.shape, plan.qtype.ggml_type, plan.nbytes)


def model_metadata(model_dir: Path, arch: str, payloads: list[TensorPayload], file_type: LlamaFileType):
    """Upstream's key/values, with the two that depend on the written tensors filled in as upstream would."""
    upstream = upstream_metadata(model_dir)
    counter = GGUFWriter(None, arch)
    for p in payloads:
        counter.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.ggml_type)
    total, shared, expert, n_experts = counter.get_total_parameter_count()
    derived = {
        "general.file_type": KeyValue("general.file_type", int(file_type), GGUFValueType.UINT32),
        "general.size_label": KeyValue(
            "general.size_label", size_label(total, shared, expert, n_experts), GGUFValueType.STRING
        ),
    }
    merged = [derived.pop(kv.key, kv) for kv in upstream]
    return merged + list(derived.values())


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
