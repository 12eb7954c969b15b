"""``mc2gguf demo``: the whole path on an embedded default model, for a first run on a new machine.

Builds the pinned llama.cpp (cached), writes a small seeded random Mixtral, converts it and generates
text with llama.cpp. The model is random, so the text is too: the demo shows the pipeline works end to end.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from .convert import convert
from .inspect_gguf import render, summarize
from .llama_build import build_llama
from .qtypes import QuantType
from .testmodel import build_tiny_mixtral, default_tokenizer


def run_demo(workdir: Path, qtype: QuantType, prompt: str) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    build = build_llama()
    model_dir = workdir / "tiny-mixtral"
    if not (model_dir / "config.json").is_file():
        build_tiny_mixtral(model_dir, default_tokenizer(workdir), seed=0)
    out = workdir / f"tiny-mixtral-{qtype.name}.gguf"
    convert(model_dir, out, qtype, force=True)
    print(render(summarize(out)).split("\n\n")[0])
    print(f"\n$ llama-completion -m {out} -p {prompt!r} -n 32 --temp 0")
    subprocess.run(
        [str(build.binary("llama-completion")), "-m", str(out), "-p", prompt, "-n", "32", "--temp", "0",
         "-no-cnv", "--no-warmup"],
        check=True, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    print()
