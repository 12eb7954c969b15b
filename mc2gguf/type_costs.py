"""Each GGUF type's decode cost per expert weight on this machine, for PMQ's speed constraint (``--min-speed``).

Decode speed is not a function of bytes alone: on a CPU the dot-product kernels of the codebook and 3-bit types
cost more per byte than Q2_K's or Q4_K's, so a smaller file can decode slower. The probe measures it where it
is spent, in the pinned llama.cpp: one random Mixtral-architecture model whose every token reads all of its
experts (8 of 8, so that the experts dominate the token's time), written once per type with every expert
tensor of that type (one quantized block of rows tiled: speed does not depend on the values), timed with
llama-bench's decode (``tg``) on ``threads`` threads, the rounds interleaved. The time the experts do not
take (attention, the head, the graph) is the intercept of the same model at two expert widths; a type's cost
is the rest of its token time over the expert weights one token reads. Results are cached per CPU, thread
count, llama.cpp build and probe in the cache directory (``mc2gguf type-costs`` prints them).
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .bench_speed import Shape, random_checkpoint, run_tool
from .errors import Mc2ggufError
from .gguf.keys import is_expert_tensor
from .paths import cache_root

#: bump when the probe changes: cached costs of another probe are measured again
PROBE_VERSION = 1
PROBES = {
    # about 100 M expert weights read per token, 8 M in attention
    "default": Shape("mixtral", 1024, 2048, 8, 8, layers=2, heads=8, kv_heads=8, head_dim=128),
    # for the tests: seconds
    "tiny": Shape("mixtral", 256, 2048, 4, 4, layers=2, heads=4, kv_heads=4, head_dim=64),
}
NARROW = 8  # the intercept's second model has experts this many times narrower
BASE_TYPE = "Q8_0"  # every tensor but the experts, and the two widths of the intercept


@dataclass(frozen=True)
class TypeCosts:
    """Seconds per expert weight one decoded token reads, per type name, and how they were measured."""

    seconds_per_weight: dict[str, float]
    threads: int
    cpu: str
    probe: str
    build: str
    fixed_seconds: float  # the probe's token time outside the experts

    def render(self, reference: str = "Q4_K") -> str:
        from .quant.types import quant_type

        ref = self.seconds_per_weight.get(reference)
        lines = [f"decode cost per expert weight ({self.threads} threads, {self.cpu}; llama.cpp {self.build}, "
                 f"probe {self.probe})",
                 f"  {'type':<8} {'bits/w':>7} {'ns/weight':>10} {'vs ' + reference:>9} {'per byte vs ' + reference:>16}"]
        for name, c in sorted(self.seconds_per_weight.items(), key=lambda kv: quant_type(kv[0]).bits_per_weight):
            bpw = quant_type(name).bits_per_weight
            rel = f"{c / ref:9.2f}" if ref else f"{'-':>9}"
            per_byte = f"{c / bpw / (ref / quant_type(reference).bits_per_weight):16.2f}" if ref else f"{'-':>16}"
            lines.append(f"  {name:<8} {bpw:7.3f} {c * 1e9:10.4f} {rel} {per_byte}")
        return "\n".join(lines)

    def save(self, path: Path) -> None:
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(asdict(self), indent=1, sort_keys=True))
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> "TypeCosts":
        try:
            data = json.loads(Path(path).read_text())
            costs = cls(**data)
            if not costs.seconds_per_weight or not all(v > 0 for v in costs.seconds_per_weight.values()):
                raise ValueError("costs must be positive")
            return costs
        except FileNotFoundError:
            raise Mc2ggufError(f"type costs file {path} not found") from None
        except (ValueError, TypeError) as e:
            raise Mc2ggufError(f"{path} is not a type costs file written by mc2gguf type-costs: {e}") from None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _tiled_experts(path: Path, qtype_name: str) -> dict[str, tuple]:
    """Every expert tensor of ``path`` as ``qtype_name``: 32 random rows quantized once, tiled."""
    import numpy as np
    import torch
    from gguf import GGUFReader

    from .quant.codec import quantize
    from .quant.types import quant_type

    qtype = quant_type(qtype_name)
    out = {}
    for t in GGUFReader(path).tensors:
        if not is_expert_tensor(t.name):
            continue
        experts, rows, cols = (int(n) for n in reversed(t.shape))
        block = quantize(torch.randn(32, cols, generator=torch.Generator().manual_seed(0)), qtype,
                         torch.ones(cols))
        data = np.tile(block, (experts * rows // 32 + 1, 1))[: experts * rows].reshape(experts, rows, -1)
        out[t.name] = (qtype.ggml_type, np.ascontiguousarray(data))
    return out


def _expert_weights_per_token(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(path).tensors if is_expert_tensor(t.name))  # top-k = all


def _probe_files(shape: Shape, types: list[str], work: Path) -> dict[str, Path]:
    """``{type: file}`` plus ``"narrow"``: the probe with every expert tensor of each type."""
    from dataclasses import replace

    from .convert import convert
    from .gguf.edit import rewrite
    from .quant.types import quant_type

    files = {}
    for name, ffn in (("wide", shape.ffn), ("narrow", shape.ffn // NARROW)):
        base = work / f"{name}-{BASE_TYPE}.gguf"
        if not base.exists():
            hf = random_checkpoint(replace(shape, ffn=ffn), work / f"hf-{name}")
            convert(hf, base, quant_type(BASE_TYPE))
        files[name] = base
    for t in types:
        files[t] = work / f"wide-{t}.gguf"
        if t != BASE_TYPE and not files[t].exists():
            rewrite(files["wide"], files[t], replace=_tiled_experts(files["wide"], t))
        elif t == BASE_TYPE:
            files[t] = files["wide"]
    return files


def _decode_seconds(bin_dir: Path, files: dict[str, Path], threads: int, rounds: int, n_gen: int) -> dict[str, float]:
    """The median over interleaved rounds of each file's seconds per decoded token."""
    times: dict[str, list[float]] = {k: [] for k in files}
    for r in range(rounds):
        for key, path in files.items():
            print(f"[type-costs] round {r + 1}/{rounds}: {key}", file=sys.stderr, flush=True)
            rows = json.loads(run_tool([bin_dir / "llama-bench", "-m", path, "-t", threads, "-p", 0, "-n", n_gen,
                                        "-r", 1, "-o", "json"]))
            times[key].append(1.0 / float(rows[0]["avg_ts"]))
    return {k: statistics.median(v) for k, v in times.items()}


