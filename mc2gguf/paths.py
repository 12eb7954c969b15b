"""Where mc2gguf keeps and finds files: its cache, and the project's shared data beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

#: ``../shared`` beside the checkout (calibration and evaluation text, tokenizers); absent in a wheel install.
SHARED = Path(__file__).resolve().parents[2] / "shared"
C4_SAMPLE = SHARED / "data" / "c4" / "c4-sample.jsonl"
TINYSTORIES = SHARED / "data" / "tinystories" / "tinystories-2MiB.txt"
WIKITEXT_TEST = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
TOKENIZER_512 = SHARED / "tokenizers" / "tok512" / "tokenizer.model"
#: the 49152-token byte-level BPE tokenizer (SmolLM2's) of the Qwen3-MoE test models
BPE_TOKENIZER = SHARED / "tokenizers" / "smollm2-bpe"


def cache_root() -> Path:
    """Builds, downloads and cached metadata: ``$MC2GGUF_CACHE``, default ``~/.cache/mc2gguf``."""
    return Path(os.environ.get("MC2GGUF_CACHE", Path.home() / ".cache" / "mc2gguf"))
