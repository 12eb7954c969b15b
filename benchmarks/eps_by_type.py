"""PMQ's eps (the MoE layer's output error with one expert quantized, GPTQ onto the type's real grid) of every
expert of some layers, for any candidate types: which types a palette should offer.

    python3 benchmarks/eps_by_type.py MODEL_DIR --calib ../shared/data/c4/c4-sample.jsonl \\
        --layers 0,7 --types Q2_K,IQ2_S,Q3_K,IQ3_S,Q4_K,IQ4_XS

Prints one line per layer and expert (``layer expert TYPE:eps ...``), then, for each pair of types given as
``--compare A/B`` (repeatable), the median, least and largest ratio eps_A / eps_B over the experts.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from mc2gguf.archs import adapter_for
from mc2gguf.text import load_calibration
from mc2gguf.pmq.calibrate import calibrate_layer
from mc2gguf.checkpoint import Checkpoint
from mc2gguf.quant.types import quant_type
from mc2gguf.pmq.measure import measure_eps, quantizer, unit_projections


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="Hugging Face Mixtral directory")
    p.add_argument("--calib", type=Path, action="append", required=True, help="calibration text (repeatable)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eps-tokens", type=int, default=1024)
    p.add_argument("--layers", default="0", help="comma-separated layer indices")
    p.add_argument("--types", default="Q2_K,IQ2_S,Q3_K,IQ3_S,IQ3_XXS,Q4_K,IQ4_XS,Q5_K")
    p.add_argument("--compare", action="append", default=[], help="A/B: ratio of two types' eps (repeatable)")
    args = p.parse_args()

    adapter = adapter_for(Checkpoint(args.model))
    cal = load_calibration(args.model, args.calib, args.nsamples, args.seqlen, seed=0)
    palette = [quant_type(t) for t in args.types.split(",")]
    layers = sorted(int(i) for i in args.layers.split(","))
    table: list[dict[str, float]] = []
    h = adapter.embed(cal.tokens)
    with torch.inference_mode():
        for i in range(layers[-1] + 1):
            layer = adapter.load_layer(i)
            h, calibration = calibrate_layer(adapter, layer, h, args.eps_tokens, seed=0)
            if i not in layers:
                continue
            eps = measure_eps(adapter, layer, calibration, unit_projections("expert", True), palette, quantizer("gptq"))
            for (expert, _), by_type in sorted(eps.items()):
                table.append(by_type)
                print(i, expert, " ".join(f"{t}:{e:.3f}" for t, e in by_type.items()), flush=True)
    for pair in args.compare:
        a, b = pair.split("/")
        ratios = [row[a] / row[b] for row in table]
        print(f"{a}/{b} over {len(ratios)} experts: median {statistics.median(ratios):.2f}, "
              f"least {min(ratios):.2f}, largest {max(ratios):.2f}")


if __name__ == "__main__":
    main()
