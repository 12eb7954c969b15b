"""PMQ, pre-loading mixed-precision quantization: ``mc2gguf convert SRC OUT --bpw B`` (or ``--size S``).

The stages, one module each, data flowing one way:

1. ``calibrate``: the calibration windows, and per layer (the full-precision model run one layer at a time,
   ``traversal``) significance (phi, w), ODP statistics and the experts' Hessians;
2. ``measure``: eps per expert unit and candidate type, with the quantizer that writes the file;
3. ``allocate``: the integer program over all layers;
4. ``quantize``: GPTQ of every expert projection onto its chosen type; attention and other non-expert matrices
   in ``--attn-type``;
5. ``write``: the GGUF with per-expert types (``docs/gguf-layout.md``), and ``report`` beside it.

Stages 1-2 and 4 checkpoint every layer in a work directory, so an interrupted run resumes; the result is
byte-identical to an uninterrupted one. Stages 1-2 do not depend on the budget or the layout: a ``--work-dir``
given by the user keeps its measurements, and conversions to other budgets from it start at stage 3. Where the
eps stage quantized with the writer's own GPTQ (not in sequential mode), its packed bytes are kept beside the
measurements if the disk has room, and stage 4 picks the chosen ones instead of quantizing again.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..archs import Role, adapter_for, type_group_architectures
from ..checkpoint import Checkpoint
from ..errors import Mc2ggufError
from ..gguf.writer import TensorPayload, atomic_output, expected_file_size, write_gguf
from ..quant.plan import uniform_plan
from ..quant.types import quant_type
from .allocate import Allocation, AllocationUnit, Objective, allocate, allocation_units, expert_types
from .calibrate import calibration_set
from .measure import measure_layers
from .options import MEASURE_OPTIONS, PMQOptions
from .quantize import encoded_non_expert, quantize_layers
from .traversal import WorkDir
from .write import file_layout

__all__ = ["Objective", "PMQOptions", "PMQResult", "run_pmq"]


@dataclass
class PMQResult:
    out: Path | None
    size: int
    allocation: Allocation
    report: dict


def run_pmq(src: Path, out: Path, opts: PMQOptions, force: bool = False, dry_run: bool = False,
            work_dir: Path | None = None) -> PMQResult:
    """``work_dir`` (default ``OUT.mc2gguf-work``, removed when the file is complete) keeps the per-layer records;
    one given here keeps its measurements for conversions of the same model to other budgets and layouts."""
    from .report import write_report

    for path in opts.calib:  # before the fingerprint reads them
        if not Path(path).is_file():
            raise Mc2ggufError(f"calibration text {path} is not a file")
    checkpoint = Checkpoint(src)
    adapter = adapter_for(checkpoint)
    if opts.layout == "mixed" and not adapter.type_groups_in_llama:
        raise Mc2ggufError(f"per-expert type groups are read by the patched llama.cpp for "
                           f"{', '.join(type_group_architectures())} only; use --layout stock for "
                           f"{adapter.gguf_architecture}")
    out = Path(out)
    if out.exists() and not force and not dry_run:
        raise Mc2ggufError(f"{out} exists; pass --force to overwrite it")
    if (opts.bpw is None) == (opts.size is None):
        raise Mc2ggufError("give exactly one budget: --bpw or --size")
    root = Path(work_dir or out.with_name(out.name + ".mc2gguf-work"))
    work = WorkDir(root, opts.fingerprint(checkpoint, MEASURE_OPTIONS))
    cal = calibration_set(checkpoint.path, opts, work)
    records = measure_layers(adapter, cal, opts, work)
    units = allocation_units(records, adapter.expert_shapes())
    base_plan = uniform_plan(adapter.tensors(), quant_type(opts.attn_type))

    def layout(allocation: Allocation):
        return file_layout(adapter, checkpoint, expert_types(allocation, units), base_plan, records, cal, opts,
                           allocation)

    def file_size(allocation: Allocation) -> int:
        payloads, metadata, _ = layout(allocation)
        return expected_file_size(adapter.gguf_architecture, metadata, payloads)

    fixed = sum(p.nbytes for p in base_plan.tensors if p.spec.role is not Role.EXPERTS)
    allocation = allocate(units, opts, fixed, file_size)
    types = expert_types(allocation, units)
    payloads, metadata, expert_source = layout(allocation)
    size = expected_file_size(adapter.gguf_architecture, metadata, payloads)
    report = {"records": records, "units": units, "allocation": allocation, "size": size, "calibration": cal.source}
    print(_plan_text(units, allocation, size, opts.speed_reference), file=sys.stderr)
    if dry_run:
        return PMQResult(None, size, allocation, report)
    non_expert = {}
    for plan in base_plan.tensors:
        if plan.spec.role in (Role.ATTENTION, Role.SHARED_EXPERT, Role.DENSE_FFN):
            non_expert.setdefault(plan.spec.layer, []).append(plan)
    quantized_work = WorkDir(root / "quantize", opts.fingerprint(checkpoint), replace_other=True)
    quantize_layers(adapter, cal, types, non_expert, opts, work, quantized_work)
    by_name = {p.spec.name: p for p in base_plan.tensors}
    loaded: dict[int, dict] = {}

    def quantized(layer: int) -> dict:  # the file is written layer by layer: keep one layer's bytes
        if layer not in loaded:
            loaded.clear()
            loaded[layer] = quantized_work.load("layers", f"layer-{layer:03d}")
        return loaded[layer]

    def produce(payload: TensorPayload) -> np.ndarray:
        if payload.name in expert_source:
            layer, proj, members = expert_source[payload.name]
            return np.stack([quantized(layer)[e, proj] for e in members])
        return encoded_non_expert(by_name[payload.name], work)

    with atomic_output(out, force, size) as tmp:
        write_gguf(tmp, adapter.gguf_architecture, metadata, payloads, produce)
    write_report(out, report)
    quantized_work.remove()
    if work_dir is None:
        work.remove()
    else:
        print(f"note: the measurements stay in {root} for conversions to other budgets", file=sys.stderr)
    return PMQResult(out, size, allocation, report)


def _plan_text(units: list[AllocationUnit], allocation: Allocation, size: int, speed_reference: str) -> str:
    layers = sorted({u.layer for u in units})
    lines = ["plan (experts' types per layer):"]
    for layer in layers:
        row = [f"{u.expert}{''.join(p[0] for p in u.projections) if len(u.projections) < 3 else ''}:"
               f"{allocation.types[u.key].name}" for u in units if u.layer == layer]
        lines.append(f"  layer {layer:3d}: " + " ".join(row))
    n_weights = sum(u.n_weights for u in units)
    lines.append(f"experts: {allocation.expert_bytes:,} bytes = {8 * allocation.expert_bytes / n_weights:.4f} bits/weight")
    if allocation.speed is not None:
        lines.append(f"experts' predicted decode speed: {allocation.speed:.3f}x all-{speed_reference} experts")
    lines.append(f"output file: {size:,} bytes (exact)")
    return "\n".join(lines)
