"""PMQ, pre-loading mixed-precision quantization: ``mc2gguf convert SRC OUT --bpw B`` (or ``--size S``).

1. measure (layer by layer, full precision): significance (phi, w), ODP statistics, Hessians, eps per
   expert unit and candidate type (``calibrate.py``, ``sensitivity.py``);
2. allocate: the integer program over all layers (``allocate.py``);
3. quantize (layer by layer): GPTQ of every expert projection onto its chosen type with the Hessian of the
   tokens routed to it; attention and other non-expert matrices in ``--attn-type``. In sequential mode a
   layer is calibrated on the outputs of the already-quantized earlier layers;
4. write the GGUF with per-expert types (``docs/gguf-layout.md``) and the report beside it.

Stages 1 and 3 checkpoint every layer in a work directory, so an interrupted run resumes; the result is
byte-identical to an uninterrupted one. Stage 1 does not depend on the budget or the layout: a ``--work-dir``
given by the user keeps its measurements, and conversions to other budgets from it start at stage 2. Where the
eps stage quantized with the writer's own GPTQ (not in sequential mode), its packed bytes are kept beside the
measurements if the disk has room, and stage 3 picks the chosen ones instead of quantizing again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFValueType, LlamaFileType
from tqdm import tqdm

from . import __version__, quant
from .allocate import (Allocation, AllocationUnit, Objective, TensorPlan, reachable_bytes, solve_allocation,
                       uniform_plan)
from .archs import PROJECTIONS, ArchAdapter, Role, adapter_for
from .calib_data import CalibrationSet, load_calibration, self_sampled_calibration
from .calibrate import NORM_QUANTILES, calibrate_layer
from .checkpoint import Checkpoint
from .convert import encode_tensor, model_metadata
from .errors import Mc2ggufError
from .gguf_out import KeyValue, TensorPayload, atomic_output, expected_file_size, write_gguf
from .gptq import GPTQ
from .qtypes import DEFAULT_PALETTE, QuantType, quant_type
from .sensitivity import measure_eps, quantizer, unit_projections
from .workdir import WorkDir

EXPERT_TENSOR = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}
# the options stage 1 (calibration, significance, eps) depends on
MEASURE_OPTIONS = ("calib", "nsamples", "seqlen", "seed", "palette", "granularity", "tie_gate_up", "eps_method",
                   "eps_tokens", "damp", "act_order")


@dataclass(frozen=True)
class PMQOptions:
    calib: tuple[Path, ...] = ()
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    bpw: float | None = None
    size: int | None = None
    palette: tuple[str, ...] = DEFAULT_PALETTE
    objective: Objective = field(default_factory=Objective)
    per_layer_budget: bool = False
    granularity: str = "expert"
    tie_gate_up: bool = True
    layout: str = "mixed"
    attn_type: str = "Q4_K"
    eps_method: str = "gptq"
    eps_tokens: int = 4096
    sequential: bool = False
    act_order: bool = False
    damp: float = 0.01
    protect_ratio: float = 0.02

    def fingerprint(self, checkpoint: Checkpoint, options: tuple[str, ...] | None = None) -> dict:
        """Everything the output depends on (or, given ``options``, a stage that reads only those): options,
        input files' identity, mc2gguf version."""
        files = sorted(p for p in checkpoint.path.iterdir() if p.is_file())
        calib = [str(Path(p).resolve()) for p in self.calib]
        values = {**asdict(self), "calib": calib}
        return {
            "mc2gguf": __version__,
            "options": {k: values[k] for k in options} if options else values,
            "model": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
            "calib": {c: hashlib.sha256(Path(c).read_bytes()).hexdigest() for c in calib},
        }


@dataclass
class PMQResult:
    out: Path | None
    size: int
    allocation: Allocation
    report: dict


def _expert_shapes(adapter: ArchAdapter) -> dict[str, tuple[int, int]]:
    specs = {s.name: s for s in adapter.tensors() if s.role is Role.EXPERTS and s.layer == 0}
    return {p: tuple(specs[f"blk.0.{EXPERT_TENSOR[p]}.weight"].shape[1:]) for p in PROJECTIONS}


# --- stage 1: measure ----------------------------------------------------------------------------------


