"""Read a GGUF file back into PyTorch: its tensors dequantized into a Hugging Face checkpoint.

The architecture adapter of the original checkpoint maps each GGUF tensor back to checkpoint tensors, so
transformers can run exactly the weights a GGUF file holds (the reference that llama.cpp is checked
against, and the way ``mc2gguf eval`` runs converted experts).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from safetensors.torch import save_file

from ..quant import codec
from ..archs import Role, adapter_for
from ..checkpoint import Checkpoint
from ..errors import Mc2ggufError
from .keys import type_group_tensor, type_groups_key
from ..quant.types import by_ggml_type


def read_tensor(tensor) -> torch.Tensor:
    """One GGUF tensor (a ``gguf.ReaderTensor``) dequantized to float32 in numpy shape order."""
    qtype = by_ggml_type(tensor.tensor_type)
    if qtype is None:
        raise Mc2ggufError(f"{tensor.name}: unsupported tensor type {tensor.tensor_type.name}")
    shape = tuple(int(d) for d in reversed(tensor.shape))
    data = np.asarray(tensor.data).view(np.uint8).reshape(-1, qtype.row_bytes(shape[-1]))
    return codec.dequantize(data, qtype, shape[-1]).reshape(shape)


def _expert_groups(reader: GGUFReader, tensors: dict, gguf_path: Path, spec) -> tuple[torch.Tensor, list[str]]:
    """A layer's experts stored as type groups (docs/gguf-layout.md), reassembled in expert order."""
    base = spec.name.removesuffix(".weight")
    field = reader.fields.get(type_groups_key(base))
    if field is None:
        raise Mc2ggufError(f"{gguf_path} has neither {spec.name} nor the type groups of {base}")
    groups = [int(g) for g in field.contents()]
    if len(groups) != spec.shape[0]:
        raise Mc2ggufError(f"{gguf_path}: {type_groups_key(base)} has {len(groups)} entries, "
                           f"expected {spec.shape[0]} experts")
    parts = {}
    for g in sorted(set(groups)):
        name = type_group_tensor(base, g)
        if name not in tensors:
            raise Mc2ggufError(f"{gguf_path} has no tensor {name} (type group {g} of {base})")
        parts[g] = (read_tensor(tensors[name]), tensors[name].tensor_type.name)
        if parts[g][0].shape[0] != groups.count(g):
            raise Mc2ggufError(f"{gguf_path}: {name} holds {parts[g][0].shape[0]} experts, "
                               f"its group map {groups.count(g)}")
    index = [groups[:e].count(g) for e, g in enumerate(groups)]
    return torch.stack([parts[g][0][i] for g, i in zip(groups, index)]), [parts[g][1] for g in groups]


def checkpoint_state(gguf_path: Path, adapter) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Every tensor of ``gguf_path`` that ``adapter`` maps, dequantized to float32 checkpoint tensors (type
    groups included); and the type of each GGUF tensor (one per expert for type groups)."""
    reader = GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    state: dict[str, torch.Tensor] = {}
    types: dict[str, list[str]] = {}
    for spec in adapter.tensors():
        if spec.name in tensors:
            value = read_tensor(tensors[spec.name])
            types[spec.name] = [tensors[spec.name].tensor_type.name]
        elif spec.role is Role.EXPERTS:
            value, types[spec.name] = _expert_groups(reader, tensors, gguf_path, spec)
        else:
            raise Mc2ggufError(f"{gguf_path} has no tensor {spec.name}")
        if tuple(value.shape) != tuple(spec.shape):
            raise Mc2ggufError(f"{gguf_path}: {spec.name} has shape {tuple(value.shape)}, the checkpoint "
                               f"{tuple(spec.shape)}: not a conversion of this model")
        state.update(spec.to_checkpoint(value))
    return state, types


def dequantized_checkpoint(gguf_path: Path, source: Path, out_dir: Path) -> Path:
    """Write ``out_dir``: ``source``'s config and tokenizer with the weights of ``gguf_path``."""
    state, _ = checkpoint_state(gguf_path, adapter_for(Checkpoint(source)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in Path(source).iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copyfile(f, out_dir / f.name)
    save_file({k: v.contiguous() for k, v in state.items()}, out_dir / "model.safetensors")
    return out_dir
