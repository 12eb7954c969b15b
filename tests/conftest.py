"""Shared fixtures: the pinned llama.cpp build and seeded tiny Mixtral checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZER = SHARED / "tokenizers" / "tok512" / "tokenizer.model"


@pytest.fixture(scope="session")
def llama_build():
    """The pinned, patched llama.cpp (built on first use, then cached; CI builds it before the tests)."""
    from mc2gguf.llama.build import build_llama

    return build_llama()


@pytest.fixture(scope="session")
def tokenizer_model() -> Path:
    """The shared 512-piece SentencePiece model (``../shared`` sits beside the checkout, in CI too)."""
    if not TOKENIZER.is_file():
        pytest.fail(f"the shared tokenizer {TOKENIZER} is missing (../shared must sit beside the checkout)")
    return TOKENIZER


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory, tokenizer_model) -> Path:
    """A seeded random Mixtral (hidden 256, experts 512, 2 layers, 4 experts, top-2), one shard per layer."""
    from mc2gguf.testmodel import build_tiny_mixtral

    return build_tiny_mixtral(tmp_path_factory.mktemp("tiny-mixtral"), tokenizer_model, seed=0)