def _calibration(src: Path, opts: PMQOptions, work: WorkDir) -> CalibrationSet:
    if work.has("calib", "tokens"):
        return work.load("calib", "tokens")
    if opts.calib:
        cal = load_calibration(src, list(opts.calib), opts.nsamples, opts.seqlen, opts.seed)
    else:
        cal = self_sampled_calibration(src, opts.nsamples, opts.seqlen, opts.seed)
    work.save("calib", "tokens", cal)
    return cal


def _layer_pass(adapter: ArchAdapter, cal: CalibrationSet, work: WorkDir, stage: str, step, desc: str) -> None:
    """Run ``step(layer_index, h) -> (h_next, record)`` over the layers, checkpointing each one."""
    n = adapter.moe.n_layers
    done = [i for i in range(n) if work.has(stage, f"layer-{i:03d}")]
    start = len(done)
    if start == n:  # finished before the interruption (its last hidden state is already discarded)
        return
    h = work.load(stage, f"hidden-{start - 1:03d}") if start else adapter.embed(cal.tokens)
    with tqdm(total=n, initial=start, unit="layer", desc=desc, file=sys.stderr) as bar:
        for i in range(start, n):
            h, record = step(i, h)
            work.save(stage, f"hidden-{i:03d}", h)
            work.save(stage, f"layer-{i:03d}", record)
            del record  # not held through the next layer's step (a quantized record is a layer's bytes)
            work.discard(stage, f"hidden-{i - 1:03d}")
            bar.update()
    work.discard(stage, f"hidden-{n - 1:03d}")


def _keeps_candidates(adapter: ArchAdapter, opts: PMQOptions, palette: list[QuantType], work: WorkDir) -> bool:
    """Whether the eps stage keeps its packed bytes for stage 3: only where they are what stage 3 would write
    (the writer's GPTQ on the same Hessians: not in sequential mode, which calibrates on quantized layers), and
    only where they fit in half the free disk (every palette type of every expert: 1.3 GB on disk for the
    reference MoE, well over 100 GB for a Mixtral 8x7B)."""
    if opts.eps_method != "gptq" or opts.sequential:
        return False
    shapes = _expert_shapes(adapter).values()
    per_expert = sum(rows * t.row_bytes(cols) for t in palette if all(t.fits(c) for _, c in shapes) for rows, cols in shapes)
    return per_expert * adapter.moe.n_experts * adapter.moe.n_layers < shutil.disk_usage(work.path).free // 2


def _candidates_record(layer: int, qtype: QuantType) -> str:
    return f"candidates-{layer:03d}-{qtype.name}"


def measure(adapter: ArchAdapter, cal: CalibrationSet, opts: PMQOptions, work: WorkDir) -> list[dict]:
    palette = [quant_type(t) for t in opts.palette]
    units = unit_projections(opts.granularity, opts.tie_gate_up)
    quantize = quantizer(opts.eps_method, opts.damp, opts.act_order)
    keep = _keeps_candidates(adapter, opts, palette, work)

    def step(i: int, h: torch.Tensor):
        layer = adapter.load_layer(i)
        candidates = {} if keep else None
        with torch.inference_mode():
            h, calibration = calibrate_layer(adapter, layer, h, opts.eps_tokens, opts.seed)
            eps = measure_eps(adapter, layer, calibration, units, palette, quantize, candidates)
        if keep:  # before the layer's record, which marks the layer done
            for t in palette:  # one record per type: a file reads back only the types it chose
                work.save("measure", _candidates_record(i, t), candidates.get(t.name, {}))
        if calibration.unused_experts:
            print(f"note: layer {i}: no calibration token selects expert(s) {calibration.unused_experts}; "
                  "they are measured on all of the layer's tokens", file=sys.stderr)
        return h, {**calibration.significance(), "eps": eps}

    _layer_pass(adapter, cal, work, "measure", step, "measure")
    return [work.load("measure", f"layer-{i:03d}") for i in range(adapter.moe.n_layers)]


# --- stage 2: allocate ---------------------------------------------------------------------------------


