"""Rewriting a GGUF file: the same tensor bytes under other metadata or another expert layout.

For tests and benchmarks, which make the variants of one file (ODP metadata set or dropped, stock expert
tensors split into type groups, groups taken from conversions of the same model to other types) without
converting the model again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .keys import Keys, type_groups_key
from .layout import group_members
from .writer import KeyValue, read_metadata


def rewrite(src: Path, dst: Path, *, set_kv: Sequence[KeyValue] = (), drop: Sequence[str] = (),
            groups: dict[str, list[int]] | None = None, group_sources: Sequence[Path] | None = None,
            replace: dict[str, tuple] | None = None) -> Path:
    """Copy ``src`` to ``dst`` with key/values replaced or dropped, and the experts of the stock tensors named
    in ``groups`` (``blk.L.ffn_P_exps``) split into type groups by the given expert -> group map; group ``g``
    takes its experts from ``group_sources[g]`` (a file of the same model in another type) if given.
    ``replace`` maps a tensor's name to ``(GGMLQuantizationType, packed bytes)``: its new type and data."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    groups = groups or {}
    sources = [{t.name: t for t in GGUFReader(p).tensors} for p in (group_sources or [])]
    # the copy's tensors may differ: it carries no checksums rather than stale ones
    replaced = {kv.key for kv in set_kv} | set(drop) | {Keys.TENSOR_CHECKSUMS}
    reader = GGUFReader(src)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    partial = dst.with_name(dst.name + ".partial")
    writer = GGUFWriter(partial, arch)
    for kv in read_metadata(src):
        if kv.key not in replaced:
            writer.add_key_value(kv.key, kv.value, kv.vtype, kv.sub_type)
    for kv in set_kv:
        writer.add_key_value(kv.key, kv.value, kv.vtype, kv.sub_type)
    for base, group_of in groups.items():
        writer.add_key_value(type_groups_key(base), list(group_of), GGUFValueType.ARRAY, GGUFValueType.INT32)
    for t in reader.tensors:
        base = t.name.removesuffix(".weight")
        if t.name in (replace or {}):
            qtype, data = replace[t.name]
            writer.add_tensor(t.name, data, raw_dtype=qtype)
            continue
        if base not in groups:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
            continue
        for g, members in enumerate(group_members(groups[base])):
            source = sources[g][t.name] if sources else t
            writer.add_tensor(f"{base}.{g}.weight", np.ascontiguousarray(np.asarray(source.data)[members]),
                              raw_dtype=source.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(dst)
    return dst


def odp_kv(mu: Sequence[float], protect_norm: Sequence[float], ratio: float = 0.02, quantiles=None) -> list[KeyValue]:
    """ODP's metadata (docs/gguf-layout.md): per-layer mu and protection threshold, the protected share
    ``ratio``, and optionally the per-layer ``quantiles`` of the router input's norm that let llama.cpp change
    that share."""
    from gguf import GGUFValueType

    f32, array = GGUFValueType.FLOAT32, GGUFValueType.ARRAY
    kvs = [KeyValue(Keys.ODP_MU, [float(v) for v in mu], array, f32),
           KeyValue(Keys.ODP_PROTECT_NORM, [float(v) for v in protect_norm], array, f32),
           KeyValue(Keys.ODP_PROTECT_RATIO, float(ratio), f32)]
    if quantiles is not None:
        kvs.append(KeyValue(Keys.ODP_ROUTER_NORM_QUANTILES, [float(v) for v in np.ravel(quantiles)], array, f32))
    return kvs