def measure_type_costs(types: list[str], threads: int = 2, probe: str = "default", rounds: int = 3,
                       n_gen: int = 32, refresh: bool = False) -> TypeCosts:
    """The decode cost of each of ``types`` per expert weight (cached; ``refresh`` measures again)."""
    from .llama.build import BuildConfig, build_llama
    from .quant.types import quant_type

    for t in types:
        quant_type(t)  # a clear error for an unknown name
    build = build_llama(BuildConfig())
    cpu = _cpu_name()
    key = f"{''.join(c if c.isalnum() else '-' for c in cpu)}-t{threads}-{build.root.name}-{probe}-v{PROBE_VERSION}"
    cache = cache_root() / "type-costs" / f"{key}.json"
    known = TypeCosts.load(cache) if cache.exists() and not refresh else None
    missing = [t for t in types if known is None or t not in known.seconds_per_weight]
    if not missing:
        return _subset(known, types)
    shape = PROBES[probe]
    work = cache.parent / f"{key}.probe"
    work.mkdir(parents=True, exist_ok=True)
    files = _probe_files(shape, missing, work)
    seconds = _decode_seconds(build.bin_dir, files, threads, rounds, n_gen)
    wide, narrow = _expert_weights_per_token(files["wide"]), _expert_weights_per_token(files["narrow"])
    slope = (seconds["wide"] - seconds["narrow"]) / (wide - narrow)
    fixed = max(0.0, seconds["wide"] - slope * wide)
    measured = {t: (seconds[t] - fixed) / wide for t in missing}
    bad = [t for t, c in measured.items() if not c > 0]
    if bad:
        raise Mc2ggufError(f"type costs of {', '.join(bad)} came out non-positive (the machine is too noisy: "
                           "measure again with more rounds)")
    costs = TypeCosts({**(known.seconds_per_weight if known else {}), **measured}, threads, cpu, probe,
                      build.root.name, fixed)
    costs.save(cache)
    return _subset(costs, types)


def _subset(costs: TypeCosts, types: list[str]) -> TypeCosts:
    return TypeCosts({t: costs.seconds_per_weight[t] for t in types}, costs.threads, costs.cpu, costs.probe,
                     costs.build, costs.fixed_seconds)