def allocation_units(records: list[dict], shapes: dict[str, tuple[int, int]]) -> list[AllocationUnit]:
    units = []
    for rec in records:
        for (e, projs), eps in sorted(rec["eps"].items()):
            units.append(AllocationUnit(rec["layer"], e, projs, tuple(shapes[p] for p in projs),
                                        rec["phi"][e], rec["mean_weight"][e], eps))
    return units


def expert_types(allocation: Allocation, units: list[AllocationUnit]) -> dict[tuple[int, int, str], QuantType]:
    """``{(layer, expert, projection): type}`` from the allocation of units."""
    return {(u.layer, u.expert, p): allocation.types[u.key] for u in units for p in u.projections}


# --- stage 3: quantize ---------------------------------------------------------------------------------


def encoded_non_expert(plan: TensorPlan, measured: WorkDir) -> np.ndarray:
    """The bytes of a non-expert tensor (attention, embeddings, output). They depend on the checkpoint and the
    tensor's type alone, not on the budget or the layout, so they are kept beside the measurements: other budgets
    and layouts take them instead of quantizing again (45 s of a file's 86 s on the reference MoE)."""
    key = f"{plan.spec.name}.{plan.qtype.name}"
    if measured.has("tensors", key):
        return measured.load("tensors", key)
    data = encode_tensor(plan)
    measured.save("tensors", key, data)
    return data


def quantize_layers(adapter: ArchAdapter, cal: CalibrationSet, types: dict, non_expert, opts: PMQOptions,
                    measured: WorkDir, work: WorkDir) -> None:
    """GPTQ every expert projection onto its type (or take the eps stage's bytes of it). The bytes go to the work
    directory, one record ``{(expert, projection): bytes}`` per layer (the GGUF writer reads them back one layer
    at a time); the other matrices' bytes are ``encoded_non_expert``'s, in sequential mode too."""
    n = adapter.moe.n_layers
    records = {(i, t): _candidates_record(i, t) for (i, _, _), t in types.items()}
    if not opts.sequential and all(measured.has("measure", r) for r in records.values()):
        for i in tqdm(range(n), unit="layer", desc="quantize (from the eps stage)", file=sys.stderr):
            if work.has("layers", f"layer-{i:03d}"):
                continue
            candidates = {t: measured.load("measure", r) for (layer, t), r in records.items() if layer == i}
            experts = {(e, p): candidates[types[i, e, p]][e, p]
                       for e in range(adapter.moe.n_experts) for p in PROJECTIONS}
            work.save("layers", f"layer-{i:03d}", experts)
            del candidates, experts
        return

    def step(i: int, h: torch.Tensor):
        layer = adapter.load_layer(i)
        experts = {}
        with torch.inference_mode():
            if opts.sequential:  # later computations see the quantized attention
                for plan in non_expert.get(i, []):
                    data = encoded_non_expert(plan, measured)
                    deq = quant.dequantize(data, plan.qtype, plan.spec.row_length).reshape(plan.spec.shape)
                    for name, value in plan.spec.to_checkpoint(deq).items():
                        layer.replace(name, value)
            h_full, calibration = calibrate_layer(adapter, layer, h, 0, opts.seed)
            for e, expert in enumerate(layer.experts):
                gptq = calibration.experts[e].quantizer(lambda h: GPTQ(h, opts.damp, opts.act_order).quantize)
                results = gptq({p: expert.get(p) for p in PROJECTIONS}, {p: types[i, e, p] for p in PROJECTIONS})
                for p, result in results.items():
                    experts[e, p] = result.data
                    if opts.sequential:
                        setattr(expert, p, result.weights)
            h = adapter.layer_forward(layer, h) if opts.sequential else h_full
        return h, experts

    _layer_pass(adapter, cal, work, "layers", step, "quantize")


# --- stage 4: the GGUF ---------------------------------------------------------------------------------


def _groups(types_of_experts: list[QuantType]) -> list[int]:
    """Expert -> group index, groups numbered in order of their first expert (docs/gguf-layout.md)."""
    order: list[str] = []
    for t in types_of_experts:
        if t.name not in order:
            order.append(t.name)
    return [order.index(t.name) for t in types_of_experts]


