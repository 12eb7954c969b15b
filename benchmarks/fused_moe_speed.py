"""Speed of the fused MoE graph (patches 0010-0013) against the graph of ordinary ops it replaces (not a test).

    python3 benchmarks/fused_moe_speed.py --work /tmp/fused-speed [--shapes mixtral,qwen3] [--rounds 3]

For each shape, seeded random weights (speed does not depend on values) in files made with llama-quantize
(--pure): a stock Q3_K file; a type-grouped file (experts cycling through Q2_K, Q3_K, Q4_K, as PMQ mixes them;
other tensors Q3_K); a same-type split (Q3_K experts in three groups: the graph's cost without the kernel mix);
the stock file with ODP metadata (mu calibrated as mc2gguf calibrates it, on llama.cpp's own router logits).
llama-bench runs every file with the fused graph and with LLAMA_MOE_FUSED=0 (the graph built from ordinary ops
that devices without the fused ops get, as the patch series built it before the fused ops), rounds interleaved,
and prints the ratios of the medians. The results are kept in ``--work``; a second run re-measures only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SHAPES = {
    # hidden, expert FFN, experts, top-k, layers (layers kept low: 2 cores, 24 GiB)
    "mixtral": dict(hidden=2048, ffn=7168, experts=8, top_k=2, layers=2),
    "qwen3": dict(hidden=2048, ffn=768, experts=64, top_k=8, layers=2),
}
GROUP_TYPES = ("Q2_K", "Q3_K", "Q4_K")


def sh(cmd: list, env: dict | None = None) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{proc.stderr[-3000:]}")
    return proc.stdout


def make_files(shape: str, work: Path, bin_dir: Path) -> dict[str, Path]:
    from test_llama_moe import odp_kv, rewrite

    from mc2gguf.convert import convert
    from mc2gguf.odp import calibrate_mu
    from mc2gguf.paths import TOKENIZER_512
    from mc2gguf.quant.types import quant_type
    from mc2gguf.testmodel import TinyMixtralConfig, TinyQwen3MoeConfig, build_tiny_mixtral, build_tiny_qwen3moe

    s = SHAPES[shape]
    out = work / shape
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / f"{name}.gguf" for name in ("stock", "grouped", "split", "odp")}
    if all(f.exists() for f in files.values()):
        return files
    hf = out / "hf"
    if shape == "mixtral":
        config = TinyMixtralConfig(hidden_size=s["hidden"], intermediate_size=s["ffn"], num_hidden_layers=s["layers"],
                                   num_attention_heads=16, num_key_value_heads=4, num_local_experts=s["experts"],
                                   num_experts_per_tok=s["top_k"])
        build_tiny_mixtral(hf, TOKENIZER_512, seed=0, config=config, dtype=__import__("torch").float16)
    else:
        config = TinyQwen3MoeConfig(hidden_size=s["hidden"], moe_intermediate_size=s["ffn"],
                                    num_hidden_layers=s["layers"], num_attention_heads=16, num_key_value_heads=4,
                                    head_dim=128, num_experts=s["experts"], num_experts_per_tok=s["top_k"])
        build_tiny_qwen3moe(hf, seed=0, config=config, dtype=__import__("torch").float16)
    f16 = out / "f16.gguf"
    if not f16.exists():
        convert(hf, f16, quant_type("F16"))
    pure = {}
    for t, ftype in (("Q2_K", "Q2_K"), ("Q3_K", "Q3_K_S"), ("Q4_K", "Q4_K_S")):
        pure[t] = out / f"pure-{t}.gguf"
        if not pure[t].exists():
            sh([bin_dir / "llama-quantize", "--pure", f16, pure[t], ftype, "2"])
    n_exp = s["experts"]
    cycle = [e % len(GROUP_TYPES) for e in range(n_exp)]
    groups = {f"blk.{il}.ffn_{p}_exps": cycle for il in range(s["layers"]) for p in ("up", "gate", "down")}
    rewrite(pure["Q3_K"], files["grouped"], groups=groups, group_sources=[pure[t] for t in GROUP_TYPES])
    rewrite(pure["Q3_K"], files["split"], groups=groups)
    files["stock"].write_bytes(pure["Q3_K"].read_bytes())

    # ODP: mu = calibrate_mu of the top-2 weight ratios of 256 random tokens, nothing protected
    import torch
    from mc2gguf.llama.runtime import eval_tokens

    tokens = torch.randint(3, 500, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    run = eval_tokens(files["stock"], tokens, capture=("ffn_moe_logits",), prune=None)
    mu = []
    for il in range(s["layers"]):
        logits = torch.from_numpy(np.concatenate(run["tensors"][f"ffn_moe_logits-{il}"])).float()
        top = torch.topk(logits.softmax(-1), 2, dim=-1).values
        mu.append(calibrate_mu(top[:, 1] / top[:, 0]))
    rewrite(files["stock"], files["odp"], set_kv=odp_kv(mu, [float("inf")] * s["layers"], 0.0))
    return files


def bench(bin_dir: Path, path: Path, fused: bool, prune: bool | None, args) -> dict:
    env = {**os.environ, "LLAMA_MOE_FUSED": "1" if fused else "0"}
    cmd = [bin_dir / "llama-bench", "-m", path, "-t", "2", "-p", str(args.n_prompt), "-n", str(args.n_gen),
           "-r", "1", "-o", "json"]
    if prune is not None:
        cmd += ["--moe-prune", "1" if prune else "0"]
    rows = json.loads(sh(cmd, env))
    out = {}
    for r in rows:
        out["pp" if r["n_prompt"] else "tg"] = r["avg_ts"]
        if r.get("moe_pruned") is not None:
            out.setdefault("pruned", r["moe_pruned"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--shapes", default="mixtral,qwen3")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-prompt", type=int, default=256)
    ap.add_argument("--n-gen", type=int, default=64)
    args = ap.parse_args()
    from mc2gguf.llama.build import find_llama_build

    bin_dir = find_llama_build().bin_dir
    results = {}
    for shape in args.shapes.split(","):
        files = make_files(shape, args.work, bin_dir)
        configs = {
            "stock": (files["stock"], True, None),
            "grouped fused": (files["grouped"], True, None),
            "grouped ops": (files["grouped"], False, None),
            "split fused": (files["split"], True, None),
            "split ops": (files["split"], False, None),
            "odp off": (files["odp"], True, False),
            "odp on fused": (files["odp"], True, True),
            "odp on ops": (files["odp"], False, True),
        }
        samples = {name: [] for name in configs}
        for r in range(args.rounds):
            for name, (path, fused, prune) in configs.items():
                samples[name].append(bench(bin_dir, path, fused, prune, args))
                print(f"[{shape} round {r + 1}] {name}: {samples[name][-1]}", file=sys.stderr, flush=True)
        med = {name: {k: statistics.median(x[k] for x in xs) for k in xs[0]} for name, xs in samples.items()}
        results[shape] = {"median": med, "size_bytes": {k: f.stat().st_size for k, f in files.items()}}
        print(f"\n## {shape} {SHAPES[shape]} ({args.rounds} rounds, pp{args.n_prompt}/tg{args.n_gen}, 2 threads)")
        for a, b in (("grouped fused", "stock"), ("grouped ops", "stock"), ("grouped fused", "grouped ops"),
                     ("split fused", "stock"), ("split ops", "stock"), ("odp on fused", "odp off"),
                     ("odp on ops", "odp off"), ("odp on fused", "odp on ops")):
            print(f"{a:>14} / {b:<12}: prefill {med[a]['pp'] / med[b]['pp']:.3f}x  decode {med[a]['tg'] / med[b]['tg']:.3f}x")
        print("pruned share (odp on):", med["odp on fused"].get("pruned"), med["odp on ops"].get("pruned"))
        print("sizes:", results[shape]["size_bytes"])
    (args.work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
