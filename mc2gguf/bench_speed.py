"""``mc2gguf bench-speed``: what mc2gguf's layouts and ODP cost or gain in llama.cpp's speed, side by side.

For each model shape, seeded random weights (speed does not depend on values) in files made with
llama-quantize ``--pure``: a stock Q3_K file; a type-grouped file of about the same size (the experts cycle
through Q2_K, Q3_K and Q4_K, as PMQ mixes them; the other matrices Q3_K); a same-type split (Q3_K experts in
the same three groups: the graph's cost without the kernel mix); and the stock file with ODP metadata (mu
calibrated as PMQ calibrates it, on llama.cpp's own router logits of random tokens, nothing protected).
llama-bench runs each file, the grouped and pruned ones both with the fused graph and with the graph of
ordinary ops (``LLAMA_MOE_FUSED=0``, what devices without the fused ops run), the rounds interleaved so that
every ratio comes from one run; the optional unpatched build runs the stock file. Decode is also reported
as a share of the bandwidth bound: this machine's read bandwidth over the bytes of the weights one token
reads (its experts' share of the expert tensors, ODP's pruned share excluded, one row of the embeddings).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import Mc2ggufError
from .gguf.keys import is_expert_tensor


@dataclass(frozen=True)
class Shape:
    arch: str  # "mixtral" or "qwen3moe": the test-model builder used
    hidden: int
    ffn: int  # one expert's FFN width
    experts: int
    top_k: int
    layers: int  # kept low where the real model's would not fit this machine
    heads: int
    kv_heads: int
    head_dim: int


SHAPES = {
    # Mixtral 8x7B's layer (32 in the real model)
    "mixtral": Shape("mixtral", 4096, 14336, 8, 2, layers=2, heads=32, kv_heads=8, head_dim=128),
    # Qwen3-30B-A3B's layer (48 in the real model)
    "qwen3-30b-a3b": Shape("qwen3moe", 2048, 768, 128, 8, layers=4, heads=32, kv_heads=4, head_dim=128),
    # the reference MoE's shape (mc2gguf.reference: padded to 768), all of its layers
    "reference": Shape("mixtral", 768, 768, 8, 2, layers=30, heads=12, kv_heads=3, head_dim=64),
    # for the tests: seconds
    "tiny": Shape("mixtral", 256, 512, 4, 2, layers=2, heads=4, kv_heads=2, head_dim=64),
}
GROUP_TYPES = ("Q2_K", "Q3_K", "Q4_K")
STOCK_TYPE = "Q3_K"
_QUANTIZE_FTYPE = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S"}  # with --pure: every matrix that type


@dataclass(frozen=True)
class SpeedConfig:
    work: Path
    shapes: tuple[str, ...] = ("mixtral", "qwen3-30b-a3b", "reference")
    rounds: int = 3
    n_prompt: int = 512
    n_gen: int = 128
    threads: int = 2
    unpatched: bool = False  # also time the stock file on an unpatched build of the same commit (built once)


@dataclass(frozen=True)
class Run:
    """One llama-bench configuration: a file, the graph asked for, pruning on or off."""
    file: str  # key of the shape's files
    fused: bool = True
    prune: bool | None = None  # None: the file's default (no switch given)
    unpatched: bool = False


RUNS = {
    "stock": Run("stock"),
    "grouped fused": Run("grouped"),
    "grouped ops": Run("grouped", fused=False),
    "split fused": Run("split"),
    "split ops": Run("split", fused=False),
    "odp off": Run("odp", prune=False),
    "odp on fused": Run("odp", prune=True),
    "odp on ops": Run("odp", fused=False, prune=True),
}
UNPATCHED_RUN = "stock unpatched"

#: (numerator, denominator, what the ratio shows)
RATIOS = (
    ("grouped fused", "stock", "type groups, fused graph"),
    ("grouped ops", "stock", "type groups, ordinary ops"),
    ("split fused", "stock", "same-type split, fused graph (graph cost only)"),
    ("split ops", "stock", "same-type split, ordinary ops"),
    ("odp on fused", "odp off", "ODP on vs off, fused graph"),
    ("odp on ops", "odp off", "ODP on vs off, ordinary ops"),
    ("stock", UNPATCHED_RUN, "patched vs unpatched build, stock file"),
)


def _note(message: str) -> None:
    print(f"[bench-speed] {message}", file=sys.stderr, flush=True)


def run_tool(cmd: list, env: dict | None = None) -> str:
    """A llama.cpp tool's stdout; its stderr's end in the error when it fails."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise Mc2ggufError(f"{Path(str(cmd[0])).name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def random_checkpoint(shape: Shape, out: Path) -> Path:
    """A seeded random fp16 checkpoint of ``shape`` in ``out`` (kept: a second call finds it)."""
    import torch

    from .paths import TOKENIZER_512
    from .testmodel import TinyMixtralConfig, TinyQwen3MoeConfig, build_tiny_mixtral, build_tiny_moe

    if (out / "config.json").exists():
        return out
    if shape.arch == "mixtral":
        config = TinyMixtralConfig(hidden_size=shape.hidden, intermediate_size=shape.ffn,
                                   num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                                   num_key_value_heads=shape.kv_heads, num_local_experts=shape.experts,
                                   num_experts_per_tok=shape.top_k)
        assert shape.hidden == shape.heads * shape.head_dim
        return build_tiny_mixtral(out, TOKENIZER_512, seed=0, config=config, dtype=torch.float16)
    config = TinyQwen3MoeConfig(hidden_size=shape.hidden, moe_intermediate_size=shape.ffn,
                                num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                                num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                                num_experts=shape.experts, num_experts_per_tok=shape.top_k)
    return build_tiny_moe(out, config, seed=0, dtype=torch.float16)


def _odp_mu(path: Path, layers: int, top_k: int) -> list[float]:
    """Each layer's mu as PMQ calibrates it (the median of the non-top slots' weight ratios), from llama.cpp's
    router logits."""
    import numpy as np
    import torch

    from .llama.runtime import eval_tokens
    from .odp import calibrate_mu, slot_ratios

    tokens = torch.randint(3, 500, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    run = eval_tokens(path, tokens, capture=("ffn_moe_logits",))
    logits = [torch.from_numpy(np.concatenate(run["tensors"][f"ffn_moe_logits-{il}"])) for il in range(layers)]
    return [calibrate_mu(slot_ratios(layer_logits, top_k)) for layer_logits in logits]


def make_files(shape: Shape, out: Path, bin_dir: Path) -> dict[str, Path]:
    """The shape's benchmark files (made once; a second run finds them)."""
    from .convert import convert
    from .gguf.edit import odp_kv, rewrite
    from .odp.params import finite_threshold
    from .quant.types import quant_type

    files = {name: out / f"{name}.gguf" for name in ("stock", "grouped", "split", "odp")}
    if all(f.exists() for f in files.values()):
        return files
    out.mkdir(parents=True, exist_ok=True)
    _note(f"{out.name}: random checkpoint")
    hf = random_checkpoint(shape, out / "hf")
    f16 = out / "f16.gguf"
    if not f16.exists():
        _note(f"{out.name}: F16 GGUF")
        convert(hf, f16, quant_type("F16"))
    pure = {}
    for t in GROUP_TYPES:
        pure[t] = out / f"pure-{t}.gguf"
        if not pure[t].exists():
            _note(f"{out.name}: llama-quantize --pure {t}")
            partial = pure[t].with_name(pure[t].name + ".partial")
            run_tool([bin_dir / "llama-quantize", "--pure", f16, partial, _QUANTIZE_FTYPE[t], "2"])
            partial.replace(pure[t])
    cycle = [e % len(GROUP_TYPES) for e in range(shape.experts)]
    groups = {f"blk.{il}.ffn_{p}_exps": cycle for il in range(shape.layers) for p in ("up", "gate", "down")}
    stock = pure[STOCK_TYPE]
    if not files["grouped"].exists():
        rewrite(stock, files["grouped"], groups=groups, group_sources=[pure[t] for t in GROUP_TYPES])
    if not files["split"].exists():
        rewrite(stock, files["split"], groups=groups)
    if not files["odp"].exists():
        mu = _odp_mu(stock, shape.layers, shape.top_k)
        nobody = finite_threshold(float("inf"))
        rewrite(stock, files["odp"], set_kv=odp_kv(mu, [nobody] * shape.layers, 0.0))
    if not files["stock"].exists():
        os.link(stock, files["stock"])
    return files


def read_bytes_per_token(path: Path, top_k: int, experts: int, pruned_share: float = 0.0) -> int:
    """The weight bytes one decoded token reads: every matrix but the expert tensors and the token embeddings,
    ``top_k / experts`` of the expert tensors (less the pruned share of the slots), one embedding row."""
    from gguf import GGUFReader

    total = 0.0
    for t in GGUFReader(path).tensors:
        if is_expert_tensor(t.name):
            total += t.n_bytes * top_k / experts * (1.0 - pruned_share)
        elif t.name == "token_embd.weight":
            total += t.n_bytes / int(t.shape[-1])
        else:
            total += t.n_bytes
    return int(total)


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """This machine's memory read bandwidth in bytes/s: the best of ``repeats`` sums of a ``gib`` GiB float32
    tensor with torch on ``threads`` threads (larger than any cache)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            x.sum().item()
            best = min(best, time.perf_counter() - start)
        return x.numel() * 4 / best
    finally:
        torch.set_num_threads(previous)


def _bench(bin_dir: Path, path: Path, run: Run, c: SpeedConfig) -> dict[str, float]:
    env = {**os.environ, "LLAMA_MOE_FUSED": "1" if run.fused else "0"}
    cmd = [bin_dir / "llama-bench", "-m", path, "-t", str(c.threads), "-p", str(c.n_prompt), "-n", str(c.n_gen),
           "-r", "1", "-o", "json"]
    if run.prune is not None:
        cmd += ["--moe-prune", "1" if run.prune else "0"]
    out: dict[str, float] = {}
    for row in json.loads(run_tool(cmd, env)):
        out["pp" if row["n_prompt"] else "tg"] = float(row["avg_ts"])
        if row.get("moe_pruned") is not None and row["n_gen"]:
            out["pruned"] = float(row["moe_pruned"])
    return out


def bench_shape(name: str, c: SpeedConfig, bin_dir: Path, unpatched_bin: Path | None, bandwidth: float) -> dict:
    shape = SHAPES[name]
    files = make_files(shape, c.work / name, bin_dir)
    runs = dict(RUNS)
    if unpatched_bin is not None:
        runs[UNPATCHED_RUN] = Run("stock", unpatched=True)
    samples: dict[str, list[dict[str, float]]] = {r: [] for r in runs}
    for i in range(c.rounds):
        for label, run in runs.items():
            binary = unpatched_bin if run.unpatched else bin_dir
            samples[label].append(_bench(binary, files[run.file], run, c))
            _note(f"{name} round {i + 1}/{c.rounds} {label}: {samples[label][-1]}")
    median = {label: {k: statistics.median(s[k] for s in xs) for k in xs[0]} for label, xs in samples.items()}
    pruned = median["odp on fused"].get("pruned", 0.0)
    bound = {
        "stock": bandwidth / read_bytes_per_token(files["stock"], shape.top_k, shape.experts),
        "odp on fused": bandwidth / read_bytes_per_token(files["odp"], shape.top_k, shape.experts, pruned),
    }
    return {
        "shape": asdict(shape),
        "sizes": {k: f.stat().st_size for k, f in files.items()},
        "samples": samples,
        "median": median,
        "ratios": {f"{a} / {b}": {k: median[a][k] / median[b][k] for k in ("pp", "tg")}
                   for a, b, _ in RATIOS if a in median and b in median},
        "decode_bound_tps": bound,
        "decode_share_of_bound": {k: median[k]["tg"] / v for k, v in bound.items()},
    }


def table(results: dict, c: SpeedConfig) -> str:
    """The results as markdown: one table of ratios over the shapes, then the absolute numbers."""
    shapes = [s for s in c.shapes if s in results["shapes"]]
    lines = [f"Prefill pp{c.n_prompt} and decode tg{c.n_gen} ratios, {c.threads} threads, medians of {c.rounds} "
             f"interleaved rounds; read bandwidth {results['bandwidth'] / 1e9:.1f} GB/s.", "",
             "| comparison | " + " | ".join(f"{s} prefill | {s} decode" for s in shapes) + " |",
             "|---|" + "---|---|" * len(shapes)]
    for a, b, what in RATIOS:
        key = f"{a} / {b}"
        if not any(key in results["shapes"][s]["ratios"] for s in shapes):
            continue
        cells = []
        for s in shapes:
            r = results["shapes"][s]["ratios"].get(key)
            cells += [f"{r['pp']:.3f}x", f"{r['tg']:.3f}x"] if r else ["-", "-"]
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    lines += ["", "| shape | stock MiB | grouped MiB | ODP pruned share | stock decode t/s (share of bound) | "
              "ODP decode t/s (share of bound) | stock prefill t/s |", "|---|---|---|---|---|---|---|"]
    for s in shapes:
        r = results["shapes"][s]
        m, share = r["median"], r["decode_share_of_bound"]
        lines.append(f"| {s} | {r['sizes']['stock'] / 2**20:.0f} | {r['sizes']['grouped'] / 2**20:.0f} | "
                     f"{m['odp on fused'].get('pruned', 0.0):.3f} | {m['stock']['tg']:.1f} ({share['stock']:.2f}) | "
                     f"{m['odp on fused']['tg']:.1f} ({share['odp on fused']:.2f}) | {m['stock']['pp']:.1f} |")
    return "\n".join(lines) + "\n"


def run_speed_bench(c: SpeedConfig) -> dict:
    from .llama.build import BuildConfig, build_llama

    unknown = [s for s in c.shapes if s not in SHAPES]
    if unknown:
        raise Mc2ggufError(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    if c.rounds < 1:
        raise Mc2ggufError("--rounds must be at least 1")
    c.work.mkdir(parents=True, exist_ok=True)
    bin_dir = build_llama().bin_dir
    unpatched_bin = None
    if c.unpatched:
        _note("the unpatched build of the same commit (once; minutes)")
        unpatched_bin = build_llama(BuildConfig.unpatched(tools=("llama-bench",))).bin_dir
    bandwidth = read_bandwidth(c.threads)
    _note(f"read bandwidth {bandwidth / 1e9:.1f} GB/s at {c.threads} threads")
    results = {"bandwidth": bandwidth, "config": {k: str(v) if isinstance(v, Path) else v
                                                  for k, v in asdict(c).items()}, "shapes": {}}
    for name in c.shapes:
        results["shapes"][name] = bench_shape(name, c, bin_dir, unpatched_bin, bandwidth)
    (c.work / "speed.json").write_text(json.dumps(results, indent=1))
    (c.work / "speed.md").write_text(table(results, c))
    return results


README_BEGIN, README_END = "<!-- speed results: begin -->", "<!-- speed results: end -->"


def update_readme(readme: Path, work: Path) -> None:
    """Replace the README's speed section (between the two markers) with this run's table."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise Mc2ggufError(f"{readme} has no speed section ({README_BEGIN} ... {README_END})")
    head, rest = text.split(README_BEGIN, 1)
    body = (work / "speed.md").read_text()
    readme.write_text(head + README_BEGIN + "\n" + body + README_END + rest.split(README_END, 1)[1])