def gguf_tensors(adapter: ArchAdapter, types: dict, base_plan) -> tuple[list[TensorPayload], list[KeyValue], dict]:
    """Payloads in file order, the per-layer group maps, and how to produce each expert payload."""
    payloads, group_maps, expert_source = [], [], {}
    n_experts = adapter.moe.n_experts
    for plan in base_plan.tensors:
        spec = plan.spec
        if spec.role is not Role.EXPERTS:
            payloads.append(TensorPayload(spec.name, spec.shape, plan.qtype.ggml_type, plan.nbytes))
            continue
        proj = next(p for p, name in EXPERT_TENSOR.items() if spec.name == f"blk.{spec.layer}.{name}.weight")
        per_expert = [types[spec.layer, e, proj] for e in range(n_experts)]
        groups = _groups(per_expert)
        rows, cols = spec.shape[1:]
        if max(groups) == 0:
            qtype = per_expert[0]
            payloads.append(TensorPayload(spec.name, spec.shape, qtype.ggml_type, n_experts * rows * qtype.row_bytes(cols)))
            expert_source[spec.name] = (spec.layer, proj, list(range(n_experts)))
            continue
        base = spec.name.removesuffix(".weight")
        group_maps.append(KeyValue(f"mc2gguf.{base}.groups", groups, GGUFValueType.ARRAY, GGUFValueType.INT32))
        for g in range(max(groups) + 1):
            members = [e for e in range(n_experts) if groups[e] == g]
            qtype = per_expert[members[0]]
            name = f"{base}.{g}.weight"
            payloads.append(TensorPayload(name, (len(members), rows, cols), qtype.ggml_type,
                                          len(members) * rows * qtype.row_bytes(cols)))
            expert_source[name] = (spec.layer, proj, members)
    return payloads, group_maps, expert_source


def pmq_metadata(records: list[dict], cal: CalibrationSet, opts: PMQOptions, allocation: Allocation) -> list[KeyValue]:
    f32 = GGUFValueType.FLOAT32
    q = NORM_QUANTILES.tolist()
    protect_index = min(range(len(q)), key=lambda k: abs(q[k] - (1.0 - opts.protect_ratio)))
    summary = {
        "palette": list(opts.palette), "objective": asdict(opts.objective), "granularity": opts.granularity,
        "layout": opts.layout, "per_layer_budget": opts.per_layer_budget, "expert_bytes": allocation.expert_bytes,
        "eps_method": opts.eps_method, "sequential": opts.sequential, "attn_type": opts.attn_type,
    }
    return [
        KeyValue("mc2gguf.version", 1, GGUFValueType.UINT32),
        KeyValue("mc2gguf.odp.mu", [float(r["mu"]) for r in records], GGUFValueType.ARRAY, f32),
        KeyValue("mc2gguf.odp.protect_norm", [float(r["router_norm_quantiles"][protect_index]) for r in records],
                 GGUFValueType.ARRAY, f32),
        KeyValue("mc2gguf.odp.protect_ratio", float(opts.protect_ratio), f32),
        # Lets llama.cpp protect another fraction of the tokens at run time (--moe-protect).
        KeyValue("mc2gguf.odp.router_norm_quantiles", [float(v) for r in records for v in r["router_norm_quantiles"]],
                 GGUFValueType.ARRAY, f32),
        KeyValue("mc2gguf.allocation", json.dumps(summary, sort_keys=True), GGUFValueType.STRING),
        KeyValue("mc2gguf.calibration.source", cal.source, GGUFValueType.STRING),
        KeyValue("mc2gguf.calibration.n_tokens", cal.n_tokens, GGUFValueType.UINT64),
        KeyValue("mc2gguf.calibration.seed", cal.seed, GGUFValueType.UINT32),
    ]


def _file_layout(adapter, checkpoint, types, base_plan, records, cal, opts, allocation):
    payloads, group_maps, expert_source = gguf_tensors(adapter, types, base_plan)
    metadata = model_metadata(checkpoint.path, adapter.gguf_architecture, payloads, LlamaFileType.GUESSED)
    metadata += pmq_metadata(records, cal, opts, allocation) + group_maps
    return payloads, metadata, expert_source


