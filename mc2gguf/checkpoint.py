"""Read a Hugging Face checkpoint lazily, one tensor at a time.

Opening a checkpoint reads only ``config.json`` and the safetensors headers, and checks every shard
against its header (so a truncated or corrupt shard fails before any work, with its name in the message).
Tensor data is read on demand with plain reads of the byte range the header gives: safetensors' own
loader maps the whole shard and its tensors keep the mapping alive, so peak address space would grow with
shard size (Mixtral's are 5 GB) instead of with the tensor being converted.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import Mc2ggufError

_HEADER_LIMIT = 100 << 20  # safetensors' own limit on the JSON header


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass(frozen=True)
class TensorRef:
    name: str
    shard: Path
    shape: tuple[int, ...]
    dtype: str
    offset: int  # of the tensor's first byte in the shard file
    nbytes: int


def _read_header(shard: Path) -> dict[str, TensorRef]:
    size = shard.stat().st_size
    with open(shard, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise Mc2ggufError(f"corrupt shard {shard}: too short to hold a safetensors header")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_HEADER_LIMIT, size - 8):
            raise Mc2ggufError(f"corrupt shard {shard}: header length {header_len} exceeds the file")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Mc2ggufError(f"corrupt shard {shard}: unreadable header ({e})") from None
    data_size = size - 8 - header_len
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(o) for o in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            dtype = _DTYPES[info["dtype"]]
        except KeyError:
            raise Mc2ggufError(f"{shard}: tensor {name} has unsupported dtype {info.get('dtype')!r}") from None
        except (TypeError, ValueError, AttributeError):
            raise Mc2ggufError(f"corrupt shard {shard}: bad header entry for {name!r}") from None
        if end - start != math.prod(shape) * dtype.itemsize:
            raise Mc2ggufError(f"corrupt shard {shard}: {name}'s byte range does not match its shape")
        refs[name] = TensorRef(name, shard, shape, info["dtype"], 8 + header_len + start, end - start)
        if end > data_size:
            raise Mc2ggufError(
                f"truncated shard {shard}: tensor {name} ends at byte {end} of the data section, "
                f"which has only {data_size} bytes"
            )
    return refs


class Checkpoint:
    """A Hugging Face model directory: config and lazily-read safetensors shards."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise Mc2ggufError(f"{self.path} is not a directory")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise Mc2ggufError(f"{self.path} has no config.json")
        try:
            self.config: dict = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise Mc2ggufError(f"{config_file} is not valid JSON: {e}") from None
        self.tensors: dict[str, TensorRef] = {}
        for shard in self._shards():
            for name, ref in _read_header(shard).items():
                if name in self.tensors:  # duplicated shards, or two links to one file
                    raise Mc2ggufError(f"{self.path}: tensor {name} is in two shards, {self.tensors[name].shard.name} "
                                       f"and {shard.name}")
                self.tensors[name] = ref

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else str(self.config.get("model_type", "unknown"))

    def _shards(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise Mc2ggufError(f"{index} is not a valid safetensors index: {e}") from None
            shards = sorted({self.path / name for name in weight_map.values()})
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise Mc2ggufError(f"{self.path}: missing shard(s) listed in {index.name}: {', '.join(missing)}")
            return shards
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise Mc2ggufError(f"{self.path} has no *.safetensors shards")
        return shards

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.ref(name).shape

    def ref(self, name: str) -> TensorRef:
        try:
            return self.tensors[name]
        except KeyError:
            raise Mc2ggufError(f"{self.path}: tensor {name} is missing from the checkpoint") from None

    def load(self, name: str) -> torch.Tensor:
        """One tensor, as float32."""
        ref = self.ref(name)
        buffer = bytearray(ref.nbytes)
        try:
            with open(ref.shard, "rb") as f:
                f.seek(ref.offset)
                if f.readinto(buffer) != ref.nbytes:
                    raise Mc2ggufError(f"truncated shard {ref.shard}: cannot read all of {name}")
        except OSError as e:
            raise Mc2ggufError(f"cannot read {name} from {ref.shard}: {e.strerror or e}") from None
        tensor = torch.frombuffer(buffer, dtype=_DTYPES[ref.dtype]).reshape(ref.shape).to(torch.float32)
        if not bool(torch.isfinite(tensor).all()):
            raise Mc2ggufError(f"{ref.shard}: tensor {name} holds NaN or infinite values")
        return tensor
