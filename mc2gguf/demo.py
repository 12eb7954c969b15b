"""``mc2gguf demo``: the main job on an embedded default model, for a first run on a new machine.

By default: the real-weights reference MoE (``mc2gguf build-reference``, SmolLM2-135M-Instruct turned into a
Mixtral; built once and cached), compressed by PMQ to 2.5 bits per expert weight with each expert in its own
type, then run by the patched llama.cpp with ODP pruning on, printing its text and the measured share of
pruned expert slots. Calibration and the candidate types are cut to a demo's size so it takes minutes;
``mc2gguf convert`` defaults to the paper's full calibration and a palette of seven types.

``--tiny`` instead converts a small seeded random Mixtral to one type: seconds, but random text.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from .convert import convert
from .gguf.inspect import render, summarize
from .llama.build import LlamaBuild, build_llama
from .paths import C4_SAMPLE
from .pmq import PMQOptions, run_pmq
from .quant.types import QuantType, quant_type
from .reference import build_reference_moe
from .testmodel import build_tiny_mixtral, default_tokenizer

# A demo's measurement: 32 windows of 512 tokens and four candidate types. Its time goes to quantizing every
# expert to every candidate (0.1-0.5 s per matrix and type), so the default palette of seven types (and the
# default 128 x 2048 tokens) takes about half an hour on 2 cores for this model.
DEMO_NSAMPLES = 32
DEMO_SEQLEN = 512
DEMO_PALETTE = "IQ2_XXS,Q2_K,Q3_K,Q4_K"


def run_demo(workdir: Path, prompt: str, bpw: float) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    build = build_llama()
    model = build_reference_moe(evaluate=False)  # its perplexity (15 min on 2 cores) is the bench's business
    print(f"reference MoE: {model.path}")
    out = workdir / f"reference-moe-{bpw:g}bpw.gguf"
    calib = (C4_SAMPLE,) if C4_SAMPLE.is_file() else ()  # else: text the model samples
    work_dir = workdir / "pmq-work"  # measurements kept: a second run only writes
    # What `mc2gguf convert` runs for the command line printed below; every other option at its default.
    opts = PMQOptions(calib=calib, nsamples=DEMO_NSAMPLES, seqlen=DEMO_SEQLEN, bpw=float(bpw),
                      palette=tuple(quant_type(t).name for t in DEMO_PALETTE.split(",")))
    argv = ["convert", str(model.path), str(out), "--bpw", str(bpw), *(a for c in calib for a in ("--calib", str(c))),
            "--nsamples", str(DEMO_NSAMPLES), "--seqlen", str(DEMO_SEQLEN), "--palette", DEMO_PALETTE,
            "--work-dir", str(work_dir), "--force"]
    print("$ mc2gguf " + " ".join(argv), flush=True)
    result = run_pmq(model.path, out, opts, force=True, work_dir=work_dir)
    print(f"wrote {result.out} ({result.size:,} bytes) and its report {result.out}.report.json/.png")
    print(render(summarize(out)).split("\n\n")[0])
    _generate(build, out, prompt, 64)


def run_tiny_demo(workdir: Path, qtype: QuantType, prompt: str) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    build = build_llama()
    model_dir = workdir / "tiny-mixtral"
    if not (model_dir / "config.json").is_file():
        build_tiny_mixtral(model_dir, default_tokenizer(workdir), seed=0)
    out = workdir / f"tiny-mixtral-{qtype.name}.gguf"
    convert(model_dir, out, qtype, force=True)
    print(render(summarize(out)).split("\n\n")[0])
    _generate(build, out, prompt, 32)


def _generate(build: LlamaBuild, model: Path, prompt: str, n_tokens: int) -> None:
    """Greedy text (with llama.cpp's repetition penalty: a 135M model loops without it) from the patched
    llama-completion, then its MoE pruning counter."""
    print(f"\n$ llama-completion -m {model} -p {prompt!r} -n {n_tokens} --temp 0 --repeat-penalty 1.2", flush=True)
    proc = subprocess.run(
        [str(build.binary("llama-completion")), "-m", str(model), "-p", prompt, "-n", str(n_tokens), "--temp", "0",
         "--repeat-penalty", "1.2", "-no-cnv", "--no-warmup"],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace",
    )
    print()
    if proc.returncode != 0:
        raise SystemExit(f"llama-completion failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    counter = re.search(r"MoE pruned slots = .*", proc.stderr)
    if counter:
        print(counter[0])