def _allocate(adapter, checkpoint, units, records, cal, opts, base_plan) -> Allocation:
    palette = [quant_type(t) for t in opts.palette]
    same_type = []
    if opts.layout == "stock":
        keys = sorted({(u.layer, u.projections) for u in units})
        same_type = [[n for n, u in enumerate(units) if (u.layer, u.projections) == k] for k in keys]

    def solve(budget: int) -> Allocation:
        return solve_allocation(units, palette, budget, opts.objective, opts.per_layer_budget, same_type)

    if opts.bpw is not None:
        n_weights = sum(u.n_weights for u in units)
        return solve(int(opts.bpw * n_weights // 8))
    # --size: the budget of the experts is what the rest of the file leaves; the header changes a little
    # with the allocation (type groups), so tighten by any excess until the exact file size fits.
    smallest, largest = reachable_bytes(units, palette)
    fixed = sum(p.nbytes for p in base_plan.tensors if p.spec.role is not Role.EXPERTS)
    budget = opts.size - fixed
    for _ in range(8):
        try:
            allocation = solve(budget)
        except Mc2ggufError:
            overhead = opts.size - budget
            raise Mc2ggufError(
                f"--size {opts.size:,} is infeasible: reachable file sizes are about {smallest + overhead:,} "
                f"to {largest + overhead:,} bytes with this palette"
            ) from None
        payloads, metadata, _ = _file_layout(adapter, checkpoint, expert_types(allocation, units), base_plan,
                                             records, cal, opts, allocation)
        excess = expected_file_size(adapter.gguf_architecture, metadata, payloads) - opts.size
        if excess <= 0:
            return allocation
        budget -= excess
    raise Mc2ggufError("could not fit the header overhead into --size")


def run_pmq(src: Path, out: Path, opts: PMQOptions, force: bool = False, dry_run: bool = False,
            work_dir: Path | None = None) -> PMQResult:
    """``work_dir`` (default ``OUT.mc2gguf-work``, removed when the file is complete) keeps the per-layer records;
    one given here keeps its measurements for conversions of the same model to other budgets and layouts."""
    from .report import write_report

    checkpoint = Checkpoint(src)
    adapter = adapter_for(checkpoint)
    out = Path(out)
    if out.exists() and not force and not dry_run:
        raise Mc2ggufError(f"{out} exists; pass --force to overwrite it")
    if (opts.bpw is None) == (opts.size is None):
        raise Mc2ggufError("give exactly one budget: --bpw or --size")
    root = Path(work_dir or out.with_name(out.name + ".mc2gguf-work"))
    work = WorkDir(root, opts.fingerprint(checkpoint, MEASURE_OPTIONS))
    cal = _calibration(checkpoint.path, opts, work)
    records = measure(adapter, cal, opts, work)
    units = allocation_units(records, _expert_shapes(adapter))
    base_plan = uniform_plan(adapter.tensors(), quant_type(opts.attn_type))
    allocation = _allocate(adapter, checkpoint, units, records, cal, opts, base_plan)
    types = expert_types(allocation, units)
    payloads, metadata, expert_source = _file_layout(adapter, checkpoint, types, base_plan, records, cal, opts,
                                                     allocation)
    size = expected_file_size(adapter.gguf_architecture, metadata, payloads)
    report = {"records": records, "units": units, "allocation": allocation, "size": size, "calibration": cal.source}
    print(_plan_text(units, allocation, size), file=sys.stderr)
    if dry_run:
        return PMQResult(None, size, allocation, report)
    non_expert = {}
    for plan in base_plan.tensors:
        if plan.spec.role is Role.ATTENTION:
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


def _plan_text(units: list[AllocationUnit], allocation: Allocation, size: int) -> str:
    layers = sorted({u.layer for u in units})
    lines = ["plan (experts' types per layer):"]
    for layer in layers:
        row = [f"{u.expert}{''.join(p[0] for p in u.projections) if len(u.projections) < 3 else ''}:"
               f"{allocation.types[u.key].name}" for u in units if u.layer == layer]
        lines.append(f"  layer {layer:3d}: " + " ".join(row))
    n_weights = sum(u.n_weights for u in units)
    lines.append(f"experts: {allocation.expert_bytes:,} bytes = {8 * allocation.expert_bytes / n_weights:.4f} bits/weight")
    lines.append(f"output file: {size:,} bytes (exact)")
    return "\n".join(lines)
