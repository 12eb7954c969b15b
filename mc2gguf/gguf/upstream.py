"""Model metadata and vocabulary exactly as llama.cpp's own converter (pinned version) writes them.

Rather than re-deriving tokenizer handling, mc2gguf runs the pinned ``convert_hf_to_gguf.py --vocab-only``
in a subprocess (with the gguf-py it ships) and copies every key/value it wrote.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFValueType, GGUFWriter, LlamaFileType, size_label

from ..errors import Mc2ggufError
from .writer import KeyValue, TensorPayload, read_metadata
from ..paths import cache_root
from ..llama.build import llama_source


def upstream_converter() -> Path:
    return llama_source() / "convert_hf_to_gguf.py"


def upstream_metadata(model_dir: Path) -> list[KeyValue]:
    # The converter reads only the config, tokenizer and model-card files: key the cache on them.
    files = tuple(
        (f.name, f.stat().st_size, f.stat().st_mtime_ns)
        for f in sorted(Path(model_dir).iterdir())
        if f.is_file() and not f.name.endswith(".safetensors")
    )
    return list(_upstream_metadata(Path(model_dir).resolve(), files))


@functools.lru_cache(maxsize=8)
def _upstream_metadata(model_dir: Path, files: tuple) -> tuple[KeyValue, ...]:
    # Kept on disk too, keyed like the in-process cache and on the converter (its path names the pinned
    # llama.cpp and patches): the subprocess and reading its vocabulary back take 10-15 s, every conversion.
    converter = upstream_converter()
    key = hashlib.sha256(repr((str(model_dir), files, str(converter))).encode()).hexdigest()[:20]
    cached = cache_root() / "upstream-metadata" / f"{key}.pickle"
    try:
        return pickle.loads(cached.read_bytes())
    except Exception:  # missing, truncated or written by another version: made again
        pass
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "vocab.gguf"
        cmd = [sys.executable, str(converter), str(model_dir), "--vocab-only", "--outfile", str(out)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join(proc.stdout.splitlines()[-15:])
            raise Mc2ggufError(f"llama.cpp's converter could not read the metadata/vocabulary of {model_dir}:\n{tail}")
        metadata = tuple(read_metadata(out))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        partial.write_bytes(pickle.dumps(metadata))
        os.replace(partial, cached)
    except OSError:
        pass  # a cache that cannot be written only costs the next conversion the subprocess
    return metadata


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
