"""``mc2gguf inspect``: what a GGUF file holds, summarised for people."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFReader

from ..errors import Mc2ggufError
from .keys import group_map_base, is_expert_tensor, type_group_tensor


@dataclass(frozen=True)
class TensorSummary:
    name: str
    type_name: str
    shape: tuple[int, ...]  # numpy order
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class FileSummary:
    path: Path
    architecture: str
    size: int
    tensors: list[TensorSummary]
    expert_types: dict[str, list[str]]  # mixed-type expert tensors (docs/gguf-layout.md): base name -> type per expert

    @property
    def expert_tensors(self) -> list[TensorSummary]:
        return [t for t in self.tensors if is_expert_tensor(t.name)]

    @staticmethod
    def bits_per_weight(tensors: list[TensorSummary]) -> float:
        n = sum(t.n_elements for t in tensors)
        return 8.0 * sum(t.n_bytes for t in tensors) / n if n else 0.0


def summarize(path: Path) -> FileSummary:
    path = Path(path)
    if not path.is_file():
        raise Mc2ggufError(f"{path} does not exist")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise Mc2ggufError(f"{path} is not a readable GGUF file: {e}") from None
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field else "unknown"
    tensors = [
        TensorSummary(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)), int(t.n_elements),
                      int(t.n_bytes))
        for t in reader.tensors
    ]
    by_name = {t.name: t for t in tensors}
    expert_types = {}
    for key, field in reader.fields.items():
        base = group_map_base(key)
        if base is not None:
            expert_types[base] = [by_name[type_group_tensor(base, g)].type_name for g in field.contents()]
    return FileSummary(path, arch, path.stat().st_size, tensors, expert_types)


def render(summary: FileSummary) -> str:
    lines = [
        f"file:         {summary.path}",
        f"architecture: {summary.architecture}",
        f"size:         {summary.size:,} bytes ({summary.size / 2**20:.2f} MiB)",
        f"tensors:      {len(summary.tensors)}",
        f"bits/weight:  {FileSummary.bits_per_weight(summary.tensors):.4f} (whole file)",
    ]
    experts = summary.expert_tensors
    if experts:
        lines.append(f"              {FileSummary.bits_per_weight(experts):.4f} (experts)")
    counts = Counter(t.type_name for t in summary.tensors)
    lines.append("types:        " + ", ".join(f"{name} x{n}" for name, n in counts.most_common()))
    if summary.expert_types:
        lines.append("per-expert types (layers whose experts differ):")
        for base, types in summary.expert_types.items():
            lines.append(f"  {base}: " + " ".join(f"{e}:{t}" for e, t in enumerate(types)))
    lines.append("")
    width = max(len(t.name) for t in summary.tensors) if summary.tensors else 10
    for t in summary.tensors:
        shape = "x".join(map(str, t.shape))
        lines.append(f"{t.name:<{width}}  {t.type_name:<8} {shape:<18} {8.0 * t.n_bytes / t.n_elements:6.3f} bpw")
    return "\n".join(lines)
