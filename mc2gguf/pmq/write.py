"""PMQ's GGUF file: the expert tensors as type groups (docs/gguf-layout.md; one stock tensor where a layer's
experts share a type), the ODP thresholds, the allocation and the calibration's provenance."""

from __future__ import annotations

import json
from dataclasses import asdict

from gguf import GGUFValueType, LlamaFileType

from ..archs import ArchAdapter, Role
from ..gguf.keys import FORMAT_VERSION, Keys
from ..gguf.keys import type_group_tensor, type_groups_key
from ..gguf.layout import group_map, group_members
from ..gguf.upstream import model_metadata
from ..gguf.writer import KeyValue, TensorPayload
from ..odp import calibrate_protect_norm
from ..odp.params import finite_threshold
from ..text import CalibrationSet
from .allocate import Allocation
from .calibrate import router_norm_quantiles
from .options import PMQOptions


def gguf_tensors(adapter: ArchAdapter, types: dict, base_plan) -> tuple[list[TensorPayload], list[KeyValue], dict]:
    """Payloads in file order, the per-layer group maps, and how to produce each expert payload."""
    payloads, group_maps, expert_source = [], [], {}
    n_experts = adapter.moe.n_experts
    for plan in base_plan.tensors:
        spec = plan.spec
        if spec.role is not Role.EXPERTS:
            payloads.append(TensorPayload(spec.name, spec.shape, plan.qtype.ggml_type, plan.nbytes))
            continue
        proj = spec.projection
        per_expert = [types[spec.layer, e, proj] for e in range(n_experts)]
        groups = group_map([t.name for t in per_expert])
        rows, cols = spec.shape[1:]
        if max(groups) == 0:
            qtype = per_expert[0]
            payloads.append(TensorPayload(spec.name, spec.shape, qtype.ggml_type, n_experts * rows * qtype.row_bytes(cols)))
            expert_source[spec.name] = (spec.layer, proj, list(range(n_experts)))
            continue
        base = spec.name.removesuffix(".weight")
        group_maps.append(KeyValue(type_groups_key(base), groups, GGUFValueType.ARRAY, GGUFValueType.INT32))
        for g, members in enumerate(group_members(groups)):
            qtype = per_expert[members[0]]
            name = type_group_tensor(base, g)
            payloads.append(TensorPayload(name, (len(members), rows, cols), qtype.ggml_type,
                                          len(members) * rows * qtype.row_bytes(cols)))
            expert_source[name] = (spec.layer, proj, members)
    return payloads, group_maps, expert_source


def pmq_metadata(records: list[dict], cal: CalibrationSet, opts: PMQOptions, allocation: Allocation) -> list[KeyValue]:
    f32 = GGUFValueType.FLOAT32
    summary = {
        "palette": list(opts.palette), "objective": asdict(opts.objective), "granularity": opts.granularity,
        "layout": opts.layout, "per_layer_budget": opts.per_layer_budget, "expert_bytes": allocation.expert_bytes,
        "eps_method": opts.eps_method, "sequential": opts.sequential, "attn_type": opts.attn_type,
    }
    if opts.min_speed:
        summary |= {"min_speed": opts.min_speed, "speed_reference": opts.speed_reference,
                    "predicted_speed": allocation.speed}
    return [
        KeyValue(Keys.VERSION, FORMAT_VERSION, GGUFValueType.UINT32),
        KeyValue(Keys.ODP_MU, [float(r["mu"]) for r in records], GGUFValueType.ARRAY, f32),
        KeyValue(Keys.ODP_PROTECT_NORM, [finite_threshold(calibrate_protect_norm(r["router_norms"], opts.protect_ratio))
                                         for r in records], GGUFValueType.ARRAY, f32),
        KeyValue(Keys.ODP_PROTECT_RATIO, float(opts.protect_ratio), f32),
        # Lets llama.cpp protect another fraction of the tokens at run time (--moe-protect).
        KeyValue(Keys.ODP_ROUTER_NORM_QUANTILES, [v for r in records for v in router_norm_quantiles(r["router_norms"])],
                 GGUFValueType.ARRAY, f32),
        KeyValue(Keys.ALLOCATION, json.dumps(summary, sort_keys=True), GGUFValueType.STRING),
        KeyValue(Keys.CALIBRATION_SOURCE, cal.source, GGUFValueType.STRING),
        KeyValue(Keys.CALIBRATION_N_TOKENS, cal.n_tokens, GGUFValueType.UINT64),
        KeyValue(Keys.CALIBRATION_SEED, cal.seed, GGUFValueType.UINT32),
    ]


def file_layout(adapter: ArchAdapter, checkpoint, types: dict, base_plan, records: list[dict], cal: CalibrationSet,
                opts: PMQOptions, allocation: Allocation):
    """The file's tensor payloads, its metadata, and where each expert payload's bytes come from."""
    payloads, group_maps, expert_source = gguf_tensors(adapter, types, base_plan)
    metadata = model_metadata(checkpoint.path, adapter.gguf_architecture, payloads, LlamaFileType.GUESSED)
    metadata += pmq_metadata(records, cal, opts, allocation) + group_maps
    return payloads, metadata, expert_source
