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

from . import quant
from .archs import adapter_for
from .checkpoint import Checkpoint
from .errors import Mc2ggufError
from .qtypes import by_ggml_type


def read_tensor(tensor) -> torch.Tensor:
    """One GGUF tensor (a ``gguf.ReaderTensor``) dequantized to float32 in numpy shape order."""
    qtype = by_ggml_type(tensor.tensor_type)
    if qtype is None:
        raise Mc2ggufError(f"{tensor.name}: unsupported tensor type {tensor.tensor_type.name}")
    shape = tuple(int(d) for d in reversed(tensor.shape))
    data = np.asarray(tensor.data).view(np.uint8).reshape(-1, qtype.row_bytes(shape[-1]))
    return quant.dequantize(data, qtype, shape[-1]).reshape(shape)


def dequantized_checkpoint(gguf_path: Path, source: Path, out_dir: Path) -> Path:
    """Write ``out_dir``: ``source``'s config and tokenizer with the weights of ``gguf_path``."""
    adapter = adapter_for(Checkpoint(source))
    reader = GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in Path(source).iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copyfile(f, out_dir / f.name)
    state: dict[str, torch.Tensor] = {}
    for spec in adapter.tensors():
        if spec.name not in tensors:
            raise Mc2ggufError(f"{gguf_path} has no tensor {spec.name}")
        state.update(spec.to_checkpoint(read_tensor(tensors[spec.name])))
    save_file({k: v.contiguous() for k, v in state.items()}, out_dir / "model.safetensors")
    return out_dir
